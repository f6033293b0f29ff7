"""Text-to-image with ControlNets: diffusers' ``StableDiffusionControlNetPipeline`` (SD 1.x / 2.x) and
``StableDiffusionXLControlNetPipeline`` (SDXL).

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

Each pipeline holds a `StableDiffusionPipeline` / `StableDiffusionXLPipeline` (`base`) for the text
encoders, the scheduler, the VAE and the U-Net, and runs the loop above (`denoise_with_control`) through
`refldm.pipelines.sampling.sample`. SDXL's ControlNets also receive the pooled text and the time ids
(``added_cond_kwargs``), as its U-Net does.
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
from refldm.core import record
from refldm.pipelines.common import parameters_text
from refldm.models.controlnet import ControlNetModel, MultiControlNetModel, check_compatible, check_scale
from refldm.core.images import scale_latents
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps, initial_latents, sample
from refldm.pipelines.sd import NonFiniteLatentsError, StableDiffusionPipeline, StableDiffusionPipelineOutput

__all__ = ["StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
           "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline",
           "StableDiffusionXLControlNetImg2ImgPipeline", "ControlledUNet",
           "control_keep",
           "prepare_control_image", "denoise_with_control"]


def control_keep(n_steps: int, starts: list, ends: list) -> list:
    """keep[i][j] = 1.0 where ControlNet j acts at step i of n, else 0.0 (diffusers' ``controlnet_keep``):
    it acts while i/n >= start_j and (i+1)/n <= end_j."""
    return [[1.0 - float(i / n_steps < s or (i + 1) / n_steps > e) for s, e in zip(starts, ends)]
            for i in range(n_steps)]


def prepare_control_image(image, height: int, width: int, dtype: str, index: int = 0, channels: int = 3,
                          what: str = "control image", stacklevel: int = 3):
    """A control image (PIL image, or uint8 array (H, W[, 3])) -> (1, channels, height, width) in [0, 1] on the
    backend: x = pixels / 255, float32 as diffusers, then the compute dtype.

    Another size is resized (Lanczos, as diffusers' image processor) with a warning naming both sizes;
    channels=1 (the one-channel T2I-Adapters) takes the grey image ("L"), 3 the RGB one. `what` names the
    image in messages ("control image 0", "adapter image 1"); stacklevel: the warning's, as warnings.warn."""
    if isinstance(image, numpy.ndarray):
        if image.dtype != numpy.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"{what} {index}: a uint8 array (H, W) or (H, W, 3) is expected, got "
                             f"{image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} {index}: expected a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        warnings.warn(f"{what} {index} is {image.width}x{image.height}; resized to {width}x{height}",
                      stacklevel=stacklevel)
        image = image.resize((width, height), Image.LANCZOS)
    a = numpy.asarray(image, dtype=numpy.float32) / 255.0                   # (H, W[, 3])
    a = a[:, :, None] if a.ndim == 2 else a
    return backend.asarray(a.transpose(2, 0, 1)[None], dtype=dtype)         # (1, C, H, W)


def _per_net(value, n: int, name: str) -> list:
    """A number for every ControlNet, or a list of one per ControlNet -> a list of n numbers."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} ControlNets")
    return values


class ControlArguments:
    """The control arguments of a call, checked and made one per ControlNet."""

    def __init__(self, nets, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end):
        n = len(nets)
        if image is None:
            raise ValueError("image: a ControlNet pipeline needs a control image")
        self.images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(self.images) != n:
            raise ValueError(f"{len(self.images)} control images for {n} ControlNet{'s' * (n > 1)}: "
                             "give one per ControlNet")
        self.scales = _per_net(controlnet_conditioning_scale, n, "controlnet_conditioning_scale")
        for s in self.scales:
            check_scale(s)
        self.starts = _per_net(control_guidance_start, n, "control_guidance_start")
        self.ends = _per_net(control_guidance_end, n, "control_guidance_end")
        for s, e in zip(self.starts, self.ends):
            if not (0.0 <= s < e <= 1.0):
                raise ValueError(f"control_guidance_start={s} and control_guidance_end={e} must satisfy "
                                 "0 <= start < end <= 1")

    def size(self, height, width, f: int):
        """(height, width): as given, or the first control image's size floored to a multiple of f."""
        first = self.images[0]
        w, h = first.size if isinstance(first, Image.Image) else (numpy.shape(first)[1], numpy.shape(first)[0])
        height = h // f * f if height is None else int(height)
        width = w // f * f if width is None else int(width)
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
        return height, width

    def tensors(self, height: int, width: int, copies: int, dtype: str, xp):
        """Each control image as (copies, 3, H, W) in [0, 1]."""
        return [xp.concatenate([prepare_control_image(im, height, width, dtype, k)] * copies)
                for k, im in enumerate(self.images)]


def _nets(controlnet, unet, vae_scale_factor: int):
    """controlnet (one, a list, or a MultiControlNetModel) -> (the callable, the list), checked against the U-Net."""
    if isinstance(controlnet, (list, tuple)):
        controlnet = MultiControlNetModel(controlnet) if len(controlnet) != 1 else controlnet[0]
    nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    for net in nets:
        if not isinstance(net, ControlNetModel):
            raise ValueError(f"controlnet: expected ControlNetModel objects, got {type(net).__name__}")
        check_compatible(net, unet)
        f = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
        if f != vae_scale_factor:
            raise ValueError(f"the ControlNet embeds control images {f}x down, but the VAE's latents are "
                             f"{vae_scale_factor}x smaller than the image")
    return controlnet, nets


def _load(c, dtype, weights_dtype=None):
    """A ControlNetModel as it is; a folder (diffusers) or a .safetensors single file (original keys) loaded."""
    if not isinstance(c, (str, os.PathLike)):
        return c
    if os.path.isfile(c):
        return ControlNetModel.from_single_file(c, dtype=dtype, weights_dtype=weights_dtype)
    return ControlNetModel.from_pretrained(c, dtype=dtype, weights_dtype=weights_dtype)


def _load_nets(controlnet, dtype, weights_dtype=None):
    items = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
    nets = [_load(c, dtype, weights_dtype) for c in items]
    return nets if isinstance(controlnet, (list, tuple)) else nets[0]


def _check_steps(num_inference_steps, guidance_scale):
    if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return int(num_inference_steps)


def _generator(seed, generator):
    """(seed, generator): the given generator, or one made from `seed` (drawn at random if None)."""
    from refldm.core.random import Generator
    if generator is None:
        seed = secrets.randbelow(2 ** 32) if seed is None else seed
        generator = Generator(seed)
    return seed, generator


def _start(base, batch, height, width, num_inference_steps, sampler, latents, seed, generator):
    """The scheduler, the starting latents x_T (B, 4, h, w) and the seed."""
    seed, generator = _generator(seed, generator)
    sched = base.make_scheduler(sampler)
    sched.set_timesteps(num_inference_steps)
    f = base.vae_scale_factor
    shape = (batch, base.unet.config.in_channels, height // f, width // f)
    dtype = base.dtype.name
    if latents is None:
        latents = initial_latents(shape, sched, generator=generator, dtype=dtype)   # eps * sigma_max
    else:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = backend.asarray(latents, dtype=dtype) * float(sched.init_noise_sigma)
    return sched, latents, seed, generator


class ControlledUNet:
    """The U-Net with the ControlNets' residuals added at every call: ``controlled(x, t, context, **kwargs)``
    computes r, r_mid for call i (scales s_j * keep_j(i)) and returns ``unet(x, t, context, **kwargs,
    down_block_additional_residuals=r, mid_block_additional_residual=r_mid)``. With CFG x holds [uncond; cond]
    and `controls` the control images for that batch (for the conditional half only in guess mode).
    The ControlNets read x's first channels (an inpainting U-Net's x also holds the mask and the masked image).
    Any loop that calls ``unet(x, t, context)`` once per step can run it (`config` is the U-Net's)."""

    def __init__(self, unet, controlnet, controls: list, args: ControlArguments, n_steps: int, guess_mode: bool,
                 do_cfg: bool):
        self.unet, self.controlnet, self.controls, self.args = unet, controlnet, controls, args
        self.config, self.dtype = unet.config, unet.dtype
        self.keep = control_keep(n_steps, args.starts, args.ends)
        self.guess_mode, self.do_cfg = guess_mode, do_cfg
        self.calls = 0                                                     # the step the next call belongs to

    def __call__(self, x, t, context, added_cond_kwargs=None, **kwargs):
        xp = backend.array_namespace(x)
        i = min(self.calls, len(self.keep) - 1)
        self.calls += 1
        s = [scale * k for scale, k in zip(self.args.scales, self.keep[i])]
        x_c, c_c, added = x[:, :self.controlnet_channels], context, added_cond_kwargs
        if self.guess_mode and self.do_cfg:                                # the ControlNets see the cond half
            half = x.shape[0] // 2
            x_c, c_c = x_c[half:], context[half:]
            added = None if added is None else {k: v[half:] for k, v in added.items()}
        with record.scope("controlnet"):                                   # trace: steps.<i>.unet.controlnet.*
            if isinstance(self.controlnet, MultiControlNetModel):
                res = self.controlnet(x_c, t, c_c, self.controls, s, self.guess_mode, added)
            else:
                res = self.controlnet(x_c, t, c_c, self.controls[0], s[0], self.guess_mode, added)
        down, mid = res.down_block_res_samples, res.mid_block_res_sample
        if self.guess_mode and self.do_cfg:                                # the uncond half gets no residual
            down = [xp.concatenate([xp.zeros_like(r), r]) for r in down]
            mid = xp.concatenate([xp.zeros_like(mid), mid])
        return self.unet(x, t, context, added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **kwargs)

    @property
    def controlnet_channels(self) -> int:
        nets = self.controlnet.nets if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]
        return nets[0].config.in_channels


def denoise_with_control(unet, controlnet, sched, latents, context, added, controls, args: ControlArguments,
                         guess_mode: bool, guidance_scale: float, generator, callback=None, progress=True,
                         timesteps=None):
    """The loop of the module docstring (`ControlledUNet` in `refldm.pipelines.sampling.sample`); with CFG,
    context and added hold [uncond; cond]. added: SDXL's {"text_embeds", "time_ids"} or None. timesteps:
    those to run (img2img's tail; default all), over which the start/end windows are counted."""
    do_cfg = guidance_scale > 1.0
    xp = backend.array_namespace(latents)
    timesteps = sched.timesteps if timesteps is None else timesteps
    controlled = ControlledUNet(unet, controlnet, controls, args, len(timesteps), guess_mode, do_cfg)

    def after_step(i, t, x):                                               # stop at the first NaN / inf
        if not bool(xp.all(xp.isfinite(x))):
            raise NonFiniteLatentsError(
                f"the latents hold NaN or inf after step {i + 1} of {len(timesteps)} (timestep {float(t):g}); "
                "stopped. Try float32 rather than float16, a lower conditioning scale or guidance scale")
        if callback is not None:
            callback(i, t, x)

    return sample(lambda x, t: controlled(x, t, context, added_cond_kwargs=added), sched, latents, timesteps,
                  guidance_scale=guidance_scale if do_cfg else None, generator=generator, callback=after_step,
                  progress=progress)


def _output(base, latents, prompts, negatives, steps, sampler, guidance_scale, seed, timings):
    start = time.perf_counter()
    pixels = base.decode_latents(latents)                                 # (B, H, W, 3) uint8
    timings["decode"] = time.perf_counter() - start
    images, parameters = [], []
    label = sampler or base.scheduler_config.get("_class_name", "")
    for k, p in enumerate(pixels):
        im = Image.fromarray(p)
        text = parameters_text(prompts[k], negatives[k] or "", steps, label, guidance_scale,
                               "unknown" if seed is None else seed, im.width, im.height, base.name)
        im.info["parameters"] = text
        images.append(im)
        parameters.append(text)
    return StableDiffusionPipelineOutput(images=images, latents=latents, seed=seed, timings=timings,
                                         parameters=parameters)


def _prompts(prompt, negative_prompt):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is None:
        return prompts, None
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


class StableDiffusionControlNetPipeline:
    """Stable Diffusion 1.x / 2.x steered by one or several ControlNets (see the module docstring)."""

    def __init__(self, base: StableDiffusionPipeline, controlnet):
        self.base = base
        self.controlnet, self.nets = _nets(controlnet, base.unet, base.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, folder, controlnet, dtype="float32",
                        weights_dtype: str | None = None) -> "StableDiffusionControlNetPipeline":
        """An SD folder and `controlnet`: a ControlNetModel, a controlnet folder, a single file, or a list.
        weights_dtype="stored": the base's models and the ControlNets keep their weights as stored."""
        return cls(StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, weights_dtype=weights_dtype),
                   _load_nets(controlnet, dtype, weights_dtype))

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
        base = self.base
        prompts, negatives = _prompts(prompt, negative_prompt)
        negatives = negatives or [""] * len(prompts)
        args = ControlArguments(self.nets, image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end)
        steps = _check_steps(num_inference_steps, guidance_scale)
        height, width = args.size(height, width, base.vae_scale_factor)
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        timings = {}

        # 1. text and control images; with CFG one batch [uncond; cond], the control image twice unless guess mode
        start = time.perf_counter()
        cond = base.encode_prompt(prompts)                                        # (B, 77, D)
        xp = backend.array_namespace(cond)
        context = xp.concatenate([base.encode_prompt(negatives, cond.shape[1]), cond]) if do_cfg else cond
        batch = len(prompts)
        controls = args.tensors(height, width, 2 * batch if do_cfg and not guess_mode else batch, base.dtype.name, xp)
        timings["text encode"] = time.perf_counter() - start

        # 2. the starting noise, 3. the loop with the ControlNets, 4. the pixels
        sched, latents, seed, generator = _start(base, batch, height, width, steps, sampler, latents, seed, generator)
        start = time.perf_counter()
        latents = denoise_with_control(base.unet, self.controlnet, sched, latents, context, None, controls, args,
                                       guess_mode, guidance_scale, generator, callback, progress)
        timings["denoise"] = time.perf_counter() - start
        return _output(base, latents, prompts, negatives, steps, sampler, guidance_scale, seed, timings)


