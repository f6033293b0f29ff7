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
    out.images[0].save("out.png"); out.latents                                    # PIL images, final latents
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

from PIL import Image

from refldm import backend, convert
from refldm.images import scale_latents, to_tensor, to_uint8, unscale_latents
from refldm.sampling import img2img_latents, img2img_timesteps, initial_latents, sample
from refldm.weights import WeightsError, load_file, read_config

__all__ = ["StableDiffusionPipeline", "StableDiffusionPipelineOutput", "NonFiniteLatentsError",
           "PARTS"]

# The folders of a diffusers SD pipeline and the class model_index.json names for each.
PARTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
         "tokenizer": "CLIPTokenizer", "scheduler": None}


class NonFiniteLatentsError(RuntimeError):
    """The latents became NaN or inf during denoising."""


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


def _models():
    """The model classes (imported here, so that `refldm.pipeline` imports without loading them all)."""
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    from refldm.tokenizer import CLIPTokenizer
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
        name = os.path.basename(os.path.normpath(folder))
        return cls(vae, text_encoder, tokenizer, unet, scheduler_config, configs, name=name, dtype=dtype)

    @classmethod
    def from_single_file(cls, path, config=None, tokenizer=None, dtype="float32",
                         prediction_type: str | None = None) -> "StableDiffusionPipeline":
        """Load an original SD 1.x / 2.x single-file ``.safetensors`` checkpoint (CompVis key names).

        config: a diffusers SD folder whose configs (and tokenizer and scheduler) describe the file's model,
        as diffusers' ``from_single_file(path, config=...)``. Without it the configs are read off the tensor
        shapes (`refldm.convert.infer_configs`), and then `tokenizer` must name a CLIP tokenizer folder
        (vocab.json + merges.txt): a single file holds no vocabulary. For SD 2.x without `config`,
        `prediction_type` must say "epsilon" (the -base models) or "v_prediction" (the 768-v models):
        the weights do not tell. Pickle files (.ckpt, .pt, .bin) are refused, never opened.
        """
        path = os.fspath(path)
        state = load_file(path)  # refuses pickles; validates the file
        kind = convert.detect(state)
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
        return self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="np")["input_ids"]

    def encode_prompt(self, prompts: list[str], max_length: int | None = None):
        """Prompts -> text embeddings (B, 77, D): the text encoder's last hidden state."""
        ids = self.tokenize(prompts, max_length)                       # (B, 77) int64
        return self.text_encoder(ids).last_hidden_state                # (B, 77, D)

    def make_scheduler(self, name: str | None = None):
        """A fresh scheduler for a sampler name ("DPM++ 2M Karras", "euler", "dpmpp_2m karras"; `refldm samplers`
        lists them) or the folder's own class."""
        from refldm.schedulers import get_scheduler
        return get_scheduler(name or self.scheduler_config.get("_class_name"), self.scheduler_config)

    def decode_latents(self, latents):
        """Latents (B, 4, h, w) -> uint8 pixels (B, H, W, 3) on the host, rounded exactly as diffusers does."""
        image = self.vae.decode(unscale_latents(latents, self.vae.config))   # (B, 3, H, W), about [-1, 1]
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
                 callback=None, progress: bool = True, scheduler: str | None = None) -> StableDiffusionPipelineOutput:
        """Generate images. See the module docstring for the loop; diffusers' argument names and defaults.

        prompt / negative_prompt: a string or a list (one per image). "" is allowed (unconditional); a
        negative prompt of None means "", as in diffusers. seed or generator (a `refldm.random.Generator`)
        make the noise; with neither, a random seed is drawn and returned in the output. latents: your own
        starting noise (B, 4, H/8, W/8), multiplied by the scheduler's init_noise_sigma as in diffusers.
        image + strength: img2img; the image is encoded, noised to the timestep that `strength` selects
        (1.0: pure noise, 0.0: unchanged) and denoised from there. callback(step, t, latents) runs after
        every step. guidance_scale <= 1 turns classifier-free guidance off (one U-Net pass per step).
        """
        from refldm.random import Generator
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
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
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
        cond = self.encode_prompt(prompts)                                  # (B, 77, D)
        if do_cfg:
            uncond = self.encode_prompt(negatives, max_length=cond.shape[1])  # (B, 77, D)
            xp = backend.array_namespace(cond)
            context = xp.concatenate([uncond, cond], axis=0)                # (2B, 77, D)
        else:
            context = cond
        timings["text encode"] = time.perf_counter() - start

        # 2. the timesteps and the starting latents x_T (B, 4, H/8, W/8)
        sched = self.make_scheduler(sampler if sampler is not None else scheduler)  # scheduler=: the old spelling
        sched.set_timesteps(num_inference_steps)
        timesteps = sched.timesteps
        latent_shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
        if image is None:
            if latents is None:
                latents = initial_latents(latent_shape, sched, generator=generator, dtype=dtype)  # eps * sigma_max
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
            posterior = self.vae.encode(init)                                    # q(z | x) over (1, 4, H/8, W/8)
            x0 = scale_latents(posterior.sample(generator=generator), self.vae.config)  # z ~ q, times 0.18215
            xp = backend.array_namespace(x0)
            x0 = xp.concatenate([x0] * batch, axis=0)                            # (B, 4, H/8, W/8), as diffusers
            latents = img2img_latents(sched, x0, timesteps, generator=generator)  # add_noise(x0, eps, t_0)
            timings["image encode"] = time.perf_counter() - start

        # 3. the denoising loop (refldm/sampling.py): per step, with CFG, one U-Net batch of 2B:
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
        return StableDiffusionPipelineOutput(images=images, latents=latents, seed=seed, timings=timings)

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
