"""Stable Diffusion 3 / 3.5: text to image and image to image, as diffusers' StableDiffusion3Pipeline and
StableDiffusion3Img2ImgPipeline. docs/sd3.md explains what changes from SD 1.x / SDXL and why.

    prompt   --tokenizer-->   ids (B, 77)  --CLIP-L-->  hidden_states[-2] (B, 77, 768),  text_embeds (B, 768)
    prompt_2 --tokenizer_2--> ids (B, 77)  --CLIP-G-->  hidden_states[-2] (B, 77, 1280), text_embeds (B, 1280)
    prompt_3 --tokenizer_3--> ids (B, 256) --T5-XXL-->  last_hidden_state (B, 256, 4096)   (zeros without T5)
    clip     = pad(concat(CLIP-L, CLIP-G, axis=-1), to 4096)                          (B, 77, 4096)
    context  = concat(clip, t5, axis=1)                                               (B, 77 + 256, 4096)
    pooled   = concat(CLIP-L text_embeds, CLIP-G text_embeds)                         (B, 2048)
    x_1 ~ N(0, I)                                                                     (B, 16, H/8, W/8)
    for t in timesteps (1 -> 0, shifted):        # CFG batch [uncond; cond]
        v   = transformer(x_t, context, pooled, 1000 t);  v = v_u + w (v_c - v_u)
        x_t = x_t + (t' - t) v                   # FlowMatchEulerDiscreteScheduler
    image = vae.decode(x_0 / scaling_factor + shift_factor)

The T5 encoder is optional, as in diffusers: a folder whose model_index.json lists no text_encoder_3, or
``from_pretrained(folder, use_t5=False)``, gives zeros of (B, max_sequence_length, 4096) in its place (a large
saving in memory and time for a small loss in prompt following). The frame of a call (argument checks, the seeded
noise of torch's CPU generator, the NaN guard, the decode and its rounding, the parameters text, the output) is
the pipeline core's, refldm/pipelines/common.py.
"""

from __future__ import annotations

import os
import time

import numpy

from refldm import backend
from refldm.checkpoints.weights import WeightsError, read_config
from refldm.core import record
from refldm.pipelines import common
from refldm.pipelines.common import StableDiffusionPipelineOutput
from refldm.pipelines.sampling import sample

__all__ = ["StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "SD3_PARTS", "is_sd3_folder"]

# The parts of a diffusers SD3 folder and the class model_index.json names for each.
SD3_PARTS = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
             "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
             "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5TokenizerFast", "scheduler": None}
T5_PARTS = ("text_encoder_3", "tokenizer_3")
# the tensors a step callback may ask for (diffusers' names; the step's predictions are added by StepEnd)
SD3_CALLBACK_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


def _listed(index: dict, part: str) -> bool:
    entry = index.get(part)
    return entry is not None and not (isinstance(entry, list) and entry[-1] is None)


def is_sd3_folder(folder) -> bool:
    """True when `folder`'s model_index.json lists an SD3Transformer2DModel as its transformer."""
    path = os.path.join(os.fspath(folder), "model_index.json")
    if not os.path.isfile(path):
        return False
    entry = read_config(os.fspath(folder), "model_index.json").get("transformer")
    return isinstance(entry, list) and entry[-1] == "SD3Transformer2DModel"


