"""Text-to-image with T2I-Adapters: diffusers' ``StableDiffusionAdapterPipeline`` (SD 1.x / 2.x) and
``StableDiffusionXLAdapterPipeline`` (SDXL).

The adapter reads the control image once, before the loop (refldm/models/t2i_adapter.py); its features,
scaled, enter the U-Net's encoder at every step of the first int(n * factor) of the n steps:

    F_k      = s T2IAdapter(y)_k                      (several adapters: F_k = sum_j s_j T2IAdapter_j(y_j)_k)
    eps      = unet(scale(x_i), t_i, c, down_intrablock_additional_residuals=F)    for i < int(n * factor)
    eps      = unet(scale(x_i), t_i, c)                                           after that

s = ``adapter_conditioning_scale``, factor = ``adapter_conditioning_factor``. With classifier-free guidance
both halves of the batch [uncond; cond] get the same features. Everything else is the plain pipeline's:
each call here runs `StableDiffusionPipeline` / `StableDiffusionXLPipeline` with the U-Net wrapped
(`AdaptedUNet`), so the samplers, noise options, prompt syntax and the PNG parameters are theirs.

    pipe = StableDiffusionAdapterPipeline.from_pretrained("sd-folder", adapter="t2iadapter-folder")
    out = pipe("a house", image=sketch_png, adapter_conditioning_scale=0.8, seed=1)
"""

from __future__ import annotations

import copy
import math
import os

import numpy
from PIL import Image

from refldm import backend
from refldm.core import record
from refldm.models.controlnet import check_scale
from refldm.pipelines.controlnet import prepare_control_image
from refldm.models.t2i_adapter import MultiAdapter, T2IAdapter, check_adapter_compatible

__all__ = ["StableDiffusionAdapterPipeline", "StableDiffusionXLAdapterPipeline", "AdaptedUNet",
           "prepare_adapter_image", "adapter_features", "with_control"]


def prepare_adapter_image(image, height: int, width: int, channels: int, dtype: str, index: int = 0):
    """A control image -> (1, channels, height, width) in [0, 1]: `prepare_control_image` (resized with a
    warning, as diffusers' ``_preprocess_adapter_image``), grey for a one-channel adapter."""
    return prepare_control_image(image, height, width, dtype, index, channels=channels, what="adapter image",
                                 stacklevel=4)


def _per_adapter(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} adapters")
    for v in values:
        check_scale(v, name)
    return values


def adapter_features(adapter, images, height: int, width: int, scales) -> list:
    """The scaled features F_k (module docstring), each (1, c_k, h_k, w_k): one adapter and one image, or a
    `MultiAdapter` and one image per adapter (their weights are the scales)."""
    adapters = adapter.adapters if isinstance(adapter, MultiAdapter) else [adapter]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(adapters):
        raise ValueError(f"{len(images)} adapter images for {len(adapters)} adapter{'s' * (len(adapters) > 1)}: "
                         "give one per adapter")
    scales = _per_adapter(scales, len(adapters), "adapter_conditioning_scale")
    dtype = adapters[0].dtype.name if adapters[0].dtype is not None else "float32"
    arrays = [prepare_adapter_image(im, height, width, a.config.in_channels, dtype, k)
              for k, (im, a) in enumerate(zip(images, adapters))]
    with record.scope("adapter"):                                          # trace: adapter.adapter.body.*
        if isinstance(adapter, MultiAdapter):
            return adapter(arrays, scales)                                 # sum_j s_j F^(j) (float32 weights)
        return [f * scales[0] for f in adapter(arrays[0])]                 # s F


