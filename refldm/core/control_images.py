"""Control images without a model: Canny edges as OpenCV computes them, and the simple preprocessors.

A ControlNet is trained on images made by a *preprocessor* ("annotator"): Canny edges, a scribble, a
blurred tile, a shuffled copy, a colour palette. The ones here need no network, only array code:

    canny(image, low, high)     cv2.Canny(image, low, high): white edges (255) on black, uint8 (H, W)
    scribble(image)             thick white strokes from the Canny edges (ControlNet's "fake scribble" recipe)
    blur(image, sigma)          a Gaussian blur (the "tile"/"blur" ControlNets' input)
    tile(image, factor)         down- then up-sampled: the detail gone, the layout kept ("tile_resample")
    shuffle(image, seed)        the content moved by a smooth random flow ("content shuffle")
    color(image, block)         the mean colours of block x block cells (T2I-Adapter's "color")

Images are uint8 arrays (H, W) or (H, W, 3), or PIL images; every function returns a uint8 array.

Canny (Canny 1986, "A Computational Approach to Edge Detection"), the way ``cv2.Canny`` does it in
integers (OpenCV's imgproc/src/canny.cpp), so that the edges agree pixel for pixel:

 1. gradients, 3x3 Sobel with the border replicated (no blur: cv2.Canny does not smooth):
        gx = [-1 0 1; -2 0 2; -1 0 1] * I,   gy = [-1 -2 -1; 0 0 0; 1 2 1] * I      (int16 range)
    a colour image: each pixel takes the gradient of the channel with the largest magnitude;
 2. magnitude m = |gx| + |gy| (L1, the default) or gx^2 + gy^2 (L2gradient, thresholds squared);
 3. non-maximum suppression: the direction falls in one of four sectors, decided in fixed point
    with tan(22.5 deg) ~ 13573 / 2^15, and m must beat its two neighbours across the edge
    (> on one side, >= on the other for the horizontal and vertical sectors, > on both diagonally);
    outside the image m = 0;
 4. hysteresis: a kept pixel with m > high is an edge; one with m > low is an edge when it is
    8-connected to an edge through such pixels. Thresholds are floored to integers, and swapped
    if low > high, as OpenCV does.

tests/test_control_images.py measures the agreement with cv2.Canny; docs/control.md reports it.
"""

from __future__ import annotations

import math

import numpy

__all__ = ["canny", "sobel", "gaussian_blur", "scribble", "blur", "tile", "shuffle", "color"]

# tan(22.5 deg) in the 15-bit fixed point of OpenCV's canny.cpp
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)   # 13573


