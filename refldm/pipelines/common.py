"""The pipeline core: what every pipeline does before and after its own part, written once.

Every call of every pipeline (SD txt2img and img2img, SDXL and its img2img / refiner, inpainting, and
the next families) runs the same frame around its own conditioning and loop:

    prologue   check the arguments (the same bad argument gets the same one-line message everywhere),
               seed -> Generator (a random seed drawn and reported when none is given)
    ...        the pipeline's own text encoding, starting latents, denoising loop
               (`initial_noise` for x_T = eps * init_noise_sigma, `nan_guard` stops at the first NaN/inf step)
    epilogue   latents -> PIL images (`DiffusionPipeline.decode_latents`), the web UIs' ``parameters`` text on
               each image (`GenerationParameters`), one `StableDiffusionPipelineOutput`

`DiffusionPipeline` holds what the pipelines share of a loaded model (the VAE's scale factor, the training
size, a scheduler by name, decoding, the image preprocessing); each pipeline file keeps only its own parts:
loading its folder layout, encoding its prompts, its call. docs/pipeline.md draws the frame.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
import time
from dataclasses import dataclass, field

from refldm import backend
from refldm.adapters.loaders import LoraLoaderMixin, TextualInversionLoaderMixin
from refldm.core import record
from refldm.core.images import to_tensor, to_uint8, unscale_latents

__all__ = ["StepEnd", "check_callback", "CALLBACK_TENSOR_INPUTS", "NonFiniteLatentsError", "StableDiffusionPipelineOutput", "GenerationParameters", "DiffusionPipeline",
           "Call", "prologue", "check_prompts", "check_steps", "check_guidance", "check_size", "check_strength",
           "check_seed", "check_count", "check_output_type", "make_generator", "initial_noise", "nan_guard",
           "sampler_label", "parameters_text", "finish", "SEED_MAX", "OUTPUT_TYPES", "NoiseOptions", "check_noise",
           "check_rng", "make_noise", "start_noise", "checkpoint_hash", "Hires", "check_hires", "upscale_latents", "LATENT_UPSCALERS",
           "PIXEL_UPSCALERS", "hires_timesteps", "hires_pass", "seed_brownian"]

SEED_MAX = 2 ** 64 - 1            # torch's seed range, 0..2**64-1
OUTPUT_TYPES = ("pil", "latent")  # PIL images, or the latents alone (no decode; a refiner continues them)


class NonFiniteLatentsError(RuntimeError):
    """The latents became NaN or inf during denoising."""


# -- the parameters text ------------------------------------------------------------------------------------


def parameters_text(prompt, negative, steps, sampler, cfg, seed, width, height, model, strength=None,
                    extra=None, model_hash=None, fields=None) -> str:
    """The generation parameters in the Stable Diffusion web UIs' format (their "PNG info" parses it):

        a red circle
        Negative prompt: blurry
        Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5,
        Denoising strength: 0.7, RNG: NV, Version: refldm 0.1.0        (one line, broken here to fit)

    `model_hash`: the web UI's short hash of the checkpoint file (``refldm.core.pnginfo.model_hash``).
    `fields`: further web-UI fields before the version, name -> value, in order (``{"RNG": "NV", "ENSD":
    31337, "Variation seed": 5}``); a value holding a comma, colon or quote is JSON-quoted as the web UI
    does; None values are left out. `extra` {key: value}: a pipeline's own fields, after the version
    (SDXL's sizes, the refiner). refldm.core.pnginfo.parse_parameters reads the text back."""
    from refldm.about import __version__
    from refldm.core.pnginfo import quote_value

    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    items = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {cfg:g}", f"Seed: {seed}",
             f"Size: {width}x{height}"]
    if model_hash:
        items.append(f"Model hash: {model_hash}")
    items.append(f"Model: {model}")
    if strength is not None:
        items.append(f"Denoising strength: {strength:g}")
    for name, value in (fields or {}).items():
        if value is not None:
            items.append(f"{name}: {quote_value(f'{value:g}' if isinstance(value, float) else value)}")
    items.append(f"Version: refldm {__version__}")
    items += [f"{key}: {value}" for key, value in (extra or {}).items()]
    lines.append(", ".join(items))
    return "\n".join(lines)


@dataclass(frozen=True)
class GenerationParameters:
    """How one image was made, as the web UIs record it; ``text()`` is its ``parameters`` text.

    seed None (a caller's own generator) is written "unknown"; strength only for image-to-image; `extra`
    holds a pipeline's own fields ({"Original size": "1024x1024", ...}), written after the version."""

    prompt: str
    negative_prompt: str | None
    steps: int
    sampler: str
    cfg_scale: float
    seed: int | None
    width: int
    height: int
    model: str
    strength: float | None = None
    extra: dict = field(default_factory=dict)
    model_hash: str | None = None
    fields: dict = field(default_factory=dict)  # web-UI fields before the version (RNG, ENSD, Variation seed)

    def text(self) -> str:
        return parameters_text(self.prompt, self.negative_prompt, self.steps, self.sampler, self.cfg_scale,
                               "unknown" if self.seed is None else self.seed, self.width, self.height, self.model,
                               strength=self.strength, extra=self.extra, model_hash=self.model_hash,
                               fields=self.fields)

    def replace(self, **changes) -> "GenerationParameters":
        """A copy with some fields changed (the CLI records the prompt as typed, with its <lora:...> tags)."""
        return dataclasses.replace(self, **changes)


# -- the output ------------------------------------------------------------------------------------------------


@dataclass
class StableDiffusionPipelineOutput:
    """What a pipeline call returns.

    images: one PIL image per prompt (none for output_type="latent"). latents: the final latents
    (B, 4, H/8, W/8), before the division by the VAE's scaling factor, as an array of the active backend.
    seed: the seed the noise came from. timings: seconds spent per stage ("text encode", "denoise",
    "decode"; img2img adds "image encode"). parameters: per image, the web UIs' "parameters" text (also in
    ``image.info["parameters"]``); generation: the same as `GenerationParameters` records.
    """

    images: list
    latents: object
    seed: int | None = None
    timings: dict = field(default_factory=dict)
    parameters: list = field(default_factory=list)  # per image, the web UIs' "parameters" text
    generation: list = field(default_factory=list)  # per image, the GenerationParameters behind that text

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


# -- the argument checks: one message per bad argument, whichever pipeline gets it --------------------------


