"""Train the autoencoder: diffusers' AutoencoderKL, 64x64x3 images <-> 8x8x4 latents.

The VAE is trained alone, before the diffusion model, as in Stable Diffusion. Its loss per image:

    L = sum_px w(px) * (D(z) - x)^2 / sum_px w(px)   +   kl_weight * KL(q(z|x) || N(0, I))

    z ~ q(z|x) = N(mean(x), diag(exp(logvar(x))))        (the encoder's "DiagonalGaussian")
    KL = 1/2 * sum(mean^2 + exp(logvar) - 1 - logvar)    (summed over the 8*8*4 latent elements)

x is in [-1, 1]. The weight w is 1 on background pixels and `fg_weight` on pixels of the shape:
the shape covers 1-15% of an image, and without the weight the decoder is happy drawing the
background first and the shape late. The KL term is tiny (SD uses 1e-6 too): it only keeps the
latents near unit scale and the posterior a little noisy, so the decoder tolerates the small
errors the diffusion model will make.

Images are drawn fresh for every batch from the training tuples (data.py), so there is no epoch and
no over-fitting; the held-out images are only used to report PSNR. After training, the latent
scaling factor is measured as SD's was: 1 / std of the latents of training images, so that the
diffusion model sees latents of unit variance (the pipeline multiplies by it after encoding and
divides before decoding).

    python tools/train_tiny/train_vae.py --workdir runs/train_tiny
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
from common import data


def batch(n: int, seed: int):
    """n training images and their foreground masks (where the pixel differs from the background)."""
    attrs, images = data.sample(n, seed=seed)
    bg = np.array([data.BACKGROUNDS[a.background] for a in attrs], dtype=np.int16)[:, None, None, :]
    fg = (np.abs(images.astype(np.int16) - bg).max(axis=-1) > 0).astype(np.float32)
    return images, fg


def evaluate(torch, vae, images) -> float:
    """Mean PSNR (dB) of decode(mode(encode(x))) over the given uint8 images."""
    vae.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = common.to_tensor(images[i:i + 64])
            out.append(common.to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    vae.train()
    return float(common.psnr(np.concatenate(out), images).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/train_tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--fg-weight", type=float, default=4.0)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--logvar-init", type=float, default=None,
                   help="start the posterior's log-variance here (a bias on quant_conv) instead of ~0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--ckpt-every", type=int, default=50)
    args = p.parse_args(argv)

    torch = common.setup_torch(args.seed, args.threads)
    from diffusers import AutoencoderKL

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = common.Log(work / "vae.log")
    ckpt = work / "vae_ckpt.safetensors"

    vae = AutoencoderKL(**common.VAE_CONFIG)
    if args.logvar_init is not None:
        # quant_conv's 8 outputs are (mean, logvar) x 4 channels. A freshly initialised encoder has
        # logvar ~ 0, i.e. noise of std 1 on latents that are still tiny: the decoder would start
        # from pure noise. Starting at a low logvar lets the decoder see the signal from step one.
        with torch.no_grad():
            vae.quant_conv.bias[common.VAE_CONFIG["latent_channels"]:] = args.logvar_init
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    if ckpt.exists():
        start = common.load_checkpoint(ckpt, {"vae": vae}, opt)["step"]
        log(f"resumed from step {start}")
    else:
        log(f"AutoencoderKL {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters; {vars(args)}")
    _, held_images = data.sample(256, seed=10_000 + args.seed, held_out=True)

    t0 = time.time()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, args.steps, args.lr, args.warmup)
        images, fg = batch(args.batch, seed=1_000 * args.seed + step + 1)
        x = common.to_tensor(images)                                   # (B, 3, 64, 64) in [-1, 1]
        w = 1.0 + (args.fg_weight - 1.0) * torch.from_numpy(fg)[:, None]  # (B, 1, 64, 64)

        posterior = vae.encode(x).latent_dist                         # mean, logvar: (B, 4, 8, 8)
        z = posterior.sample()                                        # mean + std * eps
        recon = vae.decode(z).sample                                  # (B, 3, 64, 64)
        rec = ((recon - x) ** 2 * w).sum(dim=(1, 2, 3)) / (3 * w.sum(dim=(1, 2, 3)))
        kl = posterior.kl()                                           # (B,) summed over latent elements
        loss = rec.mean() + args.kl_weight * kl.mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

        done = step + 1
        if done % 10 == 0 or done == args.steps:
            rate = (done - start) / (time.time() - t0)
            log(f"step {done}/{args.steps} loss {loss.item():.5f} rec {rec.mean().item():.5f} "
                f"kl {kl.mean().item():.1f} lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} it/s")
        if done % args.eval_every == 0 or done == args.steps:
            log(f"step {done}: held-out PSNR {evaluate(torch, vae, held_images):.2f} dB")
        if done % args.ckpt_every == 0 or done == args.steps:
            common.save_checkpoint(ckpt, {"vae": vae}, opt, {"step": done})

    # The latent scaling factor: 1 / std of the latent means of 2048 training images.
    vae.eval()
    images, _ = batch(2048, seed=999_999)
    with torch.no_grad():
        means = torch.cat([vae.encode(common.to_tensor(images[i:i + 128])).latent_dist.mean
                           for i in range(0, len(images), 128)])
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(work / "vae", safe_serialization=True)
    final = evaluate(torch, vae, held_images)
    log(f"done: held-out PSNR {final:.2f} dB; latent mean {means.mean().item():.3f} std {means.std().item():.3f}"
        f" -> scaling_factor {scaling:.5f}; saved {work / 'vae'}")


if __name__ == "__main__":
    main()