class StableDiffusion3Pipeline(common.DiffusionPipeline):
    """SD3 / SD3.5 text to image (module docstring). The frame of a call (argument checks, seed, NaN guard,
    decoding, parameters text, output) is the pipeline core's, refldm/pipelines/common.py; this class keeps what
    is SD3's own: its folder, its three text encoders, the flow samplers and the patch-size rule."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3=None,
                 tokenizer_3=None, scheduler_config: dict | None = None, configs: dict | None = None,
                 name: str = "model", dtype="float32"):
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("StableDiffusion3Pipeline: give text_encoder_3 and tokenizer_3 together (or neither: "
                             "zeros stand in for the T5 states, as in diffusers)")
        super().__init__(vae, None, scheduler_config or {"_class_name": "FlowMatchEulerDiscreteScheduler"}, configs,
                         name=name, dtype=dtype)  # no U-Net: the denoiser is the transformer
        self.transformer = transformer
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", use_t5: bool = True, weights_dtype: str | None = None):
        """Load a diffusers SD3 / SD3.5 folder: model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
        text_encoder_2/, tokenizer_2/, scheduler/, and text_encoder_3/ + tokenizer_3/ (T5) when model_index.json
        lists them and use_t5 is True (otherwise zeros stand in for T5, as diffusers' text_encoder_3=None).
        weights_dtype="stored": every model keeps its layers' weights as the files store them (memory-mapped,
        converted per layer when it runs; refldm.checkpoints.stored)."""
        from refldm.models.clip import CLIPTextModelWithProjection
        from refldm.models.sd3_transformer import SD3Transformer2DModel
        from refldm.models.tokenizer import CLIPTokenizer
        from refldm.models.vae import AutoencoderKL

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise WeightsError(f"{folder}: no such model folder")
        index = read_config(folder, "model_index.json")
        where = os.path.join(folder, "model_index.json")
        if not is_sd3_folder(folder):
            raise WeightsError(f"{where}: its transformer is not an SD3Transformer2DModel, so this is not an SD3 "
                               "folder")
        with_t5 = use_t5 and _listed(index, "text_encoder_3")
        for part, want in SD3_PARTS.items():
            if part in T5_PARTS and not with_t5:
                continue
            if not _listed(index, part):
                why = ("SD3 needs both CLIP encoders (diffusers fails without them too); only the T5 encoder "
                       "(text_encoder_3) may be left out" if part not in ("transformer", "vae", "scheduler")
                       else "every SD3 folder has it")
                raise WeightsError(f"{where}: lists no {part}; {why}")
            if not os.path.isdir(os.path.join(folder, part)):
                hint = (" (diffusers would fail to load it too; from_pretrained(folder, use_t5=False) runs without "
                        "T5, with zeros in its place as diffusers' text_encoder_3=None)") if part in T5_PARTS else ""
                raise WeightsError(f"{folder}: the model folder has no {part}/ (model_index.json lists it){hint}")
            entry = index[part]
            if want and isinstance(entry, list) and entry[-1] not in (want, want.removesuffix("Fast"),
                                                                      want + "Fast"):
                raise WeightsError(f"{folder}: {part} is a {entry[-1]}; refldm implements {want} only")
        path = lambda p: os.path.join(folder, p)  # noqa: E731
        transformer = SD3Transformer2DModel.from_pretrained(path("transformer"), dtype=dtype, weights_dtype=weights_dtype)
        vae = AutoencoderKL.from_pretrained(path("vae"), dtype=dtype, weights_dtype=weights_dtype)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path("text_encoder"), dtype=dtype, weights_dtype=weights_dtype)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path("text_encoder_2"), dtype=dtype,
                                                                     weights_dtype=weights_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path("tokenizer"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(path("tokenizer_2"))
        text_encoder_3 = tokenizer_3 = None
        if with_t5:  # imported only here: the T5 modules are needed only by folders that have T5
            from refldm.models.t5 import T5EncoderModel
            from refldm.models.t5_tokenizer import T5TokenizerFast
            text_encoder_3 = T5EncoderModel.from_pretrained(path("text_encoder_3"), dtype=dtype, weights_dtype=weights_dtype)
            tokenizer_3 = T5TokenizerFast.from_pretrained(path("tokenizer_3"))
        scheduler_config = read_config(path("scheduler"), "scheduler_config.json")
        configs = {p: read_config(path(p)) for p in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        if with_t5:
            configs["text_encoder_3"] = read_config(path("text_encoder_3"))
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
                   tokenizer_3, scheduler_config, configs, name=os.path.basename(os.path.normpath(folder)),
                   dtype=dtype)

    @classmethod
    def from_single_file(cls, path, config, dtype="float32", use_t5: bool = True, weights_dtype: str | None = None):
        """Load an original SD3 / SD3.5 single ``.safetensors`` (model.diffusion_model.joint_blocks.*,
        first_stage_model.*, text_encoders.clip_l / clip_g / t5xxl.*; the key table is `sd3_from_original` in
        refldm/checkpoints/convert.py). config: a diffusers SD3 folder whose configs, tokenizers and scheduler
        describe the file's model. The file must include the CLIP encoders; T5 is used when the file has it
        (and use_t5), else zeros stand in. Pickle files are refused, never opened. weights_dtype="stored": as
        from_pretrained."""
        from refldm.checkpoints import convert
        from refldm.checkpoints.stored import load_checkpoint
        from refldm.models.clip import CLIPTextModelWithProjection
        from refldm.models.sd3_transformer import SD3Transformer2DModel
        from refldm.models.tokenizer import CLIPTokenizer
        from refldm.models.vae import AutoencoderKL

        path, config = os.fspath(path), os.fspath(config)
        state = load_checkpoint(path, weights_dtype)
        if not convert.is_sd3(state):
            raise ValueError(f"{path}: not an SD3 / SD3.5 single file (no model.diffusion_model.joint_blocks.*)")
        for part in ("text_encoder", "text_encoder_2"):
            prefix = convert.SD3_PREFIXES[part]
            if not any(k.startswith(prefix) for k in state):
                raise ValueError(f"{path}: holds no {prefix}* ({part}); SD3 needs both CLIP encoders: use a file "
                                 "that includes them (sd3_medium_incl_clips*.safetensors) or a diffusers folder")
        classes = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
                   "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection}
        with_t5 = use_t5 and any(k.startswith(convert.SD3_PREFIXES["text_encoder_3"]) for k in state)
        if with_t5:
            from refldm.models.t5 import T5EncoderModel
            classes["text_encoder_3"] = T5EncoderModel
        configs = {p: read_config(os.path.join(config, p)) for p in classes}
        models = {p: c.from_config(configs[p], where=os.path.join(config, p, "config.json"))
                  for p, c in classes.items()}
        expected = {part: [key for key, *_ in model.params()] for part, model in models.items()}
        parts = convert.sd3_from_original(state, expected, configs, source=path)
        del state
        for part, model in models.items():
            model.load_state_dict(parts.pop(part), dtype=dtype, source=f"{path} ({part})")
        tokenizer_3 = None
        if with_t5:
            from refldm.models.t5_tokenizer import T5TokenizerFast
            tokenizer_3 = T5TokenizerFast.from_pretrained(os.path.join(config, "tokenizer_3"))
        return cls(models["transformer"], models["vae"], models["text_encoder"],
                   CLIPTokenizer.from_pretrained(os.path.join(config, "tokenizer")), models["text_encoder_2"],
                   CLIPTokenizer.from_pretrained(os.path.join(config, "tokenizer_2")), models.get("text_encoder_3"),
                   tokenizer_3, read_config(os.path.join(config, "scheduler"), "scheduler_config.json"), configs,
                   name=os.path.splitext(os.path.basename(path))[0], dtype=dtype)

    # -- sizes --------------------------------------------------------------------------------------------------

    @property
    def default_size(self) -> int:
        """transformer sample_size * vae_scale_factor: 1024 for SD3 / SD3.5."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    # -- text ---------------------------------------------------------------------------------------------------

    def _clip(self, tokenizer, encoder, prompts, clip_skip):
        """(hidden_states[-2 - clip_skip] (B, 77, D), text_embeds (B, P)) of one CLIP encoder."""
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="np")["input_ids"]  # (B, 77)
        out = encoder(ids, output_hidden_states=True)
        layer = -2 if clip_skip is None else -(int(clip_skip) + 2)
        return out.hidden_states[layer], out.text_embeds

    def _t5(self, prompts, max_sequence_length: int):
        """T5's last hidden state (B, max_sequence_length, 4096), or zeros without a T5 encoder."""
        d = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:
            return backend.asarray(numpy.zeros((len(prompts), max_sequence_length, d)), dtype=self.dtype.name)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="np")["input_ids"]    # (B, L)
        with record.scope("text_encoder_3"):
            out = self.text_encoder_3(ids)
        return getattr(out, "last_hidden_state", out)

    def encode_prompt(self, prompts, prompts_2=None, prompts_3=None, clip_skip: int | None = None,
                      max_sequence_length: int = 256):
        """Prompts -> (prompt_embeds (B, 77 + L, 4096), pooled (B, 2048)), as diffusers' SD3 encode_prompt:

            clip   = concat(CLIP-L(prompt).hidden_states[-2], CLIP-G(prompt_2).hidden_states[-2])  (B, 77, 2048)
            embeds = concat(pad(clip, to 4096 features with zeros), T5(prompt_3), axis=1)
            pooled = concat(CLIP-L(prompt).text_embeds, CLIP-G(prompt_2).text_embeds)           (B, 2048)

        prompt_2 and prompt_3 default to prompt; clip_skip k takes hidden_states[-2 - k]."""
        prompts_2 = prompts if prompts_2 is None else prompts_2
        prompts_3 = prompts if prompts_3 is None else prompts_3
        with record.scope("text_encoder"):
            h1, p1 = self._clip(self.tokenizer, self.text_encoder, prompts, clip_skip)          # (B, 77, 768)
        with record.scope("text_encoder_2"):
            h2, p2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompts_2, clip_skip)    # (B, 77, 1280)
        t5 = self._t5(prompts_3, max_sequence_length)                                         # (B, L, 4096)
        xp = backend.array_namespace(h1)
        clip = xp.concatenate([h1, h2], axis=-1).astype(self.dtype, copy=False)                # (B, 77, 2048)
        d = t5.shape[-1]
        if clip.shape[-1] > d:
            raise ValueError(f"the CLIP states have {clip.shape[-1]} features, more than the T5 states' {d}")
        pad = xp.zeros(clip.shape[:2] + (d - clip.shape[-1],), dtype=clip.dtype)
        clip = xp.concatenate([clip, pad], axis=-1)                                            # (B, 77, 4096)
        embeds = xp.concatenate([clip, t5.astype(self.dtype, copy=False)], axis=1)             # (B, 77 + L, 4096)
        pooled = xp.concatenate([p1, p2], axis=-1).astype(self.dtype, copy=False)              # (B, 2048)
        return embeds, pooled

    def _conditioning(self, prompts, prompts_2, prompts_3, negatives, do_cfg, clip_skip, max_sequence_length):
        """(context, pooled) for the transformer: with CFG, [uncond; cond] along the batch. As diffusers, the
        negative prompts go to all three encoders (negative_prompt_2/_3 default to negative_prompt) without
        clip_skip."""
        cond, pooled = self.encode_prompt(prompts, prompts_2, prompts_3, clip_skip, max_sequence_length)
        if not do_cfg:
            return cond, pooled
        neg1, neg2, neg3 = negatives
        uncond, uncond_pooled = self.encode_prompt(neg1, neg2, neg3, None, max_sequence_length)
        xp = backend.array_namespace(cond)
        return xp.concatenate([uncond, cond], axis=0), xp.concatenate([uncond_pooled, pooled], axis=0)

    # -- scheduler ----------------------------------------------------------------------------------------------

    def make_scheduler(self, name: str | None = None):
        """A fresh flow-matching scheduler: the folder's own class, or a sampler name that has a flow version
        ("euler", "Euler", "heun", "DPM++ 2M": refldm.schedulers.names.FLOW_SAMPLERS)."""
        from refldm.schedulers import get_scheduler, names
        if name is None:
            return get_scheduler(self.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler"),
                                 self.scheduler_config)
        cls, implied = names.resolve_flow(name)
        if implied.get("use_flow_sigmas"):  # DPM-Solver++ on the flow grid, with the folder's shift
            implied["flow_shift"] = float(self.scheduler_config.get("shift", 1.0))
            for key in ("use_dynamic_shifting", "time_shift_type"):
                if key in self.scheduler_config:
                    implied[key] = self.scheduler_config[key]
        return get_scheduler(cls, self.scheduler_config, **implied)

    def _set_timesteps(self, sched, steps, latent_shape, mu, sigmas):
        """diffusers' retrieve_timesteps with mu from the image's token count when the scheduler shifts
        dynamically (calculate_shift)."""
        from refldm.schedulers.flow_match_euler import calculate_shift
        kwargs = {}
        c = sched.config
        if getattr(c, "use_dynamic_shifting", False) and mu is None:
            p = self.transformer.config.patch_size
            mu = calculate_shift((latent_shape[2] // p) * (latent_shape[3] // p), c.base_image_seq_len,
                                 c.max_image_seq_len, c.base_shift, c.max_shift)
        if mu is not None:
            kwargs["mu"] = mu
        if sigmas is not None:
            sched.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            sched.set_timesteps(steps, **kwargs)

    # -- a call ---------------------------------------------------------------------------------------------------

    def check_size(self, height, width):
        """Sides must be multiples of vae_scale_factor * patch_size (16 for SD3): each patch of the latent is one
        token. (The core has checked multiples of 8 first, with the message every pipeline gives.)"""
        f = self.vae_scale_factor * self.transformer.config.patch_size
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f} (vae_scale_factor "
                             f"{self.vae_scale_factor} x patch_size {self.transformer.config.patch_size}), got "
                             f"{width}x{height}; for example {max(f, width - width % f)}x{max(f, height - height % f)}")

    def sampler_label(self, name) -> str:
        """The web UIs' name of the flow sampler a call used ("Euler", "Heun", "DPM++ 2M")."""
        label = {"FlowMatchEulerDiscreteScheduler": "Euler", "FlowMatchHeunDiscreteScheduler": "Heun",
                 "DPMSolverMultistepScheduler": "DPM++ 2M"}
        key = self.make_scheduler(name).__class__.__name__
        return label.get(key, key)

    def __call__(self, prompt="", **kwargs) -> StableDiffusionPipelineOutput:
        """Generate images; diffusers' argument names and defaults (28 steps, guidance 7.0, 1024 x 1024):
        prompt_2, prompt_3, negative_prompt(_2, _3), height, width, num_inference_steps, guidance_scale, seed,
        generator, latents, sampler, sigmas, mu, max_sequence_length, clip_skip, num_images_per_prompt,
        output_type, callback, progress (see `_generate`)."""
        return self._generate(prompt, **kwargs)

    def _generate(self, prompt="", prompt_2=None, prompt_3=None, negative_prompt=None, negative_prompt_2=None,
                  negative_prompt_3=None, height: int | None = None, width: int | None = None,
                  num_inference_steps: int = 28, guidance_scale: float = 7.0, seed: int | None = None,
                  generator=None, latents=None, sampler: str | None = None, sigmas=None, mu: float | None = None,
                  max_sequence_length: int = 256, clip_skip: int | None = None, num_images_per_prompt: int = 1,
                  output_type: str = "pil", callback=None, progress: bool = True, image=None,
                  strength=None, rng: str | None = None, sampler_rng: str | None = None, ensd: int | None = None,
                  variation_seed: int | None = None, variation_strength: float | None = None,
                  seed_resize_from=None,
                  callback_on_step_end=None, callback_on_step_end_tensor_inputs=None,
                  preview_every: int | None = None, preview_dir=None,
                  preview: str = "linear") -> StableDiffusionPipelineOutput:
        """Generate images; diffusers' argument names and defaults (28 steps, guidance 7.0, 1024 x 1024).

        prompt_2 / prompt_3 go to CLIP-G / T5 (default: prompt); negative_prompt (and _2, _3) likewise.
        seed or generator (refldm.core.random.Generator) make the noise as torch's CPU generator does.
        latents: your own starting noise (B, 16, H/8, W/8). sampler: "euler" / "heun" / "DPM++ 2M" (their flow
        versions) or a FlowMatch class name. sigmas / mu: as diffusers' (custom t grid; dynamic-shift parameter).
        image + strength: img2img (StableDiffusion3Img2ImgPipeline). rng, sampler_rng, ensd, variation_seed,
        variation_strength, seed_resize_from: the web UIs' noise for the start (or the noise added to the image),
        as `StableDiffusionPipeline` (`refldm.pipelines.common.start_noise`).
        callback_on_step_end(pipe, i, t, callback_kwargs) / callback_on_step_end_tensor_inputs: diffusers' step
        callback ("latents", "prompt_embeds", "pooled_prompt_embeds" and the step's predictions; x_0 = x_t - sigma v,
        `refldm.pipelines.preview.FlowStepEnd`); preview_every, preview_dir, preview: every N-th step's latent and
        x_0 as PNGs, as `StableDiffusionPipeline` (the linear preview with SD3's 16 x 3 factors)."""
        timings = {}
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, SD3_CALLBACK_INPUTS)
        size = None if image is not None else (self.default_size if height is None else height,
                                               self.default_size if width is None else width)
        call = common.prologue(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                               height=size and size[0], width=size and size[1],
                               strength=strength if image is not None else None,
                               num_images_per_prompt=num_images_per_prompt, output_type=output_type,
                               texts=(("prompt_2", prompt_2), ("prompt_3", prompt_3),
                                      ("negative_prompt_2", negative_prompt_2),
                                      ("negative_prompt_3", negative_prompt_3)))
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be an integer in [1, 512] (T5's "
                             "limit in SD3)")
        if image is not None:
            if latents is not None:
                raise ValueError("give either image (img2img) or latents, not both")
            init = self.preprocess_image(image)                                  # (1, 3, H, W) in [-1, 1]
            height, width = init.shape[2], init.shape[3]
        else:
            height, width = call.height, call.width
        self.check_size(height, width)
        options = common.check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        if preview_every is not None:
            from refldm.pipelines.preview import check_preview
            check_preview(preview_every, call.steps, preview_dir, preview)
        # as diffusers: prompt_2 / prompt_3 default to prompt; negative_prompt to "", its _2 / _3 to it
        prompts, texts = call.prompts, call.texts
        negs = call.negatives or [""] * call.batch
        negatives = (negs, texts["negative_prompt_2"] or negs, texts["negative_prompt_3"] or negs)
        batch, generator = call.batch, call.generator
        dtype = self.dtype.name

        # 1. text: context (B or 2B, 77 + L, 4096), pooled (B or 2B, 2048)
        start = time.perf_counter()
        context, pooled = self._conditioning(prompts, texts["prompt_2"] or prompts, texts["prompt_3"] or prompts,
                                             negatives, call.do_cfg, clip_skip, max_sequence_length)
        timings["text encode"] = time.perf_counter() - start
        self.release_mapped("text_encoder", "text_encoder_2", "text_encoder_3")  # --low-memory: done with them

        # 2. the t grid and the start x_1 = e (txt2img) or the forward process at the first t (img2img)
        f = self.vae_scale_factor
        latent_shape = (batch, self.transformer.config.in_channels, height // f, width // f)
        sched = self.make_scheduler(sampler)
        self._set_timesteps(sched, call.steps, latent_shape, mu, sigmas)
        timesteps = sched.timesteps
        if image is None:  # e * 1 (sigma_1 = 1): diffusers' noise, or the web UIs' (common.make_noise)
            latents, generator, per_image = common.make_noise(latent_shape, sched, call, options, dtype, latents)
        else:
            start = time.perf_counter()
            common.seed_brownian(sched, call.seed)
            eps, sampler_generator, per_image = common.start_noise(latent_shape, call.seed, generator, options, dtype)
            timesteps, latents = self._img2img_start(sched, init, strength, call.steps, batch, generator, eps)
            generator = sampler_generator
            timings["image encode"] = time.perf_counter() - start

        # 3. the loop (refldm/pipelines/sampling.py): v = transformer(x_t, c, y, t); CFG; x = step(v)
        start = time.perf_counter()
        from refldm.pipelines.preview import FlowStepEnd, with_previews
        if preview_every is not None:
            callback_on_step_end, callback_on_step_end_tensor_inputs = with_previews(
                self, len(timesteps), preview_every, preview_dir, preview, callback_on_step_end,
                callback_on_step_end_tensor_inputs)
        # after each step: the NaN guard, callback(i, t, x), diffusers' callback_on_step_end (with x_0)
        after_step = FlowStepEnd(common.StepEnd(self, len(timesteps), callback, callback_on_step_end,
                                                callback_on_step_end_tensor_inputs,
                                                {"prompt_embeds": context, "pooled_prompt_embeds": pooled}),
                                 getattr(sched.config, "num_train_timesteps", 1000))
        tensors = after_step.tensors  # what the callback may replace

        def model_fn(x, t):
            return self.transformer(x, tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], t)

        latents = sample(after_step.model(model_fn), sched, latents, timesteps,
                         guidance_scale=guidance_scale if call.do_cfg else None, generator=generator,
                         callback=after_step, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        # 4. latents -> pixels (z = x_0 / scaling_factor + shift_factor, then the VAE decoder), parameters text
        made = common.GenerationParameters("", "", call.steps, self.sampler_label(sampler), guidance_scale, call.seed,
                                           width, height, self.name, strength=strength,
                                           model_hash=self.model_hash, fields=options.fields())
        return common.finish(self, latents, call, timings, made, per_image=per_image)

    def describe(self) -> dict:
        """{part: {"class", "parameters", "dtype", "config"}} for `refldm info`; a left-out T5 is named so."""
        out = self.describe_parts(("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
                                  [("tokenizer", ()), ("tokenizer_2", ()), ("tokenizer_3", ())])
        if self.text_encoder_3 is None:
            out["text_encoder_3"] = {"class": None, "note": "left out: zeros stand in for its states"}
        return out


class StableDiffusion3Img2ImgPipeline(StableDiffusion3Pipeline):
    """SD3 image to image: encode the image, run the forward process x_t = t e + (1 - t) x_0 to the first t
    that `strength` keeps, and integrate from there (diffusers' StableDiffusion3Img2ImgPipeline)."""

    def __call__(self, prompt="", image=None, strength: float = 0.6, **kwargs) -> StableDiffusionPipelineOutput:
        """As StableDiffusion3Pipeline.__call__, plus the input `image` (PIL or uint8 (H, W, 3), sides multiples
        of 16) and `strength` in [0, 1] (1: from pure noise; diffusers' default 0.6)."""
        if image is None:
            raise ValueError("StableDiffusion3Img2ImgPipeline needs image= (a PIL image)")
        return self._generate(prompt, image=image, strength=strength, **kwargs)

    def _img2img_start(self, sched, init, strength, n, batch, generator, noise=None):
        """The flow models' image-to-image start (pipelines/common.py, `flow_img2img_start`)."""
        from refldm.pipelines.common import flow_img2img_start
        timesteps, x = flow_img2img_start(self, sched, init, strength, n, batch, generator, noise)
        return timesteps, x
