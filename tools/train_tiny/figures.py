"""The PNGs of docs/default-model.md: dataset examples, a sample grid, VAE reconstructions.

Drawn with PIL only (images scaled up 3x with nearest-neighbour so pixels stay visible).

    python tools/train_tiny/figures.py --model refldm/default_model --out docs/img
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import common
import numpy as np
from common import data
from PIL import Image, ImageDraw, ImageFont

SCALE = 3
PROMPTS = [
    "a large red circle in the center on a white background",
    "a medium blue square in the top left on a gray background",
    "a large yellow star in the center on a black background",
    "a medium green triangle in the bottom right on a white background",
    "a large purple cross in the top center on a gray background",
    "a medium orange diamond in the center left on a black background",
]


def grid(images, captions=None, cols=6, caption_lines=4):
    """Tile (N, 64, 64, 3) uint8 images, each with an optional caption below it."""
    font = ImageFont.load_default()
    cell = 64 * SCALE
    text_h = 12 * caption_lines + 4 if captions else 0
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (cell + 6) + 6, rows * (cell + text_h + 6) + 6), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        x, y = 6 + (i % cols) * (cell + 6), 6 + (i // cols) * (cell + text_h + 6)
        canvas.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (x, y))
        if captions:
            for j, line in enumerate(textwrap.wrap(captions[i], 30)[:caption_lines]):
                draw.text((x, y + cell + 2 + 12 * j), line, fill="black", font=font)
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(common.HERE.parent.parent / "refldm" / "default_model"))
    p.add_argument("--out", default=str(common.HERE.parent.parent / "docs" / "img"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch = common.setup_torch(0, 2)
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    # 1. the dataset
    attrs, images = data.sample(12, seed=1)
    grid(images, [a.caption() for a in attrs]).save(out / "default-model-dataset.png")

    # 2. samples: each prompt with two seeds
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS + PROMPTS
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    res = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
               output_type="np")
    samples = (res.images * 255).round().astype(np.uint8)
    grid(samples, prompts).save(out / "default-model-samples.png")

    # 3. VAE reconstructions of held-out images: originals on top, reconstructions below
    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae", torch_dtype=torch.float32).eval()
    _, originals = data.sample(8, seed=20_000, held_out=True)
    with torch.no_grad():
        x = common.to_tensor(originals)
        recon = common.to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    psnrs = common.psnr(recon, originals)
    captions = ["original"] * 8 + [f"reconstruction {v:.1f} dB" for v in psnrs]
    grid(np.concatenate([originals, recon]), captions, cols=8, caption_lines=1).save(
        out / "default-model-reconstructions.png")
    print(f"wrote {out}/default-model-{{dataset,samples,reconstructions}}.png")


if __name__ == "__main__":
    main()