def _as_uint8(image, what: str = "image"):
    """A PIL image or a uint8 array (H, W) / (H, W, C) -> a uint8 numpy array."""
    if hasattr(image, "mode") and hasattr(image, "size"):          # PIL
        image = numpy.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    a = numpy.asarray(image)
    if a.dtype != numpy.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {a.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or min(a.shape[:2]) < 1:
        raise ValueError(f"{what}: expected (H, W) or (H, W, 1|3|4) pixels, got shape {a.shape}")
    return a


def sobel(image):
    """3x3 Sobel derivatives with the border replicated (cv2.Sobel(ksize=3, BORDER_REPLICATE)):

        gx[i, j] = (I[i-1, j+1] + 2 I[i, j+1] + I[i+1, j+1]) - (I[i-1, j-1] + 2 I[i, j-1] + I[i+1, j-1])
        gy[i, j] = (I[i+1, j-1] + 2 I[i+1, j] + I[i+1, j+1]) - (I[i-1, j-1] + 2 I[i-1, j] + I[i-1, j+1])

    image (H, W) or (H, W, C) -> (gx, gy), int32 arrays of the image's shape."""
    a = numpy.asarray(image).astype(numpy.int32)
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (a.ndim - 2)
    p = numpy.pad(a, pad, mode="edge")                       # BORDER_REPLICATE
    h, w = a.shape[:2]

    def at(di, dj):                                          # I[i + di, j + dj] for every (i, j)
        return p[1 + di: 1 + di + h, 1 + dj: 1 + dj + w]

    smooth_rows = lambda dj: at(-1, dj) + 2 * at(0, dj) + at(1, dj)     # [1 2 1] down a column
    smooth_cols = lambda di: at(di, -1) + 2 * at(di, 0) + at(di, 1)     # [1 2 1] along a row
    return smooth_rows(1) - smooth_rows(-1), smooth_cols(1) - smooth_cols(-1)


def canny(image, low_threshold: float = 100, high_threshold: float = 200, L2gradient: bool = False,
          blur_sigma: float | None = None):
    """Canny edges as ``cv2.Canny(image, low_threshold, high_threshold, L2gradient=L2gradient)``
    (aperture 3; the module docstring lists the steps) -> uint8 (H, W), 255 on edges, 0 elsewhere.

    blur_sigma: blur first (`gaussian_blur`), which cv2.Canny never does; the ControlNet annotators
    call cv2.Canny on the image as it is, so the default is no blur."""
    a = _as_uint8(image)
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"canny: {name} must be a finite number >= 0, got {value!r}")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]                                       # cv2.Canny takes 1 or 3 channels; alpha dropped
    if blur_sigma is not None:
        a = gaussian_blur(a, blur_sigma)
    low, high = float(low_threshold), float(high_threshold)
    if low > high:
        low, high = high, low
    if L2gradient:                                            # compare gx^2 + gy^2 with squared thresholds
        low, high = min(32767.0, low) ** 2, min(32767.0, high) ** 2
    low, high = math.floor(low), math.floor(high)

    # 1.-2. gradients and magnitude; a colour pixel keeps the channel of largest magnitude (first on ties)
    gx, gy = sobel(a)
    mag = gx * gx + gy * gy if L2gradient else numpy.abs(gx) + numpy.abs(gy)
    if mag.ndim == 3:
        k = numpy.argmax(mag, axis=2)[:, :, None]             # argmax returns the first maximum
        gx, gy, mag = (numpy.take_along_axis(v, k, axis=2)[:, :, 0] for v in (gx, gy, mag))
    mag = mag.astype(numpy.int64)

    # 3. non-maximum suppression; M is m padded with zeros so that neighbours outside the image are 0
    h, w = mag.shape
    M = numpy.pad(mag, 1)
    nb = lambda di, dj: M[1 + di: 1 + di + h, 1 + dj: 1 + dj + w]   # m[i + di, j + dj]
    x = numpy.abs(gx).astype(numpy.int64)
    y = numpy.abs(gy).astype(numpy.int64) << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))                      # x * tan(67.5 deg) = x * (tan 22.5 + 2)
    horizontal = y < tg22x                                   # gradient near the x axis: compare left/right
    vertical = ~horizontal & (y > tg67x)                     # near the y axis: compare up/down
    s = numpy.where((gx < 0) != (gy < 0), -1, 1)             # the diagonal: up-left/down-right or the other
    # (an image row index grows downwards, so gx*gy > 0 points along the main diagonal)
    peak = numpy.where(horizontal, (mag > nb(0, -1)) & (mag >= nb(0, 1)),
                       numpy.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)),
                                   numpy.where(s > 0, (mag > nb(-1, -1)) & (mag > nb(1, 1)),
                                               (mag > nb(-1, 1)) & (mag > nb(1, -1)))))
    candidate = peak & (mag > low)                           # weak or strong
    strong = candidate & (mag > high)

    # 4. hysteresis: grow the strong pixels through 8-connected candidates (a stack, as OpenCV's)
    edges = strong.copy()
    stack = list(zip(*numpy.nonzero(strong)))
    cand = numpy.pad(candidate, 1)                           # no neighbours outside the image
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ii, jj = i + di, j + dj
                if cand[ii + 1, jj + 1] and not edges[ii, jj]:
                    edges[ii, jj] = True
                    stack.append((ii, jj))
    return numpy.where(edges, numpy.uint8(255), numpy.uint8(0))


