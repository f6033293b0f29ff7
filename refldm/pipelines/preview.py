"""Previews of the loop: every N-th step, the noisy latent x_t and the predicted x_0 as PNG files.

Built on diffusers' step callback (`refldm.pipelines.common.StepEnd`): after step i the callback gets the
latents x_{t_{i+1}} and the scheduler's estimate of the clean latents,

    x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)      (DDPM-type schedules, eps-prediction)
    x_0 = x_t - sigma_t eps                                 (sigma-parameterised samplers: Euler, DPM++ ...)

(docs/schedulers.md), and draws both with one of three decoders, cheapest first:

    linear   rgb = z W + b per latent pixel (`refldm.models.latent_rgb`), one colour per latent pixel
    tiny     TAESD (`refldm.models.autoencoder_tiny`), set as ``pipe.tiny_vae``
    vae      the model's own VAE decoder, what the final image goes through

Files: DIR/step-007-latent.png and DIR/step-007-x0.png for step 7 (counting from 1), for the steps that are
multiples of N and the last one. Schedulers that give no x_0 estimate get the latent file only.
"""

from __future__ import annotations

import numbers
import os

import numpy

from refldm.core.images import to_uint8

__all__ = ["KINDS", "check_preview", "decode_preview", "with_previews"]

KINDS = ("linear", "tiny", "vae")


def check_preview(every, n_steps: int, folder, kind: str) -> int:
    """preview_every: an integer in 1..n_steps; preview_dir: a folder (made if missing), not a file; kind."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or not 1 <= int(every) <= n_steps:
        raise ValueError(f"preview_every={every!r} must be an integer from 1 to the step count ({n_steps})")
    if kind not in KINDS:
        raise ValueError(f"preview={kind!r}: choose one of {', '.join(KINDS)}")
    if folder is None:
        raise ValueError("preview_every needs preview_dir, the folder the previews go to")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder}: is a file, not a folder for the previews (preview_dir)")
    return int(every)


def decode_preview(pipe, latents, kind: str):
    """Latents (B, C, h, w) -> uint8 pixels (B, H, W, 3) with the `kind` decoder (the linear one upscaled by the
    VAE factor, nearest, so that every preview has the image's size)."""
    if kind == "vae":
        return pipe.decode_latents(latents)
    if kind == "tiny":
        taesd = getattr(pipe, "tiny_vae", None)
        if taesd is None:
            raise ValueError("preview='tiny' needs a TAESD decoder: set pipe.tiny_vae = "
                             "AutoencoderTiny.from_pretrained(FOLDER) (refldm.models.autoencoder_tiny)")
        return to_uint8(taesd.decode(latents))
    from refldm.models.latent_rgb import family_of, latent_to_rgb
    f = pipe.vae_scale_factor
    pixels = to_uint8(latent_to_rgb(latents, family_of(pipe.vae.config, pipe.name)))
    return numpy.repeat(numpy.repeat(pixels, f, axis=1), f, axis=2)


def with_previews(pipe, n_steps: int, every, folder, kind: str, callback=None, tensor_inputs=None):
    """(callback_on_step_end, tensor_inputs) that write the previews, then call the caller's `callback` (if
    any) with the tensors it asked for; what the caller's callback returns is what the loop gets."""
    from PIL import Image
    every = check_preview(every, n_steps, folder, kind)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    wanted = ["latents"] if tensor_inputs is None else list(tensor_inputs)

    def write(i, x, x0):
        for name, z in (("latent", x), ("x0", x0)):
            if z is None:
                continue
            for k, pixels in enumerate(decode_preview(pipe, z, kind)):
                suffix = f"-{k}" if len(z) > 1 else ""
                Image.fromarray(pixels).save(os.path.join(folder, f"step-{i + 1:03d}-{name}{suffix}.png"))

    def on_step_end(p, i, t, kw):
        if (i + 1) % every == 0 or i + 1 == n_steps:
            write(i, kw["latents"], kw["pred_original_sample"])
        if callback is None:
            return {}
        return callback(p, i, t, {k: kw[k] for k in wanted})

    return on_step_end, sorted(set(wanted) | {"latents", "pred_original_sample"})
