"""Write the vae-report figures of docs/why-latent.md (docs/img/why-latent-*.png) with the built-in VAE.

    python tools/why_latent_figures.py            # from the repository root; about a minute on a CPU

Each figure is one ``refldm vae-report`` run on image files written to a temporary folder: three
images from the built-in model's own training distribution (tools/train_tiny/data.py: one flat-coloured
shape per 64x64 image), then the probe images of refldm/analysis/probe_images.py at 128x128. The numbers
printed are the ones the page quotes.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "train_tiny"))

from refldm.analysis import probe_images  # noqa: E402
from refldm.cli import main  # noqa: E402

FIGURES = {
    "why-latent-shapes.png": ["shape-0", "shape-1", "shape-2"],
    "why-latent-lines-text.png": ["lines", "text"],
    "why-latent-frequency.png": ["zone_plate", "checkers"],
    "why-latent-flat-gradient-noise.png": ["flat", "gradient", "noise"],
}


def main_() -> int:
    import data  # tools/train_tiny/data.py: the training images of the built-in model

    _, shapes = data.sample(3, seed=7)
    out_dir = os.path.join(ROOT, "docs", "img")
    with tempfile.TemporaryDirectory() as tmp:
        for name in probe_images.PROBES:
            probe_images.probe(name, 128).save(os.path.join(tmp, f"{name}.png"))
        for i, image in enumerate(shapes):
            Image.fromarray(np.asarray(image)).save(os.path.join(tmp, f"shape-{i}.png"))
        for figure, names in FIGURES.items():
            print(f"## {figure}")
            rc = main(["vae-report", *[os.path.join(tmp, f"{n}.png") for n in names],
                       "-o", os.path.join(out_dir, figure)])
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main_())
