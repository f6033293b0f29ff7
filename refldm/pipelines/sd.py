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

import math
import os
import secrets
import time
from dataclasses import dataclass, field

from PIL import Image

from refldm import backend
from refldm.checkpoints import convert
from refldm.core import record
from refldm.core.images import scale_latents, to_tensor, to_uint8, unscale_latents
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps, initial_latents, sample
from refldm.checkpoints.weights import WeightsError, load_file, read_config

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput", "NonFiniteLatentsError",
           "TooLargeError", "PARTS", "estimate_unet_bytes", "estimate_decode_bytes", "estimate_unet_flops",
           "estimate_decode_flops"]

# The folders of a diffusers SD pipeline and the class model_index.json names for each.
PARTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
         "tokenizer": "CLIPTokenizer", "scheduler": None}


class NonFiniteLatentsError(RuntimeError):
    """The latents became NaN or inf during denoising."""


class TooLargeError(ValueError):
    """A run would need more memory than the machine has (estimated from the sizes before it starts)."""


@dataclass
class StableDiffusionPipelineOutput:
    """What a pipeline call returns.

    images: one PIL image per prompt. latents: the final latents (B, 4, H/8, W/8), before the division by
    the VAE's scaling factor, as an array of the active backend. seed: the seed the noise came from.
    timings: seconds spent per stage ("text encode", "denoise", "decode"; img2img adds "image encode").
    """

    images: list
    latents: object
    seed: int | None = None
    timings: dict = field(default_factory=dict)
    parameters: list = field(default_factory=list)  # per image, the web UIs' "parameters" text

    def save(self, path, index: int | None = None) -> list:
        """Write the images with their generation parameters (a PNG ``parameters`` chunk, as the CLI and the
        web UIs write it; EXIF UserComment for .jpg / .webp), atomically. One image: `path`; several:
        NAME-0.png, NAME-1.png, ... (or only image `index` to `path`). Returns the paths written."""
        from refldm.core.images import check_output, save_pil
        path = os.fspath(path)
        chosen = range(len(self.images)) if index is None else [index]
        if len(chosen) == 1:
            names = [path]
        else:
            stem, ext = os.path.splitext(path)
            names = [f"{stem}-{i}{ext}" for i in chosen]
        for name in names:
            check_output(name)
        for name, i in zip(names, chosen):
            save_pil(self.images[i], name, self.parameters[i] if i < len(self.parameters) else None)
        return names


# -- what a run costs, from the sizes alone (for refusing a run that cannot fit before it starts) ------------


