"""Previews of the loop: every N-th step, the noisy latent x_t and the predicted x_0 as PNG files.

Built on diffusers' step callback (`refldm.pipelines.common.StepEnd`): after step i the callback gets the
latents x_{t_{i+1}} and the scheduler's estimate of the clean latents,

    x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)      (DDPM-type schedules, eps-prediction)
    x_0 = x_t - sigma_t eps                                 (sigma-parameterised samplers: Euler, DPM++ ...)
    x_0 = x_t - sigma_t v,  sigma_t = t / 1000              (flow matching, SD3 and FLUX: `flow_x0`)

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

__all__ = ["KINDS", "check_preview", "decode_preview", "with_previews", "FlowStepEnd"]

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


def with_previews(pipe, n_steps: int, every, folder, kind: str, callback=None, tensor_inputs=None, unpack=None):
    """(callback_on_step_end, tensor_inputs) that write the previews, then call the caller's `callback` (if
    any) with the tensors it asked for; what the caller's callback returns is what the loop gets.
    unpack: latents as the loop holds them -> (B, C, h, w) (FLUX's packed 2x2 patches)."""
    from PIL import Image
    every = check_preview(every, n_steps, folder, kind)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    wanted = ["latents"] if tensor_inputs is None else list(tensor_inputs)

    def write(i, x, x0):
        for name, z in (("latent", x), ("x0", x0)):
            if z is None:
                continue
            z = z if unpack is None else unpack(z)
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


class FlowStepEnd:
    """The step callback of the flow-matching pipelines (SD3, FLUX): `refldm.pipelines.common.StepEnd`, with the
    estimate of the clean latents the flow schedulers do not return filled in from the last model call,

        x_0 = x_t - sigma_t v,   sigma_t = t / T   (x_t = (1 - sigma) x_0 + sigma e, so v = e - x_0)

    (x_t: that call's input, whose first B rows are the latents under CFG; v: the guided velocity the scheduler
    stepped with; T: num_train_timesteps, diffusers' flow timesteps being sigma T). `model` wraps the model
    function so that each call's input and timestep are kept."""

    def __init__(self, step_end, big_t: float):
        self.step_end, self.big_t, self.last = step_end, float(big_t), None
        self.tensors = step_end.tensors

    def model(self, fn):
        def call(x, t):
            self.last = (x, t)
            return fn(x, t)
        return call

    def __call__(self, i, t, x, step=None):
        if step is not None and step.get("pred_original_sample") is None and self.step_end.on_step_end is not None \
                and self.last is not None and step.get("noise_pred") is not None:
            x_in, t_in = self.last
            step = dict(step, pred_original_sample=x_in[:x.shape[0]] - (float(t_in) / self.big_t) * step["noise_pred"])
        return self.step_end(i, t, x, step)
