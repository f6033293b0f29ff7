"""Train the text encoder and the U-Net together on VAE latents (the diffusion stage of SD).

1. Tokenizer: learn a tiny CLIP-format BPE vocabulary from every caption the dataset can produce
   (bpe.py) and save it; transformers' CLIPTokenizer loads it back.
2. Latents: encode `--images` training images once with the trained VAE and cache the posterior's
   mean and std (z = mean + std * eps is drawn afresh every time an image is used).
3. Diffusion training, the DDPM objective with v-prediction (Salimans & Ho 2022):

       z0 = scaling_factor * (mean + std * eps_vae)            (B, 4, 8, 8)
       t ~ U{0, ..., 999},  eps ~ N(0, I),  a = sqrt(alphabar_t),  s = sqrt(1 - alphabar_t)
       z_t = a z0 + s eps                                      (scheduler.add_noise)
       v   = a eps - s z0                                      (scheduler.get_velocity)
       c = text_encoder(tokens(caption)).last_hidden_state     (B, 32, 64)
       L = w(t) * || unet(z_t, t, c) - v ||^2,   w(t) = (min(SNR, 5) + 1) / (SNR + 1)

   Why v and this weight. Written as an error on the clean latent z0, an epsilon loss weighs
   timestep t by SNR(t) = alphabar / (1 - alphabar), which is 0.005-0.1 over the noisiest steps,
   exactly where the sampler decides *where* the shape goes. Trained that way (1500 steps, with
   Min-SNR-5 weighting) the model learned colour and shape but put shapes anywhere: position 11%,
   chance. A v loss weighs t by SNR + 1, so the noisy steps count fully; w(t) then caps the weight
   of the nearly clean steps at 6 (the "Min-SNR-gamma" idea of Hang et al. 2023, plus one), so that
   in terms of z0 every step weighs min(SNR, 5) + 1.

   Captions: each image's caption is spelled from its attributes, and size, position and background
   are each left out with probability `--drop-attr` (so "a red circle" is a prompt the model knows).
   With probability `--drop-caption` the whole caption is replaced by "" (the unconditional branch
   classifier-free guidance needs: eps = eps("") + g * (eps(prompt) - eps(""))).

   An exponential moving average (EMA) of both networks' weights is what gets exported.

    python tools/train_tiny/train_unet.py --workdir runs/train_tiny
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import bpe
import common
import numpy as np
from common import data

DROPPABLE = ("size", "position", "background")


def encode_latents(torch, vae, n: int, seed: int, log):
    """Encode n training images; returns (attrs, mean (n,4,8,8), std (n,4,8,8)) as float32 tensors."""
    attrs, images = data.sample(n, seed=seed)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 256):
            post = vae.encode(common.to_tensor(images[i:i + 256])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            if (i // 256) % 10 == 0:
                log(f"encoded {i + len(post.mean)}/{n} images")
    return attrs, torch.cat(means), torch.cat(stds)


class Captions:
    """Turns attribute tuples into token ids, with attribute and caption dropout; caches ids."""

    def __init__(self, tokenizer, rng, drop_attr: float, drop_caption: float):
        self.tok, self.rng = tokenizer, rng
        self.drop_attr, self.drop_caption = drop_attr, drop_caption
        self.cache = {}

    def ids(self, text: str):
        if text not in self.cache:
            self.cache[text] = self.tok(text, padding="max_length", max_length=self.tok.model_max_length,
                                        truncation=True)["input_ids"]
        return self.cache[text]

    def __call__(self, attrs):
        texts = []
        for a in attrs:
            if self.rng.random() < self.drop_caption:
                texts.append("")
            else:
                texts.append(a.caption([k for k in DROPPABLE if self.rng.random() < self.drop_attr]))
        return [self.ids(t) for t in texts]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/train_tiny")
    p.add_argument("--vae", default=None, help="trained VAE folder (default: WORKDIR/vae)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=8192, help="training images encoded to latents")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--restarts", default="4000:5e-4",
                   help="cosine cycles STEPS:PEAK_LR that follow the first (--steps, --lr) one")
    p.add_argument("--channels", default=",".join(map(str, common.UNET_CONFIG["block_out_channels"])),
                   help="the U-Net's block_out_channels, one per level (8x8, 4x4, 2x2)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay (ramped up from 0 early on)")
    p.add_argument("--drop-attr", type=float, default=0.15)
    p.add_argument("--drop-caption", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=100)
    args = p.parse_args(argv)

    torch = common.setup_torch(args.seed, args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    work = Path(args.workdir)
    log = common.Log(work / "unet.log")
    ckpt = work / "unet_ckpt.safetensors"

    # 1. tokenizer
    bpe.write_tokenizer(work / "tokenizer", data.all_caption_words(), common.MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")

    # 2. latents, cached on disk
    cache = work / f"latents_{args.images}_{args.seed}.safetensors"
    vae = AutoencoderKL.from_pretrained(args.vae or work / "vae").eval()
    scaling = vae.config.scaling_factor
    attrs = data.sample_attributes(args.images, seed=args.seed + 7)
    if cache.exists():
        from safetensors.torch import load_file
        t = load_file(cache)
        mean, std = t["mean"], t["std"]
    else:
        from safetensors.torch import save_file
        _, mean, std = encode_latents(torch, vae, args.images, args.seed + 7, log)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, cache)
    del vae
    log(f"{len(attrs)} latents, scaled std {float((mean * scaling).std()):.3f}")

    # 3. models
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **common.TEXT_CONFIG)
    text_encoder = CLIPTextModel(text_config)
    channels = [int(c) for c in args.channels.split(",")]
    unet = UNet2DConditionModel(**dict(common.UNET_CONFIG, block_out_channels=channels))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    models = {"unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="v_prediction")
    alphas_cumprod = noise_sched.alphas_cumprod                       # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = (torch.clamp(snr, max=args.min_snr) + 1) / (snr + 1)   # per timestep, v target

    start = 0
    if ckpt.exists():
        start = common.load_checkpoint(ckpt, models, opt)["step"]
        log(f"resumed from step {start}")
    else:
        log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
            f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f}M parameters, vocab "
            f"{len(tokenizer)}; {vars(args)}")

    captions = Captions(tokenizer, None, args.drop_attr, args.drop_caption)
    t0 = time.time()
    restarts = common.parse_cycles(args.restarts)
    total = args.steps + sum(n for n, _ in restarts)
    for step in range(start, total):
        rng = np.random.default_rng([args.seed, step])                # per-step stream: resumable
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = common.lr_with_restarts(step, (args.steps, args.lr, args.warmup), restarts)
        idx = torch.from_numpy(rng.integers(0, len(attrs), size=args.batch))
        captions.rng = rng
        ids = torch.tensor(captions([attrs[i] for i in idx.tolist()]))           # (B, 32)

        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling  # (B, 4, 8, 8)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)                      # a z0 + s eps
        target = noise_sched.get_velocity(z0, noise, t)               # a eps - s z0

        cond = text_encoder(ids).last_hidden_state                    # (B, 32, 64)
        pred = unet(zt, t, cond).sample                               # (B, 4, 8, 8)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_sample).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)

        done = step + 1
        if done % 10 == 0 or done == total:
            rate = (done - start) / (time.time() - t0)
            log(f"step {done}/{total} loss {loss.item():.4f} (unweighted {per_sample.mean().item():.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} it/s")
        if done % args.ckpt_every == 0 or done == total:
            common.save_checkpoint(ckpt, models, opt, {"step": done})

    ema_unet.save_pretrained(work / "unet", safe_serialization=True)
    ema_text.save_pretrained(work / "text_encoder", safe_serialization=True)
    log(f"done; saved {work / 'unet'} and {work / 'text_encoder'} (EMA weights)")


if __name__ == "__main__":
    main()
