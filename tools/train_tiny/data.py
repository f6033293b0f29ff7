"""The procedural dataset refldm's default model is trained on: one flat-coloured shape per 64x64 image.

Every image is drawn from five attributes, and its caption is spelled from the same five:

    shape       circle, square, triangle, star, cross, diamond
    colour      red, green, blue, yellow, purple, orange, cyan
    size        small, medium, large                  (outer radius 7, 10, 13 px)
    position    a 3x3 grid: top left ... center ... bottom right   (cell centres at 14, 32, 50 px)
    background  white, black, gray

    "a small red circle in the top left on a white background"

6 * 7 * 3 * 9 * 3 = 3402 attribute tuples. A tuple is *held out* when the SHA-256 of its full
caption is 0 modulo 10 (about 340 tuples); held-out tuples are never drawn for training, so the
evaluation asks the model for combinations it has never seen.

Inside a tuple each image varies a little: the centre moves by up to 2 px and the radius by up to
0.5 px. Shapes are drawn 4x supersampled and averaged down, so their edges are anti-aliased. Everything
is a pure function of a seed: `render(attrs, seed)` gives the same pixels on every machine.

Shapes are defined as point sets around their centre (cx, cy) with outer radius r, and every one of
them has its mass centroid at (cx, cy): the evaluator's position test reads the centroid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 200, 210),
}
SIZES = {"small": 7.0, "medium": 10.0, "large": 13.0}
# (row, column) of the 3x3 grid -> name used in the caption
POSITIONS = {
    (0, 0): "top left", (0, 1): "top center", (0, 2): "top right",
    (1, 0): "center left", (1, 1): "center", (1, 2): "center right",
    (2, 0): "bottom left", (2, 1): "bottom center", (2, 2): "bottom right",
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

IMAGE_SIZE = 64
CELL_CENTRES = (14.0, 32.0, 50.0)   # pixel coordinate of grid row/column 0, 1, 2
POSITION_JITTER = 2.0               # max shift of the centre, px
RADIUS_JITTER = 0.5                 # max change of the radius, px
SUPERSAMPLE = 4

COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS.values())
BACKGROUND_NAMES = tuple(BACKGROUNDS)


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str       # one of POSITION_NAMES
    background: str

    def caption(self, drop=()) -> str:
        """The caption; attributes named in `drop` ("size", "position", "background") are left out."""
        words = ["a"]
        if "size" not in drop:
            words.append(self.size)
        words += [self.colour, self.shape]
        if "position" not in drop:
            words += ["in the", self.position]
        if "background" not in drop:
            words += ["on a", self.background, "background"]
        return " ".join(words)

    def is_held_out(self) -> bool:
        """True for about one tuple in ten, chosen by the SHA-256 of the full caption."""
        digest = hashlib.sha256(self.caption().encode()).digest()
        return int.from_bytes(digest[:8], "big") % 10 == 0


def all_attributes() -> list[Attributes]:
    """Every attribute tuple, in a fixed order."""
    return [Attributes(s, c, z, p, b) for s in SHAPES for c in COLOURS for z in SIZES
            for p in POSITION_NAMES for b in BACKGROUNDS]


def split() -> tuple[list[Attributes], list[Attributes]]:
    """(train tuples, held-out tuples)."""
    tuples = all_attributes()
    return [a for a in tuples if not a.is_held_out()], [a for a in tuples if a.is_held_out()]


# ------------------------------------------------------------------------------------------------
# shapes as point-membership tests; x, y are offsets from the centre in units of the radius r
# (image y grows downwards, so "up" is negative y)

def _polygon_inside(x, y, vx, vy):
    """Even-odd rule: a point is inside when a ray to +x crosses the polygon's edges an odd number
    of times. (vx, vy) are the vertices in order."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def _star_vertices(points=5, inner=0.45):
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points   # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii * np.cos(angles), radii * np.sin(angles)