class StableDiffusionControlNetImg2ImgPipeline(StableDiffusionControlNetPipeline):
    """Image to image steered by ControlNets (diffusers' ``StableDiffusionControlNetImg2ImgPipeline``): the
    image is encoded and noised to the timestep `strength` selects, then denoised with the control."""

    def __call__(self, prompt="", image=None, control_image=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt=None, strength: float = 0.8, seed: int | None = None,
                 generator=None, sampler: str | None = None, controlnet_conditioning_scale=0.8,
                 guess_mode: bool = False, control_guidance_start=0.0, control_guidance_end=1.0, callback=None,
                 progress: bool = True) -> StableDiffusionPipelineOutput:
        """diffusers' arguments and defaults (strength 0.8, controlnet_conditioning_scale 0.8). image: the
        starting picture (its sides multiples of 8; the output has its size); control_image: one per
        ControlNet, resized to the image's size with a warning if it differs. The start/end windows count
        the steps that run (the last int(strength * n) of n)."""
        base = self.base
        if image is None:
            raise ValueError("image: img2img needs a starting image (and control_image the control)")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must lie in (0, 1]")
        prompts, negatives = _prompts(prompt, negative_prompt)
        negatives = negatives or [""] * len(prompts)
        args = ControlArguments(self.nets, control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end)
        steps = _check_steps(num_inference_steps, guidance_scale)
        init = base.preprocess_image(image)                                      # (1, 3, H, W) in [-1, 1]
        height, width = init.shape[2], init.shape[3]
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        batch = len(prompts)
        timings = {}

        # 1. text and control images, as in text-to-image
        start = time.perf_counter()
        cond = base.encode_prompt(prompts)                                        # (B, 77, D)
        xp = backend.array_namespace(cond)
        context = xp.concatenate([base.encode_prompt(negatives, cond.shape[1]), cond]) if do_cfg else cond
        controls = args.tensors(height, width, 2 * batch if do_cfg and not guess_mode else batch, base.dtype.name, xp)
        timings["text encode"] = time.perf_counter() - start

        # 2. the timesteps strength selects, and the encoded image noised to the first of them
        seed, generator = _generator(seed, generator)
        sched = base.make_scheduler(sampler)
        sched.set_timesteps(steps)
        timesteps, left = img2img_timesteps(sched, steps, strength)
        if left < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
        start = time.perf_counter()
        x0 = scale_latents(base.vae.encode(init).sample(generator=generator), base.vae.config)  # z ~ q(z|x)
        x0 = xp.concatenate([x0] * batch)                                         # (B, 4, h, w)
        latents = img2img_latents(sched, x0, timesteps, generator=generator)      # add_noise(x0, eps, t_0)
        timings["image encode"] = time.perf_counter() - start

        # 3. the loop with the ControlNets over those steps, 4. the pixels
        start = time.perf_counter()
        latents = denoise_with_control(base.unet, self.controlnet, sched, latents, context, None, controls, args,
                                       guess_mode, guidance_scale, generator, callback, progress, timesteps)
        timings["denoise"] = time.perf_counter() - start
        return _output(base, latents, prompts, negatives, steps, sampler, guidance_scale, seed, timings)