def check_prompts(prompt, negative_prompt=None, num_images_per_prompt: int = 1, *, name: str = "prompt",
                  negative_name: str = "negative_prompt"):
    """(prompts, negatives or None): lists of one string per image. A string or a non-empty list of strings;
    each prompt repeated num_images_per_prompt times in a row ([p0, p0, p1, p1], diffusers' order). A
    negative prompt is one string or one per prompt; None stays None (the pipeline decides what it means)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {_short(prompt)}")
    negatives = check_texts(negative_prompt, len(prompts), negative_name)
    n = check_count(num_images_per_prompt)
    repeat = (lambda values: None if values is None else [v for v in values for _ in range(n)])
    return repeat(prompts), repeat(negatives)


def check_texts(value, batch: int, name: str):
    """A string or a list of `batch` strings -> a list of `batch` strings (None stays None)."""
    if value is None:
        return None
    values = [value] * batch if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != batch or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name}: give one string, or a list of {batch} strings (one per prompt), "
                         f"got {_short(value)}")
    return values


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(value, name: str, low: int) -> int:
    """An int >= low; integral floats (2.0) are taken as ints, bools and fractions (2.5) are refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value)) and float(value) == int(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
    if not ok or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_steps(num_inference_steps, name: str = "num_inference_steps") -> int:
    """The number of denoising steps: an integer >= 1 (2.0 is taken as 2)."""
    return _integer(num_inference_steps, name, 1)


def check_count(num_images_per_prompt, name: str = "num_images_per_prompt") -> int:
    """Images per prompt: an integer >= 1."""
    return _integer(num_images_per_prompt, name, 1)


def check_guidance(guidance_scale, name: str = "guidance_scale") -> float:
    """The classifier-free guidance scale: a finite number (<= 1 turns guidance off)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
            or not math.isfinite(float(guidance_scale)):
        raise ValueError(f"{name} must be finite, got {guidance_scale!r}")
    return guidance_scale


def check_size(height, width) -> tuple:
    """(height, width) as ints: positive multiples of 8 (the VAE's factor for every SD family model)."""
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        h = w = None
    if h is None or h != height or w != width or h % 8 or w % 8 or h < 8 or w < 8:
        raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
    return h, w


def check_strength(strength, name: str = "strength") -> float:
    """img2img / inpainting strength in [0, 1] (0 keeps the image, 1 starts from pure noise)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= float(strength) <= 1:
        raise ValueError(f"{name}={strength!r} must lie in [0, 1]")
    return strength


def check_seed(seed, name: str = "seed"):
    """A seed in 0..2**64-1 (torch's range; a larger one would wrap to another seed's noise silently)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    if not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"{name} {seed} is outside 0..2**64-1 ({SEED_MAX}), the range torch and diffusers take")
    return int(seed)


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: only 'pil' and 'latent'")
    return output_type


def make_generator(seed=None, generator=None):
    """(seed, generator): a `refldm.core.random.Generator` from `seed` (a random one drawn when neither is
    given, and returned so that the run can be repeated); a caller's own generator is used as it is."""
    from refldm.core.random import Generator
    if generator is None:
        if seed is None:
            seed = secrets.randbelow(2 ** 32)
        generator = Generator(seed)
    return seed, generator


@dataclass
class Call:
    """The checked arguments every call shares (see `prologue`)."""

    prompts: list
    negatives: list | None
    steps: int
    guidance_scale: float
    do_cfg: bool
    seed: int | None
    generator: object
    height: int | None
    width: int | None
    strength: float | None
    output_type: str
    texts: dict = field(default_factory=dict)  # a pipeline's other per-prompt texts (SDXL's prompt_2, ...)

    @property
    def batch(self) -> int:
        return len(self.prompts)


def prologue(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, generator, *, height=None,
             width=None, strength=None, num_images_per_prompt=1, output_type="pil", texts=()) -> Call:
    """Check the shared arguments in one fixed order (prompt, negative prompt, images per prompt, steps,
    guidance, size, strength, seed, output type), then make the generator. height / width / strength None:
    not given (a pipeline without them, or its default). texts: (name, value) pairs of a pipeline's other
    per-prompt texts, checked and repeated as the negative prompt (None stays None)."""
    prompts, negatives = check_prompts(prompt, negative_prompt, num_images_per_prompt)
    n = check_count(num_images_per_prompt)
    more = {}
    for name, value in texts:
        values = check_texts(value, len(prompts) // n, name)
        more[name] = None if values is None else [v for v in values for _ in range(n)]
    steps = check_steps(num_inference_steps)
    guidance_scale = check_guidance(guidance_scale)
    if height is not None or width is not None:
        height, width = check_size(8 if height is None else height, 8 if width is None else width)
    if strength is not None:
        check_strength(strength)
    check_seed(seed)
    check_output_type(output_type)
    seed, generator = make_generator(seed, generator)
    return Call(prompts, negatives, steps, guidance_scale, guidance_scale > 1.0, seed, generator, height, width,
                strength, output_type, more)


# -- noise, the loop's guard ----------------------------------------------------------------------------------


def initial_noise(shape, scheduler, generator, dtype: str, latents=None, noise_dtype: str | None = None):
    """x_T = eps * init_noise_sigma (B, C, h, w) on the active backend: eps drawn from `generator` in `dtype`
    (torch draws differently per dtype), or in `noise_dtype` and upcast, or the caller's own `latents`."""
    from refldm.core.random import randn
    sigma = float(scheduler.init_noise_sigma)
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
        return backend.asarray(latents, dtype=dtype) * sigma
    if noise_dtype is None or noise_dtype == dtype:
        return backend.asarray(randn(shape, generator=generator, dtype=dtype)) * sigma
    eps = randn(shape, generator=generator, dtype=noise_dtype)  # drawn in noise_dtype, upcast, then scaled
    return backend.asarray(eps, dtype=dtype) * sigma


# -- the web UIs' noise options (refldm/core/noise.py) and the model hash ---------------------------------------

RNG_NAMES = {"cpu": "CPU", "cuda": "NV", "nv": "NV", "gpu": "GPU"}  # refldm / sd.cpp names and the web UI's


def check_rng(rng, name: str = "rng"):
    """"cpu" | "cuda" (sd.cpp's names) or the web UI's "CPU" | "NV" | "GPU" -> the web UI's name; None stays None."""
    if rng is None:
        return None
    key = str(rng).strip().lower()
    if key not in RNG_NAMES:
        raise ValueError(f"{name}: unknown random source {rng!r}; choose cpu or cuda (the web UI's CPU, NV, GPU "
                         "are taken too)")
    return RNG_NAMES[key]


@dataclass(frozen=True)
class NoiseOptions:
    """The web UIs' noise options of a call (A1111's fields; refldm/core/noise.py computes them).

    rng None and no other option: diffusers' noise, today's default (one generator for the whole batch,
    drawn in the pipeline's dtype, the sampler's noise continuing it). Any option set: A1111's per-image
    noise (`refldm.core.noise.ImageNoise`): image i from seed + i on the `rng` stream ("CPU" when only
    another option is given), float32 draws, the sampler's noise from the same per-image generators
    (reseeded seed + ENSD when `ensd` != 0). sampler_rng: the sampler's noise from a separate fresh
    generator of that stream seeded seed + ENSD, drawing the whole batch per step (ComfyUI, sd.cpp)."""

    rng: str | None = None
    sampler_rng: str | None = None
    ensd: int = 0
    variation_seed: int | None = None
    variation_strength: float = 0.0
    seed_resize_from: tuple | None = None

    @property
    def webui(self) -> bool:
        return (self.rng is not None or bool(self.ensd) or self.variation_seed is not None
                or self.seed_resize_from is not None)

    def fields(self) -> dict:
        """The web UI's fields for these options (None: not written)."""
        varied = self.variation_seed is not None and self.variation_strength != 0
        return {"RNG": (self.rng or "CPU") if self.webui else None,
                "Sampler RNG": self.sampler_rng,
                "ENSD": self.ensd or None,
                "Variation seed": self.variation_seed if varied else None,
                "Variation seed strength": self.variation_strength if varied else None,
                "Seed resize from": (f"{self.seed_resize_from[0]}x{self.seed_resize_from[1]}"
                                     if self.seed_resize_from else None)}


def check_noise(rng=None, sampler_rng=None, ensd=None, variation_seed=None, variation_strength=None,
                seed_resize_from=None) -> NoiseOptions:
    """The noise keyword arguments, checked (one line each): rng / sampler_rng a stream name, ensd an
    integer >= 0, variation_seed a seed, variation_strength in [0, 1] (needs variation_seed),
    seed_resize_from (width, height) in pixels, each side >= 8 (divided by 8 as the web UI does; 0 or None: off)."""
    rng = check_rng(rng)
    sampler_rng = check_rng(sampler_rng, "sampler_rng")
    ensd = 0 if ensd is None else _integer(ensd, "ensd", 0)
    check_seed(variation_seed, "variation_seed")
    strength = 0.0 if variation_strength is None else variation_strength
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= float(strength) <= 1:
        raise ValueError(f"variation_strength={variation_strength!r} must lie in [0, 1]")
    if variation_strength is not None and variation_seed is None and float(strength) != 0:
        raise ValueError("variation_strength needs a variation_seed (the second noise it mixes in)")
    if variation_seed is not None and variation_strength is None:
        raise ValueError("variation_seed needs a variation_strength in [0, 1] (0 keeps the seed's noise)")
    if seed_resize_from is not None:
        try:
            w, h = (int(v) for v in seed_resize_from)
            ok = [w, h] == [v for v in seed_resize_from]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"seed_resize_from must be (width, height), got {_short(seed_resize_from)}")
        if w <= 0 and h <= 0:
            seed_resize_from = None  # the web UI's "off"
        elif w < 8 or h < 8:
            raise ValueError(f"seed_resize_from={w}x{h}: each side must be at least 8 pixels (0x0: off)")
        else:
            seed_resize_from = (w, h)
    return NoiseOptions(rng, sampler_rng, ensd, None if variation_seed is None else int(variation_seed),
                        float(strength), seed_resize_from)


def start_noise(shape, seed, generator, options: NoiseOptions, dtype: str, draw: bool = True):
    """(eps or None, the sampler's generator, per-image field changes): the noise a call starts from
    (text-to-image, times init_noise_sigma) or adds to its image (image-to-image, inpainting), shape (B, C, h, w).

    Default options: eps None -- the pipeline draws diffusers' noise from `generator` (the call's) where
    diffusers draws it, and the sampler continues that generator. Web-UI options (`NoiseOptions`; `draw`
    False: a caller's own latents, nothing drawn): eps = ``ImageNoise(...).first()`` (float32, cast to
    `dtype`), A1111's per-image noise, which its img2img adds to the image's latents as its txt2img starts
    from it (variation seed and seed resize included, `processing.py`: ``x = self.rng.next()`` in both);
    the sampler draws from the per-image generators, and each image's parameters name its own seed (seed + i,
    or the variation seed + i). sampler_rng: the sampler's generator is ``Generator(seed + ensd, mode)``.
    With the web-UI options the image-to-image pipelines encode their image to the posterior's mean: A1111
    samples it with its global generator, unseeded (its std is small, and no seed makes it again); the mean
    keeps image i of a batch the image of seed + i alone, as in the web UI."""
    from refldm.core.noise import generator_for, webui_noise
    per_image = [{} for _ in range(shape[0])]
    if (options.webui or options.sampler_rng) and seed is None:
        raise ValueError("the noise options (rng, sampler_rng, ensd, variation_seed, seed_resize_from) need seed=, "
                         "not a generator of your own")
    eps = None
    if options.webui and draw:
        noise = webui_noise(tuple(shape[1:]), seed, shape[0], rng=options.rng or "CPU",
                            variation_seed=options.variation_seed, variation_strength=options.variation_strength,
                            seed_resize_from=options.seed_resize_from, ensd=options.ensd)
        eps = backend.asarray(noise.first(), dtype=dtype)
        generator = noise.generators
        for i in range(shape[0]):
            per_image[i]["seed"] = noise.seeds[i]
            if noise.variation_seeds is not None and options.variation_strength != 0:
                per_image[i]["fields"] = {"Variation seed": noise.variation_seeds[i]}
    if options.sampler_rng is not None:
        generator = generator_for(seed + options.ensd, options.sampler_rng)
    return eps, generator, per_image


def make_noise(shape, scheduler, call: Call, options: NoiseOptions, dtype: str, latents=None,
               noise_dtype: str | None = None):
    """(x_T, the sampler's generator, per-image field changes) for a text-to-image call: x_T = eps *
    init_noise_sigma with eps from `start_noise` (web-UI options), or `initial_noise` from the call's
    generator (today's noise, unchanged), or the caller's own `latents` as they are."""
    seed_brownian(scheduler, call.seed)
    eps, generator, per_image = start_noise(shape, call.seed, call.generator, options, dtype, draw=latents is None)
    if eps is None:
        return initial_noise(shape, scheduler, call.generator, dtype, latents, noise_dtype), generator, per_image
    return eps * float(scheduler.init_noise_sigma), generator, per_image


def seed_brownian(scheduler, seed) -> None:
    """DPM++ SDE's Brownian noise (`noise_sampler_seed`, None in a folder's config: a fresh random seed per
    run, as in diffusers) is seeded with the call's seed, as A1111 seeds its Brownian tree, so that the
    image can be made again from its parameters."""
    config = getattr(scheduler, "config", None)
    if seed is not None and hasattr(config, "noise_sampler_seed") and config.noise_sampler_seed is None:
        config.noise_sampler_seed = int(seed)


def checkpoint_hash(path) -> str | None:
    """The web UI's "Model hash" of what a pipeline was loaded from: a single file's short SHA-256
    (`refldm.core.pnginfo.model_hash`); for a diffusers folder, the same hash of its U-Net weights file
    (unet/diffusion_pytorch_model.safetensors; the web UI loads single files only, so a folder has no
    hash of its own and this one names its weights). None when there is no such file."""
    from refldm.core.pnginfo import model_hash
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
            candidate = os.path.join(path, "unet", name)
            if os.path.isfile(candidate):
                return model_hash(candidate)
        return None
    return model_hash(path) if os.path.isfile(path) else None


# -- hires fix: A1111's two-pass text-to-image --------------------------------------------------------------------

# the web UI's latent upscale modes -> torch.nn.functional.interpolate's (mode, antialias), align_corners off
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
# the pixel-space upscalers: decode, resize with PIL, encode again (the web UI's "Lanczos" and "Nearest")
PIXEL_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}


