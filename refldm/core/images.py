"""Images <-> model tensors, and the latent scaling convention.

Pixels: a PIL image or a uint8 array (H, W, 3) with values 0..255. Model tensors: float arrays
(N, 3, H, W) with values in [-1, 1], on the active backend:

    x = p / 127.5 - 1              (to_tensor: uint8 -> [-1, 1])
    p = round(255 * clip((x + 1) / 2, 0, 1))   (to_uint8: [-1, 1] -> uint8, as diffusers' postprocess)

Latent scaling. The VAE's latents have a spread that depends on the checkpoint (a standard deviation
near 5.5 for SD 1.x); the diffusion model was trained on latents rescaled to unit variance. So the
pipeline multiplies after encoding and divides before decoding:

    z_unet = (z_vae - shift_factor) * scaling_factor        (scale_latents)
    z_vae  = z_unet / scaling_factor + shift_factor         (unscale_latents)

with scaling_factor 0.18215 for SD 1.x/2.x, 0.13025 for SDXL, and shift_factor None (= 0) for both.
A VAE config with latents_mean / latents_std normalises per channel instead:
z_unet = (z_vae - mean) * scaling_factor / std. `AutoencoderKL.encode` / `decode` never scale.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from refldm import backend
from refldm.files import atomic_write

__all__ = ["to_tensor", "to_uint8", "to_pil", "load_image", "save_image", "save_pil", "scale_latents",
           "unscale_latents", "check_output", "atomic_write"]


def to_tensor(images, dtype="float32"):
    """PIL image(s) or uint8 array(s) -> (N, 3, H, W) array in [-1, 1] on the active backend.

    Accepts a PIL image, a list of PIL images of one size, a uint8 array (H, W, 3) or (N, H, W, 3).
    Images with another mode (L, RGBA, P, ...) are converted to RGB as PIL does.
    """
    if isinstance(images, (list, tuple)):
        arrays = [_rgb_array(im) for im in images]
        if not arrays:
            raise ValueError("to_tensor: empty list of images")
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"to_tensor: images of different sizes in one batch: {sorted(sizes)}")
        pixels = np.stack(arrays)
    else:
        pixels = _rgb_array(images)
        if pixels.ndim == 3:
            pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"to_tensor: expected (H, W, 3) or (N, H, W, 3) uint8 pixels, got {pixels.shape}")
    dt = backend.resolve_dtype(dtype)
    x = pixels.astype(dt) / dt.type(127.5) - dt.type(1.0)  # (N, H, W, 3) in [-1, 1]
    return backend.asarray(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # -> (N, 3, H, W)


def _rgb_array(image):
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = backend.to_numpy(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_tensor: expected uint8 pixels (0..255), got {arr.dtype}; float model tensors "
                         "in [-1, 1] need no conversion")
    return arr


def to_uint8(x):
    """(N, 3, H, W) float array in [-1, 1] (any backend) -> (N, H, W, 3) uint8 NumPy array.

    Values outside [-1, 1] are clipped; p = round(255 * (x + 1) / 2), as diffusers' image processor.
    """
    if len(getattr(x, "shape", ())) != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8: expected a (N, 3, H, W) array, got {getattr(x, 'shape', type(x).__name__)}")
    host = backend.to_numpy(x).astype(np.float32)
    unit = np.clip(host / 2 + 0.5, 0.0, 1.0)
    return np.round(unit * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def to_pil(x):
    """(N, 3, H, W) float array in [-1, 1] -> list of N PIL images."""
    from PIL import Image

    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(x)]


def open_image(path, what: str = "image"):
    """Read an image file as a PIL image in its own mode, fully decoded (one clear error if it is missing,
    not an image, truncated, or over PIL's decompression-bomb limit: never a traceback)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, not an {what} file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {what} too large to open safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some broken headers in PIL
        raise ValueError(f"{path}: not a readable {what} ({e})") from None


def load_image(path):
    """Read an image file as an RGB PIL image (one clear error if it is missing or not an image).

    16-bit images (PNG mode I;16 / I) are scaled to 8 bits (v / 257), not clipped: PIL's own RGB conversion
    would clip every value above 255 to white. Very large images (PIL's decompression-bomb guard) and
    truncated files are one error naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
                wide = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
                gray = np.round(np.clip(wide, 0, top) * (255.0 / top)).astype(np.uint8)
                return Image.fromarray(gray, mode="L").convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, not an image file") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large to open safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some broken headers in PIL
        raise ValueError(f"{path}: not a readable image ({e})") from None


def save_image(x, path, parameters: str | None = None):
    """Save a (1, 3, H, W) float array in [-1, 1] as an image file (the format from the suffix)."""
    images = to_pil(x)
    if len(images) != 1:
        raise ValueError(f"save_image: expected one image, got a batch of {len(images)}")
    save_pil(images[0], path, parameters)


# --------------------------------------------------------------------------------------------------------
# Writing outputs: checked before the work, written whole or not at all

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def check_output(path, suffixes=None, what: str = "output") -> str:
    """Refuse an output path that cannot be written, before any work is done; returns the path.

    It must be non-empty, not a folder, in an existing folder where a file can be created (a temporary
    file is made and removed there: this also catches read-only and virtual file systems such as
    /proc), and end with one of `suffixes` (default: the image formats refldm writes).
    """
    suffixes = tuple(IMAGE_FORMATS) if suffixes is None else tuple(suffixes)
    if path is None or not str(path).strip():
        raise ValueError(f"the {what} path is empty")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; give a file name for the {what}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in suffixes:
        raise ValueError(f"{path}: the {what} must end in {', '.join(suffixes)} (got {ext or 'no suffix'})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".refldm-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{path}: exists and is not writable")
    return path


def save_pil(image, path, parameters: str | None = None) -> None:
    """Write a PIL image atomically, in the format its suffix names, with the generation parameters:
    a PNG ``parameters`` text chunk (tEXt, or iTXt where the text is not Latin-1) as the Stable Diffusion
    web UIs write it; in a JPEG / WebP, the same text as the EXIF UserComment, where those UIs put it."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    fmt = IMAGE_FORMATS.get(ext)
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the image format; use one of {', '.join(IMAGE_FORMATS)}")
    options = {}
    if fmt == "PNG":
        info = PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        options["pnginfo"] = info
    else:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if fmt == "JPEG":
            options["quality"] = 95
        if parameters is not None and fmt in ("JPEG", "WEBP"):
            exif = Image.Exif()
            # UserComment (0x9286) in the Exif IFD (0x8769): an 8-byte charset code, then the text
            exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + parameters.encode("utf-16-be")
            options["exif"] = exif.tobytes()
    atomic_write(path, lambda f: image.save(f, format=fmt, **options))


def _stats(config, like):
    """(scaling_factor, shift, per-channel std or None) as arrays/floats ready to broadcast on `like`."""
    xp = backend.array_namespace(like)
    sf = float(config.scaling_factor)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        c = len(config.latents_mean)
        mean = xp.asarray(np.asarray(config.latents_mean, dtype=like.dtype).reshape(1, c, 1, 1))
        std = xp.asarray(np.asarray(config.latents_std, dtype=like.dtype).reshape(1, c, 1, 1))
        return sf, mean, std
    shift = getattr(config, "shift_factor", None)
    return sf, (0.0 if shift is None else float(shift)), None


def scale_latents(latents, config):
    """VAE latents -> the latents the U-Net sees: (z - shift_factor) * scaling_factor (see module doc)."""
    sf, shift, std = _stats(config, latents)
    z = (latents - shift) * sf
    return z if std is None else z / std


def unscale_latents(latents, config):
    """The U-Net's latents -> VAE latents, ready for `AutoencoderKL.decode`: z / scaling_factor + shift."""
    sf, shift, std = _stats(config, latents)
    z = latents if std is None else latents * std
    return z / sf + shift