def _gaussian_kernel(sigma: float):
    """OpenCV's getGaussianKernel for ksize = 0: radius round(3 sigma) (odd size 2r + 1, at least 3),
    g_k = exp(-k^2 / (2 sigma^2)) normalised to sum 1."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"blur: sigma must be a finite number > 0, got {sigma!r}")
    r = max(1, int(round(3 * sigma)))
    k = numpy.arange(-r, r + 1, dtype=numpy.float64)
    g = numpy.exp(-k * k / (2 * sigma * sigma))
    return g / g.sum()


def gaussian_blur(image, sigma: float):
    """Separable Gaussian blur, border reflected without repeating the edge (OpenCV's BORDER_REFLECT_101):
    out = round(g * (g * I)^T ...) with g from `_gaussian_kernel`. uint8 in, uint8 out (rounded half up)."""
    a = numpy.asarray(image)
    g = _gaussian_kernel(sigma)
    r = len(g) // 2
    out = a.astype(numpy.float64)
    for axis in (0, 1):
        if out.shape[axis] == 1:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        n = out.shape[axis]
        p = numpy.pad(out, pad, mode="reflect") if n > r else numpy.pad(out, pad, mode="symmetric")
        acc = numpy.zeros_like(out)
        for t, weight in enumerate(g):
            acc += weight * numpy.take(p, numpy.arange(t, t + n), axis=axis)
        out = acc
    return numpy.clip(numpy.floor(out + 0.5), 0, 255).astype(numpy.uint8)


def blur(image, sigma: float = 3.0):
    """The blur preprocessor: `gaussian_blur` of the image (uint8, same shape)."""
    return gaussian_blur(_as_uint8(image), sigma)


def scribble(image, low_threshold: float = 100, high_threshold: float = 200, sigma: float = 3.0):
    """Scribble from edges: ControlNet's fake-scribble recipe (its gradio_fake_scribble2image.py) with Canny
    in place of HED: blur the edge map and keep every pixel the blur reached,

        S = 255 where gaussian_blur(canny(I), sigma) > 4, else 0            (thick white strokes on black)."""
    edges = canny(image, low_threshold, high_threshold)
    return numpy.where(gaussian_blur(edges, sigma) > 4, numpy.uint8(255), numpy.uint8(0))


def _resize(a, size, resample):
    """uint8 (H, W[, C]) -> (size[1], size[0][, C]) with PIL's filter `resample` (a PIL.Image constant)."""
    from PIL import Image
    return numpy.asarray(Image.fromarray(a).resize(size, resample))


def tile(image, factor: int = 8):
    """The tile preprocessor ("tile_resample"): shrink by `factor` (box average) and enlarge back (bicubic),
    so the layout and colours stay and the detail goes. uint8, same shape."""
    from PIL import Image
    a = _as_uint8(image)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"tile: factor must be an integer >= 1, got {factor!r}")
    h, w = a.shape[:2]
    small = _resize(a, (max(1, w // factor), max(1, h // factor)), Image.BOX)
    return _resize(small, (w, h), Image.BICUBIC)


def color(image, block: int = 64):
    """T2I-Adapter's colour palette: the image shrunk by `block` (bicubic, as its annotator) and enlarged
    back with nearest neighbours, so each block x block cell holds one colour. uint8, same shape."""
    from PIL import Image
    a = _as_uint8(image)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"color: block must be an integer >= 1, got {block!r}")
    h, w = a.shape[:2]
    small = _resize(a, (max(1, w // block), max(1, h // block)), Image.BICUBIC)
    return _resize(small, (w, h), Image.NEAREST)


def _smooth_noise(rng, h: int, w: int, f: int):
    """A smooth random field in [0, 1] of shape (h, w): uniform noise on a grid of cell size f, enlarged
    bicubically (as the shuffle annotator's make_noise_disk), then rescaled to span [0, 1]."""
    from PIL import Image
    coarse = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2)).astype(numpy.float32)
    big = numpy.asarray(Image.fromarray(coarse, mode="F").resize((w + 2 * f, h + 2 * f), Image.BICUBIC))
    field = big[f: f + h, f: f + w].astype(numpy.float64)
    field -= field.min()
    top = field.max()
    return field / top if top > 0 else field


def shuffle(image, seed: int = 0, f: int = 256):
    """Content shuffle: out[i, j] = I(Y[i, j], X[i, j]) with X, Y smooth random fields over the image
    (`_smooth_noise`, scaled to [0, W-1] and [0, H-1]), sampled bilinearly. The colours and textures stay,
    the layout is scrambled. Deterministic for a seed (numpy's default_rng). uint8, same shape."""
    a = _as_uint8(image)
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise ValueError(f"shuffle: f must be an integer >= 1, got {f!r}")
    rng = numpy.random.default_rng(seed)
    h, w = a.shape[:2]
    X = _smooth_noise(rng, h, w, f) * (w - 1)
    Y = _smooth_noise(rng, h, w, f) * (h - 1)
    x0, y0 = numpy.floor(X).astype(int), numpy.floor(Y).astype(int)
    x1, y1 = numpy.minimum(x0 + 1, w - 1), numpy.minimum(y0 + 1, h - 1)
    fx, fy = X - x0, Y - y0
    if a.ndim == 3:
        fx, fy = fx[:, :, None], fy[:, :, None]
    src = a.astype(numpy.float64)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx                 # bilinear: along x, then y
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    out = top * (1 - fy) + bottom * fy
    return numpy.clip(numpy.floor(out + 0.5), 0, 255).astype(numpy.uint8)
