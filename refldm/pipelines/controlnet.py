"""Text-to-image with ControlNets (diffusers' ``StableDiffusionControlNetPipeline``), SD 1.x / 2.x.

The Stable Diffusion loop (refldm/pipelines/sd.py, docs/pipeline.md) with one change per step: before the
U-Net runs, each ControlNet j reads the latents, the text and its control image y_j, and its residuals,
scaled, are added to the U-Net's skips and mid block (refldm/models/controlnet.py):

    s_j(i)     = controlnet_conditioning_scale_j * keep_j(i),
    keep_j(i)  = 0 if i/n < control_guidance_start_j or (i+1)/n > control_guidance_end_j else 1
    r, r_mid   = sum_j s_j(i) ControlNet_j(scale(x_i), t_i, c, y_j)
    eps        = unet(scale(x_i), t_i, c, down_block_additional_residuals=r, mid_block_additional_residual=r_mid)

then classifier-free guidance and the scheduler's step as usual. With guidance, the ControlNets see the
batch [uncond; cond] and the control image twice; in guess mode they see only the conditional half, and
the unconditional half of the U-Net gets no residual (the control then acts through the guidance).

    pipe = StableDiffusionControlNetPipeline.from_pretrained("sd-folder", controlnet="controlnet-folder")
    out = pipe("a house", image=edges_png, controlnet_conditioning_scale=0.8, seed=1)

The pipeline holds a `StableDiffusionPipeline` (`base`) for the text encoder, the scheduler, the VAE and the
U-Net, and runs its own loop through `refldm.pipelines.sampling.sample`.
"""

from __future__ import annotations

import math
import os
import secrets
import time
import warnings

import numpy
from PIL import Image

from refldm import backend
from refldm.core.images import parameters_text
from refldm.models.controlnet import ControlNetModel, MultiControlNetModel, check_compatible, check_scale
from refldm.pipelines.sampling import initial_latents, sample
from refldm.pipelines.sd import StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["StableDiffusionControlNetPipeline", "control_keep", "prepare_control_image"]


def control_keep(n_steps: int, starts: list, ends: list) -> list:
    """keep[i][j] = 1.0 where ControlNet j acts at step i of n, else 0.0 (diffusers' ``controlnet_keep``):
    it acts while i/n >= start_j and (i+1)/n <= end_j."""
    return [[1.0 - float(i / n_steps < s or (i + 1) / n_steps > e) for s, e in zip(starts, ends)]
            for i in range(n_steps)]


def prepare_control_image(image, height: int, width: int, dtype: str, index: int = 0):
    """A control image (PIL image, or uint8 array (H, W[, 3])) -> (1, 3, height, width) in [0, 1] on the backend.

    Another size is resized (Lanczos, as diffusers' image processor) with a warning naming both sizes."""
    if isinstance(image, numpy.ndarray):
        if image.dtype != numpy.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"control image {index}: a uint8 array (H, W) or (H, W, 3) is expected, got "
                             f"{image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"control image {index}: expected a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        warnings.warn(f"control image {index} is {image.width}x{image.height}; resized to {width}x{height}",
                      stacklevel=3)
        image = image.resize((width, height), Image.LANCZOS)
    a = numpy.asarray(image, dtype=numpy.float32) / 255.0                   # (H, W, 3), as diffusers: float32
    return backend.asarray(a.transpose(2, 0, 1)[None], dtype=dtype)         # (1, 3, H, W)