@dataclass(frozen=True)
class Hires:
    """A checked hires fix: the scale, the second pass's steps (0: as many as the first), its denoising
    strength, the upscaler's web-UI name and the final (width, height). comfyui: None (A1111's second pass)
    or ComfyUI's second sampler node, {"seed": its noise seed, "start": None (a KSampler with denoise) or the
    step a KSamplerAdvanced pair splits the schedule at} (`hires_pass`)."""

    scale: float
    steps: int
    denoise: float
    upscaler: str
    width: int
    height: int
    comfyui: dict | None = None

    def fields(self) -> dict:
        out = {"Hires upscale": self.scale, "Hires steps": self.steps or None, "Hires upscaler": self.upscaler}
        if self.comfyui is not None:  # refldm's own fields after A1111's "Hires resize"
            out.update({"Hires resize": f"{self.width}x{self.height}", "Hires schedule": "ComfyUI",
                        "Hires seed": self.comfyui["seed"], "Hires start": self.comfyui.get("start")})
        return out


def check_hires(scale, steps, denoise, upscaler, height: int, width: int, comfyui=None) -> Hires | None:
    """The hires keyword arguments, checked (one line each). scale None: no second pass. The final size is
    (int(width * scale), int(height * scale)) as the web UI computes it, and must be multiples of 8 here
    (the message names the nearest sizes that are). comfyui: {"seed": s, "size": (W, H) (optional, the
    final size as ComfyUI's LatentUpscale / LatentUpscaleBy made it), "start": k (optional)}."""
    if scale is None:
        for name, value in (("hires_steps", steps), ("hires_denoise", denoise), ("hires_upscaler", upscaler),
                            ("hires_comfyui", comfyui)):
            if value is not None:
                raise ValueError(f"{name} needs hires_scale (the second pass's upscale factor)")
        return None
    if comfyui is not None:
        comfyui = _check_comfyui_pass(comfyui, steps)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 1 <= float(scale) <= 8:
        raise ValueError(f"hires_scale={scale!r} must lie in [1, 8]")
    steps = 0 if steps is None else _integer(steps, "hires_steps", 0)
    denoise = 0.7 if denoise is None else denoise
    if isinstance(denoise, bool) or not isinstance(denoise, numbers.Real) or not 0 < float(denoise) <= 1:
        raise ValueError(f"hires_denoise={denoise!r} must lie in (0, 1]")
    upscaler = "Latent" if upscaler is None else upscaler
    if upscaler not in LATENT_UPSCALERS and upscaler not in PIXEL_UPSCALERS:
        names = ", ".join(repr(n) for n in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS))
        raise ValueError(f"hires_upscaler: unknown upscaler {upscaler!r}; choose one of {names}")
    w, h = int(width * float(scale)), int(height * float(scale))
    if comfyui is not None and comfyui.get("size") is not None:
        w, h = comfyui["size"]
    if w % 8 or h % 8:
        lo, hi = f"{w // 8 * 8}x{h // 8 * 8}", f"{-(-w // 8) * 8}x{-(-h // 8) * 8}"
        raise ValueError(f"hires_scale={float(scale):g} makes {width}x{height} into {w}x{h}, not multiples of 8; "
                         f"the nearest sizes are {lo} and {hi}")
    comfyui = None if comfyui is None else {"seed": comfyui["seed"], "start": comfyui.get("start")}
    return Hires(float(scale), steps, float(denoise), upscaler, w, h, comfyui)


