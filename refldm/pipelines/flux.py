"""FLUX.1 (dev and schnell): text to image and image to image, as diffusers' FluxPipeline and
FluxImg2ImgPipeline. docs/flux.md explains the model and the schedule.

    prompt   --tokenizer-->   ids (B, 77)  --CLIP-L-->   pooler_output (B, 768)          the pooled vector y
    prompt_2 --tokenizer_2--> ids (B, 512) --T5-XXL-->   last_hidden_state (B, 512, 4096) the tokens c
    txt_ids = zeros (512, 3);  img_ids[r * w + s] = (0, r, s)                             RoPE positions
    x_1 ~ N(0, I) (B, 16, H/8, W/8), packed into 2x2 patches -> (B, HW/256, 64)
    t_i = shift_mu(linspace(1, 1/n, n)),  mu = linear in the token count HW/256           (dynamic shift)
    for t in t_i:
        v = transformer(x_t, c, y, t, ids, guidance=g)       (dev: g is an input, no second pass)
        [true CFG: v = v_neg + s (v - v_neg), a second pass on the negative prompt]
        x_t = x_t + (t' - t) v                               FlowMatchEulerDiscreteScheduler
    image = vae.decode(unpack(x_0) / scaling_factor + shift_factor)

FLUX.1-dev is guidance-distilled: `guidance_scale` (default 3.5) is fed to the transformer's guidance embedding
and costs nothing; schnell has no such embedding (a guidance value given to it is ignored, with a warning).
``true_cfg_scale > 1`` with a negative prompt runs real classifier-free guidance on top (two passes per step).
The seeded noise is torch's CPU generator's (refldm.core.random), the image rounding refldm.pipelines.sd's.
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
from refldm.checkpoints.stored import release_mapped
from refldm.checkpoints.weights import WeightsError, read_config
from refldm.core import record
from refldm.core.images import to_tensor, to_uint8, unscale_latents
from refldm.pipelines.common import parameters_text
from refldm.models.flux_transformer import latent_image_ids, pack_latents, unpack_latents
from refldm.pipelines.sampling import sample
from refldm.pipelines.sd import StableDiffusionPipelineOutput

__all__ = ["FluxPipeline", "FluxImg2ImgPipeline", "FLUX_PARTS", "is_flux_folder"]

# The parts of a diffusers FLUX folder and the class model_index.json names for each.
FLUX_PARTS = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5TokenizerFast",
              "scheduler": None}


# the tensors a step callback may ask for (diffusers' FluxPipeline._callback_tensor_inputs)
FLUX_CALLBACK_INPUTS = ("latents", "prompt_embeds")


def is_flux_folder(folder) -> bool:
    """True when `folder`'s model_index.json lists a FluxTransformer2DModel as its transformer."""
    if not os.path.isfile(os.path.join(os.fspath(folder), "model_index.json")):
        return False
    entry = read_config(os.fspath(folder), "model_index.json").get("transformer")
    return isinstance(entry, list) and entry[-1] == "FluxTransformer2DModel"


def _strings(value, batch: int, what: str, default):
    """A string or a list of strings -> a list of `batch` strings; None -> `default` (already a list)."""
    if value is None:
        return default
    values = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what}: give one string, or a list of {batch} strings (one per prompt)")
    return values