def _per_net(value, n: int, name: str) -> list:
    """A number for every ControlNet, or a list of one per ControlNet -> a list of n numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} ControlNets")
    return values


class StableDiffusionControlNetPipeline:
    """Stable Diffusion steered by one or several ControlNets (see the module docstring)."""

    def __init__(self, base: StableDiffusionPipeline, controlnet):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet) if len(controlnet) != 1 else controlnet[0]
        nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
        for net in nets:
            if not isinstance(net, ControlNetModel):
                raise ValueError(f"controlnet: expected ControlNetModel objects, got {type(net).__name__}")
            check_compatible(net, base.unet)
            f = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
            if f != base.vae_scale_factor:
                raise ValueError(f"the ControlNet embeds control images {f}x down, but the VAE's latents are "
                                 f"{base.vae_scale_factor}x smaller than the image")
        self.base = base
        self.controlnet = controlnet
        self.nets = nets

    @classmethod
    def from_pretrained(cls, folder, controlnet, dtype="float32") -> "StableDiffusionControlNetPipeline":
        """An SD folder and `controlnet`: a ControlNetModel, a controlnet folder, or a list of either."""
        items = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
        nets = [ControlNetModel.from_pretrained(c, dtype=dtype) if isinstance(c, (str, os.PathLike)) else c
                for c in items]
        base = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
        return cls(base, nets if isinstance(controlnet, (list, tuple)) else nets[0])

    def _controlnet_residuals(self, x, t, context, images, scales, guess_mode):
        """The summed residuals of every ControlNet whose scale is not switched off at this step."""
        if isinstance(self.controlnet, MultiControlNetModel):
            return self.controlnet(x, t, context, images, scales, guess_mode)
        return self.controlnet(x, t, context, images[0], scales[0], guess_mode)

    def __call__(self, prompt="", image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt=None,
                 seed: int | None = None, generator=None, sampler: str | None = None, latents=None,
                 controlnet_conditioning_scale=1.0, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, callback=None, progress: bool = True) -> StableDiffusionPipelineOutput:
        """Generate images steered by the control image(s), with diffusers' argument names and defaults.

        image: one control image per ControlNet (a PIL image or uint8 array; a list for several);
        height/width default to the (first) control image's size, floored to a multiple of 8.
        controlnet_conditioning_scale, control_guidance_start, control_guidance_end: a number, or one per
        ControlNet. guess_mode: the ControlNets see only the conditional text, with their residuals scaled
        from 0.1 (shallow) to 1 (mid block)."""
        from refldm.core.random import Generator
        base, n_nets = self.base, len(self.nets)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        batch = len(prompts)
        negatives = [""] * batch if negative_prompt is None else (
            [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        if image is None:
            raise ValueError("image: a ControlNet pipeline needs a control image")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) != n_nets:
            raise ValueError(f"{len(images)} control images for {n_nets} ControlNet{'s' * (n_nets > 1)}: "
                             "give one per ControlNet")
        scales = _per_net(controlnet_conditioning_scale, n_nets, "controlnet_conditioning_scale")
        for s in scales:
            check_scale(s)
        starts = _per_net(control_guidance_start, n_nets, "control_guidance_start")
        ends = _per_net(control_guidance_end, n_nets, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not (0.0 <= s < e <= 1.0):
                raise ValueError(f"control_guidance_start={s} and control_guidance_end={e} must satisfy "
                                 "0 <= start < end <= 1")
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        first = images[0] if isinstance(images[0], Image.Image) else Image.fromarray(numpy.asarray(images[0]))
        f = base.vae_scale_factor
        height = first.height // f * f if height is None else int(height)
        width = first.width // f * f if width is None else int(width)
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
        if generator is None:
            seed = secrets.randbelow(2 ** 32) if seed is None else seed
            generator = Generator(seed)
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        dtype = base.dtype.name
        timings = {}

        # 1. text and control images; with CFG one batch [uncond; cond], the control image twice unless guess mode
        start = time.perf_counter()
        cond = base.encode_prompt(prompts)                                        # (B, 77, D)
        xp = backend.array_namespace(cond)
        context = xp.concatenate([base.encode_prompt(negatives, cond.shape[1]), cond]) if do_cfg else cond
        copies = 2 * batch if do_cfg and not guess_mode else batch
        controls = [xp.concatenate([prepare_control_image(im, height, width, dtype, k)] * copies)
                    for k, im in enumerate(images)]                               # each (B or 2B, 3, H, W)
        timings["text encode"] = time.perf_counter() - start

        # 2. timesteps, starting noise, and which ControlNet acts at which step
        sched = base.make_scheduler(sampler)
        sched.set_timesteps(int(num_inference_steps))
        timesteps = sched.timesteps
        shape = (batch, base.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = initial_latents(shape, sched, generator=generator, dtype=dtype)   # eps * sigma_max
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            latents = backend.asarray(latents, dtype=dtype) * float(sched.init_noise_sigma)
        keep = control_keep(len(timesteps), starts, ends)
        step = [0]                                                                # the model calls so far

        # 3. the loop: the ControlNets' residuals enter the U-Net at every step
        def model_fn(x, t):                                                       # x: (2B or B, 4, h, w), scaled
            i = min(step[0], len(keep) - 1)
            step[0] += 1
            s = [scale * k for scale, k in zip(scales, keep[i])]
            if guess_mode and do_cfg:                                             # conditional half only
                res = self._controlnet_residuals(x[batch:], t, context[batch:], controls, s, True)
                zeros = lambda r: xp.concatenate([xp.zeros_like(r), r])           # uncond half: no residual
                down, mid = [zeros(r) for r in res.down_block_res_samples], zeros(res.mid_block_res_sample)
            else:
                res = self._controlnet_residuals(x, t, context, controls, s, guess_mode)
                down, mid = res.down_block_res_samples, res.mid_block_res_sample
            return base.unet(x, t, context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)

        start = time.perf_counter()
        latents = sample(model_fn, sched, latents, timesteps, guidance_scale=guidance_scale if do_cfg else None,
                         generator=generator, callback=callback, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        # 4. latents -> pixels
        start = time.perf_counter()
        pixels = base.decode_latents(latents)                                     # (B, H, W, 3) uint8
        timings["decode"] = time.perf_counter() - start
        out_images, parameters = [], []
        label = sampler or base.scheduler_config.get("_class_name", "")
        for k, p in enumerate(pixels):
            im = Image.fromarray(p)
            text = parameters_text(prompts[k], negatives[k], int(num_inference_steps), label, guidance_scale,
                                   "unknown" if seed is None else seed, im.width, im.height, base.name)
            im.info["parameters"] = text
            out_images.append(im)
            parameters.append(text)
        return StableDiffusionPipelineOutput(images=out_images, latents=latents, seed=seed, timings=timings,
                                             parameters=parameters)
