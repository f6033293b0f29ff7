"""Inpainting: repaint the masked part of an image under a prompt, as diffusers' StableDiffusionInpaintPipeline.

Inputs: image (1, 3, H, W) in [-1, 1]; mask (1, 1, H, W) binarised, 1 = repaint, 0 = keep. Two mechanisms,
chosen by the U-Net's input channels (docs/inpainting.md draws both):

9-channel inpainting U-Nets (sd-v1-5-inpainting, sd-2-inpainting) are trained to see what to keep:

    m        = nearest_resize(mask, (H/8, W/8))                    (1, 1, h, w)   the mask at latent size
    z_masked = 0.18215 * vae.encode(image * (mask < 0.5)).sample   (1, 4, h, w)   the kept part, hole = grey 0
    x_T      = noise * init_noise_sigma    (strength 1), else add_noise(z_image, noise, t_0)
    per step: eps = unet([scale(x_t), m, z_masked], t, c)          (B, 4 + 1 + 4 = 9, h, w) in
              x_{t-1} = scheduler.step(eps, t, x_t)

4-channel (ordinary) U-Nets know nothing of the mask; after every step the kept region is replaced by the
image's own latents noised to the next timestep (with the same noise), so only the hole is generated:

    x_{t-1} = (1 - m) * add_noise(z_image, noise, t_next) + m * scheduler.step(eps, t, x_t)
              (after the last step: (1 - m) * z_image + m * x_0)

The random draws come in diffusers' order from one generator: the image's posterior sample (4-channel, or
strength < 1), the noise, then the masked image's posterior sample. So with the same seed both pipelines
start from the same numbers (tests/test_inpaint.py).

A mask of another size than the image is resized to it (PIL's Lanczos, as diffusers) and a mask that is not
single-channel is converted to grey ("L"); each says so in a warning. Then mask = 1 where value >= 0.5
(of 255), 0 elsewhere. padding_mask_crop (diffusers' inpaint-only-masked-area mode) is not implemented.
"""

from __future__ import annotations

import secrets
import time
import warnings

import numpy as np
from PIL import Image

from refldm import backend
from refldm import random as refldm_random
from refldm.images import scale_latents
from refldm.models.blocks import upsample_nearest
from refldm.pipeline import NonFiniteLatentsError, StableDiffusionPipeline, StableDiffusionPipelineOutput
from refldm.sampling import img2img_latents, img2img_timesteps, sample

__all__ = ["StableDiffusionInpaintPipeline", "prepare_mask"]