class StableDiffusionControlNetInpaintPipeline(StableDiffusionControlNetPipeline):
    """Inpainting steered by ControlNets (diffusers' ``StableDiffusionControlNetInpaintPipeline``): refldm's
    inpainting pipeline (refldm/pipelines/inpaint.py: a 9-channel inpainting U-Net, or masked blending with an
    ordinary one) run with the `ControlledUNet` in place of the U-Net."""

    def __call__(self, prompt="", image=None, mask_image=None, control_image=None, negative_prompt=None,
                 strength: float = 1.0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 seed: int | None = None, generator=None, sampler: str | None = None,
                 controlnet_conditioning_scale=0.5, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, callback=None, progress: bool = True) -> StableDiffusionPipelineOutput:
        """diffusers' arguments and defaults (strength 1.0, controlnet_conditioning_scale 0.5). image: the
        picture (sides multiples of 8); mask_image: white = repaint; control_image: one per ControlNet (for
        the "inpaint" ControlNets, the image with the masked pixels at -1, made by the caller), resized to the
        image's size with a warning if it differs."""
        from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
        base = self.base
        if image is None or mask_image is None:
            raise ValueError("inpainting needs image= and mask_image= (and control_image= the control)")
        args = ControlArguments(self.nets, control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end)
        steps = _check_steps(num_inference_steps, guidance_scale)
        prompts, _ = _prompts(prompt, negative_prompt)
        init = base.preprocess_image(image)                                      # checks the size
        height, width = init.shape[2], init.shape[3]
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        batch = len(prompts)
        copies = 2 * batch if do_cfg and not guess_mode else batch
        controls = args.tensors(height, width, copies, base.dtype.name, backend.array_namespace(init))
        sched = base.make_scheduler(sampler)                                     # to count the steps that run
        sched.set_timesteps(steps)
        timesteps, _ = img2img_timesteps(sched, steps, strength)
        controlled = ControlledUNet(base.unet, self.controlnet, controls, args, len(timesteps), guess_mode, do_cfg)
        pipe = StableDiffusionInpaintPipeline(base.vae, base.text_encoder, base.tokenizer, controlled,
                                              base.scheduler_config, base.configs, name=base.name,
                                              dtype=base.dtype.name)
        return pipe(prompt, image=image, mask_image=mask_image, negative_prompt=negative_prompt, strength=strength,
                    num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, generator=generator,
                    sampler=sampler, callback=callback, progress=progress)


