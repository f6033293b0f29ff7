"""SDXL: text to image, image to image and the refiner, as diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline. docs/sdxl.md explains what changes from SD 1.x/2.x and why.

    prompt   --tokenizer-->   ids (B, 77) --CLIP ViT-L-->    hidden_states[-2] (B, 77, 768)
    prompt_2 --tokenizer_2--> ids (B, 77) --OpenCLIP bigG--> hidden_states[-2] (B, 77, 1280), text_embeds (B, 1280)
    context  = concat(both, axis=-1)                                            (B, 77, 2048)
    time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]        (B, 6)
               (refiner: [orig_h, orig_w, crop_top, crop_left, aesthetic_score]  (B, 5))
    for t in timesteps:                                   # CFG batch [uncond; cond] as in StableDiffusionPipeline
        eps = unet(scale(x_t), t, context, added_cond_kwargs={"text_embeds", "time_ids"})
        x_t = scheduler.step(guided(eps), t, x_t)
    image = vae.decode(x_0 / 0.13025)                     # in float32 when the VAE says force_upcast

Base + refiner ("ensemble of expert denoisers"): the base runs the first 80% of the schedule
(``denoising_end=0.8, output_type="latent"``), the refiner the rest from those latents
(``image=out.latents, denoising_start=0.8``).

    base = StableDiffusionXLPipeline.from_pretrained("sdxl-base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained("sdxl-refiner")
    out = base("an astronaut", seed=1, num_inference_steps=40, denoising_end=0.8, output_type="latent")
    image = refiner("an astronaut", image=out.latents, seed=1, num_inference_steps=40, denoising_start=0.8).images[0]

The frame every pipeline shares (the argument checks, the seed, the NaN guard, the decode, the output with its
parameters text) is `refldm.pipelines.common`; this file holds SDXL's own parts: its folder layout, the two text
encoders, the micro-conditioning and the refiner's share of the schedule.
"""

from __future__ import annotations

import os
import time

from refldm import backend
from refldm.core.images import scale_latents
from refldm.adapters.loaders import IPAdapterMixin
from refldm.pipelines import common
from refldm.pipelines.common import StableDiffusionPipelineOutput
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps, sample
from refldm.checkpoints.weights import WeightsError, read_config

__all__ = ["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "XL_PARTS", "is_sdxl_folder"]

# The parts of a diffusers SDXL folder and the class model_index.json names for each. A refiner folder
# has no text_encoder/tokenizer (model_index.json says [null, null] for them).
XL_PARTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
            "tokenizer": "CLIPTokenizer", "text_encoder_2": "CLIPTextModelWithProjection",
            "tokenizer_2": "CLIPTokenizer", "scheduler": None}
OPTIONAL = ("text_encoder", "tokenizer")
# the tensors a step callback may ask for (diffusers' names; refldm's step predictions are added by StepEnd)
SDXL_CALLBACK_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


def is_sdxl_folder(folder) -> bool:
    """True when `folder`'s model_index.json lists a text_encoder_2 (SDXL base or refiner)."""
    path = os.path.join(os.fspath(folder), "model_index.json")
    if not os.path.isfile(path):
        return False
    entry = read_config(os.fspath(folder), "model_index.json").get("text_encoder_2")
    return entry is not None and not (isinstance(entry, list) and entry[-1] is None)


def _listed(index: dict, part: str) -> bool:
    entry = index.get(part)
    return entry is not None and not (isinstance(entry, list) and entry[-1] is None)


