"""Measure the default model: does an image show the colour, shape and position its prompt asks for?

The evaluator reads an image with plain pixel statistics, no learned model:

1. background: the median colour of the 1-pixel border, snapped to the nearest background colour;
2. colour: pixels far from the background (max channel difference > 60) are "core" pixels; the
   largest connected group of them is the shape; its median colour, snapped to the nearest of the
   palette's colours, is the shape's colour;
3. coverage: each pixel's alpha = how far it lies from the background towards the shape colour,
   a = clip(<p - bg, fg - bg> / |fg - bg|^2, 0, 1), inside the shape's group grown by 2 px;
4. position: the alpha-weighted centroid, read on the 3x3 grid (thirds of the image);
5. shape: for each candidate shape, draw it (data.coverage) centred on the centroid with the radius
   that gives it the measured area (sum of alpha); the one with the highest soft IoU
   sum(min(a, t)) / sum(max(a, t)) with the image wins;
6. size: the winning template's radius, snapped to the nearest of small/medium/large.

It is validated on ground-truth dataset images first (`--truth`), where it must score ~100%.

The model is then run through diffusers' StableDiffusionPipeline loaded from the exported folder
on 100 held-out prompts (attribute tuples never used in training), one fixed seed per prompt.
The VAE is scored separately: PSNR of decode(encode(x)) on held-out images.

    python tools/train_tiny/evaluate.py --model refldm/default_model --out runs/train_tiny/eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import numpy as np
from common import data
from scipy import ndimage

CORE_THRESHOLD = 60          # max channel difference from the background that marks a "core" pixel
PALETTE = np.array(list(data.COLOURS.values()), dtype=np.float64)
BACKDROPS = np.array(list(data.BACKGROUNDS.values()), dtype=np.float64)
# area of each shape drawn with radius 1 (measured on a large drawing)
UNIT_AREA = {s: float(data.coverage(s, 32.0, 32.0, 28.0).sum()) / 28.0 ** 2 for s in data.SHAPES}


def nearest(table, names, colour):
    return names[int(np.argmin(((table - colour) ** 2).sum(axis=1)))]


def read_image(image: np.ndarray) -> dict:
    """Attributes read from a (64, 64, 3) uint8 image: background, colour, shape, position, size
    (each None when no shape is found)."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    result = {"background": nearest(BACKDROPS, data.BACKGROUND_NAMES, bg),
              "colour": None, "shape": None, "position": None, "size": None}

    core = np.abs(img - bg).max(axis=-1) > CORE_THRESHOLD                 # (64, 64) bool
    labels, n = ndimage.label(core)
    if n == 0:
        return result
    sizes = ndimage.sum(core, labels, index=np.arange(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    fg = np.median(img[blob], axis=0)
    result["colour"] = nearest(PALETTE, data.COLOUR_NAMES, fg)

    d = fg - bg
    alpha = np.clip(((img - bg) @ d) / max(d @ d, 1e-6), 0.0, 1.0)      # (64, 64)
    alpha *= ndimage.binary_dilation(blob, iterations=2)
    area = alpha.sum()
    yy, xx = np.mgrid[0:64, 0:64] + 0.5                                 # pixel centres
    cx, cy = (alpha * xx).sum() / area, (alpha * yy).sum() / area
    col, row = min(int(cx * 3 / 64), 2), min(int(cy * 3 / 64), 2)
    result["position"] = data.POSITIONS[(row, col)]

    best, best_iou, best_r = None, -1.0, 0.0
    for shape in data.SHAPES:
        r = float(np.sqrt(area / UNIT_AREA[shape]))
        t = data.coverage(shape, cx, cy, r, ss=2)
        iou = np.minimum(alpha, t).sum() / np.maximum(alpha, t).sum()
        if iou > best_iou:
            best, best_iou, best_r = shape, iou, r
    result["shape"] = best
    result["size"] = min(data.SIZES, key=lambda k: abs(data.SIZES[k] - best_r))
    result["iou"] = float(best_iou)
    return result


ATTRS = ("colour", "shape", "position", "size", "background")


def score(attrs, images) -> dict:
    """Fraction of images whose read attribute equals the asked one, per attribute."""
    hits = {k: 0 for k in ATTRS}
    for a, im in zip(attrs, images):
        r = read_image(im)
        for k in ATTRS:
            hits[k] += r[k] == getattr(a, k)
    return {k: hits[k] / len(attrs) for k in ATTRS}


def held_out_prompts(n: int, seed: int = 0):
    """n distinct held-out attribute tuples, in a fixed shuffled order."""
    _, held = data.split()
    order = np.random.default_rng(seed).permutation(len(held))[:n]
    return [held[i] for i in order]


def generate(model: str, attrs, steps: int, guidance: float, scheduler: str, batch: int = 25):
    """One image per attribute tuple with diffusers' StableDiffusionPipeline; seed i for prompt i."""
    torch = common.setup_torch(0, 2)
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, local_files_only=True)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [a.caption() for a in attrs]
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(j) for j in range(i, min(i + batch, len(prompts)))]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np")
        images.append((out.images * 255).round().astype(np.uint8))
    return np.concatenate(images)


def vae_round_trip(model: str, n: int = 500, seed: int = 20_000):
    """The VAE round trip (posterior mode) on n held-out images: mean and 10th-percentile PSNR (dB),
    and the evaluator's scores on the reconstructions (an upper bound for the whole model)."""
    torch = common.setup_torch(0, 2)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(Path(model) / "vae", torch_dtype=torch.float32).eval()
    attrs, images = data.sample(n, seed=seed, held_out=True)
    out = []
    with torch.no_grad():
        for i in range(0, n, 100):
            x = common.to_tensor(images[i:i + 100])
            out.append(common.to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    recon = np.concatenate(out)
    p = common.psnr(recon, images)
    return float(p.mean()), float(np.percentile(p, 10)), score(attrs, recon)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(common.HERE.parent.parent / "refldm" / "default_model"))
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "euler"])
    p.add_argument("--truth", action="store_true", help="only validate the evaluator on dataset images")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--save-images", default=None, help="save the generated images (.npy)")
    args = p.parse_args(argv)

    attrs_t, images_t = data.sample(1000, seed=30_000, held_out=True)
    truth = score(attrs_t, images_t)
    print("evaluator on 1000 ground-truth held-out images: " + ", ".join(f"{k} {v:.1%}" for k, v in truth.items()))
    results = {"evaluator_on_ground_truth": truth}
    if not args.truth:
        mean, p10, recon_scores = vae_round_trip(args.model)
        print(f"VAE round trip on 500 held-out images: PSNR mean {mean:.2f} dB, 10th percentile {p10:.2f} dB; "
              "evaluator on the reconstructions: " + ", ".join(f"{k} {v:.1%}" for k, v in recon_scores.items()))
        attrs = held_out_prompts(args.prompts)
        t = time.time()
        images = generate(args.model, attrs, args.steps, args.guidance, args.scheduler)
        gen_s = time.time() - t
        model_scores = score(attrs, images)
        print(f"model on {len(attrs)} held-out prompts ({args.steps} {args.scheduler} steps, guidance "
              f"{args.guidance}, {gen_s:.0f} s): " + ", ".join(f"{k} {v:.1%}" for k, v in model_scores.items()))
        results.update(vae_psnr_mean=mean, vae_psnr_p10=p10, vae_reconstructions=recon_scores, model=model_scores, steps=args.steps,
                       guidance=args.guidance, scheduler=args.scheduler, prompts=len(attrs),
                       generation_seconds=gen_s)
        if args.save_images:
            np.save(args.save_images, images)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
