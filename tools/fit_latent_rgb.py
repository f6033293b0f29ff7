"""Fit the linear latent-to-RGB preview of a model by least squares on its own VAE decodes.

    rgb(z) ~= z W + b        z: the 4 latent channels of one latent pixel (the sampler's scaled latents),
                             rgb: the VAE decode of the latents, averaged over the f x f pixels above it

For images drawn by the model (prompts from its own caption grammar, several seeds, DDIM), the decoded
images are average-pooled to the latent grid and [z, 1] @ [W; b] = rgb is solved in the least-squares sense
on two thirds of the latent pixels; the RMS error (in the [-1, 1] image range) on the other third is printed
next to the fitted numbers, ready to paste into refldm/models/latent_rgb.py.

    python tools/fit_latent_rgb.py [MODEL_FOLDER] [--images 48]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm.about import DEFAULT_MODEL  # noqa: E402
from refldm.core.images import unscale_latents  # noqa: E402
from refldm.pipelines.sd import StableDiffusionPipeline  # noqa: E402

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
PLACES = ("top left", "center", "bottom right", "center left", "top right")
BACKGROUNDS = ("white", "black", "gray")


def samples(pipe, n: int, steps: int = 12):
    """(latent pixels (N, 4), pooled decoded rgb (N, 3)) from n images the model draws."""
    combos = list(itertools.product(SHAPES, COLOURS, PLACES, BACKGROUNDS))
    rng = np.random.default_rng(0)
    zs, rgbs = [], []
    for k in rng.choice(len(combos), n, replace=False):
        shape, colour, place, bg = combos[k]
        prompt = f"a large {colour} {shape} in the {place} on a {bg} background"
        z = np.asarray(pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, seed=int(k), sampler="ddim",
                            progress=False, output_type="latent").latents, np.float64)     # (1, 4, h, w)
        image = np.asarray(pipe.vae.decode(unscale_latents(z.astype(np.float32), pipe.vae.config)), np.float64)
        f = pipe.vae_scale_factor
        _, c, h, w = z.shape
        pooled = image.reshape(1, 3, h, f, w, f).mean(axis=(3, 5))                           # (1, 3, h, w)
        zs.append(z.transpose(0, 2, 3, 1).reshape(-1, c))
        rgbs.append(pooled.transpose(0, 2, 3, 1).reshape(-1, 3))
    return np.concatenate(zs), np.concatenate(rgbs)


def fit(z, rgb):
    """Least squares [z, 1] @ A = rgb; returns (W (C, 3), b (3,))."""
    design = np.concatenate([z, np.ones((len(z), 1))], axis=1)
    a, *_ = np.linalg.lstsq(design, rgb, rcond=None)
    return a[:-1], a[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--images", type=int, default=48)
    args = ap.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    z, rgb = samples(pipe, args.images)
    cut = 2 * len(z) // 3                                   # whole images: the pixels are in image order
    w, b = fit(z[:cut], rgb[:cut])
    held = np.concatenate([z[cut:], np.ones((len(z) - cut, 1))], axis=1) @ np.concatenate([w, b[None]])
    rms = float(np.sqrt(np.mean((held - rgb[cut:]) ** 2)))
    spread = float(rgb[cut:].std())
    print(f"# {args.images} images, {len(z)} latent pixels; fit on {cut}, held out {len(z) - cut}")
    print(f"# held-out RMS error {rms:.4f} (image range [-1, 1]; the pooled images' std is {spread:.4f})")
    print("factors = [")
    for row in w:
        print("    [" + ", ".join(f"{v: .4f}" for v in row) + "],")
    print("]")
    print("bias = [" + ", ".join(f"{v: .4f}" for v in b) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
