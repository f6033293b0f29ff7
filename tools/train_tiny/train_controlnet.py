"""Train a tiny ControlNet for refldm's built-in model: an edge image decides where the shape goes.

The built-in model (refldm/default_model, trained by train_unet.py on data.py's shapes) places a shape where
its caption says ("in the top left"). This tool teaches a ControlNet to place it where a *control image*
says instead, with the position left out of the caption:

    control  y = canny(image)                 refldm's own Canny (refldm/core/control_images.py), 100/200,
                                              white edges on black: the outline of the shape, at its place
    caption    "a red circle on a white background"          (position always dropped; size and
                                                             background dropped at random; 10% "")

The ControlNet is diffusers' ``ControlNetModel.from_unet(unet)``: a copy of the U-Net's encoder (its weights
to start with) plus the conditioning embedding (convs from the 64x64 control image down to the 8x8 latent
grid) and the zero convolutions. The U-Net and the text encoder stay frozen; the loss is the one the U-Net was
trained with (v-prediction, Min-SNR-5 weight; train_unet.py explains it), with the ControlNet's residuals
added to the U-Net's skips:

    r, r_mid = controlnet(z_t, t, c, y)
    L = w(t) || unet(z_t, t, c; skips + r, mid + r_mid) - v ||^2

Afterwards it is measured with refldm itself (refldm.pipelines.controlnet.StableDiffusionControlNetPipeline,
NumPy): for every one of the 9 grid cells, prompts without a position and a control image drawn there; the
evaluator of evaluate.py reads where the shape landed. The same prompts without the ControlNet give the
baseline. The figure for docs/control.md (docs/img/control-worked-example.png): one prompt and one seed, two
control images, two layouts.

    nice -n 10 python tools/train_tiny/train_controlnet.py --workdir runs/controlnet

The run behind docs/control.md's figure: the defaults (batch 32, AdamW at 5e-4, 22 minutes of wall time on a
shared 2-core machine: 808 steps, loss 0.21 -> 0.15), then 36 measurement prompts: the shape landed in the
control image's cell 36 times of 36 with the ControlNet, 4 of 36 (chance) without. The ControlNet is 2.6 M
parameters (10.5 MB in float32), a copy of the built-in U-Net's encoder, so it is not shipped: the tool
makes it again. ``--figure-only`` redraws the figure from WORKDIR/controlnet.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common
import numpy as np
from common import data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_MODEL = ROOT / "refldm" / "default_model"
FIGURE = ROOT / "docs" / "img" / "control-worked-example.png"


def control_image(image: np.ndarray) -> np.ndarray:
    """(64, 64, 3) uint8 picture -> (64, 64, 3) uint8 edge image: refldm's Canny, thresholds 100 / 200."""
    import sys
    sys.path.insert(0, str(ROOT))
    from refldm.core.control_images import canny
    edges = canny(image, 100, 200)
    return np.repeat(edges[:, :, None], 3, axis=2)


def caption(attrs, rng, drop_attr: float, drop_caption: float) -> str:
    if rng.random() < drop_caption:
        return ""
    drop = ["position"] + [k for k in ("size", "background") if rng.random() < drop_attr]
    return attrs.caption(drop)