def _check_comfyui_pass(comfyui, steps) -> dict:
    if not isinstance(comfyui, dict) or "seed" not in comfyui or set(comfyui) - {"seed", "size", "start"}:
        raise ValueError(f"hires_comfyui must be a dict with seed (and size, start), got {_short(comfyui)}")
    check_seed(comfyui["seed"], "hires_comfyui seed")
    out = dict(comfyui)
    if comfyui.get("size") is not None:
        size = comfyui["size"]
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v >= 8
                                                                           for v in size)):
            raise ValueError(f"hires_comfyui size must be (width, height) in pixels, got {_short(size)}")
        out["size"] = tuple(size)
    if comfyui.get("start") is not None:
        start = _integer(comfyui["start"], "hires_comfyui start", 1)
        if steps and start >= steps:
            raise ValueError(f"hires_comfyui start {start} must be below the {steps} hires steps")
        out["start"] = start
    return out


def _source_index(size_in: int, size_out: int, cubic: bool = False):
    """torch's source coordinate of each output pixel (align_corners=False), in float32:
    s = (in / out) (i + 1/2) - 1/2, clamped at 0 except for cubic (torch's area_pixel_compute_source_index)."""
    import numpy as np
    scale = np.float32(size_in / size_out)
    half = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
    # one rounding of scale * half - 1/2, as the fused multiply-add torch's compiled kernel uses (the float32
    # product is exact in float64)
    real = (np.float64(scale) * half.astype(np.float64) - 0.5).astype(np.float32)
    return real if cubic else np.maximum(real, np.float32(0))