def _fraction(value, what: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise ValueError(f"{what}={value!r} must lie strictly between 0 and 1 (the fraction of the schedule)")
    return float(value)


def _pair(value, default, what: str):
    value = default if value is None else value
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{what} must be a pair (height, width) or (top, left), got {value!r}")
    return pair


class StableDiffusionXLPipeline(common.DiffusionPipeline, IPAdapterMixin):
    """SDXL text to image: two text encoders, the pooled embedding and the time ids (module docstring).
    What every pipeline shares (decoding, schedulers, the checks, the output) is `refldm.pipelines.common`."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler_config: dict,
                 configs: dict | None = None, name: str = "model", dtype="float32",
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False):
        super().__init__(vae, unet, scheduler_config, configs, name=name, dtype=dtype)
        self.text_encoder = text_encoder  # None for a refiner (encoder 2 alone)
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", weights_dtype: str | None = None):
        """Load a diffusers SDXL folder: model_index.json, unet/, vae/, text_encoder_2/, tokenizer_2/,
        scheduler/, and (base only) text_encoder/, tokenizer/. weights_dtype="stored": as
        StableDiffusionPipeline.from_pretrained (weights kept as the files store them)."""
        from refldm.models.clip import CLIPTextModel, CLIPTextModelWithProjection
        from refldm.models.unet import UNet2DConditionModel
        from refldm.models.vae import AutoencoderKL
        from refldm.models.tokenizer import CLIPTokenizer

        folder = os.fspath(folder)
        if os.path.isfile(folder):
            raise WeightsError(f"{folder}: is a file, not a model folder (an SDXL single file loads with "
                               "StableDiffusionXLPipeline.from_single_file)")
        if not os.path.isdir(folder):
            raise WeightsError(f"{folder}: no such model folder")
        index = read_config(folder, "model_index.json")
        where = os.path.join(folder, "model_index.json")
        if not _listed(index, "text_encoder_2"):
            raise WeightsError(f"{where}: lists no text_encoder_2, so this is not an SDXL folder (SD 1.x/2.x "
                               "folders load with StableDiffusionPipeline)")
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if _listed(index, enc) != _listed(index, tok):
                have, lack = (enc, tok) if _listed(index, enc) else (tok, enc)
                raise WeightsError(f"{where}: lists {have} but no {lack}; each text encoder needs its tokenizer")
        present = [p for p in XL_PARTS if p not in OPTIONAL or _listed(index, p)]
        for part in present:
            if not os.path.isdir(os.path.join(folder, part)):
                raise WeightsError(f"{folder}: the model folder has no {part}/ (model_index.json lists it)")
            if not _listed(index, part):
                raise WeightsError(f"{where}: lists no {part}")
            entry, want = index[part], XL_PARTS[part]
            if want and isinstance(entry, list) and entry[-1] not in (want, want + "Fast"):
                raise WeightsError(f"{folder}: {part} is a {entry[-1]}; refldm implements {want} only")
        refiner = bool(index.get("requires_aesthetics_score", False))
        if refiner and cls is StableDiffusionXLPipeline:
            raise ValueError(f"{folder}: an SDXL refiner (requires_aesthetics_score); it continues a base model's "
                             "latents: load it with StableDiffusionXLImg2ImgPipeline")
        path = lambda p: os.path.join(folder, p)  # noqa: E731
        unet = UNet2DConditionModel.from_pretrained(path("unet"), dtype=dtype, weights_dtype=weights_dtype)
        vae = AutoencoderKL.from_pretrained(path("vae"), dtype=dtype, weights_dtype=weights_dtype)
        text_encoder = tokenizer = None
        if "text_encoder" in present:
            text_encoder = CLIPTextModel.from_pretrained(path("text_encoder"), dtype=dtype, weights_dtype=weights_dtype)
            tokenizer = CLIPTokenizer.from_pretrained(path("tokenizer"))
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path("text_encoder_2"), dtype=dtype,
                                                                     weights_dtype=weights_dtype)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path("tokenizer_2"))
        scheduler_config = read_config(path("scheduler"), "scheduler_config.json")
        configs = {p: read_config(path(p)) for p in ("unet", "vae", "text_encoder", "text_encoder_2")
                   if p in present}
        pipe = cls(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler_config, configs,
                   name=os.path.basename(os.path.normpath(folder)), dtype=dtype,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                   requires_aesthetics_score=refiner)
        pipe.checkpoint_path = folder  # "Model hash": the U-Net weights file's (common.checkpoint_hash)
        return pipe

    @classmethod
    def from_single_file(cls, path, config=None, dtype="float32", weights_dtype: str | None = None):
        """Load an original SDXL base single-file ``.safetensors`` (model.diffusion_model.*, first_stage_model.*,
        conditioner.embedders.{0,1}.*; the key table is in refldm/checkpoints/convert.py).

        config: an SDXL diffusers folder whose configs, tokenizers and scheduler describe the file's model
        (as diffusers' ``from_single_file(path, config=...)``); refldm does not read SDXL configs off the
        tensor shapes. Pickle files are refused, never opened. weights_dtype="stored": as from_pretrained."""
        from refldm.checkpoints import convert
        from refldm.models.clip import CLIPTextModel, CLIPTextModelWithProjection
        from refldm.models.unet import UNet2DConditionModel
        from refldm.models.vae import AutoencoderKL
        from refldm.models.tokenizer import CLIPTokenizer
        from refldm.checkpoints.stored import load_checkpoint

        path = os.fspath(path)
        state = load_checkpoint(path, weights_dtype)
        kind = convert.detect(state)
        if kind != "sdxl":
            raise ValueError(f"{path}: an {kind.upper()} checkpoint, not SDXL; load it with "
                             "StableDiffusionPipeline.from_single_file")
        if config is None:
            raise ValueError(f"{path}: an SDXL single file; give config=an SDXL diffusers folder (its configs, "
                             "tokenizers and scheduler describe the file's model)")
        config = os.fspath(config)
        classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection}
        configs = {p: read_config(os.path.join(config, p)) for p in classes}
        models = {p: c.from_config(configs[p], where=os.path.join(config, p, "config.json"))
                  for p, c in classes.items()}
        expected = {part: [key for key, *_ in model.params()] for part, model in models.items()}
        parts = convert.from_original(state, expected, configs, kind, source=path)  # the key table
        del state
        for part, model in models.items():
            model.load_state_dict(parts.pop(part), dtype=dtype, source=f"{path} ({part})")
        index = read_config(config, "model_index.json")
        pipe = cls(models["vae"], models["text_encoder"], models["text_encoder_2"],
                   CLIPTokenizer.from_pretrained(os.path.join(config, "tokenizer")),
                   CLIPTokenizer.from_pretrained(os.path.join(config, "tokenizer_2")), models["unet"],
                   read_config(os.path.join(config, "scheduler"), "scheduler_config.json"), configs,
                   name=os.path.splitext(os.path.basename(path))[0], dtype=dtype,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
        pipe.checkpoint_path = path  # "Model hash": the web UI's short SHA-256 of the file
        return pipe

    # -- text ---------------------------------------------------------------------------------------------------

    def _encoders(self):
        """(tokenizer, text encoder) pairs: both for the base, the second alone for the refiner."""
        pairs = [(self.tokenizer, self.text_encoder)] if self.text_encoder is not None else []
        return pairs + [(self.tokenizer_2, self.text_encoder_2)]

    def encode_prompt(self, prompts: list[str], prompts_2: list[str] | None = None, clip_skip: int | None = None,
                      max_length: int | None = None):
        """Prompts -> (context (B, 77, D1 + D2), pooled (B, P)), as diffusers' SDXL encode_prompt:

            context = concat(enc1(prompt).hidden_states[-2 - k], enc2(prompt_2).hidden_states[-2 - k])
            pooled  = enc2(prompt_2).text_embeds

        hidden_states[-2] is the penultimate layer's output, without the final layer norm (SDXL was trained
        on it); clip_skip k moves k layers further down. prompt_2 (for encoder 2) defaults to prompt.
        Each tokenizer pads with its own pad token (tokenizer_2: "!", id 0) and truncates at 77 with a warning.
        """
        prompts_2 = prompts if prompts_2 is None else prompts_2
        layer = -2 if clip_skip is None else -(int(clip_skip) + 2)
        embeds, pooled = [], None
        # the refiner has encoder 2 alone and gives it `prompts` (diffusers zips [prompt, prompt_2] with it)
        for (tokenizer, encoder), texts in zip(self._encoders(), [prompts, prompts_2]):
            ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="np")["input_ids"]                    # (B, 77)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and hasattr(out, "text_embeds"):
                pooled = out.text_embeds                                         # (B, P), encoder 2
            embeds.append(out.hidden_states[layer])                              # (B, 77, D_i)
        xp = backend.array_namespace(embeds[0])
        context = embeds[0] if len(embeds) == 1 else xp.concatenate(embeds, axis=-1)  # (B, 77, D1 + D2)
        return context.astype(self.dtype, copy=False), pooled.astype(self.dtype, copy=False)

    def _conditioning(self, prompts, prompts_2, negatives, negatives_2, do_cfg, clip_skip):
        """(context, text_embeds) for the U-Net: with CFG, [uncond; cond] along the batch (2B, ...).

        diffusers' rules: with force_zeros_for_empty_prompt (the base) and no negative prompt, the
        unconditional embeddings are zeros, not the encoding of ""; a negative prompt is encoded without
        clip_skip (diffusers uses hidden_states[-2] for it whatever clip_skip says)."""
        cond, pooled = self.encode_prompt(prompts, prompts_2, clip_skip)
        if not do_cfg:
            return cond, pooled
        xp = backend.array_namespace(cond)
        if negatives is None and self.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = xp.zeros_like(cond), xp.zeros_like(pooled)
        else:
            negatives = negatives or [""] * len(prompts)
            negatives_2 = negatives_2 or negatives
            uncond, uncond_pooled = self.encode_prompt(negatives, negatives_2, None, max_length=cond.shape[1])
        return xp.concatenate([uncond, cond], axis=0), xp.concatenate([uncond_pooled, pooled], axis=0)

    # -- micro-conditioning -------------------------------------------------------------------------------------

    def time_ids(self, original_size, crops_coords_top_left, target_size, aesthetic_score=None):
        """One row of time ids: original (h, w) + crop (top, left) + target (h, w) for the base (6 numbers),
        original + crop + (aesthetic score,) for the refiner (5 numbers); checked against the U-Net's
        add_embedding width: text_embeds' P + n * addition_time_embed_dim = projection_class_embeddings_input_dim."""
        ids = list(original_size) + list(crops_coords_top_left)
        ids += [float(aesthetic_score)] if self.requires_aesthetics_score else list(target_size)
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"{self.name}: the U-Net has no SDXL added embedding (addition_embed_type "
                             f"{cfg.addition_embed_type!r}); this is not an SDXL model")
        width = self.text_encoder_2.config.projection_dim + cfg.addition_time_embed_dim * len(ids)
        if width != cfg.projection_class_embeddings_input_dim:
            n = (cfg.projection_class_embeddings_input_dim - self.text_encoder_2.config.projection_dim) \
                // cfg.addition_time_embed_dim
            kind = "a refiner (5 ids: sizes, crop, aesthetic score)" if n == 5 else \
                "a base model (6 ids: sizes, crop, target size)" if n == 6 else f"a model with {n} ids"
            raise ValueError(f"{self.name}: the U-Net takes {n} time ids but this pipeline makes {len(ids)} "
                             f"(requires_aesthetics_score={self.requires_aesthetics_score}); the U-Net is {kind}")
        return ids

    # -- a call -------------------------------------------------------------------------------------------------

    def _prepare(self, prompt, prompt_2, negative_prompt, negative_prompt_2, seed, generator,
                 num_inference_steps, guidance_scale, *, size=None, strength=None, num_images_per_prompt=1,
                 output_type="pil", denoising_start=None, denoising_end=None):
        """The shared checks (`refldm.pipelines.common.prologue`), then SDXL's own: the second prompts and the
        fractions of the schedule. -> (Call, denoising_start, denoising_end)."""
        call = common.prologue(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                               height=size and size[0], width=size and size[1], strength=strength,
                               num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                               texts=(("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)))
        start = _fraction(denoising_start, "denoising_start")
        end = _fraction(denoising_end, "denoising_end")
        if start is not None and end is not None and start >= end:
            raise ValueError(f"denoising_start={start} must be below denoising_end={end}")
        return call, start, end

    @staticmethod
    def _check_previews(preview_every, n_steps, preview_dir, preview) -> None:
        """The preview arguments, checked before any work (`refldm.pipelines.preview.check_preview`)."""
        if preview_every is not None:
            from refldm.pipelines.preview import check_preview
            check_preview(preview_every, n_steps, preview_dir, preview)

    def _previews(self, n_steps, preview_every, preview_dir, preview, callback_on_step_end, tensor_inputs):
        """(callback_on_step_end, tensor_inputs), wrapped to write the previews when preview_every is set."""
        if preview_every is None:
            return callback_on_step_end, tensor_inputs
        from refldm.pipelines.preview import with_previews
        return with_previews(self, n_steps, preview_every, preview_dir, preview, callback_on_step_end, tensor_inputs)

    def _denoise(self, latents, sched, timesteps, context, text_embeds, time_ids, guidance_scale, guidance_rescale,
                 do_cfg, generator, callback, progress, denoising_end, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, image_embeds=None):
        """The loop (refldm/pipelines/sampling.py) with the added conditioning; timesteps cut at denoising_end as diffusers:
        keep t >= round(T - denoising_end * T), T = num_train_timesteps."""
        if denoising_end is not None:
            big_t = sched.config.num_train_timesteps
            cutoff = int(round(big_t - denoising_end * big_t))
            timesteps = timesteps[:sum(1 for t in timesteps if float(t) >= cutoff)]
        # after each step: the NaN guard, callback(i, t, x), diffusers' callback_on_step_end (common.StepEnd)
        after_step = common.StepEnd(self, len(timesteps), callback, callback_on_step_end,
                                    callback_on_step_end_tensor_inputs,
                                    {"prompt_embeds": context, "add_text_embeds": text_embeds,
                                     "add_time_ids": time_ids})
        tensors = after_step.tensors  # what the callback may replace

        def model(x, t):
            added = {"text_embeds": tensors["add_text_embeds"], "time_ids": tensors["add_time_ids"]}
            if image_embeds is not None:                                # IP-Adapter's image features
                added["image_embeds"] = image_embeds
            return self.unet(x, t, tensors["prompt_embeds"], added_cond_kwargs=added)

        return sample(model, sched, latents, timesteps,
                      guidance_scale=guidance_scale if do_cfg else None,
                      guidance_rescale=guidance_rescale if do_cfg else 0.0, generator=generator,
                      callback=after_step, progress=progress)

    def _added(self, batch, do_cfg, ids, negative_ids):
        """time_ids (B or 2B, n) on the backend in the pipeline's dtype, [negative rows; positive rows] with CFG.
        (diffusers' base pipeline tiles [neg, pos] B times instead, which differs only when the negative sizes
        differ from the positive ones and B > 1.)"""
        rows = [negative_ids] * batch + [ids] * batch if do_cfg else [ids] * batch
        return backend.asarray(rows, dtype=self.dtype)

    def _record(self, call, sampler, original, crop, target, strength=None):
        """The parameters record of a call: the web UIs' fields, then SDXL's sizes (width x height)."""
        extra = {"Original size": f"{original[1]}x{original[0]}", "Target size": f"{target[1]}x{target[0]}",
                 "Crop": f"{crop[1]}x{crop[0]}"}
        return common.GenerationParameters("", "", call.steps, self.sampler_label(sampler), call.guidance_scale,
                                           call.seed, 0, 0, self.name, strength=strength, extra=extra)

    def __call__(self, prompt="", prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 denoising_end: float | None = None, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 clip_skip: int | None = None, seed: int | None = None, generator=None, sampler: str | None = None,
                 latents=None, output_type: str = "pil", callback=None,
                 progress: bool = True, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, rng: str | None = None, sampler_rng: str | None = None,
                 ensd: int | None = None, variation_seed: int | None = None, variation_strength: float | None = None,
                 seed_resize_from=None, hires_scale: float | None = None, hires_steps: int | None = None,
                 hires_denoise: float | None = None, hires_upscaler: str | None = None, hires_comfyui=None,
                 preview_every: int | None = None, preview_dir=None, preview: str = "linear",
                 ip_adapter_image=None, ip_adapter_image_embeds=None) -> StableDiffusionPipelineOutput:
        """Text to image with diffusers' SDXL arguments and defaults (guidance 5.0, 1024x1024 for SDXL).

        original_size / target_size default to (height, width), crops_coords_top_left to (0, 0); the
        negative_* sizes make the unconditional half's time ids (diffusers uses them only when both
        negative_original_size and negative_target_size are given). denoising_end in (0, 1): stop there
        (for a refiner to continue; with output_type="latent" the images are skipped). callback(i, t, x)
        after every step; latents: your own starting noise (B, 4, H/8, W/8), times init_noise_sigma.
        The checks, the seed, the output and its parameters text: `refldm.pipelines.common`.
        callback_on_step_end(pipe, i, t, callback_kwargs) with callback_on_step_end_tensor_inputs: diffusers'
        step callback ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", and the step's
        predictions; `refldm.pipelines.common.StepEnd`).
        rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from: the web UIs' noise, and
        hires_scale, hires_steps, hires_denoise, hires_upscaler, hires_comfyui: A1111's hires fix, as in
        `StableDiffusionPipeline`; the second pass's time ids use the final size as original and target size.
        preview_every, preview_dir, preview: every N-th step's latent and x_0 as PNGs, as `StableDiffusionPipeline`
        (the linear preview with SDXL's latent-to-RGB factors).
        ip_adapter_image / ip_adapter_image_embeds: the loaded IP-Adapter's reference image(s), as diffusers.
        """
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, SDXL_CALLBACK_INPUTS)
        size = (self.default_size if height is None else height, self.default_size if width is None else width)
        call, _, end = self._prepare(prompt, prompt_2, negative_prompt, negative_prompt_2, seed, generator,
                                     num_inference_steps, guidance_scale, size=size,
                                     num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                     denoising_end=denoising_end)
        prompts, negatives, generator, do_cfg = call.prompts, call.negatives, call.generator, call.do_cfg
        prompts_2, negatives_2 = call.texts["prompt_2"], call.texts["negative_prompt_2"]
        batch, height, width = call.batch, call.height, call.width
        noise = common.check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        hires = common.check_hires(hires_scale, hires_steps, hires_denoise, hires_upscaler, height, width,
                                   hires_comfyui)
        self._check_previews(preview_every, call.steps, preview_dir, preview)
        if hires is not None and end is not None:
            raise ValueError("hires_scale and denoising_end: choose one (a hires pass finishes the image)")
        timings = {}

        # 1. text: (2B, 77, D1 + D2) context and (2B, P) pooled embeddings; the time ids (2B, 6)
        start = time.perf_counter()
        context, text_embeds = self._conditioning(prompts, prompts_2, negatives, negatives_2, do_cfg, clip_skip)
        original = _pair(original_size, (height, width), "original_size")
        target = _pair(target_size, (height, width), "target_size")
        crop = _pair(crops_coords_top_left, (0, 0), "crops_coords_top_left")
        ids = self.time_ids(original, crop, target)
        negative_ids = ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_crop = _pair(negative_crops_coords_top_left, (0, 0), "negative_crops_coords_top_left")
            negative_ids = self.time_ids(_pair(negative_original_size, None, "negative_original_size"),
                                         negative_crop, _pair(negative_target_size, None, "negative_target_size"))
        time_ids = self._added(batch, do_cfg, ids, negative_ids)
        image_embeds = self.ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, batch, do_cfg)  # IP-Adapter
        timings["text encode"] = time.perf_counter() - start
        self.release_mapped("text_encoder", "text_encoder_2", "text_encoder_3")  # --low-memory: done with them

        # 2. the schedule and the starting noise x_T (B, 4, H/8, W/8)
        sched, sampler = self.scheduler_for(sampler, scheduler, call.steps)
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        latents, generator, per_image = common.make_noise(latent_shape, sched, call, noise, self.dtype.name,
                                                          latents)  # eps * sigma

        # 3. the loop (and the hires pass), 4. the decode
        start = time.perf_counter()
        first = common.first_pass_timesteps(sched.timesteps, hires, sched.order)
        callback_on_step_end, callback_on_step_end_tensor_inputs = self._previews(
            len(first), preview_every, preview_dir, preview, callback_on_step_end,
            callback_on_step_end_tensor_inputs)
        latents = self._denoise(latents, sched, first, context, text_embeds, time_ids, guidance_scale,
                                guidance_rescale, do_cfg, generator, callback, progress, end,
                                callback_on_step_end, callback_on_step_end_tensor_inputs, image_embeds)
        made = self._record(call, sampler, original, crop, target)
        if hires is not None:
            big = (hires.height, hires.width)
            big_ids = self._added(batch, do_cfg, self.time_ids(big, crop, big), self.time_ids(big, crop, big))

            def denoise(x, sched2, timesteps, gen):
                return self._denoise(x, sched2, timesteps, context, text_embeds, big_ids, guidance_scale,
                                     guidance_rescale, do_cfg, gen, callback, progress, None,
                                     callback_on_step_end, callback_on_step_end_tensor_inputs, image_embeds)

            latents = common.hires_pass(self, latents, call, noise, hires, sampler, call.steps, generator, denoise)
            made = made.replace(strength=hires.denoise)
        timings["denoise"] = time.perf_counter() - start
        made = made.replace(model_hash=self.model_hash,
                            fields={**noise.fields(), **(hires.fields() if hires else {})})
        return common.finish(self, latents, call, timings, made, per_image=per_image,
                             size=(width, height) if hires else None)

    # -- description --------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """{part: {...}} for `refldm info`: both text encoders and both tokenizers."""
        return self.describe_parts(("unet", "vae", "text_encoder", "text_encoder_2"),
                                   [("tokenizer", ("pad_token",)), ("tokenizer_2", ("pad_token",))])


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """SDXL image to image, and the refiner: start from an image (or from latents, a base model's output
    with ``denoising_start``) instead of pure noise."""

    def __call__(self, prompt="", prompt_2=None, image=None, strength: float = 0.3, num_inference_steps: int = 50,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 guidance_scale: float = 5.0, guidance_rescale: float = 0.0, negative_prompt=None,
                 negative_prompt_2=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 seed: int | None = None, generator=None, sampler: str | None = None, output_type: str = "pil",
                 callback=None, progress: bool = True, scheduler: str | None = None,
                 num_images_per_prompt: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, rng: str | None = None, sampler_rng: str | None = None,
                 ensd: int | None = None, variation_seed: int | None = None, variation_strength: float | None = None,
                 seed_resize_from=None,
                 preview_every: int | None = None, preview_dir=None,
                 preview: str = "linear", ip_adapter_image=None,
                 ip_adapter_image_embeds=None) -> StableDiffusionPipelineOutput:
        """Image to image with diffusers' SDXL arguments and defaults (strength 0.3, guidance 5.0).

        image: a PIL image / uint8 array (encoded by the VAE, then noised to the timestep `strength`
        selects), or latents (B or 1, 4, h, w), e.g. a base model's ``output_type="latent"`` output.
        denoising_start in (0, 1): skip the first part of the schedule and do not add noise (the latents
        are already that noisy); it replaces strength. aesthetic_score / negative_aesthetic_score: the
        refiner's last time id (requires_aesthetics_score). Other arguments (previews included) as
        StableDiffusionXLPipeline; the web UIs' noise options (rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        make the noise added to the image (`refldm.pipelines.common.start_noise`), not with denoising_start.
        """
        if image is None:
            raise ValueError("image is required (a PIL image, a uint8 array, or latents (B, 4, h, w))")
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, SDXL_CALLBACK_INPUTS)
        call, begin, end = self._prepare(prompt, prompt_2, negative_prompt, negative_prompt_2, seed, generator,
                                         num_inference_steps, guidance_scale, strength=strength,
                                         num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                                         denoising_start=denoising_start, denoising_end=denoising_end)
        prompts, negatives, generator, do_cfg = call.prompts, call.negatives, call.generator, call.do_cfg
        prompts_2, negatives_2 = call.texts["prompt_2"], call.texts["negative_prompt_2"]
        batch, steps = call.batch, call.steps
        self._check_previews(preview_every, steps, preview_dir, preview)
        dtype = self.dtype.name
        timings = {}
        noise = common.check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        if begin is not None and (noise.webui or noise.sampler_rng):
            raise ValueError("the noise options make the noise added to an image; not with denoising_start")

        # the input: latents as they are, or an image to encode
        channels = self.unet.config.in_channels
        is_latent = hasattr(image, "shape") and len(image.shape) == 4 and image.shape[1] == channels \
            and not hasattr(image, "convert")
        if is_latent:
            init = backend.asarray(image, dtype=dtype) if backend.array_namespace(image) is not backend.xp() \
                else image.astype(dtype, copy=False)
            height, width = init.shape[2] * self.vae_scale_factor, init.shape[3] * self.vae_scale_factor
        else:
            init = self.preprocess_image(image)                            # (1, 3, H, W) in [-1, 1]
            height, width = init.shape[2], init.shape[3]
        if init.shape[0] not in (1, batch):
            raise ValueError(f"image holds {init.shape[0]} latents for {batch} prompts")

        # 1. text and time ids (refiner: original size, crop, aesthetic score)
        start = time.perf_counter()
        context, text_embeds = self._conditioning(prompts, prompts_2, negatives, negatives_2, do_cfg, clip_skip)
        original = _pair(original_size, (height, width), "original_size")
        target = _pair(target_size, (height, width), "target_size")
        crop = _pair(crops_coords_top_left, (0, 0), "crops_coords_top_left")
        ids = self.time_ids(original, crop, target, aesthetic_score)
        negative_original = _pair(negative_original_size, original, "negative_original_size")
        negative_target = _pair(negative_target_size, target, "negative_target_size")
        if self.requires_aesthetics_score:
            negative_ids = self.time_ids(negative_original, _pair(negative_crops_coords_top_left, (0, 0),
                                                                  "negative_crops_coords_top_left"),
                                         negative_target, negative_aesthetic_score)
        else:  # diffusers uses the positive crop here (its img2img _get_add_time_ids)
            negative_ids = self.time_ids(negative_original, crop, negative_target)
        time_ids = self._added(batch, do_cfg, ids, negative_ids)
        image_embeds = self.ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, batch, do_cfg)  # IP-Adapter
        timings["text encode"] = time.perf_counter() - start
        self.release_mapped("text_encoder", "text_encoder_2", "text_encoder_3")  # --low-memory: done with them

        # 2. the schedule: strength's tail, or everything below denoising_start
        sched, sampler = self.scheduler_for(sampler, scheduler, steps)
        if begin is None:
            timesteps, steps_left = img2img_timesteps(sched, steps, strength)
            if steps_left < 1:
                raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; "
                                 "raise strength or the number of steps")
        else:
            timesteps = self.timesteps_from(sched, begin)

        # 3. the starting latents: encode (in float32 if force_upcast), scale, repeat, noise (unless denoising_start)
        start = time.perf_counter()
        if is_latent:
            x0 = init
        else:
            from refldm.models.vae import encode_upcast
            posterior = encode_upcast(self.vae, init)                       # q(z | x) over (1, 4, H/8, W/8)
            z = posterior.mode() if noise.webui else posterior.sample(generator=generator)  # common.start_noise
            x0 = scale_latents(z, self.vae.config).astype(dtype, copy=False)
            timings["image encode"] = time.perf_counter() - start
        xp = backend.array_namespace(x0)
        if x0.shape[0] != batch:
            x0 = xp.concatenate([x0] * batch, axis=0)                       # (B, 4, h, w)
        per_image = None
        if begin is None:  # eps: the web UIs' noise with their options, else drawn here as diffusers does
            common.seed_brownian(sched, call.seed)
            eps, sampler_generator, per_image = common.start_noise(tuple(x0.shape), call.seed, generator, noise, dtype)
            latents = img2img_latents(sched, x0, timesteps, noise=eps, generator=generator)
            generator = sampler_generator
        else:
            latents = x0

        start = time.perf_counter()
        callback_on_step_end, callback_on_step_end_tensor_inputs = self._previews(
            len(timesteps), preview_every, preview_dir, preview, callback_on_step_end,
            callback_on_step_end_tensor_inputs)
        latents = self._denoise(latents, sched, timesteps, context, text_embeds, time_ids, guidance_scale,
                                guidance_rescale, do_cfg, generator, callback, progress, end,
                                callback_on_step_end, callback_on_step_end_tensor_inputs, image_embeds)
        timings["denoise"] = time.perf_counter() - start
        made = self._record(call, sampler, original, crop, target, strength=strength if begin is None else None)
        made = made.replace(model_hash=self.model_hash, fields=noise.fields())
        return common.finish(self, latents, call, timings, made, per_image=per_image)

    @staticmethod
    def timesteps_from(sched, denoising_start: float):
        """The timesteps below the cutoff round(T - denoising_start * T), as diffusers' get_timesteps: the
        refiner's share of a schedule the base began (a second-order scheduler keeps one more step when the
        count is even, so it does not start between the two halves of a step)."""
        big_t = sched.config.num_train_timesteps
        cutoff = int(round(big_t - denoising_start * big_t))
        n = sum(1 for t in sched.timesteps if float(t) < cutoff)
        if getattr(sched, "order", 1) == 2 and n % 2 == 0:
            n += 1
        t_start = len(sched.timesteps) - n
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start)
        return sched.timesteps[t_start:]
