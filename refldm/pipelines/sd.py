"""Text to image (and image to image): the Stable Diffusion pipeline, as diffusers' StableDiffusionPipeline.

    prompt --tokenizer--> ids (B, 77) --text encoder--> c (B, 77, D)
    noise x_T ~ N(0, I) * init_noise_sigma                       (B, 4, H/8, W/8)
    for t in scheduler.timesteps:                                 # the denoising loop
        eps_u, eps_c = unet(scale(x_t), t, [c_uncond, c])         # one batch of 2B: [uncond, cond]
        eps = eps_u + w (eps_c - eps_u)                           # classifier-free guidance, w = guidance_scale
        x_t = scheduler.step(eps, t, x_t)
    image = vae.decode(x_0 / scaling_factor)                      (B, 3, H, W) in [-1, 1]
    pixels = round(255 * clamp(image / 2 + 0.5, 0, 1))            uint8

Every step follows diffusers' ``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline`` so that,
given the same weights, prompt, seed and scheduler, both give the same 8-bit image (tests/test_pipeline.py).
docs/pipeline.md walks the data through with the shapes at every step.

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd-folder")           # diffusers layout
    pipe = StableDiffusionPipeline.from_single_file("v1-5-pruned-emaonly.safetensors", tokenizer="tok/")
    out = pipe("a red circle", num_inference_steps=20, guidance_scale=7.5, seed=1, sampler="DPM++ 2M Karras")
    out.save("out.png"); out.images[0]; out.latents        # PNG with the parameters chunk, PIL images, latents

A pipeline object keeps no state between calls (each call makes its own scheduler, generator and
arrays), so calls from several threads are independent and give what the same calls in sequence give.
"""

from __future__ import annotations

import os
import time

from refldm import backend
from refldm.checkpoints import convert
from refldm.core import record
from refldm.core.images import scale_latents
from refldm.errors import TooLargeError  # noqa: F401  (its old home; the CLI raises it, refldm.analysis.cost estimates)
from refldm.adapters.loaders import IPAdapterMixin
from refldm.pipelines import common
from refldm.pipelines.common import NonFiniteLatentsError, StableDiffusionPipelineOutput  # noqa: F401
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps, sample
from refldm.checkpoints.weights import WeightsError, read_config

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput", "NonFiniteLatentsError", "TooLargeError",
           "PARTS"]

# The folders of a diffusers SD pipeline and the class model_index.json names for each.
PARTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
         "tokenizer": "CLIPTokenizer", "scheduler": None}


def _models():
    """The model classes (imported here, so that `refldm.pipelines.sd` imports without loading them all)."""
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    from refldm.models.tokenizer import CLIPTokenizer
    return UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer


class StableDiffusionPipeline(common.DiffusionPipeline, IPAdapterMixin):
    """The parts of Stable Diffusion and the loop that joins them (see the module docstring); what every
    pipeline shares (decoding, schedulers, the checks, the output) is `refldm.pipelines.common`."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler_config: dict, configs: dict | None = None,
                 name: str = "model", dtype="float32"):
        super().__init__(vae, unet, scheduler_config, configs, name=name, dtype=dtype)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", weights_dtype: str | None = None) -> "StableDiffusionPipeline":
        """Load a diffusers SD folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
        weights_dtype="stored": every model keeps its layers' weights as the files store them (memory-mapped,
        converted per layer when it runs; refldm.checkpoints.stored), same results bit for bit."""
        folder = os.fspath(folder)
        if os.path.isfile(folder):
            raise WeightsError(f"{folder}: is a file, not a model folder (a single-file checkpoint loads with "
                               "StableDiffusionPipeline.from_single_file)")
        if not os.path.isdir(folder):
            raise WeightsError(f"{folder}: no such model folder")
        index = read_config(folder, "model_index.json")
        if (index.get("text_encoder_2") or [None])[-1] is not None:
            raise WeightsError(f"{folder}: an SDXL folder (it has text_encoder_2); load it with "
                               "StableDiffusionXLPipeline (refldm.pipelines.sdxl)")
        for part in PARTS:
            if not os.path.isdir(os.path.join(folder, part)):
                raise WeightsError(f"{folder}: the model folder has no {part}/ (a Stable Diffusion folder needs "
                                   f"{', '.join(p + '/' for p in PARTS)})")
            entry = index.get(part)
            if entry is None or (isinstance(entry, list) and entry[-1] is None):
                raise WeightsError(f"{os.path.join(folder, 'model_index.json')}: lists no {part}")
        for part, name in PARTS.items():
            entry = index[part]
            if name and isinstance(entry, list) and entry[-1] != name:
                raise WeightsError(f"{folder}: {part} is a {entry[-1]}; refldm implements {name} only")
        Unet, Vae, TextEncoder, Tokenizer = _models()
        unet = Unet.from_pretrained(os.path.join(folder, "unet"), dtype=dtype, weights_dtype=weights_dtype)
        vae = Vae.from_pretrained(os.path.join(folder, "vae"), dtype=dtype, weights_dtype=weights_dtype)
        text_encoder = TextEncoder.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype,
                                                   weights_dtype=weights_dtype)
        tokenizer = Tokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        scheduler_config = read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
        configs = {p: read_config(os.path.join(folder, p)) for p in ("unet", "vae", "text_encoder")}
        from refldm.about import DEFAULT_MODEL
        name = os.path.basename(os.path.normpath(folder))
        if os.path.realpath(folder) == os.path.realpath(DEFAULT_MODEL):
            name = "refldm-default"  # as the CLI records the built-in model
        pipe = cls(vae, text_encoder, tokenizer, unet, scheduler_config, configs, name=name, dtype=dtype)
        pipe.checkpoint_path = folder  # its "Model hash": the U-Net weights file's (common.checkpoint_hash)
        return pipe

    @classmethod
    def from_single_file(cls, path, config=None, tokenizer=None, dtype="float32",
                         prediction_type: str | None = None, weights_dtype: str | None = None
                         ) -> "StableDiffusionPipeline":
        """Load an original SD 1.x / 2.x single-file ``.safetensors`` checkpoint (CompVis key names).

        config: a diffusers SD folder whose configs (and tokenizer and scheduler) describe the file's model,
        as diffusers' ``from_single_file(path, config=...)``. Without it the configs are read off the tensor
        shapes (`refldm.checkpoints.convert.infer_configs`), and then `tokenizer` must name a CLIP tokenizer folder
        (vocab.json + merges.txt): a single file holds no vocabulary. For SD 2.x without `config`,
        `prediction_type` must say "epsilon" (the -base models) or "v_prediction" (the 768-v models):
        the weights do not tell. Pickle files (.ckpt, .pt, .bin) are refused, never opened.
        weights_dtype="stored": the file's tensors stay mapped, converted per layer when it runs (from_pretrained).
        """
        from refldm.checkpoints.stored import load_checkpoint
        path = os.fspath(path)
        state = load_checkpoint(path, weights_dtype)  # refuses pickles; validates the file
        kind = convert.detect(state)
        if kind == "sdxl":
            raise ValueError(f"{path}: an SDXL checkpoint; load it with StableDiffusionXLPipeline.from_single_file")
        Unet, Vae, TextEncoder, Tokenizer = _models()
        if config is not None:
            config = os.fspath(config)
            configs = {p: read_config(os.path.join(config, p)) for p in ("unet", "vae", "text_encoder")}
            scheduler_config = read_config(os.path.join(config, "scheduler"), "scheduler_config.json")
            tokenizer_dir = tokenizer or os.path.join(config, "tokenizer")
        else:
            configs = convert.infer_configs(state, kind)
            scheduler_config = dict(convert.SD_SCHEDULER_CONFIG)
            if kind == "sd2":
                if prediction_type is None:
                    raise ValueError(f"{path}: an SD 2.x checkpoint; say prediction_type='epsilon' (2.x-base) or "
                                     "'v_prediction' (768-v models), or give config=a diffusers folder: the "
                                     "weights do not tell which")
            if tokenizer is None:
                raise ValueError(f"{path}: a single file holds no tokenizer vocabulary; give tokenizer=a CLIP "
                                 "tokenizer folder (vocab.json + merges.txt) or config=a diffusers SD folder")
            tokenizer_dir = tokenizer
        if prediction_type is not None:
            scheduler_config["prediction_type"] = prediction_type
        models = {"unet": Unet.from_config(configs["unet"]), "vae": Vae.from_config(configs["vae"]),
                  "text_encoder": TextEncoder.from_config(configs["text_encoder"])}
        expected = {part: [key for key, *_ in model.params()] for part, model in models.items()}
        parts = convert.from_original(state, expected, configs, kind, source=path)  # the key table
        del state
        for part, model in models.items():
            model.load_state_dict(parts.pop(part), dtype=dtype, source=f"{path} ({part})")
        tok = Tokenizer.from_pretrained(tokenizer_dir)
        name = os.path.splitext(os.path.basename(path))[0]
        pipe = cls(models["vae"], models["text_encoder"], tok, models["unet"], scheduler_config, configs,
                   name=name, dtype=dtype)
        pipe.checkpoint_path = path  # its "Model hash", the web UI's short SHA-256 of the file
        return pipe

    # -- the parts of a call ------------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str], max_length: int | None = None):
        """Token ids (B, 77): [bos] + BPE ids + [eos], padded to the tokenizer's model_max_length.

        A longer prompt is cut to fit, and the tokenizer warns naming what was dropped (as diffusers does).
        """
        if getattr(self.tokenizer, "added_tokens_encoder", None):  # textual-inversion tokens: t -> "t t_1 ..."
            from refldm.adapters.textual_inversion import expand_prompt
            prompts = [expand_prompt(self.tokenizer, p) for p in prompts]
        return self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="np")["input_ids"]

    def encode_prompt(self, prompts: list[str], max_length: int | None = None):
        """Prompts -> text embeddings (B, 77, D): the text encoder's last hidden state."""
        ids = self.tokenize(prompts, max_length)                       # (B, 77) int64
        with record.scope("text_encoder"):                             # trace names: text_encoder.<layer>
            return self.text_encoder(ids).last_hidden_state            # (B, 77, D)

    # -- a call ---------------------------------------------------------------------------------------------------

    def __call__(self, prompt="", negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                 generator=None, sampler: str | None = None, latents=None, image=None, strength: float = 0.8,
                 callback=None, progress: bool = True, noise_dtype: str | None = None,
                 prompt_syntax: str = "plain", clip_skip: int | None = None,
                 scheduler: str | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, preview_every: int | None = None,
                 preview_dir=None, preview: str = "linear", rng: str | None = None, sampler_rng: str | None = None,
                 ensd: int | None = None, variation_seed: int | None = None, variation_strength: float | None = None,
                 seed_resize_from=None, hires_scale: float | None = None, hires_steps: int | None = None,
                 hires_denoise: float | None = None, hires_upscaler: str | None = None, hires_comfyui=None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None) -> StableDiffusionPipelineOutput:
        """Generate images. See the module docstring for the loop; diffusers' argument names and defaults.

        prompt / negative_prompt: a string or a list (one per image). "" is allowed (unconditional); a
        negative prompt of None means "", as in diffusers. seed or generator (a `refldm.core.random.Generator`)
        make the noise; with neither, a random seed is drawn and returned in the output. latents: your own
        starting noise (B, 4, H/8, W/8), multiplied by the scheduler's init_noise_sigma as in diffusers.
        image + strength: img2img; the image is encoded, noised to the timestep that `strength` selects
        (1.0: pure noise, 0.0: unchanged) and denoised from there. callback(step, t, latents) runs after
        every step. guidance_scale <= 1 turns classifier-free guidance off (one U-Net pass per step); it
        must be finite. seed: 0..2**64-1, as torch. noise_dtype: the dtype the starting noise is drawn in
        (default: the pipeline's). The noise is drawn per dtype, as torch does, so the same seed gives a
        float64 pipeline other noise than a float32 one; noise_dtype="float32" on a float64 pipeline draws
        the float32 noise and upcasts it, so a float64 "golden" run starts where the float32 run starts
        (docs/pipeline.md). The images carry their generation parameters in ``image.info["parameters"]``;
        ``out.save(path)`` writes them into the file. num_images_per_prompt: images per prompt (as diffusers);
        output_type="latent": the latents alone, no decode.
        prompt_syntax="webui": the AUTOMATIC1111 web UI's (word:1.3) weights, BREAK and prompts over 75
        tokens (refldm/adapters/prompt_weighting.py); clip_skip=k: the text encoder's k-th layer from the end, as
        diffusers' clip_skip.
        callback_on_step_end(pipe, i, t, callback_kwargs) / callback_on_step_end_tensor_inputs: diffusers' step
        callback (`refldm.pipelines.common.StepEnd`); the dict it returns may replace "latents".
        preview_every=N, preview_dir=DIR, preview="linear"|"tiny"|"vae": write the noisy latent and the
        predicted x_0 of every N-th step as PNGs (`refldm.pipelines.preview`), through that callback.
        The web UIs' noise (`refldm.pipelines.common.NoiseOptions`, docs/reproduce.md):
        rng="cpu"|"cuda" (torch's CPU stream or the GPU's Philox stream, A1111's "CPU" / "NV"), ensd,
        variation_seed + variation_strength, seed_resize_from=(w, h): A1111's per-image noise, image i from
        seed + i (img2img: the noise added to the image, as A1111's img2img); sampler_rng: the sampler's noise
        from its own generator. None of them: diffusers' noise.
        hires_scale (+ hires_steps, hires_denoise=0.7, hires_upscaler="Latent"): A1111's hires fix, a second
        pass at the scaled size (`refldm.pipelines.common.hires_pass`); hires_comfyui={"seed": s, "size": (W, H),
        "start": k}: that pass as ComfyUI's second sampler node runs it (KSampler with denoise, or from step k of
        a KSamplerAdvanced pair, the first pass then stopping at k; `refldm.pipelines.common._comfyui_pass`).
        ip_adapter_image / ip_adapter_image_embeds: the reference image(s) of the loaded IP-Adapter(s)
        (`load_ip_adapter`, refldm/adapters/loaders.py), as diffusers.
        """
        timings = {}
        size = None if image is not None else (self.default_size if height is None else height,
                                               self.default_size if width is None else width)
        call = common.prologue(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator,
                               height=size and size[0], width=size and size[1],
                               strength=strength if image is not None else None,
                               num_images_per_prompt=num_images_per_prompt, output_type=output_type)
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if preview_every is not None:
            from refldm.pipelines.preview import check_preview
            check_preview(preview_every, call.steps, preview_dir, preview)
        noise = common.check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        hires = None if image is not None else common.check_hires(hires_scale, hires_steps, hires_denoise,
                                                                   hires_upscaler, call.height, call.width,
                                                                   hires_comfyui)
        if image is not None and hires_scale is not None:
            raise ValueError("hires_scale is for text-to-image; not with image=")
        if noise_dtype not in (None, "float16", "float32", "float64"):
            raise ValueError(f"noise_dtype={noise_dtype!r}; choose 'float16', 'float32' or 'float64'")
        if image is not None:
            if latents is not None:
                raise ValueError("give either image (img2img) or latents, not both")
            init = self.preprocess_image(image)                             # (1, 3, H, W) in [-1, 1]
            height, width = init.shape[2], init.shape[3]
        else:
            height, width = call.height, call.width
        prompts, negatives = call.prompts, call.negatives or [""] * call.batch  # None: "", as diffusers
        batch, steps, do_cfg, generator = call.batch, call.steps, call.do_cfg, call.generator
        dtype = self.dtype.name

        # 1. text -> embeddings: (B, 77) ids -> (B, 77, D); with CFG, one batch [uncond; cond] of 2B
        start = time.perf_counter()
        if prompt_syntax != "plain" or clip_skip:  # refldm/adapters/prompt_weighting.py: (B, 77 * chunks, D) each
            from refldm.adapters.prompt_weighting import encode_prompts
            cond, uncond = encode_prompts(self, prompts, negatives if do_cfg else None, prompt_syntax, clip_skip)
        else:
            cond = self.encode_prompt(prompts)                              # (B, 77, D)
            uncond = self.encode_prompt(negatives, max_length=cond.shape[1]) if do_cfg else None  # (B, 77, D)
        if do_cfg:
            xp = backend.array_namespace(cond)
            context = xp.concatenate([uncond, cond], axis=0)                # (2B, 77, D)
        else:
            context = cond
        timings["text encode"] = time.perf_counter() - start
        self.release_mapped("text_encoder", "text_encoder_2", "text_encoder_3")  # --low-memory: done with them
        image_embeds = self.ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, batch, do_cfg)
        added = None if image_embeds is None else {"image_embeds": image_embeds}  # IP-Adapter: the image features

        # 2. the timesteps and the starting latents x_T (B, 4, H/8, W/8)
        sched, sampler = self.scheduler_for(sampler, scheduler, steps)
        timesteps = sched.timesteps
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        per_image = None
        if image is None:  # eps * sigma: diffusers' noise, or the web UI's (the sampler's generator with it)
            latents, generator, per_image = common.make_noise(latent_shape, sched, call, noise, dtype, latents,
                                                              noise_dtype)
        else:
            # img2img starts part-way: strength s runs the last int(s * n) of the n steps
            timesteps, steps_left = img2img_timesteps(sched, steps, strength)
            if steps_left < 1:
                raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; "
                                 "raise strength or the number of steps")
            start = time.perf_counter()
            with record.scope("vae"):
                posterior = self.vae.encode(init)                                # q(z | x) over (1, 4, H/8, W/8)
            z = posterior.mode() if noise.webui else posterior.sample(generator=generator)  # common.start_noise
            x0 = scale_latents(z, self.vae.config)                               # z ~ q (or its mean), times 0.18215
            xp = backend.array_namespace(x0)
            x0 = xp.concatenate([x0] * batch, axis=0)                            # (B, 4, H/8, W/8), as diffusers
            # eps: the web UIs' noise with their options (common.start_noise), else drawn here as diffusers does
            common.seed_brownian(sched, call.seed)
            eps, sampler_generator, per_image = common.start_noise(tuple(x0.shape), call.seed, generator, noise, dtype)
            latents = img2img_latents(sched, x0, timesteps, noise=eps, generator=generator)  # add_noise(x0, eps, t_0)
            generator = sampler_generator
            timings["image encode"] = time.perf_counter() - start

        # 3. the denoising loop (refldm/pipelines/sampling.py): per step, with CFG, one U-Net batch of 2B:
        #    eps_u, eps_c = unet(scale(x_t), t, [c_uncond; c]);  eps = eps_u + w (eps_c - eps_u);  x = step(eps)
        start = time.perf_counter()
        if preview_every is not None:
            from refldm.pipelines.preview import with_previews
            callback_on_step_end, callback_on_step_end_tensor_inputs = with_previews(
                self, len(timesteps), preview_every, preview_dir, preview, callback_on_step_end,
                callback_on_step_end_tensor_inputs)

        def denoise(x, sched, timesteps, generator):  # one pass of the loop (the hires fix runs a second)
            after_step = common.StepEnd(self, len(timesteps), callback, callback_on_step_end,
                                        callback_on_step_end_tensor_inputs,
                                        {"prompt_embeds": context, "negative_prompt_embeds": uncond})
            extra = {} if added is None else {"added_cond_kwargs": added}  # IP-Adapter's image features, if any
            return sample(lambda x, t: self.unet(x, t, after_step.tensors["prompt_embeds"], **extra), sched, x,
                          timesteps, guidance_scale=guidance_scale if do_cfg else None, generator=generator,
                          callback=after_step, progress=progress)

        latents = denoise(latents, sched, common.first_pass_timesteps(timesteps, hires, sched.order), generator)
        if hires is not None:  # A1111's hires fix: upscale, re-noise to hires.denoise, a second pass
            latents = common.hires_pass(self, latents, call, noise, hires, sampler, steps, generator, denoise)
        timings["denoise"] = time.perf_counter() - start

        # 4. latents -> pixels, each image with its parameters text
        fields = {"Clip skip": clip_skip + 1 if clip_skip else None,  # the web UI counts the last layer as 1
                  **noise.fields(), **(hires.fields() if hires else {})}
        made = common.GenerationParameters("", "", steps, self.sampler_label(sampler), guidance_scale, call.seed,
                                           width, height, self.name,
                                           strength=hires.denoise if hires else None if image is None else strength,
                                           model_hash=self.model_hash, fields=fields)
        return common.finish(self, latents, call, timings, made, per_image=per_image,
                             size=(width, height) if hires else None)

    # -- description -----------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """{part: {"class", "parameters", "dtype", "config"}} for `refldm info`."""
        return self.describe_parts(("unet", "vae", "text_encoder"), [("tokenizer", ())])