def _nearest_index(size_in: int, size_out: int, exact: bool):
    """torch's nearest source index: floor(i * in / out) ("nearest"), floor((i + 1/2) in / out)
    ("nearest-exact"), in float32, capped at in - 1; twice the size is i >> 1 and the same size i."""
    import numpy as np
    i = np.arange(size_out)
    if size_out == size_in:
        return i
    if size_out == 2 * size_in and not exact:
        return i >> 1
    scale = np.float32(size_in / size_out)
    pos = (i.astype(np.float32) + np.float32(0.5 if exact else 0.0)) * scale
    return np.minimum(np.floor(pos).astype(np.int64), size_in - 1)


def _linear_weights(size_in: int, size_out: int):
    import numpy as np
    real = _source_index(size_in, size_out)
    i0 = np.floor(real).astype(np.int64)
    lam = real - i0.astype(np.float32)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return [i0, i1], [np.float32(1) - lam, lam]


def _cubic_weights(size_in: int, size_out: int, a: float = -0.75):
    """Keys' cubic convolution (A = -0.75, torch's bicubic): for t the fractional position, weights
    W(t + 1), W(t), W(1 - t), W((1 - t) + 1) on pixels i - 1 .. i + 2 (indices clamped to the edge), with
    W(x) = ((A + 2) x - (A + 3)) x^2 + 1 for |x| <= 1 and ((A x - 5A) x + 8A) x - 4A for 1 < |x| < 2."""
    import numpy as np
    real = _source_index(size_in, size_out, cubic=True)
    i = np.floor(real).astype(np.int64)
    t = real - i.astype(np.float32)
    a = np.float32(a)
    one = np.float32(1)

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = [far(t + one), near(t), near(one - t), far((one - t) + one)]  # torch's roundings of 1+t, 1-t, 2-t
    index = [np.clip(i - 1 + k, 0, size_in - 1) for k in range(4)]
    return index, weights


def _antialias_weights(size_in: int, size_out: int, cubic: bool):
    """torch's antialiased resampling weights along one axis (``interpolate(..., antialias=True)``, the
    separable filter PIL uses; ATen's UpSampleKernel ``_compute_weights_aa``), in its float32 / double steps:

        s = in / out;  support = (n / 2) max(s, 1);  c_i = s (i + 1/2)          n = 2 (bilinear), 4 (bicubic)
        taps j = xmin .. xmin + xsize - 1,  xmin = max(trunc(c_i - support + 1/2), 0),
                                            xmin + xsize = min(trunc(c_i + support + 1/2), in)
        w_ij = f((j - c_i + 1/2) / max(s, 1)) / sum_j f(...)

    f: the triangle max(0, 1 - |x|) (bilinear) or Keys' cubic with A = -0.5 (PIL's; plain bicubic uses
    -0.75). Downscaling by s widens the filter s times (each output averages about s inputs: the
    antialiasing); upscaling (s < 1) leaves f at its own width, so antialiased bilinear equals plain
    bilinear (the clamp at the border and the renormalised edge weights agree), while antialiased bicubic
    differs from plain bicubic by A and by the renormalised edges. Returns (indices, weights): one
    array over the output positions per tap (taps past xsize weigh 0)."""
    import numpy as np
    f32 = np.float32
    n = 4 if cubic else 2
    scale = f32(size_in) / f32(size_out)
    support = f32(n * 0.5 * float(scale)) if scale >= 1 else f32(n * 0.5)
    invscale = f32(1.0 / float(scale)) if scale >= 1 else f32(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    i = np.arange(size_out)
    center = (np.float64(scale) * (i + 0.5)).astype(f32)
    xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), size_in) - xmin
    xsize = np.clip(xsize, 0, taps)

    def f(x):
        x = np.abs(x)
        if not cubic:
            return np.where(x < 1, f32(1) - x, f32(0)).astype(f32)
        a = f32(-0.5)
        near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
        far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
        return np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(f32)

    weights = []
    for j in range(taps):
        x = (((j + xmin).astype(f32) - center).astype(np.float64) + 0.5) * np.float64(invscale)
        weights.append(np.where(j < xsize, f(x.astype(f32)), f32(0)))
    total = np.zeros(size_out, f32)
    for wt in weights:                                           # summed in order, in float32
        total = (total + wt).astype(f32)
    safe = np.where(total != 0, total, f32(1))
    weights = [np.where(total != 0, wt / safe, wt).astype(f32) for wt in weights]
    index = [np.minimum(xmin + j, size_in - 1) for j in range(taps)]
    return index, weights


def upscale_latents(latents, size, mode: str = "bilinear", antialias: bool = False):
    """Resize latents (B, C, h, w) to size = (H, W) as ``torch.nn.functional.interpolate(x, size, mode,
    antialias=antialias)`` (align_corners=False) computes it: "nearest", "nearest-exact" (exact index rules),
    "bilinear" and "bicubic" (separable, float32 weights from the same source coordinates as torch's, its
    fused multiply-add included; the order of torch's sums is not reproduced, so they agree to float32
    rounding: measured <= 5e-7 bilinear, <= 4e-6 bicubic on N(0, 1) values, tests/test_reproduce.py).
    antialias=True (bilinear / bicubic, the web UI's "Latent (antialiased)" and "Latent (bicubic
    antialiased)"): `_antialias_weights`, along the width first, then the height, an axis of unchanged size
    left as it is, as torch's separable kernel (tests/test_reproduce_passes.py states the agreement).
    On the host; returned on the active backend."""
    import numpy as np
    x = np.asarray(backend.to_numpy(latents))
    (h, w), (H, W) = x.shape[2:], (int(size[0]), int(size[1]))
    if antialias and mode in ("bilinear", "bicubic"):
        out, cubic = x, mode == "bicubic"
        if W != w:
            cols, col_w = _antialias_weights(w, W, cubic)
            out = _weighted_sum([out[:, :, :, c] for c in cols], [wt[None, :] for wt in col_w])
        if H != h:
            rows, row_w = _antialias_weights(h, H, cubic)
            out = _weighted_sum([out[:, :, r, :] for r in rows], [wt[:, None] for wt in row_w])
        return backend.asarray(np.ascontiguousarray(out.astype(x.dtype)))
    if antialias:
        raise ValueError(f"upscale_latents: antialias is for bilinear and bicubic, not {mode!r}")
    if mode in ("nearest", "nearest-exact"):
        exact = mode == "nearest-exact"
        out = x[:, :, _nearest_index(h, H, exact)][:, :, :, _nearest_index(w, W, exact)]
        return backend.asarray(np.ascontiguousarray(out))
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"upscale_latents: unknown mode {mode!r}; choose nearest, nearest-exact, bilinear, bicubic")
    weights = _linear_weights if mode == "bilinear" else _cubic_weights
    rows, row_w = weights(h, H)
    cols, col_w = weights(w, W)
    dt = x.dtype
    if mode == "bilinear":  # along the width first (closest to torch's sums: within 2 float32 ulps)
        tmp = sum(x[:, :, :, c] * wt.astype(dt)[None, :] for c, wt in zip(cols, col_w))        # (B, C, h, W)
        out = sum(tmp[:, :, r, :] * wt.astype(dt)[:, None] for r, wt in zip(rows, row_w))      # (B, C, H, W)
    else:                   # bicubic: along the height first (within ~4e-6 of torch on N(0, 1) values)
        tmp = sum(x[:, :, r, :] * wt.astype(dt)[:, None] for r, wt in zip(rows, row_w))        # (B, C, H, w)
        out = sum(tmp[:, :, :, c] * wt.astype(dt)[None, :] for c, wt in zip(cols, col_w))      # (B, C, H, W)
    return backend.asarray(out.astype(dt))