def _levels(config, h: int, w: int):
    """(channels, height, width, has attention) of each U-Net level for a latent of h x w."""
    out = []
    for i, c in enumerate(config.block_out_channels):
        has_attn = "CrossAttn" in config.down_block_types[i]
        out.append((c, -(-h // 2 ** i), -(-w // 2 ** i), has_attn))
    return out


def _per_level(value, i):
    return value[i] if isinstance(value, (list, tuple)) else value


def estimate_unet_bytes(config, batch: int, h: int, w: int, itemsize: int = 4) -> int:
    """Peak memory of one U-Net call on `batch` latents of h x w, roughly: the skip connections kept for the
    up path, plus the working arrays of the largest level (ResNet temporaries and the transformer's
    feed-forward, 8 channels wide per channel with GEGLU), plus one chunk of attention scores."""
    from refldm.core import ops
    skips, work = 0, 0
    for i, (c, hi, wi, _) in enumerate(_levels(config, h, w)):
        n = batch * c * hi * wi
        skips += n * (_per_level(config.layers_per_block, i) + 1)
        work = max(work, 12 * n)
    return itemsize * (skips + work) + ops.ATTENTION_CHUNK_BYTES


def estimate_decode_bytes(vae_config, shape, itemsize: int = 4) -> int:
    """Peak memory of decoding latents of `shape` (N, C, h, w), roughly: at full size, a ResNet's input,
    output and normalised copy at the top level's width, and the upsampled input from the level below."""
    n, _, h, w = shape
    chans = list(vae_config.block_out_channels)
    f = 2 ** (len(chans) - 1)
    top, below = chans[0], chans[1] if len(chans) > 1 else chans[0]
    return itemsize * n * (h * f) * (w * f) * (4 * top + 2 * below + 6)


def estimate_decode_flops(vae_config, shape) -> float:
    """Floating-point operations of decoding latents of `shape` (N, C, h, w), roughly: per decoder level,
    its ResNets' 3x3 convolutions (layers_per_block + 1 ResNets of two convs, 18 c^2 per pixel each) and
    the mid block's attention over the h x w latent grid (4 (hw)^2 c)."""
    n, _, h, w = shape
    chans = list(vae_config.block_out_channels)[::-1]  # the decoder runs from the widest, coarsest level up
    lpb = vae_config.layers_per_block
    total = 4 * (h * w) ** 2 * chans[0] + 2 * 2 * 18 * chans[0] ** 2 * h * w
    for i, c in enumerate(chans):
        hw = h * w * 4 ** i
        total += 2 * 18 * c * c * hw * 2 * (lpb + 1)
    return n * total


def estimate_unet_flops(config, batch: int, h: int, w: int) -> float:
    """Floating-point operations of one U-Net call, roughly: its 3x3 convolutions (18 c^2 per pixel each:
    two per ResNet, 2 x layers_per_block down and 2 x (layers_per_block + 1) up) and, at levels with
    attention, the attention products (4 (hw)^2 c) and the transformer's matrix products (~24 c^2 per token)."""
    total = 0.0
    for i, (c, hi, wi, has_attn) in enumerate(_levels(config, h, w)):
        hw = hi * wi
        lpb = _per_level(config.layers_per_block, i)
        resnets = 2 * lpb + 1 + (1 if i == len(config.block_out_channels) - 1 else 0)
        total += 2 * 18 * c * c * hw * resnets
        if has_attn:
            total += (4 * hw * hw * c + 24 * hw * c * c) * (2 * lpb + 1)
    return batch * total


def _models():
    """The model classes (imported here, so that `refldm.pipelines.sd` imports without loading them all)."""
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    from refldm.models.tokenizer import CLIPTokenizer
    return UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer


class StableDiffusionPipeline:
    """The parts of Stable Diffusion and the loop that joins them (see the module docstring)."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler_config: dict, configs: dict | None = None,
                 name: str = "model", dtype="float32"):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)  # a fresh scheduler is built from it for each call
        self.configs = configs or {}  # the raw config.json dicts of the parts (for `refldm info`)
        self.name = name
        self.dtype = backend.resolve_dtype(dtype)

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype="float32") -> "StableDiffusionPipeline":
        """Load a diffusers SD folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
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
        unet = Unet.from_pretrained(os.path.join(folder, "unet"), dtype=dtype)
        vae = Vae.from_pretrained(os.path.join(folder, "vae"), dtype=dtype)
        text_encoder = TextEncoder.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype)
        tokenizer = Tokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        scheduler_config = read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
        configs = {p: read_config(os.path.join(folder, p)) for p in ("unet", "vae", "text_encoder")}
        from refldm.about import DEFAULT_MODEL
        name = os.path.basename(os.path.normpath(folder))
        if os.path.realpath(folder) == os.path.realpath(DEFAULT_MODEL):
            name = "refldm-default"  # as the CLI records the built-in model
        return cls(vae, text_encoder, tokenizer, unet, scheduler_config, configs, name=name, dtype=dtype)

    @classmethod
    def from_single_file(cls, path, config=None, tokenizer=None, dtype="float32",
                         prediction_type: str | None = None) -> "StableDiffusionPipeline":
        """Load an original SD 1.x / 2.x single-file ``.safetensors`` checkpoint (CompVis key names).

        config: a diffusers SD folder whose configs (and tokenizer and scheduler) describe the file's model,
        as diffusers' ``from_single_file(path, config=...)``. Without it the configs are read off the tensor
        shapes (`refldm.checkpoints.convert.infer_configs`), and then `tokenizer` must name a CLIP tokenizer folder
        (vocab.json + merges.txt): a single file holds no vocabulary. For SD 2.x without `config`,
        `prediction_type` must say "epsilon" (the -base models) or "v_prediction" (the 768-v models):
        the weights do not tell. Pickle files (.ckpt, .pt, .bin) are refused, never opened.
        """
        path = os.fspath(path)
        state = load_file(path)  # refuses pickles; validates the file
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
        return cls(models["vae"], models["text_encoder"], tok, models["unet"], scheduler_config, configs,
                   name=name, dtype=dtype)

    # -- the parts of a call ------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along a side: 2 ** (VAE levels - 1) = 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The image side the U-Net was trained at: unet sample_size * vae_scale_factor (512 for SD 1.x)."""
        size = self.configs.get("unet", {}).get("sample_size", 64)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

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

    def make_scheduler(self, name: str | None = None):
        """A fresh scheduler for a sampler name ("DPM++ 2M Karras", "euler", "dpmpp_2m karras"; `refldm samplers`
        lists them) or the folder's own class."""
        from refldm.schedulers import get_scheduler
        return get_scheduler(name or self.scheduler_config.get("_class_name"), self.scheduler_config)

    def decode_latents(self, latents):
        """Latents (B, 4, h, w) -> uint8 pixels (B, H, W, 3) on the host, rounded exactly as diffusers does."""
        from refldm.models.vae import decode_checked
        # in float32 when a float16 VAE says force_upcast; NaN/inf in the image is an error (models/vae.py)
        with record.scope("vae"):                                             # trace names: vae.<layer>
            image = decode_checked(self.vae, unscale_latents(latents, self.vae.config))  # (B, 3, H, W), ~[-1, 1]
        return to_uint8(image)                                               # round(255 clip(x/2 + 1/2))

    def preprocess_image(self, image):
        """A PIL image (or uint8 array (H, W, 3)) -> (1, 3, H, W) in [-1, 1] on the active backend.
        H and W must be multiples of 8 (diffusers would resize silently; refldm asks you to)."""
        x = to_tensor(image, dtype=self.dtype.name)                          # (1, 3, H, W)
        h, w = x.shape[2], x.shape[3]
        f = max(8, self.vae_scale_factor)
        if h % f or w % f:
            raise ValueError(f"the input image is {w}x{h}; its width and height must be multiples of {f} "
                             "(resize or crop it)")
        return x

    # -- a call ---------------------------------------------------------------------------------------------------

    def __call__(self, prompt="", negative_prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                 generator=None, sampler: str | None = None, latents=None, image=None, strength: float = 0.8,
                 callback=None, progress: bool = True, noise_dtype: str | None = None,
                 prompt_syntax: str = "plain", clip_skip: int | None = None,
                 scheduler: str | None = None) -> StableDiffusionPipelineOutput:
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
        ``out.save(path)`` writes them into the file.
        prompt_syntax="webui": the AUTOMATIC1111 web UI's (word:1.3) weights, BREAK and prompts over 75
        tokens (refldm/adapters/prompt_weighting.py); clip_skip=k: the text encoder's k-th layer from the end, as
        diffusers' clip_skip.
        """
        from refldm.core.random import Generator
        timings = {}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        batch = len(prompts)
        if negative_prompt is None:
            negatives = [""] * batch
        else:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        num_inference_steps = int(num_inference_steps)
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if noise_dtype not in (None, "float16", "float32", "float64"):
            raise ValueError(f"noise_dtype={noise_dtype!r}; choose 'float16', 'float32' or 'float64'")
        if image is not None:
            init = self.preprocess_image(image)                             # (1, 3, H, W) in [-1, 1]
            height, width = init.shape[2], init.shape[3]
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2 ** 32)
            generator = Generator(seed)
        do_cfg = guidance_scale > 1.0
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

        # 2. the timesteps and the starting latents x_T (B, 4, H/8, W/8)
        sampler = sampler if sampler is not None else scheduler                 # scheduler=: the old spelling
        sched = self.make_scheduler(sampler)
        sched.set_timesteps(num_inference_steps)
        self._check_schedule(sched, num_inference_steps, sampler)
        timesteps = sched.timesteps
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if image is None:
            if latents is None:
                if noise_dtype is None or noise_dtype == dtype:
                    latents = initial_latents(latent_shape, sched, generator=generator, dtype=dtype)  # eps * sigma
                else:  # eps drawn in noise_dtype, upcast, then scaled in the pipeline's dtype
                    from refldm.core.random import randn
                    eps = randn(latent_shape, generator=generator, dtype=noise_dtype)
                    latents = backend.asarray(eps, dtype=dtype) * float(sched.init_noise_sigma)
            else:
                if tuple(latents.shape) != latent_shape:
                    raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {latent_shape}")
                latents = backend.asarray(latents, dtype=dtype) * float(sched.init_noise_sigma)
        else:
            if latents is not None:
                raise ValueError("give either image (img2img) or latents, not both")
            # img2img starts part-way: strength s runs the last int(s * n) of the n steps
            timesteps, steps_left = img2img_timesteps(sched, num_inference_steps, strength)
            if steps_left < 1:
                raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run; "
                                 "raise strength or the number of steps")
            start = time.perf_counter()
            with record.scope("vae"):
                posterior = self.vae.encode(init)                                # q(z | x) over (1, 4, H/8, W/8)
            x0 = scale_latents(posterior.sample(generator=generator), self.vae.config)  # z ~ q, times 0.18215
            xp = backend.array_namespace(x0)
            x0 = xp.concatenate([x0] * batch, axis=0)                            # (B, 4, H/8, W/8), as diffusers
            latents = img2img_latents(sched, x0, timesteps, generator=generator)  # add_noise(x0, eps, t_0)
            timings["image encode"] = time.perf_counter() - start

        # 3. the denoising loop (refldm/pipelines/sampling.py): per step, with CFG, one U-Net batch of 2B:
        #    eps_u, eps_c = unet(scale(x_t), t, [c_uncond; c]);  eps = eps_u + w (eps_c - eps_u);  x = step(eps)
        start = time.perf_counter()
        n_steps = len(timesteps)

        def after_step(i, t, x):
            xp = backend.array_namespace(x)
            if not bool(xp.all(xp.isfinite(x))):
                raise NonFiniteLatentsError(
                    f"the latents hold NaN or inf after step {i + 1} of {n_steps} (timestep {float(t):g}); "
                    "stopped. Try float32 rather than float16, another sampler, or a lower guidance scale")
            if callback is not None:
                callback(i, t, x)

        latents = sample(lambda x, t: self.unet(x, t, context), sched, latents, timesteps,
                         guidance_scale=guidance_scale if do_cfg else None, generator=generator,
                         callback=after_step, progress=progress)
        timings["denoise"] = time.perf_counter() - start

        # 4. latents -> pixels
        start = time.perf_counter()
        pixels = self.decode_latents(latents)                                 # (B, H, W, 3) uint8
        images = [Image.fromarray(p) for p in pixels]
        timings["decode"] = time.perf_counter() - start
        parameters = []
        for k, im in enumerate(images):
            text = self._parameters(prompts[k], negatives[k], num_inference_steps, sampler, guidance_scale,
                                    seed, im.width, im.height, None if image is None else strength)
            im.info["parameters"] = text
            parameters.append(text)
        return StableDiffusionPipelineOutput(images=images, latents=latents, seed=seed, timings=timings,
                                             parameters=parameters)

    def _parameters(self, prompt, negative, steps, sampler, cfg, seed, width, height, strength) -> str:
        """The web UIs' parameters text for one image (the format `refldm txt2img` writes)."""
        from refldm.core.images import parameters_text
        from refldm.schedulers import names
        key = sampler or self.scheduler_config.get("_class_name", "")
        try:
            label = names.label(key)  # the web UIs' name ("DPM++ 2M Karras")
        except ValueError:
            label = str(key)
        return parameters_text(prompt, negative, steps, label, cfg, "unknown" if seed is None else seed,
                               width, height, self.name, strength=strength)

    def estimate(self, batch: int, height: int, width: int, steps: int, guidance_scale: float) -> dict:
        """What a call would cost, from the sizes: {"bytes": peak memory, "flops": total operations}.
        Rough (within a factor of about 2), for refusing what cannot fit and announcing long runs."""
        f = self.vae_scale_factor
        h, w = -(-height // f), -(-width // f)
        unet_batch = batch * (2 if guidance_scale > 1 else 1)
        itemsize = self.dtype.itemsize
        weights = sum(m.num_parameters() for m in (self.unet, self.vae, self.text_encoder)) * itemsize
        peak = max(estimate_unet_bytes(self.unet.config, unet_batch, h, w, itemsize),
                   estimate_decode_bytes(self.vae.config, (batch, 4, h, w), itemsize))
        flops = estimate_unet_flops(self.unet.config, unet_batch, h, w) * steps
        return {"bytes": weights + peak, "flops": flops}

    def _check_schedule(self, sched, steps: int, name) -> None:
        """Every timestep must be one the model was trained on (0 .. num_train_timesteps - 1); too many
        steps for a spacing with an offset (steps_offset=1 makes 1000 steps start at t = 1000) are refused
        here with the largest count that works, rather than failing inside the loop."""
        import numpy as np
        train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        t = np.asarray(backend.to_numpy(sched.timesteps), dtype=np.float64)
        if t.size and (t.max() <= train - 1 + 1e-9) and t.min() >= 0:
            return
        ok = steps - 1
        while ok > 1:
            trial = self.make_scheduler(name)
            trial.set_timesteps(ok)
            u = np.asarray(backend.to_numpy(trial.timesteps), dtype=np.float64)
            if u.size and u.max() <= train - 1 + 1e-9 and u.min() >= 0:
                break
            ok -= 1
        raise ValueError(f"{steps} steps reach timestep {t.max():g}, past the {train} training timesteps of this "
                         f"schedule (timestep_spacing={self.scheduler_config.get('timestep_spacing', 'leading')!r}, "
                         f"steps_offset={self.scheduler_config.get('steps_offset', 0)}); use at most {ok} steps")

    # -- description -----------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """{part: {"class", "parameters", "dtype", "config"}} for `refldm info`."""
        out = {}
        for part in ("unet", "vae", "text_encoder"):
            model = getattr(self, part)
            out[part] = {"class": type(model).__name__, "parameters": model.num_parameters(),
                         "dtype": self.dtype.name, "config": self.configs.get(part, {})}
        tok = self.tokenizer
        out["tokenizer"] = {"class": type(tok).__name__,
                            "vocabulary": len(getattr(tok, "encoder", getattr(tok, "vocab", {})) or {})}
        out["scheduler"] = {"class": self.scheduler_config.get("_class_name"), "config": self.scheduler_config}
        return out