_TRIANGLE = (np.cos(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3), np.sin(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3))
_STAR = _star_vertices()
CROSS_ARM = 0.34    # half-width of a cross's arms, in units of r
SQUARE_HALF = 0.85  # half-side of a square, in units of r


def shape_mask(shape: str, x, y):
    """Boolean membership of the points (x, y) (offsets / r) in the unit `shape`."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (np.abs(x) <= SQUARE_HALF) & (np.abs(y) <= SQUARE_HALF)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= CROSS_ARM) & (ay <= 1.0)) | ((ay <= CROSS_ARM) & (ax <= 1.0))
    if shape == "triangle":   # equilateral, pointing up, centroid at the centre
        return _polygon_inside(x, y, *_TRIANGLE)
    if shape == "star":       # five points, one pointing up
        return _polygon_inside(x, y, *_STAR)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE, ss: int = SUPERSAMPLE):
    """Fraction of each pixel covered by the shape, (size, size) float32 in [0, 1], from an
    ss x ss grid of samples per pixel."""
    t = (np.arange(size * ss, dtype=np.float64) + 0.5) / ss      # sample positions, pixel units
    y, x = np.meshgrid((t - cy) / r, (t - cx) / r, indexing="ij")
    inside = shape_mask(shape, x, y).astype(np.float32)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def position_centre(position: str) -> tuple[float, float]:
    """(cx, cy) in pixels of a position name's grid cell."""
    for (row, col), name in POSITIONS.items():
        if name == position:
            return CELL_CENTRES[col], CELL_CENTRES[row]
    raise ValueError(f"unknown position {position!r}; expected one of {POSITION_NAMES}")


def render(attrs: Attributes, seed: int) -> np.ndarray:
    """One image, (64, 64, 3) uint8. The seed picks the small jitter of centre and radius."""
    rng = np.random.default_rng(seed)
    cx, cy = position_centre(attrs.position)
    cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    r = SIZES[attrs.size] + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER)
    alpha = coverage(attrs.shape, cx, cy, r)[..., None]                   # (64, 64, 1)
    fg = np.asarray(COLOURS[attrs.colour], dtype=np.float32)
    bg = np.asarray(BACKGROUNDS[attrs.background], dtype=np.float32)
    image = alpha * fg + (1.0 - alpha) * bg                              # over-compositing
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def sample_attributes(n: int, seed: int, held_out: bool = False) -> list[Attributes]:
    """The attribute tuples `sample(n, seed, held_out)` draws, without rendering the images."""
    train, held = split()
    pool = held if held_out else train
    picks = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return [pool[i] for i in picks]


def sample(n: int, seed: int, held_out: bool = False):
    """n (attributes, image) pairs drawn uniformly from the train (or held-out) tuples.

    Returns (list of Attributes, (n, 64, 64, 3) uint8 array). Image i uses the seed
    `seed * 1_000_003 + i`, so a prefix of a longer draw equals a shorter draw.
    """
    attrs = sample_attributes(n, seed, held_out)
    images = np.stack([render(a, seed * 1_000_003 + i) for i, a in enumerate(attrs)]) if n else \
        np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return attrs, images


def all_caption_words() -> list[str]:
    """Every caption of every tuple (all drop variants), for building the BPE vocabulary."""
    drops = [(), ("size",), ("position",), ("background",), ("size", "position"), ("size", "background"),
             ("position", "background"), ("size", "position", "background")]
    return [a.caption(d) for a in all_attributes() for d in drops]


if __name__ == "__main__":   # a quick look: python tools/train_tiny/data.py out.png
    import sys

    from PIL import Image
    attrs, images = sample(64, seed=0)
    grid = images.reshape(8, 8, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(512, 512, 3)
    Image.fromarray(grid).save(sys.argv[1] if len(sys.argv) > 1 else "dataset.png")
    for a in attrs[:8]:
        print(a.caption())
    train, held = split()
    print(f"{len(train)} train tuples, {len(held)} held out")