def _weighted_sum(values, weights):
    """sum_k values[k] * weights[k], accumulated in order in the values' dtype (torch's loop over the taps)."""
    out = values[0] * weights[0].astype(values[0].dtype)
    for v, wt in zip(values[1:], weights[1:]):
        out = out + v * wt.astype(v.dtype)
    return out


def hires_timesteps(scheduler, steps: int, denoise: float):
    """The second pass's timesteps, as A1111's img2img chooses them (``sd_samplers_common.setup_img2img_steps``,
    ``sd_samplers_kdiffusion.sample_img2img``): of the `steps`-step schedule it runs the last
    t_enc + 1 steps, t_enc = int(min(denoise, 0.999) * steps) (diffusers' img2img runs int(denoise * steps)).
    Sets the scheduler's begin index; returns the timesteps."""
    t_enc = int(min(float(denoise), 0.999) * steps)
    start = max(steps - t_enc - 1, 0)
    timesteps = scheduler.timesteps[start * scheduler.order:] if start else scheduler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps


def hires_pass(pipe, latents, call: Call, options: NoiseOptions, hires: Hires, sampler, first_steps: int,
               sampler_generator, denoise):
    """A1111's hires fix second pass: upscale the first pass's latents (B, C, h, w) to the final size,
    noise them to `hires.denoise` and denoise again.

        x_0' = resize(x_0)                            latent upscaler (`upscale_latents`), or
        x_0' = E(resize_pixels(D(x_0)))               a pixel upscaler: decode, PIL resize, encode (the mean)
        x_t  = scheduler.add_noise(x_0', eps, t_0)    t_0: `hires_timesteps`
        x    = loop(x_t) over the remaining timesteps

    eps: with the web-UI noise options a fresh `ImageNoise` at the new size from the same seeds (as A1111
    makes a new ImageRNG), the sampler drawing from its generators; otherwise the call's generator,
    continued. `denoise(x, scheduler, timesteps, generator)` runs the pipeline's loop with its
    conditioning at the new size. Returns the final latents."""
    from refldm.core.images import scale_latents
    from refldm.core.random import randn
    f = pipe.vae_scale_factor
    size = (hires.height // f, hires.width // f)
    if hires.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        x0 = upscale_latents(latents, size, mode, antialias=antialias)
    else:
        from PIL import Image
        pixels = pipe.decode_latents(latents)                                      # (B, H, W, 3) uint8
        method = getattr(Image.Resampling, PIXEL_UPSCALERS[hires.upscaler])
        big = [Image.fromarray(p).resize((hires.width, hires.height), method) for p in pixels]
        xp = backend.array_namespace(latents)
        image = xp.concatenate([to_tensor(im, dtype=pipe.dtype.name) for im in big], axis=0)
        with record.scope("vae"):
            x0 = scale_latents(pipe.vae.encode(image).mode(), pipe.vae.config)
    steps = hires.steps or first_steps
    shape = (latents.shape[0], latents.shape[1]) + size
    if hires.comfyui is not None:
        return _comfyui_pass(pipe, x0, shape, hires, sampler, steps, denoise)
    sched = pipe.make_scheduler(sampler)
    sched.set_timesteps(steps)
    pipe.check_schedule(sched, steps, sampler)
    seed_brownian(sched, call.seed)
    timesteps = hires_timesteps(sched, steps, hires.denoise)
    if options.webui:  # a fresh ImageNoise at the new size from the same seeds
        eps, generator, _ = start_noise(shape, call.seed, call.generator, options, pipe.dtype.name)
    else:
        eps = backend.asarray(randn(shape, generator=sampler_generator, dtype=pipe.dtype.name))
        generator = sampler_generator
    import numpy as np
    t0 = np.repeat(np.asarray(backend.to_numpy(timesteps))[:1], shape[0])
    x = sched.add_noise(backend.asarray(x0, dtype=pipe.dtype.name), eps, t0)
    return denoise(x, sched, timesteps, generator)


def comfyui_schedule(steps: int, denoise: float, start=None):
    """(the schedule's length, the step the pass begins at) of a ComfyUI sampler node (``comfy/samplers.py``
    ``KSampler.set_steps``): a KSampler with denoise d < 1 (d <= 0.9999) runs the last `steps` steps of an
    int(steps / d)-step schedule; a KSamplerAdvanced runs steps start .. of a `steps`-step schedule."""
    if start is not None:
        return steps, int(start)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    return total, total - steps


def first_pass_timesteps(timesteps, hires, order: int = 1):
    """The timesteps of the first pass: all of them, or up to a ComfyUI KSamplerAdvanced pair's split step
    (the first node's end_at_step with return_with_leftover_noise; `hires_pass` runs the rest)."""
    start = None if hires is None or hires.comfyui is None else hires.comfyui.get("start")
    return timesteps if start is None else timesteps[:start * order]


def _comfyui_pass(pipe, x0, shape, hires: Hires, sampler, steps: int, denoise):
    """ComfyUI's second sampler node on the (upscaled) latents x0 (``nodes.py`` ``common_ksampler``):

        KSampler, denoise d:   the last `steps` of an int(steps / d)-step schedule (`comfyui_schedule`),
                               x = add_noise(x0, eps, t_0), eps = randn(shape) from a fresh CPU generator
                               seeded with the node's seed (``comfy/sample.py`` ``prepare_noise``, whole batch)
        KSamplerAdvanced pair: steps start .. of the same `steps` schedule, add_noise disabled: x = x0

    and the sampler's own noise from another fresh CPU generator of that seed (``default_noise_sampler``)."""
    from refldm.core.random import Generator
    seed, start = hires.comfyui["seed"], hires.comfyui.get("start")
    total, begin = comfyui_schedule(steps, hires.denoise, start)
    sched = pipe.make_scheduler(sampler)
    sched.set_timesteps(total)
    pipe.check_schedule(sched, total, sampler)
    seed_brownian(sched, seed)
    timesteps = sched.timesteps[begin * sched.order:] if begin else sched.timesteps
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin * sched.order)
    x = backend.asarray(x0, dtype=pipe.dtype.name)
    if start is None:
        import numpy as np
        eps = backend.asarray(Generator(seed).randn(shape, dtype="float32"), dtype=pipe.dtype.name)
        x = sched.add_noise(x, eps, np.repeat(np.asarray(backend.to_numpy(timesteps))[:1], shape[0]))
    return denoise(x, sched, timesteps, Generator(seed))


