"""Draw docs/img/control-preprocessors.png: one picture through each of refldm's control preprocessors.

    python tools/control_figure.py [INPUT.png] [-o docs/img/control-preprocessors.png]

Without INPUT, a drawn scene (sky, sun, house, tree, ground, a little noise). PIL only; the preprocessors
are refldm/core/control_images.py.
"""

from __future__ import annotations

import argparse
import os

import numpy
from PIL import Image, ImageDraw

from refldm.core import control_images as ci

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS_IMG = os.path.join(HERE, "..", "docs", "img")


def scene(size: int = 256, seed: int = 0):
    """A small drawn landscape, (size, size, 3) uint8: smooth regions, straight and curved edges, texture."""
    u = size / 256
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    for y in range(size):                                   # sky: a vertical gradient
        d.line([(0, y), (size, y)], fill=(90 + y * 100 // size, 150 + y * 60 // size, 235))
    d.ellipse([190 * u, 20 * u, 235 * u, 65 * u], fill=(255, 220, 90))                       # sun
    d.rectangle([0, 180 * u, size, size], fill=(90, 160, 70))                                # ground
    d.rectangle([50 * u, 120 * u, 140 * u, 190 * u], fill=(200, 120, 80))                   # house
    d.polygon([(40 * u, 122 * u), (95 * u, 80 * u), (150 * u, 122 * u)], fill=(150, 50, 50))  # roof
    d.rectangle([85 * u, 150 * u, 105 * u, 190 * u], fill=(90, 60, 40))                     # door
    d.rectangle([170 * u, 130 * u, 180 * u, 195 * u], fill=(100, 70, 40))                   # trunk
    d.ellipse([150 * u, 90 * u, 200 * u, 145 * u], fill=(40, 120, 50))                      # crown
    rng = numpy.random.default_rng(seed)
    a = numpy.asarray(im, dtype=numpy.float64) + rng.normal(0, 4, (size, size, 3))
    return numpy.clip(a, 0, 255).astype(numpy.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", default=None)
    p.add_argument("-o", "--output", default=os.path.join(DOCS_IMG, "control-preprocessors.png"))
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    if args.input is None:
        a = scene(args.size)
    else:
        with Image.open(args.input) as im:
            a = numpy.asarray(im.convert("RGB"))[:args.size, :args.size].copy()
    panels = [("input", a), ("canny 100/200", ci.canny(a, 100, 200)), ("scribble", ci.scribble(a)),
              ("blur sigma 3", ci.blur(a, 3.0)), ("tile x8", ci.tile(a, 8)), ("shuffle", ci.shuffle(a, seed=0)),
              ("color 32", ci.color(a, 32))]
    s, label = args.size, 18
    sheet = Image.new("RGB", (len(panels) * (s + 4), s + label), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, img) in enumerate(panels):
        sheet.paste(Image.fromarray(img).convert("RGB"), (k * (s + 4), label))
        draw.text((k * (s + 4) + 4, 3), name, fill="black")
    sheet.save(args.output, optimize=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
