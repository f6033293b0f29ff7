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

import numpy as np

from refldm import backend

__all__ = ["to_tensor", "to_uint8", "to_pil", "load_image", "save_image", "scale_latents", "unscale_latents"]


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


def load_image(path):
    """Read an image file as an RGB PIL image (one clear error if it is missing or not an image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def save_image(x, path):
    """Save a (1, 3, H, W) float array in [-1, 1] as an image file (the format from the suffix)."""
    images = to_pil(x)
    if len(images) != 1:
        raise ValueError(f"save_image: expected one image, got a batch of {len(images)}")
    images[0].save(path)


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