def nan_guard(n_steps: int):
    """check(i, t, x): raise NonFiniteLatentsError when the latents after step i hold NaN or inf."""
    def check(i, t, x):
        xp = backend.array_namespace(x)
        if not bool(xp.all(xp.isfinite(x))):
            raise NonFiniteLatentsError(
                f"the latents hold NaN or inf after step {i + 1} of {n_steps} (timestep {float(t):g}); "
                "stopped. Try float32 rather than float16, another sampler, or a lower guidance scale")
    return check


def sampler_label(name, scheduler_config: dict) -> str:
    """The web UIs' name of the sampler used ("DPM++ 2M Karras"), or the folder's own scheduler's."""
    from refldm.schedulers import names
    key = name or scheduler_config.get("_class_name", "")
    try:
        return names.label(key)
    except ValueError:
        return str(key)


# -- step callbacks: diffusers' callback_on_step_end -------------------------------------------------------------

# What diffusers' SD / SDXL pipelines let a callback ask for (`_callback_tensor_inputs`), and what refldm adds:
# the step's guided prediction, the scheduler's estimate of x_0, and with guidance the two halves.
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
STEP_TENSOR_INPUTS = ("noise_pred", "pred_original_sample", "noise_pred_uncond", "noise_pred_text")


def check_callback(callback_on_step_end, tensor_inputs, allowed=CALLBACK_TENSOR_INPUTS) -> list:
    """The checked list of tensor names a step-end callback asks for (diffusers' default: ["latents"])."""
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    names = ["latents"] if tensor_inputs is None else list(tensor_inputs)
    known = tuple(allowed) + STEP_TENSOR_INPUTS
    bad = [k for k in names if k not in known]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs: {bad[0]!r} is not one of {', '.join(known)}")
    return names


class StepEnd:
    """What runs after each step of the loop (`sampling.sample`'s callback): the NaN guard, the old
    ``callback(i, t, latents)``, then diffusers' ``callback_on_step_end(pipe, i, t, callback_kwargs)``.

    callback_kwargs holds the tensors named in `tensor_inputs`: "latents" (x after the step), the call's
    `tensors` ("prompt_embeds" is what the U-Net sees: [negative; positive] under guidance, as in diffusers),
    and the step's own ("noise_pred", "pred_original_sample", "noise_pred_uncond", "noise_pred_text").
    The dict the callback returns may replace "latents" (the loop continues from it) and the entries of
    `tensors` (the pipeline's model function reads ``tensors["prompt_embeds"]`` at every step)."""

    def __init__(self, pipe, n_steps: int, callback=None, callback_on_step_end=None, tensor_inputs=None,
                 tensors: dict | None = None):
        self.pipe, self.callback, self.on_step_end = pipe, callback, callback_on_step_end
        self.guard = nan_guard(n_steps)
        self.names = check_callback(callback_on_step_end, tensor_inputs, tuple(tensors or ()) + ("latents",))
        self.tensors = dict(tensors or {})

    def __call__(self, i, t, x, step=None):
        self.guard(i, t, x)
        if self.callback is not None:
            self.callback(i, t, x)
        if self.on_step_end is None:
            return None
        step = step or {}
        found = {"latents": x, **self.tensors, "noise_pred": step.get("noise_pred"),
                 "pred_original_sample": step.get("pred_original_sample"),
                 "noise_pred_uncond": step.get("pred_uncond"), "noise_pred_text": step.get("pred_cond")}
        outputs = self.on_step_end(self.pipe, i, t, {k: found[k] for k in self.names}) or {}
        for k in self.tensors:
            if k in outputs:
                self.tensors[k] = outputs[k]
        return outputs.get("latents")


# -- the epilogue -------------------------------------------------------------------------------------------------


def finish(pipe, latents, call: Call, timings: dict, record: GenerationParameters,
           postprocess=None, per_image=None, size=None) -> StableDiffusionPipelineOutput:
    """Decode (unless output_type="latent"), apply `postprocess` to the PIL images (inpainting's paste-back),
    and put each image's parameters text on it: `record` with the image's prompt, negative prompt and size.
    per_image: a list of {field: value} changes per image (its seed, its variation seed: `make_noise`);
    size: (width, height) to record instead of the image's (the first pass's size of a hires fix)."""
    images = []
    if call.output_type != "latent":
        start = time.perf_counter()
        pixels = pipe.decode_latents(latents)                               # (B, H, W, 3) uint8
        from PIL import Image
        images = [Image.fromarray(p) for p in pixels]
        if postprocess is not None:
            images = postprocess(images)
        timings["decode"] = time.perf_counter() - start
    f = pipe.vae_scale_factor
    negatives = call.negatives or [""] * call.batch
    generation = []
    for k in range(call.batch):
        if images:
            width, height = images[k].width, images[k].height
        else:
            height, width = latents.shape[2] * f, latents.shape[3] * f
        if size is not None:
            width, height = size
        changes = dict(per_image[k]) if per_image else {}
        if "fields" in changes:
            changes["fields"] = {**record.fields, **changes["fields"]}
        generation.append(record.replace(prompt=call.prompts[k], negative_prompt=negatives[k], width=width,
                                         height=height, **changes))
    parameters = [g.text() for g in generation]
    for image, text in zip(images, parameters):
        image.info["parameters"] = text
    return StableDiffusionPipelineOutput(images=images, latents=latents, seed=call.seed, timings=timings,
                                         parameters=parameters, generation=generation)


# -- what the pipelines share of a loaded model -----------------------------------------------------------------


