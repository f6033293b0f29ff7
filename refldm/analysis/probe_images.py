"""Test images that probe what a VAE keeps and loses, drawn by code (no downloads).

Each function returns an RGB PIL image of size x size pixels (size a multiple of 8):

    lines       thin black lines 1, 2, 3 and 4 pixels wide: horizontal, vertical and diagonal
    text        the same words in PIL's built-in bitmap font at 1x, 2x and 3x (about 11, 22, 33 px tall)
    zone_plate  cos(pi * r^2 / size): the frequency rises from 0 at the centre to Nyquist at the edge
    checkers    checkerboards of 1, 2, 4 and 8 pixel squares, one per quadrant
    flat        flat regions of saturated colours with hard borders
    gradient    smooth ramps: red-green across, brightness down
    noise       fine grain: uniform noise of +-48 grey levels around mid-grey (seed 0)

docs/why-latent.md shows what the built-in VAE does to each (``refldm vae-report --probes``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PROBES", "probe", "lines", "text", "zone_plate", "checkers", "flat", "gradient", "noise"]


def _check(size: int) -> None:
    if size < 32 or size % 8:
        raise ValueError(f"probe images: size must be a multiple of 8 and at least 32, got {size}")


def _image(pixels):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")


def lines(size: int = 128):
    """Black lines on white, 1-4 px wide: four horizontal, four vertical, two diagonals."""
    from PIL import Image, ImageDraw

    _check(size)
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    step = size // 10
    for i, width in enumerate((1, 2, 3, 4)):
        y = step * (1 + i)
        d.line([(size // 2, y), (size - step // 2, y)], fill="black", width=width)      # horizontal
        x = step * (1 + i)
        d.line([(x, size // 2), (x, size - step // 2)], fill="black", width=width)      # vertical
    d.line([(step // 2, step // 2), (size // 2 - step // 2, size // 2 - step // 2)], fill="black", width=1)
    d.line([(size // 2, size - step // 2), (size - step // 2, size // 2)], fill="black", width=2)
    return im


def text(size: int = 128):
    """'Ag 17' in PIL's built-in bitmap font, scaled 1x, 2x, 3x by pixel repetition, black on white."""
    from PIL import Image, ImageDraw, ImageFont

    _check(size)
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
        else ImageFont.load_default()
    im = Image.new("RGB", (size, size), "white")
    y = 2
    for scale in (1, 2, 3):
        word = "Ag 17" if scale > 1 else "Ag 17 thin text"
        box = font.getbbox(word)
        glyphs = Image.new("RGB", (box[2] + 1, box[3] + 1), "white")
        ImageDraw.Draw(glyphs).text((0, 0), word, fill="black", font=font)
        glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.NEAREST)
        im.paste(glyphs.crop((0, 0, min(glyphs.width, size - 2), glyphs.height)), (2, y))
        y += glyphs.height + 4
        if y >= size:
            break
    return im


def zone_plate(size: int = 128):
    """A zone plate: 127.5 + 127.5 cos(pi r^2 / size), r from the centre. The local frequency is
    r / size cycles per pixel: 0 at the centre, 0.5 (Nyquist) at the middle of each edge; outside that
    circle (where it would alias) the image is mid-grey."""
    _check(size)
    y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2
    r2 = x * x + y * y
    v = np.where(r2 <= (size / 2) ** 2, 127.5 + 127.5 * np.cos(np.pi * r2 / size), 127.5)
    return _image(np.repeat(np.round(v)[..., None], 3, axis=2))


def checkers(size: int = 128):
    """Four checkerboards: squares of 1, 2, 4 and 8 pixels (periods 2 to 16 pixels)."""
    _check(size)
    half = size // 2
    out = np.zeros((size, size), dtype=np.uint8)
    y, x = np.mgrid[0:half, 0:half]
    for (qy, qx), square in zip(((0, 0), (0, 1), (1, 0), (1, 1)), (1, 2, 4, 8)):
        out[qy * half:(qy + 1) * half, qx * half:(qx + 1) * half] = 255 * (((y // square) + (x // square)) % 2)
    return _image(np.repeat(out[..., None], 3, axis=2))


def flat(size: int = 128):
    """A 4 x 4 grid of flat, saturated colours with hard borders."""
    _check(size)
    colours = np.array([[230, 25, 25], [25, 180, 60], [30, 60, 220], [250, 210, 20],
                        [240, 130, 20], [150, 40, 180], [20, 200, 220], [240, 50, 230],
                        [255, 255, 255], [0, 0, 0], [128, 128, 128], [120, 70, 20],
                        [0, 128, 128], [128, 0, 0], [170, 255, 195], [0, 0, 128]], dtype=np.uint8)
    cell = size // 4
    idx = (np.arange(size) // cell).clip(0, 3)
    return _image(colours[idx[:, None] * 4 + idx[None, :]])


def gradient(size: int = 128):
    """Smooth ramps: red rises and green falls from left to right; brightness falls from top to bottom."""
    _check(size)
    t = np.linspace(0.0, 1.0, size)
    shade = (1.0 - 0.75 * t)[:, None]                              # rows
    rgb = np.stack([255 * t[None, :] * shade, 255 * (1 - t[None, :]) * shade,
                    np.broadcast_to(160 * shade, (size, size))], axis=-1)
    return _image(np.round(rgb))


def noise(size: int = 128, seed: int = 0):
    """Fine grain: mid-grey plus uniform noise in [-48, 48], independent per pixel and channel."""
    _check(size)
    rng = np.random.default_rng(seed)
    return _image(128 + rng.integers(-48, 49, size=(size, size, 3)))


PROBES = {"lines": lines, "text": text, "zone_plate": zone_plate, "checkers": checkers, "flat": flat,
          "gradient": gradient, "noise": noise}


def probe(name: str, size: int = 128):
    """The probe image `name` (one of PROBES) at size x size."""
    if name not in PROBES:
        raise ValueError(f"unknown probe image {name!r} (one of {', '.join(PROBES)})")
    return PROBES[name](size)
