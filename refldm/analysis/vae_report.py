"""What a VAE keeps and what it loses: encode, decode, and compare with the input.

The reconstruction is deterministic: x_hat = decode(mean of q(z | x)), the posterior mean, no sampling.
Both images are compared as 8-bit RGB (H, W, 3), the way they are seen and saved:

    PSNR   = 10 log10(255^2 / MSE),   MSE over all pixels and channels (inf for identical images)
    SSIM   (Wang et al., 2004), per channel, then averaged over the channels, as scikit-image's
           ``structural_similarity`` with its defaults: 7x7 uniform windows, sample (co)variances
           (divided by N - 1 = 48), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
               SSIM(x, y) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
           averaged over the windows that fit inside the image (3 pixels from each border dropped)
    bands  the 2-D spectrum F(f) of each channel, split into rings of radial frequency
           |f| = sqrt(fx^2 + fy^2) from 0 to 0.5 cycles per pixel (Nyquist; the corners beyond go to
           the last ring), the DC term left out. Per ring:
               energy kept    = sum |F_hat|^2 / sum |F|^2      (1: as much detail; < 1: smoothed away)
               relative error = sum |F_hat - F|^2 / sum |F|^2  (0: exact; 1: as large as the content)
           A texture replaced by a different texture of the same strength keeps its energy but has an
           error near 2; a smoothed one loses energy and has an error near 1.
    edges  the Pearson correlation of the Sobel gradient magnitudes of the two images' luminance
           (0.299 R + 0.587 G + 0.114 B): 1 when every edge is where it was, as strong
    worst  the square tile (side = max(8, min(H, W) / 8)) with the largest MSE, and its PSNR

`refldm vae-report` (refldm/cli/analysis.py) calls `run`; docs/why-latent.md shows the figures.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from refldm.about import DEFAULT_MODEL

__all__ = ["psnr", "ssim", "band_energy", "edge_correlation", "worst_region", "reconstruct", "measure",
           "draw_report", "run"]

SSIM_WIN = 7
BUILTIN_NOTE = ("built-in VAE: a small model (16-64 channels) trained only on 64x64 images of coloured "
                "shapes, not SD's VAE")


# ---------------------------------------------------------------------------------------------------
# Metrics on (H, W, 3) uint8 images
# ---------------------------------------------------------------------------------------------------

def _pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"vae-report: images to compare must have one shape (H, W[, C]), got {a.shape} "
                         f"and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a, b, data_range: float = 255.0) -> float:
    """10 log10(R^2 / mean((a - b)^2)) in dB; inf when the images are identical."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _box_mean(x, k: int):
    """Mean over every k x k window that fits in x (H, W) -> (H - k + 1, W - k + 1), by summed-area table."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    s[1:, 1:] = x.cumsum(0).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


def ssim(a, b, data_range: float = 255.0, win_size: int = SSIM_WIN) -> float:
    """Mean structural similarity over the channels (see the module docstring); 1 for identical images."""
    a, b = _pair(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[:2]) < win_size:
        raise ValueError(f"vae-report: SSIM needs images of at least {win_size}x{win_size}, got "
                         f"{a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win_size * win_size
    per_channel = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _box_mean(x, win_size), _box_mean(y, win_size)            # window means
        vx = (_box_mean(x * x, win_size) - mx * mx) * n / (n - 1)          # sample variances
        vy = (_box_mean(y * y, win_size) - my * my) * n / (n - 1)
        cxy = (_box_mean(x * y, win_size) - mx * my) * n / (n - 1)         # sample covariance
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        per_channel.append(s.mean())
    return float(np.mean(per_channel))


def band_energy(a, b, bands: int = 8) -> list:
    """Per radial frequency ring: {"low", "high" (cycles/pixel), "energy_kept", "relative_error"}
    (None where the input has no energy in the ring)."""
    a, b = _pair(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    fa = np.fft.fft2(a, axes=(0, 1))                                       # (H, W, C) spectra
    fb = np.fft.fft2(b, axes=(0, 1))
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.fftfreq(a.shape[1])[None, :]
    radius = np.sqrt(fx * fx + fy * fy)                                    # cycles per pixel
    edges = np.linspace(0.0, 0.5, bands + 1)
    ring = np.clip(np.ceil(radius / 0.5 * bands).astype(int) - 1, 0, bands - 1)  # (lo, hi] -> index
    ring[0, 0] = -1                                                        # DC: the mean colour, left out
    ea = (np.abs(fa) ** 2).sum(axis=2)
    eb = (np.abs(fb) ** 2).sum(axis=2)
    ed = (np.abs(fb - fa) ** 2).sum(axis=2)
    out = []
    for k in range(bands):
        sel = ring == k
        total = ea[sel].sum()
        ok = total > 1e-9 * max(ea.sum(), 1e-300)
        out.append({"low": float(edges[k]), "high": float(edges[k + 1]),
                    "energy_kept": float(eb[sel].sum() / total) if ok else None,
                    "relative_error": float(ed[sel].sum() / total) if ok else None})
    return out


def _sobel_magnitude(img):
    """|grad| of the luminance with 3x3 Sobel kernels, on the interior (H - 2, W - 2)."""
    y = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114 if img.ndim == 3 else img
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    return np.sqrt(gx * gx + gy * gy)


def edge_correlation(a, b):
    """Pearson correlation of the Sobel gradient magnitudes; None when the input has no edges."""
    a, b = _pair(a, b)
    ga, gb = _sobel_magnitude(a).ravel(), _sobel_magnitude(b).ravel()
    ga, gb = ga - ga.mean(), gb - gb.mean()
    den = math.sqrt(float(ga @ ga) * float(gb @ gb))
    if float(ga @ ga) <= 1e-12 * ga.size:
        return None
    return float(ga @ gb) / den if den > 0 else 0.0


def worst_region(a, b, tile: int | None = None) -> dict:
    """The tile with the largest MSE: {"x", "y", "width", "height", "psnr"} (pixels, top-left origin)."""
    a, b = _pair(a, b)
    h, w = a.shape[:2]
    tile = tile or max(8, min(h, w) // 8)
    best = None
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            d = a[y:y + tile, x:x + tile] - b[y:y + tile, x:x + tile]
            mse = float(np.mean(d * d))
            if best is None or mse > best[0]:
                best = (mse, x, y, d.shape[1], d.shape[0])
    mse, x, y, tw, th = best
    return {"x": x, "y": y, "width": tw, "height": th,
            "psnr": math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)}


# ---------------------------------------------------------------------------------------------------
# Encode, decode, measure
# ---------------------------------------------------------------------------------------------------

def reconstruct(vae, pixels, dtype="float32"):
    """(H, W, 3) uint8 -> (reconstruction (H, W, 3) uint8, notes). Sizes that are not a multiple of the
    VAE's factor are padded by repeating the edge pixels, then cropped back (and a note says so)."""
    from refldm.core import images

    notes = []
    h, w = pixels.shape[:2]
    f = vae.downscale_factor
    ph, pw = -h % f, -w % f
    if ph or pw:
        notes.append(f"{w}x{h} is not a multiple of {f}: padded to {w + pw}x{h + ph} by repeating the edge "
                     "pixels, measured on the original area")
        pixels = np.pad(pixels, ((0, ph), (0, pw), (0, 0)), mode="edge")
    z = vae.encode(images.to_tensor(pixels, dtype=dtype)).mode()       # (1, C, H/f, W/f): the mean
    out = images.to_uint8(vae.decode(z))[0]                             # (H, W, 3) uint8
    return out[:h, :w], notes