def prepare_mask(mask_image, size) -> np.ndarray:
    """A PIL mask (or uint8 array) -> (1, 1, H, W) float32 of 0 / 1 at the image's size (width, height).

    Not single-channel: converted to grey with PIL's "L" (0.299 R + 0.587 G + 0.114 B), with a warning.
    Another size: resized with Lanczos (diffusers' resample for masks), with a warning. Then binarised:
    value / 255 >= 0.5 -> 1 (repaint), else 0 (keep)."""
    if isinstance(mask_image, np.ndarray):
        mask_image = Image.fromarray(mask_image)
    if not isinstance(mask_image, Image.Image):
        raise ValueError(f"mask_image must be a PIL image or a uint8 array, got {type(mask_image).__name__}")
    if mask_image.mode != "L":
        warnings.warn(f"the mask is {mask_image.mode}, not single-channel; converted to grey (PIL 'L')",
                      stacklevel=3)
        mask_image = mask_image.convert("L")
    if mask_image.size != tuple(size):
        warnings.warn(f"the mask is {mask_image.size[0]}x{mask_image.size[1]}, the image {size[0]}x{size[1]}; "
                      "the mask was resized to the image (Lanczos)", stacklevel=3)
        mask_image = mask_image.resize(tuple(size), resample=Image.LANCZOS)
    m = np.asarray(mask_image, dtype=np.float32) / 255.0                      # (H, W) in [0, 1]
    m = (m >= 0.5).astype(np.float32)                                         # 1 = repaint
    return m[None, None]                                                      # (1, 1, H, W)


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """``pipe(prompt, image=..., mask_image=...)``: the masked part repainted (see the module docstring)."""

    def __call__(self, prompt="", image=None, mask_image=None, negative_prompt=None, strength: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                 generator=None, scheduler: str | None = None, padding_mask_crop=None, callback=None,
                 progress: bool = True, prompt_syntax: str = "plain",
                 clip_skip: int | None = None) -> StableDiffusionPipelineOutput:
        """image: PIL (sides multiples of 8); mask_image: PIL, white = repaint. strength 1 starts from pure
        noise; below 1 from the image noised to the strength's timestep (as img2img)."""
        from refldm.prompt_weighting import encode_prompts
        if image is None or mask_image is None:
            raise ValueError("inpainting needs image= and mask_image=")
        if padding_mask_crop is not None:
            raise ValueError("padding_mask_crop (inpaint only the masked area) is not implemented in refldm")
        channels = self.unet.config.in_channels
        latent_c = self.vae.config.latent_channels
        if channels not in (latent_c, 2 * latent_c + 1):
            raise ValueError(f"the U-Net has {channels} input channels; inpainting needs {latent_c} (blending) or "
                             f"{2 * latent_c + 1} (an inpainting U-Net: latents + mask + masked-image latents)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        negatives = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2 ** 32)
            generator = refldm_random.Generator(seed)
        do_cfg = guidance_scale > 1.0
        dtype = self.dtype.name
        timings = {}
        xp = backend.xp()

        # 1. text -> (B, 77, D); with CFG [uncond; cond]
        start = time.perf_counter()
        cond, uncond = encode_prompts(self, prompts, negatives if do_cfg else None, prompt_syntax, clip_skip)
        context = xp.concatenate([uncond, cond], axis=0) if do_cfg else cond
        timings["text encode"] = time.perf_counter() - start

        # 2. image (1, 3, H, W) in [-1, 1]; mask (1, 1, H, W) of 0 / 1; the masked image, hole at 0
        init = self.preprocess_image(image)
        height, width = init.shape[2], init.shape[3]
        mask_full = backend.asarray(prepare_mask(mask_image, (width, height)), dtype=dtype)
        masked = init * (mask_full < 0.5)                                             # (1, 3, H, W)
        f = self.vae_scale_factor
        mask = upsample_nearest(mask_full, (height // f, width // f))                 # (1, 1, h, w)

        # 3. timesteps, and the random draws in diffusers' order: image latents, noise, masked-image latents
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        timesteps, steps_left = img2img_timesteps(sched, num_inference_steps, strength)
        if steps_left < 1:
            raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run")
        start = time.perf_counter()
        z_image = None
        if channels == latent_c or strength < 1.0:
            z_image = scale_latents(self.vae.encode(init).sample(generator=generator), self.vae.config)
            z_image = xp.concatenate([z_image] * batch, axis=0)                       # (B, 4, h, w)
        shape = (batch, latent_c, height // f, width // f)
        noise = backend.asarray(refldm_random.randn(shape, generator=generator, dtype=dtype))
        z_masked = scale_latents(self.vae.encode(masked).sample(generator=generator), self.vae.config)
        if strength == 1.0:
            latents = noise * float(sched.init_noise_sigma)                           # x_T
        else:
            latents = img2img_latents(sched, z_image, timesteps, noise=noise)         # add_noise(z, eps, t_0)
        timings["image encode"] = time.perf_counter() - start

        # 4. the loop: 9-channel input, or blending the kept region back after every step
        masks = xp.concatenate([mask] * batch, axis=0)                                # (B, 1, h, w)
        extra = xp.concatenate([masks, xp.concatenate([z_masked] * batch, axis=0)], axis=1)  # (B, 5, h, w)

        def model(x, t):
            if channels != latent_c:                                                  # (n, 4 + 1 + 4, h, w)
                x = xp.concatenate([x, xp.concatenate([extra] * (x.shape[0] // batch), axis=0)], axis=1)
            return self.unet(x, t, context)

        n_steps = len(timesteps)

        def after_step(i, t, x):
            if not bool(xp.all(xp.isfinite(x))):
                raise NonFiniteLatentsError(f"the latents hold NaN or inf after step {i + 1} of {n_steps}")
            if channels == latent_c:
                kept = z_image
                if i < n_steps - 1:                                                   # noised to the next t
                    kept = sched.add_noise(z_image, noise, np.asarray(timesteps)[i + 1:i + 2])
                x = (1 - masks) * kept + masks * x
            if callback is not None:
                callback(i, t, x)
            return x

        start = time.perf_counter()
        latents = sample(model, sched, latents, timesteps, guidance_scale=guidance_scale if do_cfg else None,
                         generator=generator, callback=after_step, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        pixels = self.decode_latents(latents)
        images = [Image.fromarray(p) for p in pixels]
        timings["decode"] = time.perf_counter() - start
        return StableDiffusionPipelineOutput(images=images, latents=latents, seed=seed, timings=timings)