class DiffusionPipeline(LoraLoaderMixin, TextualInversionLoaderMixin):
    """The parts every latent-diffusion pipeline has and uses alike: `vae`, `unet`, `scheduler_config`,
    `configs` (the raw config.json dicts), `name`, `dtype`. Subclasses add their text encoders and calls.
    diffusers' adapter methods (load_lora_weights, fuse_lora, set_adapters, load_textual_inversion, ...)
    come from refldm.adapters.loaders."""

    def __init__(self, vae, unet, scheduler_config: dict, configs: dict | None = None, name: str = "model",
                 dtype="float32"):
        self.vae = vae                                  # AutoencoderKL
        self.unet = unet                                # UNet2DConditionModel
        self.scheduler_config = dict(scheduler_config)  # a fresh scheduler is built from it for each call
        self.configs = configs or {}                    # the raw config.json dicts of the parts (`refldm info`)
        self.name = name                                # the model's name, as the parameters text records it
        self.dtype = backend.resolve_dtype(dtype)
        self.checkpoint_path = None                     # the file or folder it was loaded from (Model hash)

    @property
    def model_hash(self) -> str | None:
        """The web UI's "Model hash" of `checkpoint_path` (`checkpoint_hash`), computed once."""
        path = getattr(self, "checkpoint_path", None)
        cached = getattr(self, "_model_hash", (None, None))
        if cached[0] != path:
            cached = (path, checkpoint_hash(path))
            self._model_hash = cached
        return cached[1]

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

    def make_scheduler(self, name: str | None = None):
        """A fresh scheduler for a sampler name ("DPM++ 2M Karras", "euler", "dpmpp_2m karras"; `refldm samplers`
        lists them) or the folder's own class."""
        from refldm.schedulers import get_scheduler
        return get_scheduler(name or self.scheduler_config.get("_class_name"), self.scheduler_config)

    def sampler_label(self, name) -> str:
        """The web UIs' name of sampler `name` (or of the folder's scheduler), as the parameters text says it."""
        return sampler_label(name, self.scheduler_config)

    def decode_latents(self, latents):
        """Latents (B, 4, h, w) -> uint8 pixels (B, H, W, 3) on the host, rounded exactly as diffusers does."""
        from refldm.models.vae import decode_checked
        self.release_mapped("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        # in float32 when a float16 VAE says force_upcast; NaN/inf in the image is an error (models/vae.py)
        with record.scope("vae"):                                             # trace names: vae.<layer>
            image = decode_checked(self.vae, unscale_latents(latents, self.vae.config))  # (B, 3, H, W), ~[-1, 1]
        return to_uint8(image)                                               # round(255 clip(x/2 + 1/2))

    def release_mapped(self, *parts):
        """weights_dtype="stored": drop the named models' memory-mapped weight pages from the process's resident
        set once the call is done with them (refldm.checkpoints.stored.release_mapped); otherwise nothing."""
        from refldm.checkpoints.stored import release_mapped
        release_mapped(*(getattr(self, part, None) for part in parts))

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

    def check_schedule(self, sched, steps: int, name) -> None:
        """Every timestep must be one the model was trained on (0 .. num_train_timesteps - 1); too many
        steps for a spacing with an offset (steps_offset=1 makes 1000 steps start at t = 1000) are refused
        here with the largest count that works, rather than failing inside the loop."""
        import numpy as np
        train = int(self.scheduler_config.get("num_train_timesteps", 1000))

        def fits(s):
            t = np.asarray(backend.to_numpy(s.timesteps), dtype=np.float64)
            return bool(t.size) and t.max() <= train - 1 + 1e-9 and t.min() >= 0, t

        ok, t = fits(sched)
        if ok:
            return
        good = steps - 1
        while good > 1:
            trial = self.make_scheduler(name)
            trial.set_timesteps(good)
            if fits(trial)[0]:
                break
            good -= 1
        raise ValueError(f"{steps} steps reach timestep {t.max():g}, past the {train} training timesteps of this "
                         f"schedule (timestep_spacing={self.scheduler_config.get('timestep_spacing', 'leading')!r}, "
                         f"steps_offset={self.scheduler_config.get('steps_offset', 0)}); use at most {good} steps")

    def scheduler_for(self, sampler, scheduler, steps: int):
        """The call's scheduler with its timesteps set (sampler=, or scheduler= the old spelling), checked."""
        name = sampler if sampler is not None else scheduler
        sched = self.make_scheduler(name)
        sched.set_timesteps(steps)
        self.check_schedule(sched, steps, name)
        return sched, name

    def describe_parts(self, models, tokenizers) -> dict:
        """{part: {"class", "parameters", "dtype", "config"}} of the models present, and the tokenizers."""
        out = {}
        for part in models:
            model = getattr(self, part, None)
            if model is not None:
                out[part] = {"class": type(model).__name__, "parameters": model.num_parameters(),
                             "dtype": self.dtype.name, "config": self.configs.get(part, {})}
        for part, extra in tokenizers:
            tok = getattr(self, part, None)
            if tok is not None:
                out[part] = {"class": type(tok).__name__, **{k: getattr(tok, k) for k in extra},
                             "vocabulary": len(getattr(tok, "encoder", getattr(tok, "vocab", {})) or {})}
        out["scheduler"] = {"class": self.scheduler_config.get("_class_name"), "config": self.scheduler_config}
        return out


# -- image-to-image on a rectified-flow model (SD3, FLUX) ----------------------------------------------------


def flow_img2img_start(pipe, sched, init, strength, n, batch, generator, noise=None):
    """diffusers' get_timesteps + prepare_latents for a flow model: t_start = int(n - min(n s, n)) (the float
    n s, as diffusers computes it); x_0 = (z - shift) * scale with z ~ q(z | image); x = t_0 e + (1 - t_0) x_0.
    e: `noise` (batch, C, h, w) when given (the web UIs' noise, `start_noise`; z is then the posterior's mean),
    else drawn from `generator` after z. Returns (the timesteps that run, x (batch, C, h, w)); FLUX packs x into 2x2 patches after."""
    import numpy

    from refldm.core.images import scale_latents
    from refldm.core.random import randn
    t_start = int(max(n - min(n * strength, n), 0))
    timesteps = sched.timesteps[t_start * sched.order:]
    sched.set_begin_index(t_start * sched.order)
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {n} steps leaves no step to run; raise strength or steps")
    with record.scope("vae"):
        posterior = pipe.vae.encode(init)
    z = posterior.sample(generator=generator) if noise is None else posterior.mode()  # the mean: start_noise
    x0 = scale_latents(z, pipe.vae.config)                                        # (1, C, h, w)
    xp = backend.array_namespace(x0)
    x0 = xp.concatenate([x0] * batch, axis=0)
    if noise is None:
        noise = backend.asarray(randn(tuple(x0.shape), generator=generator, dtype=pipe.dtype.name))
    t0 = numpy.repeat(numpy.asarray(timesteps)[:1], batch)
    return timesteps, sched.scale_noise(x0, t0, noise)
