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
from refldm.core import record
from refldm.core.images import to_tensor, to_uint8, unscale_latents

__all__ = ["StepEnd", "check_callback", "CALLBACK_TENSOR_INPUTS", "NonFiniteLatentsError", "StableDiffusionPipelineOutput", "GenerationParameters", "DiffusionPipeline",
           "Call", "prologue", "check_prompts", "check_steps", "check_guidance", "check_size", "check_strength",
           "check_seed", "check_count", "check_output_type", "make_generator", "initial_noise", "nan_guard",
           "sampler_label", "parameters_text", "finish", "SEED_MAX", "OUTPUT_TYPES"]

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
           postprocess=None) -> StableDiffusionPipelineOutput:
    """Decode (unless output_type="latent"), apply `postprocess` to the PIL images (inpainting's paste-back),
    and put each image's parameters text on it: `record` with the image's prompt, negative prompt and size."""
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
        generation.append(record.replace(prompt=call.prompts[k], negative_prompt=negatives[k], width=width,
                                         height=height))
    parameters = [g.text() for g in generation]
    for image, text in zip(images, parameters):
        image.info["parameters"] = text
    return StableDiffusionPipelineOutput(images=images, latents=latents, seed=call.seed, timings=timings,
                                         parameters=parameters, generation=generation)


# -- what the pipelines share of a loaded model -----------------------------------------------------------------


class DiffusionPipeline:
    """The parts every latent-diffusion pipeline has and uses alike: `vae`, `unet`, `scheduler_config`,
    `configs` (the raw config.json dicts), `name`, `dtype`. Subclasses add their text encoders and calls."""

    def __init__(self, vae, unet, scheduler_config: dict, configs: dict | None = None, name: str = "model",
                 dtype="float32"):
        self.vae = vae                                  # AutoencoderKL
        self.unet = unet                                # UNet2DConditionModel
        self.scheduler_config = dict(scheduler_config)  # a fresh scheduler is built from it for each call
        self.configs = configs or {}                    # the raw config.json dicts of the parts (`refldm info`)
        self.name = name                                # the model's name, as the parameters text records it
        self.dtype = backend.resolve_dtype(dtype)

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