def train(args, log):
    torch = common.setup_torch(args.seed, args.threads)
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = Path(args.model)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    sched = DDPMScheduler.from_pretrained(model / "scheduler")
    for m in (text_encoder, unet, vae):
        m.float().requires_grad_(False)                # the built-in model is stored in float16
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(args.embedding))
    controlnet.train()
    n_params = sum(p.numel() for p in controlnet.parameters())
    log(f"ControlNet: {n_params:,} parameters ({4 * n_params / 1e6:.1f} MB in float32)")

    # the data: images, their edge images, their latents (posterior mean and std, z drawn afresh each time)
    attrs, images = data.sample(args.images, seed=args.seed + 11)
    controls = np.stack([control_image(im) for im in images])
    log(f"{len(images)} images and edge images; {np.mean(controls.reshape(len(images), -1).max(1) == 0):.1%} "
        "with no edge")
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(images), 256):
            post = vae.encode(common.to_tensor(images[i:i + 256])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)
    del vae
    y_all = torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255.0      # [0, 1], as the pipelines pass it
    scaling = float(json.loads((model / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215))

    text_cache = {}

    def embed(texts):
        missing = [t for t in set(texts) if t not in text_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.no_grad():
                hs = text_encoder(ids).last_hidden_state
            text_cache.update(zip(missing, hs))
        return torch.stack([text_cache[t] for t in texts])

    abar = sched.alphas_cumprod
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    start, step, recent = time.time(), 0, []
    while step < args.steps and time.time() - start < 60 * args.minutes:
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.from_numpy(rng.integers(0, len(images), size=args.batch))
        texts = [caption(attrs[int(i)], rng, args.drop_attr, args.drop_caption) for i in idx]
        c = embed(texts)
        z0 = scaling * (mean[idx] + std[idx] * torch.randn_like(mean[idx]))
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,))
        eps = torch.randn_like(z0)
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        z_t, v = a * z0 + s * eps, a * eps - s * z0
        down, mid = controlnet(z_t, t, c, controlnet_cond=y_all[idx], return_dict=False)
        pred = unet(z_t, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        snr = abar[t] / (1 - abar[t])
        w = (torch.clamp(snr, max=args.min_snr) + 1) / (snr + 1)
        loss = (w * ((pred - v) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            log(f"step {step}: loss {np.mean(recent):.4f} ({(time.time() - start) / step:.2f} s/step)")
            recent = []
    log(f"trained {step} steps in {(time.time() - start) / 60:.1f} min")
    out = Path(args.workdir) / "controlnet"
    controlnet.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"saved {out} ({size / 1e6:.2f} MB)")
    return out, step


# -- the measurement and the figure, with refldm (NumPy) ---------------------------------------------------------

def position_of(image) -> str | None:
    import evaluate
    return evaluate.read_image(np.asarray(image))["position"]


def measure(args, controlnet_dir, log) -> dict:
    """Per grid cell, prompts without a position, a control image drawn there: where does the shape land?"""
    import sys
    sys.path.insert(0, str(ROOT))
    from refldm.pipelines.controlnet import StableDiffusionControlNetPipeline
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(args.model), str(controlnet_dir))
    plain = StableDiffusionPipeline.from_pretrained(str(args.model))
    rng = np.random.default_rng(1234)
    hits = {"controlnet": 0, "no controlnet": 0}
    n = 0
    for k in range(args.eval):
        shape = data.SHAPES[rng.integers(len(data.SHAPES))]
        colour = data.COLOUR_NAMES[rng.integers(len(data.COLOUR_NAMES))]
        size = data.SIZE_NAMES[rng.integers(len(data.SIZE_NAMES))]
        bg = data.BACKGROUND_NAMES[rng.integers(len(data.BACKGROUND_NAMES))]
        where = data.POSITION_NAMES[k % 9]
        a = data.Attributes(shape, colour, size, where, bg)
        prompt = a.caption(["position"])
        control = control_image(data.render(a, seed=10_000 + k))
        kw = dict(num_inference_steps=args.eval_steps, guidance_scale=args.guidance, seed=k, progress=False)
        got = position_of(pipe(prompt, image=control, **kw).images[0])
        base = position_of(plain(prompt, **kw).images[0])
        hits["controlnet"] += got == where
        hits["no controlnet"] += base == where
        n += 1
    result = {k: v / n for k, v in hits.items()}
    result["n"] = n
    log(f"position of the shape = the control image's cell: {result['controlnet']:.0%} with the ControlNet, "
        f"{result['no controlnet']:.0%} without (chance 11%), {n} prompts, {args.eval_steps} steps, "
        f"guidance {args.guidance}")
    return result


def figure(args, controlnet_dir, path, log):
    """One prompt, one seed; no control, then two control images and what each gives."""
    import sys
    sys.path.insert(0, str(ROOT))
    from PIL import Image, ImageDraw
    from refldm.pipelines.controlnet import StableDiffusionControlNetPipeline
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(args.model), str(controlnet_dir))
    prompt = args.prompt
    kw = dict(num_inference_steps=args.eval_steps, guidance_scale=args.guidance, seed=args.figure_seed,
              progress=False)
    plain = pipe.base(prompt, **kw).images[0]
    tiles, labels = [plain], ["no control"]
    for where in args.figure_places:
        shape = "circle"
        a = data.Attributes(shape, "red", "medium", where, "white")
        control = control_image(data.render(a, seed=1))
        out = pipe(prompt, image=control, **kw).images[0]
        tiles += [Image.fromarray(control), out]
        labels += [f"control: {shape} edges, {where}", "refldm + ControlNet"]
        log(f"figure: control {shape} {where} -> shape read at {position_of(out)}")
    scale, pad, text_h = 3, 8, 30
    side = 64 * scale
    canvas = Image.new("RGB", (len(tiles) * (side + pad) + pad, side + text_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        x = pad + k * (side + pad)
        canvas.paste(tile.convert("RGB").resize((side, side), Image.NEAREST), (x, pad))
        for j, line in enumerate(label.split(", ")):
            draw.text((x, pad + side + 3 + 12 * j), line, fill="black")
    canvas.save(path, optimize=True)
    log(f"wrote {path}: prompt {prompt!r}, seed {args.figure_seed}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/controlnet")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=22.0, help="stop training after this much wall time")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--embedding", type=int, nargs="+", default=[16, 32, 64, 64],
                   help="conditioning_embedding_out_channels (4 entries: 3 halvings, 64 -> 8 pixels)")
    p.add_argument("--drop-attr", type=float, default=0.3)
    p.add_argument("--drop-caption", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval", type=int, default=36, help="prompts for the measurement (4 per grid cell)")
    p.add_argument("--eval-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--prompt", default="a red circle on a white background")
    p.add_argument("--figure-seed", type=int, default=3)
    p.add_argument("--figure", default=str(FIGURE))
    p.add_argument("--figure-places", nargs=2, default=["bottom left", "top right"], choices=data.POSITION_NAMES,
                   help="where the figure's two control images put the shape")
    p.add_argument("--figure-only", action="store_true", help="draw the figure from WORKDIR/controlnet only")
    p.add_argument("--skip-training", action="store_true", help="measure and draw WORKDIR/controlnet only")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = common.Log(work / "controlnet.log")
    if args.skip_training or args.figure_only:
        out, steps = work / "controlnet", None
    else:
        out, steps = train(args, log)
    if args.figure_only:
        figure(args, out, args.figure, log)
        return
    result = measure(args, out, log)
    result["steps"] = steps
    common.write_json(work / "controlnet_eval.json", result)
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    figure(args, out, args.figure, log)


if __name__ == "__main__":
    main()
