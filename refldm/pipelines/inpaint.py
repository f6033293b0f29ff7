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
(of 255), 0 elsewhere. padding_mask_crop=p (diffusers' "inpaint only the masked area"): the box around the
mask, grown by p pixels and to the output's aspect ratio, is cut out, scaled to the output size, inpainted,
scaled back and pasted over the original where the mask is (`crop_region`, `resize_and_fill`, `paste_back`).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from PIL import Image

from refldm import backend
from refldm.core import random as refldm_random
from refldm.core.images import scale_latents
from refldm.models.blocks import upsample_nearest
from refldm.pipelines import common
from refldm.pipelines.common import StableDiffusionPipelineOutput
from refldm.pipelines.sd import StableDiffusionPipeline
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps, sample

__all__ = ["StableDiffusionInpaintPipeline", "prepare_mask", "crop_region", "resize_and_fill", "paste_back"]


def prepare_mask(mask_image, size) -> np.ndarray:
    """A PIL mask (or uint8 array) -> (1, 1, H, W) float32 of 0 / 1 at the image's size (width, height).

    Another size: resized with Lanczos (diffusers' resample for masks), with a warning. Not single-channel:
    then converted to grey with PIL's "L" (0.299 R + 0.587 G + 0.114 B), with a warning. Then binarised:
    value / 255 >= 0.5 -> 1 (repaint), else 0 (keep)."""
    if isinstance(mask_image, np.ndarray):
        mask_image = Image.fromarray(mask_image)
    if not isinstance(mask_image, Image.Image):
        raise ValueError(f"mask_image must be a PIL image or a uint8 array, got {type(mask_image).__name__}")
    if mask_image.size != tuple(size):  # resized in its own mode, then made grey: diffusers' order
        warnings.warn(f"the mask is {mask_image.size[0]}x{mask_image.size[1]}, the image {size[0]}x{size[1]}; "
                      "the mask was resized to the image (Lanczos)", stacklevel=3)
        mask_image = mask_image.resize(tuple(size), resample=Image.LANCZOS)
    if mask_image.mode != "L":
        warnings.warn(f"the mask is {mask_image.mode}, not single-channel; converted to grey (PIL 'L')",
                      stacklevel=3)
        mask_image = mask_image.convert("L")
    m = np.asarray(mask_image, dtype=np.float32) / 255.0                      # (H, W) in [0, 1]
    m = (m >= 0.5).astype(np.float32)                                         # 1 = repaint
    return m[None, None]                                                      # (1, 1, H, W)


# --------------------------------------------------------------------------------------------------------
# padding_mask_crop: inpaint only a box around the mask, at full resolution, and paste it back


def crop_region(mask_image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around every non-zero mask pixel, grown by `pad` on each side (within the
    image), then widened or heightened about its centre to the aspect ratio width / height, shifted back
    inside the image where it sticks out (diffusers' ``VaeImageProcessor.get_crop_region``)."""
    m = np.asarray(mask_image.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        raise ValueError("padding_mask_crop: the mask is empty (nothing to repaint)")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:                      # too wide: grow the height
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
        y1, y2 = _inside(y1, y2, h)
    else:                                                           # too tall (or exact): grow the width
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
        x1, x2 = _inside(x1, x2, w)
    return x1, y1, x2, y2


def _inside(a, b, size):
    """Shift [a, b) back inside [0, size) keeping its length where it fits, else clip it."""
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def resize_and_fill(image, width: int, height: int):
    """Resize keeping the aspect ratio to fit (width, height), centre it, and fill the two bands left over by
    stretching the image's first and last row (or column) into them (diffusers' resize_mode="fill")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        band = height // 2 - src_h // 2
        out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, band), box=(0, src_h, width, src_h)), box=(0, band + src_h))
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        band = width // 2 - src_w // 2
        out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((band, height), box=(src_w, 0, src_w, height)), box=(band + src_w, 0))
    return out


def _resize_and_crop(image, width: int, height: int):
    """Resize keeping the aspect ratio to cover (width, height), centred, the excess cut (resize_mode="crop")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def paste_back(mask_image, original, generated, box):
    """The generated crop scaled back into its box of the original; outside the mask the original shows
    (alpha = 255 - mask), as diffusers' ``apply_overlay``."""
    from PIL import ImageOps
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_image.convert("L")))
    kept = kept.convert("RGBA")
    x1, y1, x2, y2 = box
    base = Image.new("RGBA", (width, height))
    base.paste(_resize_and_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """``pipe(prompt, image=..., mask_image=...)``: the masked part repainted (see the module docstring).

    An SD pipeline with another call: the same folder, loaders and text encoding as
    `StableDiffusionPipeline` (diffusers loads both from one folder); the frame of the call (checks, seed,
    NaN guard, output and parameters text) is `refldm.pipelines.common`, as for every pipeline."""

    def __call__(self, prompt="", image=None, mask_image=None, negative_prompt=None, strength: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                 generator=None, sampler: str | None = None, padding_mask_crop: int | None = None,
                 height: int | None = None, width: int | None = None, callback=None,
                 progress: bool = True, prompt_syntax: str = "plain",
                 clip_skip: int | None = None, scheduler: str | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, rng: str | None = None, sampler_rng: str | None = None,
                 ensd: int | None = None, variation_seed: int | None = None, variation_strength: float | None = None,
                 seed_resize_from=None) -> StableDiffusionPipelineOutput:
        """image: PIL (sides multiples of 8); mask_image: PIL, white = repaint. strength 1 starts from pure
        noise; below 1 from the image noised to the strength's timestep (as img2img). padding_mask_crop=p:
        repaint only the box around the mask grown by p pixels, scaled to (width, height) (default: the
        image's size), then pasted back (diffusers' "inpaint only masked" mode). callback_on_step_end /
        callback_on_step_end_tensor_inputs: diffusers' step callback, after the kept region is blended back
        (`refldm.pipelines.common.StepEnd`). rng, sampler_rng, ensd, variation_seed, variation_strength,
        seed_resize_from: the web UIs' noise (as `StableDiffusionPipeline`; `refldm.pipelines.common.start_noise`)
        for the starting noise, the noise added to the image and the kept region's re-noising."""
        from refldm.adapters.prompt_weighting import encode_prompts
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if image is None or mask_image is None:
            raise ValueError("inpainting needs image= and mask_image=")
        size = None
        if height is not None or width is not None:  # the size of the repainted box (padding_mask_crop)
            full = image.size if hasattr(image, "size") and not hasattr(image, "shape") else \
                (np.shape(image)[1], np.shape(image)[0])
            size = (full[1] if height is None else height, full[0] if width is None else width)
        call = common.prologue(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                               height=size and size[0], width=size and size[1], strength=strength,
                               num_images_per_prompt=num_images_per_prompt, output_type=output_type)
        options = common.check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        original_image, original_mask, box = image, mask_image, None
        if padding_mask_crop is not None and (isinstance(padding_mask_crop, bool) or not isinstance(
                padding_mask_crop, int) or padding_mask_crop < 0):
            raise ValueError(f"padding_mask_crop={padding_mask_crop!r} must be an integer >= 0 (pixels of margin)")
        if padding_mask_crop is not None:  # inpaint the box around the mask, at the image's size
            if isinstance(image, np.ndarray):
                original_image = image = Image.fromarray(image)
            if isinstance(mask_image, np.ndarray):
                original_mask = mask_image = Image.fromarray(mask_image)
            size = (width or image.width, height or image.height)
            box = crop_region(mask_image, size[0], size[1], int(padding_mask_crop))
            image = resize_and_fill(image.crop(box), *size)
            mask_image = resize_and_fill(mask_image.crop(box), *size).convert("L")
        channels = self.unet.config.in_channels
        latent_c = self.vae.config.latent_channels
        if channels not in (latent_c, 2 * latent_c + 1):
            raise ValueError(f"the U-Net has {channels} input channels; inpainting needs {latent_c} (blending) or "
                             f"{2 * latent_c + 1} (an inpainting U-Net: latents + mask + masked-image latents)")
        prompts, negatives = call.prompts, call.negatives or [""] * call.batch
        batch, steps, do_cfg, generator = call.batch, call.steps, call.do_cfg, call.generator
        dtype = self.dtype.name
        timings = {}
        xp = backend.xp()

        # 1. text -> (B, 77, D); with CFG [uncond; cond]
        start = time.perf_counter()
        cond, uncond = encode_prompts(self, prompts, negatives if do_cfg else None, prompt_syntax, clip_skip)
        context = xp.concatenate([uncond, cond], axis=0) if do_cfg else cond
        timings["text encode"] = time.perf_counter() - start
        self.release_mapped("text_encoder", "text_encoder_2", "text_encoder_3")  # --low-memory: done with them

        # 2. image (1, 3, H, W) in [-1, 1]; mask (1, 1, H, W) of 0 / 1; the masked image, hole at 0
        init = self.preprocess_image(image)
        height, width = init.shape[2], init.shape[3]
        mask_full = backend.asarray(prepare_mask(mask_image, (width, height)), dtype=dtype)
        masked = init * (mask_full < 0.5)                                             # (1, 3, H, W)
        f = self.vae_scale_factor
        mask = upsample_nearest(mask_full, (height // f, width // f))                 # (1, 1, h, w)

        # 3. timesteps, and the random draws in diffusers' order: image latents, noise, masked-image latents
        sched, sampler = self.scheduler_for(sampler, scheduler, steps)
        timesteps, steps_left = img2img_timesteps(sched, steps, strength)
        if steps_left < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; "
                             "raise strength or the number of steps")
        start = time.perf_counter()

        def encoded(pixels):  # z ~ q(z | x), or its mean with the web UIs' noise (common.start_noise)
            posterior = self.vae.encode(pixels)
            return posterior.mode() if options.webui else posterior.sample(generator=generator)

        z_image = None
        if channels == latent_c or strength < 1.0:
            z_image = scale_latents(encoded(init), self.vae.config)
            z_image = xp.concatenate([z_image] * batch, axis=0)                       # (B, 4, h, w)
        shape = (batch, latent_c, height // f, width // f)
        common.seed_brownian(sched, call.seed)
        noise, sampler_generator, per_image = common.start_noise(shape, call.seed, generator, options, dtype)
        if noise is None:  # diffusers' noise, drawn between the two encodes as diffusers draws it
            noise = backend.asarray(refldm_random.randn(shape, generator=generator, dtype=dtype))
        z_masked = scale_latents(encoded(masked), self.vae.config)
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
            return self.unet(x, t, step_end.tensors["prompt_embeds"])

        n_steps = len(timesteps)
        guard = common.nan_guard(n_steps)
        step_end = common.StepEnd(self, n_steps, None, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                  {"prompt_embeds": context, "negative_prompt_embeds": uncond if do_cfg else None})

        def after_step(i, t, x, step=None):
            guard(i, t, x)
            if channels == latent_c:
                kept = z_image
                if i < n_steps - 1:                                                   # noised to the next t
                    kept = sched.add_noise(z_image, noise, np.asarray(timesteps)[i + 1:i + 2])
                x = (1 - masks) * kept + masks * x
            if callback is not None:
                callback(i, t, x)
            replaced = step_end(i, t, x, step=step)
            return x if replaced is None else replaced

        start = time.perf_counter()
        latents = sample(model, sched, latents, timesteps, guidance_scale=guidance_scale if do_cfg else None,
                         generator=sampler_generator, callback=after_step, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        # 5. latents -> pixels (pasted back into the original for padding_mask_crop), with the parameters text
        paste = None if box is None else (lambda images: [paste_back(original_mask, original_image, im, box)
                                                          for im in images])
        made = common.GenerationParameters("", "", steps, self.sampler_label(sampler), guidance_scale, call.seed,
                                           width, height, self.name, strength=strength,
                                           model_hash=self.model_hash, fields=options.fields())
        return common.finish(self, latents, call, timings, made, postprocess=paste, per_image=per_image)
