"""The sampling loop: a scheduler, a model function, classifier-free guidance, img2img starts.

    scheduler.set_timesteps(30)
    latents = initial_latents((1, 4, 64, 64), scheduler, seed=42)        # noise * init_noise_sigma
    latents = sample(model_fn, scheduler, latents, guidance_scale=7.5)

``model_fn(x, t)`` returns the model's prediction (eps, v or x_0, as the scheduler's prediction_type says) for
the already scaled input x (``scheduler.scale_model_input``). With ``guidance_scale`` set, x holds the batch
twice, ``[x, x]``, and the model must return ``[unconditional, conditional]`` predictions in that order (as
diffusers' pipelines lay out the batch with the negative prompt first).
"""

from __future__ import annotations

import inspect

import numpy
from tqdm.auto import tqdm

from refldm import backend
from refldm.core import record
from refldm.core import random as refldm_random

__all__ = [
    "classifier_free_guidance", "rescale_guidance", "initial_latents", "img2img_timesteps", "img2img_latents",
    "sample",
]


def classifier_free_guidance(pred_uncond, pred_cond, guidance_scale: float):
    """eps = eps_u + s (eps_c - eps_u)   (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6,
    written with s = 1 + w): s = 1 is the conditional model alone, s > 1 pushes away from the unconditional."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def rescale_guidance(pred_guided, pred_cond, guidance_rescale: float):
    """Rescale the guided prediction to the per-sample standard deviation of the conditional one, mixed by
    phi = guidance_rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    sec. 3.4, eqs. 15-16): x = phi * pred * std(cond)/std(pred) + (1 - phi) * pred, with the sample standard
    deviation (n - 1 in the denominator, as torch.std and diffusers' rescale_noise_cfg)."""
    xp = backend.array_namespace(pred_guided, pred_cond)
    axes = tuple(range(1, pred_cond.ndim))
    std_cond = xp.std(pred_cond, axis=axes, keepdims=True, ddof=1)
    std_guided = xp.std(pred_guided, axis=axes, keepdims=True, ddof=1)
    rescaled = pred_guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * pred_guided


def initial_latents(shape, scheduler, seed=None, generator=None, dtype="float32"):
    """Starting noise for text-to-image: randn(shape) * scheduler.init_noise_sigma, on the active backend.

    With `seed` (or a refldm.core.random.Generator) the noise equals diffusers' for the same seed."""
    noise = refldm_random.randn(shape, seed=seed, generator=generator, dtype=dtype)
    return backend.asarray(noise) * float(scheduler.init_noise_sigma)


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The timesteps img2img runs for `strength`, as diffusers' pipelines choose them:

        init_timestep = min(int(n * strength), n);  t_start = max(n - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]

    and ``scheduler.set_begin_index(t_start * order)`` so step counting starts there. Call
    ``scheduler.set_timesteps(num_inference_steps)`` first (for LCM pass ``strength=`` there too).
    Returns (timesteps, number of denoising steps = n - t_start)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"img2img: strength={strength!r} must be in [0, 1]")
    if getattr(scheduler, "timesteps", None) is None or scheduler.num_inference_steps is None:
        raise ValueError("img2img: call scheduler.set_timesteps(num_inference_steps) first")
    n = int(num_inference_steps)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    # t_start = 0 keeps the scheduler's own object: DPM adaptive's list grows as it samples
    timesteps = scheduler.timesteps[t_start * scheduler.order:] if t_start else scheduler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, n - t_start


def img2img_latents(scheduler, init_latents, timesteps, noise=None, generator=None):
    """Noise the encoded image to the first img2img timestep: ``scheduler.add_noise(x_0, eps, t_0)`` with t_0
    repeated over the batch (eps drawn from `generator`, like diffusers, if not given)."""
    if len(timesteps) == 0:
        return init_latents  # strength 0: nothing to denoise
    if noise is None:
        host = refldm_random.randn(tuple(init_latents.shape), generator=generator,
                                   dtype=numpy.dtype(init_latents.dtype).name)
        xp = backend.array_namespace(init_latents)
        noise = host if xp is numpy else xp.asarray(host)
    t0 = numpy.repeat(numpy.asarray(timesteps)[:1], init_latents.shape[0])
    return scheduler.add_noise(init_latents, noise, t0)