class AdaptedUNet:
    """The U-Net with the adapter's features added while the call count is below `active_calls` (None: at
    every call). The pipelines pass int(n * factor) for a factor below 1: the first steps, counted as diffusers
    counts them, one per U-Net call (the batch [uncond; cond] is one call; a second-order sampler's
    timesteps list holds its extra evaluations, as diffusers' does).
    ``adapted(x, t, context, **kwargs)`` passes everything else through; `config` and `dtype` are the U-Net's,
    and any other attribute is looked up on it."""

    def __init__(self, unet, features: list, active_calls: int):
        self.unet, self.features, self.active_calls = unet, features, active_calls
        self.config, self.dtype = unet.config, unet.dtype
        self.calls = 0

    def __getattr__(self, name):                                           # what a pipeline reads off its U-Net
        return getattr(self.__dict__["unet"], name)

    def __call__(self, x, t, context, **kwargs):
        i, self.calls = self.calls, self.calls + 1
        if self.active_calls is None or i < self.active_calls:
            xp = backend.array_namespace(x)
            b = x.shape[0]
            kwargs["down_intrablock_additional_residuals"] = [
                f if f.shape[0] == b else xp.concatenate([f] * (b // f.shape[0]), axis=0) for f in self.features]
        return self.unet(x, t, context, **kwargs)


def _load(adapter, dtype):
    """A T2IAdapter as it is, a folder loaded, or a list of either made a MultiAdapter."""
    if isinstance(adapter, (list, tuple)):
        adapters = [_load(a, dtype) for a in adapter]
        return adapters[0] if len(adapters) == 1 else MultiAdapter(adapters)
    if isinstance(adapter, (str, os.PathLike)):
        return T2IAdapter.from_pretrained(adapter, dtype=dtype)
    return adapter


def _check_adapter(adapter, unet, vae_scale_factor: int):
    adapters = adapter.adapters if isinstance(adapter, MultiAdapter) else [adapter]
    for a in adapters:
        if not isinstance(a, T2IAdapter):
            raise ValueError(f"adapter: expected T2IAdapter objects, got {type(a).__name__}")
        check_adapter_compatible(a, unet)
        first = vae_scale_factor * (2 if a.config.adapter_type == "full_adapter_xl" else 1)
        if a.downscale_factor != first:
            raise ValueError(f"the T2I-Adapter unshuffles the image {a.downscale_factor}x down, but its first "
                             f"feature must be {first}x smaller than the image for this U-Net and VAE")


class StableDiffusionAdapterPipeline:
    """Stable Diffusion 1.x / 2.x steered by one or several T2I-Adapters (module docstring)."""

    default_guidance = 7.5

    @staticmethod
    def _base_class():
        from refldm.pipelines.sd import StableDiffusionPipeline
        return StableDiffusionPipeline

    def __init__(self, base, adapter):
        if not isinstance(base, self._base_class()):
            raise ValueError(f"{type(self).__name__} needs a {self._base_class().__name__}, got {type(base).__name__}")
        self.base = base
        self.adapter = _load(adapter, base.dtype.name)
        _check_adapter(self.adapter, base.unet, base.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, folder, adapter, dtype="float32"):
        """A model folder and `adapter`: a T2IAdapter, an adapter folder, or a list of them."""
        return cls(cls._base_class().from_pretrained(folder, dtype=dtype), _load(adapter, dtype))

    def _size(self, image, height, width):
        """(height, width): as given, or the (first) image's size floored to the unshuffle factor (diffusers'
        ``_default_height_width``)."""
        first = image[0] if isinstance(image, (list, tuple)) else image
        if first is None:
            raise ValueError("image: a T2I-Adapter pipeline needs a control image")
        w, h = first.size if isinstance(first, Image.Image) else (numpy.shape(first)[1], numpy.shape(first)[0])
        r = self.adapter.downscale_factor
        height = h // r * r if height is None else height
        width = w // r * r if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, numpy.integer)) or v < r or v % r:
                raise ValueError(f"{name}={v!r}: must be a positive multiple of the adapter's downscale_factor {r}")
        return int(height), int(width)

    def __call__(self, prompt="", image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, negative_prompt=None,
                 adapter_conditioning_scale=1.0, adapter_conditioning_factor: float = 1.0, **kwargs):
        """diffusers' arguments: image (one control image per adapter: a PIL image or a uint8 array),
        adapter_conditioning_scale (a number, or one per adapter), adapter_conditioning_factor (the fraction
        of the steps the features act in, from the start; diffusers' SDXL pipeline has it, its SD one acts on
        every step, which is the default 1.0). height / width default to the image's size floored to the
        adapter's downscale_factor. Any other keyword goes to the plain pipeline (seed, sampler,
        num_images_per_prompt, ...) except img2img's and the hires fix's, whose latents have another size."""
        for key in ("strength", "hires_scale", "denoising_start"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}: not with a T2I-Adapter here (its features are made for one latent size, "
                                 "the text-to-image one)")
        guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        factor = adapter_conditioning_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
                or not 0 <= factor <= 1:
            raise ValueError(f"adapter_conditioning_factor={factor!r} must lie in [0, 1]")
        n = len(self.adapter.adapters) if isinstance(self.adapter, MultiAdapter) else 1
        _per_adapter(adapter_conditioning_scale, n, "adapter_conditioning_scale")   # checked before the work
        height, width = self._size(image, height, width)
        features = adapter_features(self.adapter, image, height, width, adapter_conditioning_scale)
        from refldm.pipelines.common import check_steps
        steps = check_steps(num_inference_steps)
        pipe = copy.copy(self.base)                     # the same parts; its own U-Net wrapper for this call
        pipe.unet = AdaptedUNet(self.base.unet, features, None if factor >= 1 else int(steps * factor))
        return pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, **kwargs)


class StableDiffusionXLAdapterPipeline(StableDiffusionAdapterPipeline):
    """SDXL steered by one or several SDXL T2I-Adapters (``full_adapter_xl``); guidance 5.0 by default, the
    rest of the SDXL pipeline's arguments (prompt_2, original_size, ...) passed through."""

    default_guidance = 5.0

    @staticmethod
    def _base_class():
        from refldm.pipelines.sdxl import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline


def with_control(pipe, controlnets=(), adapters=(), images=(), scales=None, *, height: int, width: int,
                 steps: int, guidance_scale: float):
    """A shallow copy of `pipe` (an SD 1.x / 2.x or SDXL pipeline, for one image per call) whose U-Net adds,
    at every step, the ControlNets' residuals (`refldm.pipelines.controlnet.ControlledUNet`) and the
    T2I-Adapters' features (`AdaptedUNet`); both kinds at once is allowed, the U-Net takes the two inputs apart.
    images: one per model, the ControlNets' first, in order; scales: one per model (default 1.0). Control
    images of another size are resized to height x width with a warning. The CLI's --controlnet / --t2i-adapter."""
    from refldm.pipelines.controlnet import ControlArguments, ControlledUNet, _nets
    controlnets, adapters, images = list(controlnets), list(adapters), list(images)
    n_models = len(controlnets) + len(adapters)
    scales = [1.0] * n_models if scales is None else list(scales)
    if len(images) != n_models or len(scales) != n_models:
        raise ValueError(f"{len(images)} control images and {len(scales)} scales for {n_models} models "
                         "(ControlNets and T2I-Adapters): give one of each per model")
    for s in scales:
        check_scale(s, "control scale")
    unet = pipe.unet
    if adapters:
        adapter = adapters[0] if len(adapters) == 1 else MultiAdapter(adapters)
        _check_adapter(adapter, pipe.unet, pipe.vae_scale_factor)
        features = adapter_features(adapter, images[len(controlnets):], height, width, scales[len(controlnets):])
        unet = AdaptedUNet(unet, features, None)
    if controlnets:
        controlnet, nets = _nets(controlnets if len(controlnets) > 1 else controlnets[0], pipe.unet,
                                 pipe.vae_scale_factor)
        args = ControlArguments(nets, images[:len(controlnets)], scales[:len(controlnets)], 0.0, 1.0)
        do_cfg = guidance_scale > 1.0
        controls = args.tensors(height, width, 2 if do_cfg else 1, pipe.dtype.name, backend.xp())
        unet = ControlledUNet(unet, controlnet, controls, args, int(steps), False, do_cfg)
    out = copy.copy(pipe)
    out.unet = unet
    return out