class FluxPipeline:
    """FLUX.1 text to image (module docstring)."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler_config: dict | None = None, name: str = "model", dtype="float32"):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler_config = dict(scheduler_config or {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                          "use_dynamic_shifting": True})
        self.name = name
        self.dtype = backend.resolve_dtype(dtype)

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", weights_dtype: str | None = None, transformer=None):
        """Load a diffusers FLUX.1 folder: model_index.json, transformer/, vae/, text_encoder/ (CLIP-L),
        tokenizer/, text_encoder_2/ (T5-XXL), tokenizer_2/, scheduler/. weights_dtype="stored": every model
        keeps its layers' weights as the files store them (bfloat16 for the published FLUX.1), memory-mapped and
        converted per layer when it runs (refldm.checkpoints.stored); the results are the same bit for bit.
        transformer: a loaded FluxTransformer2DModel to use instead of the folder's (as diffusers' components)."""
        from refldm.models.clip import CLIPTextModel
        from refldm.models.flux_transformer import FluxTransformer2DModel
        from refldm.models.t5 import T5EncoderModel
        from refldm.models.t5_tokenizer import T5TokenizerFast
        from refldm.models.tokenizer import CLIPTokenizer
        from refldm.models.vae import AutoencoderKL

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise WeightsError(f"{folder}: no such model folder")
        where = os.path.join(folder, "model_index.json")
        if not is_flux_folder(folder):
            raise WeightsError(f"{where}: its transformer is not a FluxTransformer2DModel, so this is not a FLUX "
                               "folder")
        index = read_config(folder, "model_index.json")
        for part, want in FLUX_PARTS.items():
            entry = index.get(part)
            if entry is None or (isinstance(entry, list) and entry[-1] is None) \
                    or not os.path.isdir(os.path.join(folder, part)):
                raise WeightsError(f"{folder}: the model folder has no {part}/ (every FLUX folder has it)")
            if want and isinstance(entry, list) and entry[-1] not in (want, want.removesuffix("Fast"),
                                                                      want + "Fast"):
                raise WeightsError(f"{folder}: {part} is a {entry[-1]}; refldm implements {want} only")
        path = lambda p: os.path.join(folder, p)  # noqa: E731
        load = {"weights_dtype": weights_dtype}
        if transformer is None:
            transformer = FluxTransformer2DModel.from_pretrained(path("transformer"), dtype=dtype, **load)
        return cls(transformer,
                   AutoencoderKL.from_pretrained(path("vae"), dtype=dtype, **load),
                   CLIPTextModel.from_pretrained(path("text_encoder"), dtype=dtype, **load),
                   CLIPTokenizer.from_pretrained(path("tokenizer")),
                   T5EncoderModel.from_pretrained(path("text_encoder_2"), dtype=dtype, **load),
                   T5TokenizerFast.from_pretrained(path("tokenizer_2")),
                   read_config(path("scheduler"), "scheduler_config.json"),
                   name=os.path.basename(os.path.normpath(folder)), dtype=dtype)

    @classmethod
    def from_single_file(cls, path, config, dtype="float32", weights_dtype: str | None = None):
        """The reference repository's transformer file (flux1-dev.safetensors, flux1-schnell.safetensors: the
        transformer alone) with the rest from `config`, a diffusers FLUX folder (its transformer config, VAE,
        text encoders, tokenizers and scheduler; its transformer weights are not read)."""
        from refldm.models.flux_transformer import FluxTransformer2DModel
        path, config = os.fspath(path), os.fspath(config)
        transformer = FluxTransformer2DModel.from_single_file(path, read_config(os.path.join(config, "transformer")),
                                                              dtype=dtype, weights_dtype=weights_dtype)
        pipe = cls.from_pretrained(config, dtype=dtype, weights_dtype=weights_dtype, transformer=transformer)
        pipe.name = os.path.splitext(os.path.basename(path))[0]
        return pipe

    # -- sizes --------------------------------------------------------------------------------------------------

    @property
    def default_size(self) -> int:
        """1024: diffusers' default height and width for FLUX.1 (128 latent pixels x the VAE's 8)."""
        return 128 * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along a side: 2 ** (VAE levels - 1) = 8."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, height: int, width: int):
        """(h, w) of the latent: 2 * (side // 16), so that the 2x2 packing fits (diffusers rounds down too)."""
        f = 2 * self.vae_scale_factor
        return 2 * (int(height) // f), 2 * (int(width) // f)

    # -- text ---------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts, prompts_2=None, max_sequence_length: int = 512):
        """Prompts -> (prompt_embeds (B, L, 4096), pooled (B, 768), txt_ids (L, 3)), as diffusers' encode_prompt:
        CLIP-L's pooled output of `prompts` (77 tokens) and T5's last hidden state of `prompts_2` (default:
        prompts), padded to max_sequence_length tokens; every text token has the RoPE id (0, 0, 0)."""
        prompts_2 = prompts if prompts_2 is None else prompts_2
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="np")["input_ids"]                                  # (B, 77)
        with record.scope("text_encoder"):
            pooled = self.text_encoder(ids).pooler_output                                       # (B, 768)
        ids_2 = self.tokenizer_2(prompts_2, padding="max_length", max_length=max_sequence_length, truncation=True,
                                 return_tensors="np")["input_ids"]                              # (B, L)
        with record.scope("text_encoder_2"):
            out = self.text_encoder_2(ids_2)
        embeds = getattr(out, "last_hidden_state", out)                                         # (B, L, 4096)
        txt_ids = numpy.zeros((embeds.shape[1], 3), dtype=numpy.int64)
        return embeds.astype(self.dtype, copy=False), pooled.astype(self.dtype, copy=False), txt_ids

    # -- scheduler ----------------------------------------------------------------------------------------------

    def make_scheduler(self):
        """A fresh scheduler of the folder's class and config (FlowMatchEulerDiscreteScheduler for FLUX)."""
        from refldm.schedulers import get_scheduler
        return get_scheduler(self.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler"),
                             self.scheduler_config)

    def time_shift_mu(self, image_seq_len: int) -> float:
        """mu of the dynamic shift, linear in the image token count n (diffusers' calculate_shift):

            mu(n) = base_shift + (max_shift - base_shift) (n - base_image_seq_len) / (max_image_seq_len -
                    base_image_seq_len)          (0.5 at 256 tokens = 256x256 px, 1.15 at 4096 = 1024x1024 px)

        The scheduler then uses t' = e^mu / (e^mu + 1/t - 1): more steps stay at high noise for larger images."""
        from refldm.schedulers.flow_match_euler import calculate_shift
        c = self.scheduler_config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    # -- a call -------------------------------------------------------------------------------------------------

    def __call__(self, prompt="", **kwargs) -> StableDiffusionPipelineOutput:
        """Generate images; diffusers' argument names and defaults (28 steps, guidance 3.5, 1024 x 1024):
        prompt_2 (T5's prompt), negative_prompt(_2) and true_cfg_scale, height, width, num_inference_steps,
        guidance_scale, seed, generator, latents (packed), sigmas, max_sequence_length, callback, progress."""
        return self._generate(prompt, **kwargs)

    def _generate(self, prompt="", prompt_2=None, negative_prompt=None, negative_prompt_2=None,
                  true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                  num_inference_steps: int = 28, guidance_scale: float | None = None, seed: int | None = None,
                  generator=None, latents=None, sigmas=None, max_sequence_length: int = 512, callback=None,
                  progress: bool = True, init=None, strength=None, rng: str | None = None,
                  sampler_rng: str | None = None, ensd: int | None = None, variation_seed: int | None = None,
                  variation_strength: float | None = None, seed_resize_from=None, callback_on_step_end=None,
                  callback_on_step_end_tensor_inputs=None, preview_every: int | None = None, preview_dir=None,
                  preview: str = "linear") -> StableDiffusionPipelineOutput:
        """The call (see __call__). rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from:
        the web UIs' noise for the start (or the noise added to the image), on the unpacked latent (B, 16, h, w),
        as `StableDiffusionPipeline` (`refldm.pipelines.common.start_noise`). callback_on_step_end(pipe, i, t, callback_kwargs) with
        callback_on_step_end_tensor_inputs: diffusers' step callback ("latents", packed as diffusers' FLUX hands
        them, "prompt_embeds", and the step's predictions; x_0 = x_t - sigma v, `preview.FlowStepEnd`);
        preview_every, preview_dir, preview: every N-th step's latent and x_0 as PNGs (unpacked; the linear
        preview with FLUX's 16 x 3 factors)."""
        from refldm.pipelines import common
        from refldm.pipelines.preview import FlowStepEnd, check_preview, with_previews
        from refldm.core.random import Generator, randn
        from refldm.pipelines.common import check_noise, seed_brownian, start_noise
        timings = {}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        batch = len(prompts)
        prompts_2 = _strings(prompt_2, batch, "prompt_2", prompts)
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length={max_sequence_length!r} must be an integer in [1, 512] (FLUX's "
                             "T5 limit)")
        options = check_noise(rng, sampler_rng, ensd, variation_seed, variation_strength, seed_resize_from)
        common.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, FLUX_CALLBACK_INPUTS)
        if preview_every is not None:
            check_preview(preview_every, n, preview_dir, preview)
        guidance = self._guidance(guidance_scale)
        do_true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if not math.isfinite(float(true_cfg_scale)):
            raise ValueError(f"true_cfg_scale must be finite, got {true_cfg_scale}")
        if init is not None:
            height, width = init.shape[2], init.shape[3]
        height = 128 * self.vae_scale_factor if height is None else int(height)
        width = 128 * self.vae_scale_factor if width is None else int(width)
        h, w = self.latent_size(height, width)
        if h < 2 or w < 2 or (h * self.vae_scale_factor, w * self.vae_scale_factor) != (height, width):
            f = 2 * self.vae_scale_factor
            raise ValueError(f"height and width must be positive multiples of {f} (vae_scale_factor "
                             f"{self.vae_scale_factor} x the 2x2 packing), got {width}x{height}; for example "
                             f"{max(f, width - width % f)}x{max(f, height - height % f)}")
        self._check_rope_range(h // 2, w // 2)
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2 ** 32)
            generator = Generator(seed)
        dtype = self.dtype.name

        # 1. text: c (B, L, 4096), y (B, 768), txt_ids (L, 3); with true CFG the negatives go first in the batch
        start = time.perf_counter()
        context, pooled, txt_ids = self.encode_prompt(prompts, prompts_2, max_sequence_length)
        if do_true_cfg:
            negs = _strings(negative_prompt, batch, "negative_prompt", None)
            negs_2 = _strings(negative_prompt_2, batch, "negative_prompt_2", negs)
            neg_c, neg_y, _ = self.encode_prompt(negs, negs_2, max_sequence_length)
            xp = backend.array_namespace(context)
            context, pooled = xp.concatenate([neg_c, context], axis=0), xp.concatenate([neg_y, pooled], axis=0)
        timings["text encode"] = time.perf_counter() - start
        release_mapped(self.text_encoder, self.text_encoder_2)  # --low-memory: T5's pages leave the resident set

        # 2. the t grid: linspace(1, 1/n, n) shifted by mu(token count); the start latent, packed
        img_ids = latent_image_ids(h // 2, w // 2)
        sched = self.make_scheduler()
        sigmas = numpy.linspace(1.0, 1 / n, n) if sigmas is None else sigmas
        sched.set_timesteps(sigmas=sigmas, mu=self.time_shift_mu(len(img_ids)))
        timesteps = sched.timesteps
        shape = (batch, self.transformer.config.in_channels // 4, h, w)
        seed_brownian(sched, seed)
        eps, sampler_generator, per_image = start_noise(shape, seed, generator, options, dtype, draw=latents is None)
        if init is not None:
            if latents is not None:
                raise ValueError("give either image (img2img) or latents, not both")
            start = time.perf_counter()
            timesteps, latents = self._img2img_start(sched, init, strength, n, batch, generator, eps)
            timings["image encode"] = time.perf_counter() - start
        elif latents is None:
            eps = backend.asarray(randn(shape, generator=generator, dtype=dtype)) if eps is None else eps
            latents = pack_latents(eps)
        else:
            want = (batch, (h // 2) * (w // 2), shape[1] * 4)
            if tuple(latents.shape) != want:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected packed {want}")
            latents = backend.asarray(latents, dtype=dtype)

        # 3. the loop: v = transformer(x_t, c, y, t / 1000, ids, g); true CFG; x = x + (t' - t) v
        start = time.perf_counter()
        n_steps = len(timesteps)
        if preview_every is not None:
            callback_on_step_end, callback_on_step_end_tensor_inputs = with_previews(
                self, n_steps, preview_every, preview_dir, preview, callback_on_step_end,
                callback_on_step_end_tensor_inputs, unpack=lambda z: unpack_latents(z, h, w))
        # after each step: the NaN guard, callback(i, t, x), diffusers' callback_on_step_end (with x_0)
        after_step = FlowStepEnd(common.StepEnd(self, n_steps, callback, callback_on_step_end,
                                                callback_on_step_end_tensor_inputs, {"prompt_embeds": context}),
                                 getattr(sched.config, "num_train_timesteps", 1000))
        tensors = after_step.tensors  # what the callback may replace

        def model_fn(x, t):
            # as diffusers: t cast to the latents' dtype, divided by 1000 there (the model multiplies back)
            t_in = numpy.full(x.shape[0], numpy.asarray(t, dtype=dtype) / numpy.asarray(1000, dtype=dtype))
            g = None if guidance is None else numpy.full(x.shape[0], guidance, dtype=numpy.float32)
            with record.scope("transformer"):
                return self.transformer(x, tensors["prompt_embeds"], pooled, t_in, img_ids, txt_ids, guidance=g)

        latents = sample(after_step.model(model_fn), sched, latents, timesteps,
                         guidance_scale=true_cfg_scale if do_true_cfg else None, generator=sampler_generator,
                         callback=after_step, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        # 4. unpack, z = x_0 / scaling_factor + shift_factor, decode
        start = time.perf_counter()
        release_mapped(self.transformer)  # --low-memory: the transformer's pages leave the resident set
        pixels = self.decode_latents(unpack_latents(latents, h, w))
        images = [Image.fromarray(p) for p in pixels]
        timings["decode"] = time.perf_counter() - start
        parameters = []
        for k, im in enumerate(images):   # the web UIs' PNG info; CFG scale is true CFG's (1 when off)
            negative = negs[k] if do_true_cfg else ""
            fields = {"Distilled CFG Scale": guidance, **options.fields(), **per_image[k].get("fields", {})}
            image_seed = per_image[k].get("seed", seed)
            text = parameters_text(prompts[k], negative, n, "Euler", true_cfg_scale if do_true_cfg else 1,
                                   "unknown" if image_seed is None else image_seed, im.width, im.height, self.name,
                                   strength=strength, fields=fields)
            im.info["parameters"] = text
            parameters.append(text)
        return StableDiffusionPipelineOutput(images=images, latents=latents, seed=seed, timings=timings,
                                             parameters=parameters)

    def _guidance(self, guidance_scale):
        """The value for the guidance embedding: guidance_scale (3.5 by default) on dev; None on schnell, where a
        given value (other than 0) is ignored with a warning."""
        if self.transformer.config.guidance_embeds:
            g = 3.5 if guidance_scale is None else float(guidance_scale)
            if not math.isfinite(g):
                raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
            return g
        if guidance_scale not in (None, 0, 0.0):
            warnings.warn(f"guidance_scale={guidance_scale} is ignored: this transformer has no guidance embedding "
                          "(FLUX.1-schnell is not guidance-distilled); use true_cfg_scale with a negative_prompt "
                          "for classifier-free guidance", stacklevel=3)
        return None

    def _check_rope_range(self, rows: int, cols: int):
        """Image ids must be exact in float32 (diffusers casts them): rows and columns below 2^24."""
        if max(rows, cols) >= 2 ** 24:
            raise ValueError(f"the image is {rows} x {cols} tokens; RoPE positions beyond 2^24 are not exact in "
                             "float32 (the ids' dtype in diffusers); use a smaller size")

    def decode_latents(self, latents):
        """Latents (B, 16, h, w) -> uint8 pixels (B, H, W, 3): vae.decode(x / scaling_factor + shift_factor)."""
        from refldm.models.vae import decode_checked
        with record.scope("vae"):
            image = decode_checked(self.vae, unscale_latents(latents, self.vae.config))
        return to_uint8(image)


class FluxImg2ImgPipeline(FluxPipeline):
    """FLUX image to image: encode the image, run the forward process x_t = t e + (1 - t) x_0 to the first t
    that `strength` keeps, and integrate from there (diffusers' FluxImg2ImgPipeline)."""

    def __call__(self, prompt="", image=None, strength: float = 0.6, **kwargs) -> StableDiffusionPipelineOutput:
        """As FluxPipeline.__call__, plus the input `image` (PIL or uint8 (H, W, 3), sides multiples of 16) and
        `strength` in [0, 1] (1: from pure noise; diffusers' default 0.6)."""
        if image is None:
            raise ValueError("FluxImg2ImgPipeline needs image= (a PIL image)")
        if isinstance(strength, bool) or not 0 <= float(strength) <= 1:
            raise ValueError(f"strength={strength!r} must be in [0, 1]")
        init = to_tensor(image, dtype=self.dtype.name)                   # (1, 3, H, W) in [-1, 1]
        return self._generate(prompt, init=init, strength=float(strength), **kwargs)

    def _img2img_start(self, sched, init, strength, n, batch, generator, noise=None):
        """The flow models' image-to-image start (pipelines/common.py, `flow_img2img_start`), packed."""
        from refldm.pipelines.common import flow_img2img_start
        timesteps, x = flow_img2img_start(self, sched, init, strength, n, batch, generator, noise)
        return timesteps, pack_latents(x)
