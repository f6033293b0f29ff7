"""Fine-tune only the VAE's decoder, with the encoder frozen (as Stability did for SD's "ft-MSE" VAE).

The first stage (train_vae.py) learns the latent space; after it the encoder is frozen, the latents
the U-Net trains on are fixed, and the decoder alone can keep improving: sharper edges, truer shapes.
Because the encoder does not change, this can run at the same time as train_unet.py.

Loss as in train_vae.py without the KL term (nothing upstream of the latent is trained):

    L = sum_px w(px) * (D(z) - x)^2 / sum_px w(px),   z ~ q(z|x) from the frozen encoder

with a larger weight on shape pixels, since what is left to learn is the shapes' outlines.

    python tools/train_tiny/finetune_decoder.py --workdir runs/train_tiny     # WORKDIR/vae -> WORKDIR/vae_ft
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
from common import data
from train_vae import batch, evaluate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/train_tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--restarts", default="6000:1e-3",
                   help="cosine cycles STEPS:PEAK_LR that follow the first (--steps, --lr) one")
    p.add_argument("--fg-weight", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=50)
    args = p.parse_args(argv)

    torch = common.setup_torch(args.seed + 1, args.threads)
    from diffusers import AutoencoderKL

    work = Path(args.workdir)
    log = common.Log(work / "decoder.log")
    ckpt = work / "decoder_ckpt.safetensors"
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    trained = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    if ckpt.exists():
        start = common.load_checkpoint(ckpt, {"vae": vae}, opt)["step"]
        log(f"resumed from step {start}")
    else:
        log(f"decoder fine-tuning, {sum(p.numel() for p in trained) / 1e6:.2f}M parameters; {vars(args)}")
    _, held_images = data.sample(256, seed=10_000 + args.seed, held_out=True)

    restarts = common.parse_cycles(args.restarts)
    total = args.steps + sum(n for n, _ in restarts)
    t0 = time.time()
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = common.lr_with_restarts(step, (args.steps, args.lr, args.warmup), restarts)
        images, fg = batch(args.batch, seed=5_000_000 + 1_000 * args.seed + step)
        x = common.to_tensor(images)
        w = 1.0 + (args.fg_weight - 1.0) * torch.from_numpy(fg)[:, None]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()                   # frozen encoder
        recon = vae.decode(z).sample
        loss = (((recon - x) ** 2 * w).sum(dim=(1, 2, 3)) / (3 * w.sum(dim=(1, 2, 3)))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()

        done = step + 1
        if done % 10 == 0 or done == total:
            log(f"step {done}/{total} loss {loss.item():.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(done - start) / (time.time() - t0):.2f} it/s")
        if done % args.eval_every == 0 or done == total:
            log(f"step {done}: held-out PSNR {evaluate(torch, vae, held_images):.2f} dB")
        if done % args.ckpt_every == 0 or done == total:
            common.save_checkpoint(ckpt, {"vae": vae}, opt, {"step": done})

    vae.save_pretrained(work / "vae_ft", safe_serialization=True)
    log(f"done; saved {work / 'vae_ft'} (encoder and scaling_factor unchanged)")


if __name__ == "__main__":
    main()