class StableDiffusionXLControlNetPipeline:
    """SDXL steered by one or several SDXL ControlNets; diffusers' arguments (guidance 5.0 by default)."""

    def __init__(self, base, controlnet):
        from refldm.pipelines.sdxl import StableDiffusionXLPipeline
        if not isinstance(base, StableDiffusionXLPipeline):
            raise ValueError(f"StableDiffusionXLControlNetPipeline needs an SDXL pipeline, got {type(base).__name__}")
        self.base = base
        self.controlnet, self.nets = _nets(controlnet, base.unet, base.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, folder, controlnet, dtype="float32",
                        weights_dtype: str | None = None) -> "StableDiffusionXLControlNetPipeline":
        """An SDXL folder and `controlnet`: a ControlNetModel, a controlnet folder, a single file, or a list.
        weights_dtype="stored": the base's models and the ControlNets keep their weights as stored."""
        from refldm.pipelines.sdxl import StableDiffusionXLPipeline
        return cls(StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, weights_dtype=weights_dtype),
                   _load_nets(controlnet, dtype, weights_dtype))

    def __call__(self, prompt="", image=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 seed: int | None = None, generator=None, sampler: str | None = None, latents=None,
                 controlnet_conditioning_scale=1.0, guess_mode: bool = False, control_guidance_start=0.0,
                 control_guidance_end=1.0, callback=None, progress: bool = True) -> StableDiffusionPipelineOutput:
        """As `StableDiffusionControlNetPipeline.__call__`, plus SDXL's size conditioning (original_size,
        crops_coords_top_left, target_size; sizes default to the output's). With force_zeros_for_empty_prompt
        and no negative prompt the unconditional embeddings are zeros, as in diffusers."""
        base = self.base
        prompts, negatives = _prompts(prompt, negative_prompt)
        args = ControlArguments(self.nets, image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end)
        steps = _check_steps(num_inference_steps, guidance_scale)
        height, width = args.size(height, width, base.vae_scale_factor)
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        batch = len(prompts)
        timings = {}

        # 1. text (context (B, 77, D1 + D2), pooled (B, P)), time ids (B, 6) and the control images
        start = time.perf_counter()
        cond, pooled = base.encode_prompt(prompts)
        xp = backend.array_namespace(cond)
        if do_cfg:
            if negatives is None and base.force_zeros_for_empty_prompt:
                uncond, uncond_pooled = xp.zeros_like(cond), xp.zeros_like(pooled)
            else:
                uncond, uncond_pooled = base.encode_prompt(negatives or [""] * batch, max_length=cond.shape[1])
            context = xp.concatenate([uncond, cond])
            pooled = xp.concatenate([uncond_pooled, pooled])
        else:
            context = cond
        ids = base.time_ids(tuple(original_size or (height, width)), tuple(crops_coords_top_left),
                            tuple(target_size or (height, width)))
        time_ids = backend.asarray([ids] * (2 * batch if do_cfg else batch), dtype=base.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        controls = args.tensors(height, width, 2 * batch if do_cfg and not guess_mode else batch, base.dtype.name, xp)
        timings["text encode"] = time.perf_counter() - start

        # 2. the starting noise, 3. the loop with the ControlNets, 4. the pixels
        sched, latents, seed, generator = _start(base, batch, height, width, steps, sampler, latents, seed, generator)
        start = time.perf_counter()
        latents = denoise_with_control(base.unet, self.controlnet, sched, latents, context, added, controls, args,
                                       guess_mode, guidance_scale, generator, callback, progress)
        timings["denoise"] = time.perf_counter() - start
        return _output(base, latents, prompts, negatives or [""] * batch, steps, sampler, guidance_scale, seed,
                       timings)


class StableDiffusionXLControlNetImg2ImgPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL image to image steered by ControlNets (diffusers' ``StableDiffusionXLControlNetImg2ImgPipeline``):
    refldm's SDXL img2img pipeline run with the `ControlledUNet` in place of the U-Net."""

    def __call__(self, prompt="", image=None, control_image=None, strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, negative_prompt=None,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, seed: int | None = None, generator=None,
                 sampler: str | None = None, controlnet_conditioning_scale=0.8, guess_mode: bool = False,
                 control_guidance_start=0.0, control_guidance_end=1.0, callback=None,
                 progress: bool = True) -> StableDiffusionPipelineOutput:
        """diffusers' arguments and defaults (strength 0.8, controlnet_conditioning_scale 0.8, guidance 5.0);
        image: the starting picture (sides multiples of 8), control_image: one per ControlNet."""
        from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline
        base = self.base
        if image is None:
            raise ValueError("image: img2img needs a starting image (and control_image the control)")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must lie in (0, 1]")
        args = ControlArguments(self.nets, control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end)
        steps = _check_steps(num_inference_steps, guidance_scale)
        prompts, _ = _prompts(prompt, negative_prompt)
        init = base.preprocess_image(image)                                      # checks the size
        height, width = init.shape[2], init.shape[3]
        do_cfg = guidance_scale > 1.0
        guess_mode = guess_mode or any(net.config.global_pool_conditions for net in self.nets)
        copies = 2 * len(prompts) if do_cfg and not guess_mode else len(prompts)
        controls = args.tensors(height, width, copies, base.dtype.name, backend.array_namespace(init))
        sched = base.make_scheduler(sampler)                                     # to count the steps that run
        sched.set_timesteps(steps)
        timesteps, _ = img2img_timesteps(sched, steps, strength)
        controlled = ControlledUNet(base.unet, self.controlnet, controls, args, len(timesteps), guess_mode, do_cfg)
        pipe = StableDiffusionXLImg2ImgPipeline(
            base.vae, base.text_encoder, base.text_encoder_2, base.tokenizer, base.tokenizer_2, controlled,
            base.scheduler_config, base.configs, name=base.name, dtype=base.dtype.name,
            force_zeros_for_empty_prompt=base.force_zeros_for_empty_prompt,
            requires_aesthetics_score=base.requires_aesthetics_score)
        return pipe(prompt, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt, original_size=original_size,
                    crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                    aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score, seed=seed,
                    generator=generator, sampler=sampler, callback=callback, progress=progress)
