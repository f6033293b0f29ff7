"""Write the figures of docs/watching-the-loop.md (docs/img/loop-*.png) from `refldm explain`'s data.

    python tools/watching_the_loop_figures.py       # from the repository root; seconds on a CPU

The pictures are the page's own (refldm/analysis/explain.py: the same run, the same colour maps), laid out
in strips: the noisy latent and the x_0 estimate per step, what the prompt changes per step, the final image
at several guidance scales, and the attention maps of some of the prompt's words. With chromium installed it
also takes a screenshot of the top of the page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from refldm.about import DEFAULT_MODEL  # noqa: E402
from refldm.analysis.explain import _heat, _stretch, _upscale, explain, write_html  # noqa: E402
from refldm.pipelines.sd import StableDiffusionPipeline  # noqa: E402

OUT = os.path.join(ROOT, "docs", "img")
PROMPT = "a large red circle in the top left on a white background"


def strip(rows, labels, captions, cell=96, pad=4, left=110, top=18):
    """A grid: one row per entry of `rows` (a list of uint8 images), a label left of each row, captions on top."""
    n = max(len(r) for r in rows)
    widths = [max(r[k].shape[1] * cell // r[k].shape[0] for r in rows if k < len(r)) for k in range(n)]
    W = left + sum(widths) + pad * (n + 1)
    H = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(captions):
        x = left + pad + sum(widths[:j]) + pad * j
        draw.text((x + 2, 3), text, fill="black")
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = top + i * (cell + pad) + pad
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for j, pixels in enumerate(row):
            x = left + pad + sum(widths[:j]) + pad * j
            im = Image.fromarray(pixels).resize((pixels.shape[1] * cell // pixels.shape[0], cell), Image.NEAREST)
            canvas.paste(im, (x, y))
    return canvas


def main() -> int:
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    ex = explain(pipe, PROMPT)
    steps = range(ex.steps)
    caps = [f"step {i + 1}" for i in steps]
    strip([[ex.step_images[i]["x_t"] for i in steps], [ex.step_images[i]["x0"] for i in steps]],
          ["x_t (decoded)", "x_0 estimate"], caps).save(os.path.join(OUT, "loop-steps.png"), optimize=True)
    picks = [0, 2, 5, 9]
    strip([[ex.step_images[i][k] for k in ("eps_u", "eps_c", "diff")] for i in picks],
          [f"step {i + 1}, t={ex.timesteps[i]:g}" for i in picks],
          ["eps_u (4 channels)", "eps_c", "eps_c - eps_u (own scale)"], cell=48).save(
        os.path.join(OUT, "loop-guidance-steps.png"), optimize=True)
    finals = []
    scales = (1.0, 2.0, 3.0, 5.0, 8.0)
    for w in scales:
        out = pipe(PROMPT, num_inference_steps=ex.steps, guidance_scale=w, seed=0, progress=False)
        finals.append(np.asarray(out.images[0]))
    strip([finals], ["same seed"], [f"w = {w:g}" for w in scales]).save(
        os.path.join(OUT, "loop-guidance-scales.png"), optimize=True)
    words = [3, 4, 7, 8, 11]
    image = np.asarray(ex.image.convert("RGB"), np.float64)
    hw = max(ex.attention, key=lambda s: s[0] * s[1])
    rows = [[_upscale(_heat(_stretch(ex.attention[hw][k])), 8) for k in words],
            [np.round(image * (0.25 + 0.75 * _upscale(_stretch(ex.attention[hw][k]), 8)[..., None]))
             .astype(np.uint8) for k in words]]
    strip(rows, [f"{hw[0]}x{hw[1]} maps", "on the image"], [ex.tokens[k - 1] for k in words]).save(
        os.path.join(OUT, "loop-attention.png"), optimize=True)
    exe = shutil.which("chromium")
    if exe:
        with tempfile.TemporaryDirectory() as tmp:
            page = os.path.join(tmp, "explain.html")
            write_html(ex, page)
            shot = os.path.join(tmp, "shot.png")
            subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={tmp}/profile", "--window-size=1100,900", f"--screenshot={shot}",
                            "file://" + page], capture_output=True, timeout=120)
            Image.open(shot).convert("RGB").save(os.path.join(OUT, "loop-page.png"), optimize=True)
    print(f"steps {ex.steps}, timesteps {ex.timesteps}")
    print("rms eps_c - eps_u per step:", [round(s["rms_diff"], 3) for s in ex.step_stats])
    print("rms eps_c per step:", [round(s["rms_c"], 3) for s in ex.step_stats])
    print("unet flops/step", ex.cost["unet_flops"], "decode", ex.cost["decode_flops"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