def measure(original, recon, bands: int = 8) -> dict:
    """Every metric of the module docstring for one pair of (H, W, 3) uint8 images."""
    return {"psnr": psnr(original, recon), "ssim": ssim(original, recon),
            "bands": band_energy(original, recon, bands), "edge_correlation": edge_correlation(original, recon),
            "worst_region": worst_region(original, recon)}


def load_rgb(path):
    """An image file -> ((H, W, 3) uint8, notes about any conversion)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            notes = []
            if mode != "RGB":
                what = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA", "P": "palette",
                        "1": "1-bit", "I;16": "16-bit grayscale", "CMYK": "CMYK"}.get(mode, mode)
                dropped = ", alpha dropped" if "A" in mode or "transparency" in im.info else ""
                notes.append(f"{what} image converted to RGB{dropped}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8), notes
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large to open safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({e})") from None


# ---------------------------------------------------------------------------------------------------
# The picture: input | reconstruction | amplified error | band curve, one row per image
# ---------------------------------------------------------------------------------------------------

PANEL = 256
ERROR_GAIN = 4


def _fit(im, size=PANEL):
    """Scale a PIL image to fit size x size: an integer factor up (nearest, pixels stay sharp), or down."""
    from PIL import Image

    s = size / max(im.width, im.height)
    if s >= 1:
        k = int(s)
        return im.resize((im.width * k, im.height * k), Image.NEAREST)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)


def _heatmap(original, recon):
    """|error| averaged over RGB, times ERROR_GAIN, through a black-red-yellow-white colour ramp."""
    from PIL import Image

    err = np.abs(original.astype(np.float64) - recon.astype(np.float64)).mean(axis=2)
    t = np.clip(err * ERROR_GAIN / 255.0, 0, 1)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return Image.fromarray(np.round(255 * rgb).astype(np.uint8), "RGB")


def _band_plot(bands, size=PANEL):
    """Energy kept (blue) and relative error (red) per frequency ring, 0 to 1.5, on a PIL image."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 30, size - 8, 16, size - 30
    ymax = 1.5

    def px(i, v):
        x = left + (right - left) * (i + 0.5) / len(bands)
        return x, bottom - (bottom - top) * min(v, ymax) / ymax

    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for v in (0.5, 1.0):
        y = px(0, v)[1]
        d.line([(left, y), (right, y)], fill=(200, 200, 200))
        d.text((4, y - 5), f"{v:g}", fill=(0, 0, 0))
    d.text((4, bottom - 5), "0", fill=(0, 0, 0))
    for key, colour in (("energy_kept", (30, 60, 220)), ("relative_error", (220, 40, 40))):
        pts = [px(i, b[key]) for i, b in enumerate(bands) if b[key] is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if any(b[k] is not None and b[k] > ymax for b in bands for k in ("energy_kept", "relative_error")):
        d.text((right - 92, top + 3), f"(clipped at {ymax:g})", fill=(90, 90, 90))
    d.text((left, bottom + 4), "0", fill=(0, 0, 0))
    d.text((right - 60, bottom + 4), "0.5 cyc/px", fill=(0, 0, 0))
    d.text((left + 40, bottom + 16), "radial frequency", fill=(0, 0, 0))
    d.text((left + 4, 2), "energy kept", fill=(30, 60, 220))
    d.text((left + 110, 2), "rel. error", fill=(220, 40, 40))
    return im


def _fmt(v, spec):
    return "n/a" if v is None else ("inf" if v == math.inf else format(v, spec))


def draw_report(rows, path, title: str, note: str | None = None) -> None:
    """rows: (name, original uint8, reconstruction uint8, metrics) -> one PNG with a row per image."""
    from PIL import Image, ImageDraw

    gap, caption, head = 8, 30, 34 if note else 20
    width = 4 * PANEL + 5 * gap
    im = Image.new("RGB", (width, head + len(rows) * (PANEL + caption + gap)), "white")
    d = ImageDraw.Draw(im)
    d.text((gap, 4), title, fill=(0, 0, 0))
    if note:
        d.text((gap, 18), note, fill=(170, 0, 0))
    y = head
    for name, original, recon, m in rows:
        panels = [Image.fromarray(original, "RGB"), Image.fromarray(recon, "RGB"), _heatmap(original, recon)]
        for i, p in enumerate(panels):
            p = _fit(p)
            x0 = gap + i * (PANEL + gap)
            im.paste(p, (x0, y))
            d.rectangle([x0 - 1, y - 1, x0 + p.width, y + p.height], outline=(160, 160, 160))
            if i == 2:                                   # the worst tile, outlined on the error map
                k = p.width / original.shape[1]
                wr = m["worst_region"]
                d.rectangle([x0 + wr["x"] * k, y + wr["y"] * k, x0 + (wr["x"] + wr["width"]) * k - 1,
                             y + (wr["y"] + wr["height"]) * k - 1], outline=(0, 200, 255), width=2)
        im.paste(_band_plot(m["bands"]), (gap + 3 * (PANEL + gap), y))
        wr = m["worst_region"]
        d.text((gap, y + PANEL + 3), f"{name}: input | reconstruction | |error| x{ERROR_GAIN} (white: 64+ "
               "levels; blue box: worst tile) | bands", fill=(0, 0, 0))
        d.text((gap, y + PANEL + 15),
               f"PSNR {_fmt(m['psnr'], '.2f')} dB   SSIM {_fmt(m['ssim'], '.4f')}   edges r = "
               f"{_fmt(m['edge_correlation'], '.3f')}   worst {wr['width']}x{wr['height']} tile at "
               f"({wr['x']}, {wr['y']}): {_fmt(wr['psnr'], '.1f')} dB", fill=(0, 0, 0))
        y += PANEL + caption + gap
    im.save(path)


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------

def _default_vae():
    return os.path.join(DEFAULT_MODEL, "vae")


def _jsonable(v):
    """inf (identical images) -> the string "inf": JSON has no infinity."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return "inf" if isinstance(v, float) and math.isinf(v) else v


MAX_BANDS = 1024        # more radial bands than this are narrower than one frequency step of any image here
MAX_PROBE_SIZE = 2048   # a 2048x2048 probe already takes minutes and GBs through the VAE on a CPU


def run(args) -> int:
    """``refldm vae-report``: see refldm/cli/analysis.py for the arguments."""
    from refldm.analysis import probe_images
    from refldm.models.vae import AutoencoderKL

    if not 1 <= args.bands <= MAX_BANDS:
        raise ValueError(f"vae-report: --bands must lie in 1..{MAX_BANDS}, got {args.bands}")
    if args.probes and not SSIM_WIN <= args.probe_size <= MAX_PROBE_SIZE:
        raise ValueError(f"vae-report: --probe-size must lie in {SSIM_WIN}..{MAX_PROBE_SIZE}, got {args.probe_size}")
    inputs = [(path, None) for path in args.images]
    if args.probes:
        inputs += [(f"probe:{name}", name) for name in probe_images.PROBES]
    if not inputs:
        raise ValueError("vae-report: give image files, or --probes for the built-in test images")
    model = _default_vae() if args.model is None else args.model
    here = os.path.realpath(model)                              # the built-in VAE, however it is named
    builtin = here in (os.path.realpath(_default_vae()), os.path.dirname(os.path.realpath(_default_vae())))
    loaded = []
    for path, probe in inputs:                                  # read everything before the slow part
        if probe is not None:
            loaded.append((path, np.asarray(probe_images.probe(probe, args.probe_size)), []))
        else:
            pixels, notes = load_rgb(path)
            loaded.append((path, pixels, notes))
    vae = AutoencoderKL.from_pretrained(model, dtype=args.dtype)
    if getattr(args, "tiling", False):
        vae.enable_tiling()  # tile by tile, as diffusers' enable_tiling (models/vae.py, `_tiled`)
    results, rows = [], []
    for path, pixels, notes in loaded:
        if min(pixels.shape[:2]) < SSIM_WIN:
            raise ValueError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} is too small (SSIM needs "
                             f"{SSIM_WIN}x{SSIM_WIN})")
        recon, more = reconstruct(vae, pixels, args.dtype)
        notes = notes + more
        m = measure(pixels, recon, args.bands)
        results.append({"image": path, "width": pixels.shape[1], "height": pixels.shape[0], "notes": notes, **m})
        rows.append((os.path.basename(path), pixels, recon, m))
    title = (f"vae-report: {'the built-in VAE' if args.model is None else model} (deterministic: decode(posterior "
             "mean)), 8-bit RGB")
    if args.output:
        draw_report(rows, args.output, title, BUILTIN_NOTE if builtin else None)
    if args.json:
        out = {"model": model, "builtin": builtin, "images": results, "output": args.output}
        print(json.dumps(_jsonable(out), indent=1))
        return 0
    print(title)
    if builtin:
        print(f"note: {BUILTIN_NOTE}")
    for r in results:
        print(f"{r['image']} ({r['width']}x{r['height']}): PSNR {_fmt(r['psnr'], '.2f')} dB, SSIM "
              f"{_fmt(r['ssim'], '.4f')}, edges r = {_fmt(r['edge_correlation'], '.3f')}, worst "
              f"{r['worst_region']['width']}x{r['worst_region']['height']} tile at ({r['worst_region']['x']}, "
              f"{r['worst_region']['y']}): {_fmt(r['worst_region']['psnr'], '.1f')} dB")
        for note in r["notes"]:
            print(f"  note: {note}")
        print("  band up to (cyc/px)" + "".join(f"{b['high']:>8.4f}" for b in r["bands"]))
        print("  energy kept        " + "".join(f"{_fmt(b['energy_kept'], '.3f'):>8}" for b in r["bands"]))
        print("  relative error     " + "".join(f"{_fmt(b['relative_error'], '.3f'):>8}" for b in r["bands"]))
    if args.output:
        print(f"wrote {args.output}")
    return 0