def _accepts(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _model_call(model_fn, x_in, t, i):
    """model_fn(x_in, t), recorded when a trace is on (`refldm.core.record`) as ``steps.<i>.timestep``,
    ``.model_input``, ``.unet.<layer>`` (the model's own layers) and ``.noise_pred`` (its output)."""
    record.value(f"steps.{i}.timestep", float(t))
    record.value(f"steps.{i}.model_input", x_in)
    with record.scope(f"steps.{i}.unet"):
        pred = model_fn(x_in, t)
    record.value(f"steps.{i}.noise_pred", pred)
    return pred


def sample(model_fn, scheduler, latents, timesteps=None, *, guidance_scale: float | None = None,
           guidance_rescale: float = 0.0, generator=None, callback=None, progress: bool = True, **step_kwargs):
    """Run `scheduler` from `latents` over `timesteps` (default: scheduler.timesteps) and return the result.

    Per step: x_in = scale_model_input(x, t); pred = model_fn(x_in, t) (guided as in the module docstring when
    guidance_scale is set); x = scheduler.step(pred, t, x, generator=..., **step_kwargs).prev_sample.
    ``callback(i, t, x)`` runs after each step; if it returns an array, that replaces x. A callback that takes a
    keyword ``step`` also gets ``step={"noise_pred": pred, "pred_original_sample": x_0 or None, "pred_uncond",
    "pred_cond"}`` (the guided prediction, the scheduler's estimate of x_0, and with guidance the two halves). A scheduler whose
    ``timesteps`` is a Python list (DPM adaptive) appends the model calls it decides on while this loop iterates it.
    ``progress=False`` silences the tqdm bar. With a trace on (`refldm.core.record`), step i records
    ``steps.<i>.timestep``, ``.model_input``, ``.unet.<layer>``, ``.noise_pred``, ``.latents`` (x), ``.guided``
    (pred), ``.prev_sample`` and ``.pred_original_sample``."""
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if guidance_scale is None and guidance_rescale:
        raise ValueError("sample: guidance_rescale needs guidance_scale")
    xp = backend.array_namespace(latents)
    takes_generator = _accepts(scheduler.step, "generator")
    total = len(timesteps) if hasattr(timesteps, "__len__") else None
    if isinstance(scheduler.timesteps, list):  # DPM adaptive: step() appends the model calls it decides on
        if timesteps is not scheduler.timesteps:
            raise ValueError(f"sample: {type(scheduler).__name__} chooses its timesteps as it goes; "
                             "pass timesteps=None (or scheduler.timesteps itself), not a copy or a part")
        total = float("inf")  # tqdm's "unknown": the loop below runs while the list grows
    x = latents
    wants_step = callback is not None and _accepts(callback, "step")
    for i, t in enumerate(tqdm(timesteps, total=total, disable=not progress, desc=type(scheduler).__name__)):
        x_in = scheduler.scale_model_input(x, t)
        pred_uncond = pred_cond = None
        if guidance_scale is None:
            pred = _model_call(model_fn, x_in, t, i)
        else:
            both = _model_call(model_fn, xp.concatenate([x_in, x_in], axis=0), t, i)  # (2B, ...): [uncond, cond]
            pred_uncond, pred_cond = both[: x.shape[0]], both[x.shape[0]:]
            pred = classifier_free_guidance(pred_uncond, pred_cond, guidance_scale)
            if guidance_rescale:
                pred = rescale_guidance(pred, pred_cond, guidance_rescale)
        kwargs = dict(step_kwargs)
        if takes_generator:
            kwargs["generator"] = generator
        record.value(f"steps.{i}.latents", x)
        record.value(f"steps.{i}.guided", pred)  # what the scheduler receives: after guidance
        out = scheduler.step(pred, t, x, **kwargs)
        x = out.prev_sample
        record.value(f"steps.{i}.prev_sample", x)
        record.value(f"steps.{i}.pred_original_sample", getattr(out, "pred_original_sample", None))
        if callback is not None:
            if wants_step:
                step = {"noise_pred": pred, "pred_original_sample": getattr(out, "pred_original_sample", None),
                        "pred_uncond": pred_uncond, "pred_cond": pred_cond}
                replaced = callback(i, t, x, step=step)
            else:
                replaced = callback(i, t, x)
            if replaced is not None:
                x = replaced
    return x
