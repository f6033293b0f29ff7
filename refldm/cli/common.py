"""What the generating subcommands share (txt2img, img2img, inpaint, demo): their flags, the checks of the
flags' values, loading the model a -m names, the memory and time check before a run, writing the image.

Argument parsing and checking only: the models, the pipelines and the cost model are the library's
(refldm.pipelines, refldm.analysis.cost); the messages name the flag at fault.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import warnings

from refldm import backend
from refldm.about import DEFAULT_MODEL  # the folder of the model shipped inside the package

__all__ = ["sampler_name", "add_model_args", "add_generation_args", "one_line_warnings", "use_backend",
           "load_pipeline", "save_png", "check_seed", "check_cfg", "check_steps", "check_text",
           "check_generation_args", "resolve_defaults", "check_resources", "gib", "STEPS", "CFG", "CFG_RANGE",
           "SEED_MAX", "DEMO_STEPS", "DEMO_CFG", "DEMO_SAMPLER"]

# the settings tools/train_tiny/evaluate.py measures the embedded model's quality with
DEMO_STEPS = 25
DEMO_CFG = 3.0  # measured best for colour on the default model (docs/default-model.md)
DEMO_SAMPLER = None  # the model's own scheduler (DDIM)


# ---------------------------------------------------------------------------------------------------------------
# the flags


def sampler_name(value):
    """--sampler: any name refldm.schedulers.names knows, checked before the model loads."""
    from refldm.schedulers import names
    try:
        names.resolve(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_model_args(p, *, model_flag=True):
    if model_flag:
        p.add_argument("-m", "--model", default=None,
                       help="a diffusers SD / SDXL / SD3 folder or a single-file .safetensors "
                            "(default: the model shipped with refldm)")
    p.add_argument("--config", default=None,
                   help="for a single file: a diffusers folder with the model's configs, tokenizer and scheduler")
    p.add_argument("--tokenizer", default=None, help="for a single file without --config: a CLIP tokenizer folder")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="prompt length in tokens, for a tokenizer whose folder sets no model_max_length "
                        "(default: the tokenizer's own, 77 for SD)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="for an SD 2.x single file without --config (the weights do not tell)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="where the arrays live (default: numpy, or $REFLDM_BACKEND)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32")


# defaults for a model given with -m (diffusers' own); the built-in model uses DEMO_STEPS / DEMO_CFG
STEPS = 20
CFG = 7.5
SD3_STEPS, SD3_CFG = 28, 7.0  # diffusers' StableDiffusion3Pipeline defaults
CFG_RANGE = (0.0, 100.0)  # a finite guidance scale; beyond ~30 images saturate, 1e30 is flat grey
SEED_MAX = 2 ** 64 - 1    # torch's seed range, 0..2**64-1 (refldm.pipelines.common.SEED_MAX)


def add_generation_args(p, default_output="refldm-txt2img.png / refldm-img2img.png", *, prompt_required=True):
    p.add_argument("-p", "--prompt", required=prompt_required, default=None,
                   help='the prompt ("" for an unconditional image)')
    p.add_argument("-n", "--negative", default=None, help="the negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {STEPS}; {DEMO_STEPS} for the built-in model)")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale in [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (default {CFG:g}; "
                        f"{DEMO_CFG:g} for the built-in model; <= 1 turns guidance off)")
    p.add_argument("--seed", type=int, default=None, help="noise seed, 0..2**64-1 (default: random, printed)")
    p.add_argument("--sampler", default=None, type=sampler_name,
                   help='sampler by name, as the web UIs write it ("DPM++ 2M Karras", "Euler a", "dpmpp_2m karras") '
                        "or refldm's (euler, dpm++2m); `refldm samplers` lists them (default: the model's own)")
    p.add_argument("-o", "--output", default=None, help="output image: .png (with the parameters chunk), .jpg, "
                                                         f".webp, ... (default {default_output})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------------------------
# checks, loading, writing


@contextlib.contextmanager
def one_line_warnings():
    """Show warnings (a prompt cut to 77 tokens, ...) as one line each on stderr, without source lines."""
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"refldm: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield
    finally:
        warnings.showwarning = old


def use_backend(name):
    if name:
        backend.use(name)


# The Python API's argument names in the library's messages -> the CLI's flags (`cli_words`)
FLAG_NAMES = ((re.compile(r"\btokenizer="), "--tokenizer "), (re.compile(r"\bconfig="), "--config "),
              (re.compile(r"\bprediction_type="), "--prediction-type "),
              (re.compile(r"\bpass max_length\b"), "give --max-length N"))


def cli_words(message: str) -> str:
    """A library message as the CLI says it: ``give tokenizer=a folder`` -> ``give --tokenizer a folder``."""
    for pattern, flag in FLAG_NAMES:
        message = pattern.sub(flag, message)
    return message


def load_pipeline(model=None, *, config=None, tokenizer=None, prediction_type=None, dtype="float32",
                  img2img=False, max_length=None, weights_dtype=None):
    """The pipeline for MODEL: a diffusers folder, a single .safetensors file, or None for the embedded model.
    Errors name the CLI's flags (--tokenizer, --config) where the library names its arguments. `max_length`
    (--max-length): the prompt length in tokens for tokenizers whose folder sets no model_max_length.
    `weights_dtype` ("stored" with --low-memory) goes to every model the pipeline loads."""
    try:
        pipe = _load_pipeline(model, config=config, tokenizer=tokenizer, prediction_type=prediction_type,
                              dtype=dtype, img2img=img2img, weights_dtype=weights_dtype)
    except ValueError as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (cli_words(e.args[0]),) + e.args[1:]
        raise
    set_max_length(pipe, max_length)
    return pipe


def set_max_length(pipe, max_length) -> None:
    """--max-length N: the tokenizers' model_max_length; without it a tokenizer that sets none is refused here,
    before the work, naming the flag."""
    from refldm.models.tokenizer import NO_LIMIT
    for part, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = getattr(pipe, part, None), getattr(pipe, encoder, None)
        if tok is None:
            continue
        positions = getattr(getattr(enc, "config", None), "max_position_embeddings", None)
        if max_length is not None:
            if positions is not None and not 2 <= max_length <= positions:
                raise ValueError(f"--max-length {max_length}: must lie in 2..{positions}, the {encoder}'s positions")
            if max_length < 2:
                raise ValueError(f"--max-length {max_length}: must be >= 2")
            tok.model_max_length = max_length
        elif tok.model_max_length == NO_LIMIT:
            raise ValueError(f"the {part} folder sets no model_max_length; give --max-length N (the {encoder} "
                             f"has {positions} positions: --max-length {positions})")


def _load_pipeline(model=None, *, config=None, tokenizer=None, prediction_type=None, dtype="float32",
                   img2img=False, weights_dtype=None):
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, is_sdxl_folder
    from refldm.checkpoints.weights import refuse_pickle
    if model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
            raise OSError(f"the embedded model is missing ({DEFAULT_MODEL}); reinstall refldm or give -m MODEL")
        pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype, weights_dtype=weights_dtype)
        pipe.name = "refldm-default"
        return pipe
    refuse_pickle(model)
    w = {"weights_dtype": weights_dtype}
    flux = load_flux(model, config, dtype, img2img, weights_dtype)  # FLUX.1 folder or single file, else None
    if flux is not None:
        return flux
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline, is_sd3_folder
    sd3 = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    if os.path.isdir(model) and is_sd3_folder(model):  # SD3 / SD3.5: an SD3Transformer2DModel in model_index.json
        return sd3.from_pretrained(model, dtype=dtype, **w)
    if os.path.isdir(model) and is_sdxl_folder(model):  # SDXL: a text_encoder_2 in model_index.json
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        return cls.from_pretrained(model, dtype=dtype, **w)
    if os.path.isdir(model):
        return StableDiffusionPipeline.from_pretrained(model, dtype=dtype, **w)
    if not os.path.exists(model):
        raise OSError(f"{model}: no such model folder or file")
    if not model.lower().endswith(".safetensors"):
        raise ValueError(f"{model}: not a model folder nor a .safetensors file")
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import read_header
    header = read_header(model)[0]
    if convert.is_sd3(header):  # model.diffusion_model.joint_blocks.*
        if config is None:
            raise ValueError(f"{model}: an SD3 / SD3.5 single file; give --config SD3_FOLDER (a diffusers SD3 "
                             "folder with the model's configs, tokenizers and scheduler)")
        return sd3.from_single_file(model, config, dtype=dtype, **w)
    if convert.detect(header) == "sdxl":  # conditioner.embedders.* keys
        return StableDiffusionXLPipeline.from_single_file(model, config=config, dtype=dtype, **w)
    return StableDiffusionPipeline.from_single_file(model, config=config, tokenizer=tokenizer, dtype=dtype,
                                                    prediction_type=prediction_type, **w)


def is_flux_model(model, config=None) -> bool:
    """A FLUX.1 diffusers folder, or a FLUX single file (the reference repository's transformer file)."""
    from refldm.pipelines.flux import is_flux_folder
    if model is None or not os.path.exists(model):
        return False
    if os.path.isdir(model):
        return is_flux_folder(model)
    if not model.lower().endswith(".safetensors"):
        return False
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import read_header
    return convert.is_flux(read_header(model)[0])


def load_flux(model, config, dtype, img2img, weights_dtype):
    """FluxPipeline / FluxImg2ImgPipeline for a FLUX folder or single file (--config FLUX_FOLDER), else None."""
    if not is_flux_model(model):
        return None
    from refldm.pipelines.flux import FluxImg2ImgPipeline, FluxPipeline, is_flux_folder
    cls = FluxImg2ImgPipeline if img2img else FluxPipeline
    if os.path.isdir(model):
        return cls.from_pretrained(model, dtype=dtype, weights_dtype=weights_dtype)
    if config is None or not os.path.isdir(config) or not is_flux_folder(config):
        raise ValueError(f"{model}: a FLUX.1 transformer file; give --config FLUX_FOLDER (a diffusers FLUX folder "
                         "with the VAE, text encoders, tokenizers, scheduler and the transformer's config)")
    return cls.from_single_file(model, config, dtype=dtype, weights_dtype=weights_dtype)


def save_png(image, path, parameters: str | None = None) -> None:
    """Write a PIL image with the ``parameters`` text (a PNG tEXt/iTXt chunk; EXIF UserComment in a JPEG),
    atomically: the file is complete or untouched (refldm.core.images.save_pil)."""
    from refldm.core.images import check_output, save_pil
    save_pil(image, check_output(path), parameters)


def check_seed(seed, flag="--seed"):
    """The pipelines' own seed check (refldm.pipelines.common), naming the flag."""
    from refldm.pipelines.common import check_seed as check
    check(seed, flag)


def check_cfg(cfg, flag="--cfg"):
    if cfg is not None and not (math.isfinite(cfg) and CFG_RANGE[0] <= cfg <= CFG_RANGE[1]):
        raise ValueError(f"{flag} {cfg:g} is outside [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (values <= 1 turn "
                         "guidance off; 3 to 15 are usual)")


def check_steps(steps, flag="--steps"):
    if steps is not None and steps < 1:
        raise ValueError(f"{flag} must be >= 1, got {steps}")


def resolve_defaults(args):
    """--steps / --cfg not given: the built-in model's recommended settings, or diffusers' for -m MODEL (for
    an SD3 folder, diffusers' SD3 pipeline defaults: 28 steps, guidance 7)."""
    model = getattr(args, "model", None)
    builtin = model is None
    from refldm.pipelines.sd3 import is_sd3_folder
    sd3 = not builtin and os.path.isdir(model) and is_sd3_folder(model)
    if args.steps is None:
        args.steps = DEMO_STEPS if builtin else SD3_STEPS if sd3 else STEPS
    if args.cfg is None:
        args.cfg = DEMO_CFG if builtin else SD3_CFG if sd3 else CFG


def check_text(text, flag):
    """Command-line text arrives as UTF-8; a byte that is not (Python keeps it as a lone surrogate) is refused."""
    if text is None:
        return
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            raise ValueError(f"{flag} holds byte 0x{ord(ch) - 0xdc00:02x} at character {i}, which is not UTF-8; "
                             "give the text in UTF-8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag} holds a character that is not valid Unicode at position {e.start}") from None


def check_generation_args(args):
    check_text(args.prompt, "--prompt")
    check_text(args.negative, "--negative")
    check_steps(args.steps)
    check_cfg(args.cfg)
    check_seed(args.seed)
    for flag in ("width", "height"):
        value = getattr(args, flag, None)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{flag} must be a positive multiple of 8, got {value}")


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_resources(pipe, batch, height, width, steps, cfg, *, strength=None, announce_after_s: float = 30.0) -> dict:
    """Before a run: refuse it when its estimated memory exceeds what the machine has (saying what it would
    take), and print an estimated time when it looks long. The estimate is refldm.analysis.cost's walk of
    the pipeline's own networks (`estimate_pipeline`) over the steps that run (img2img / inpaint at
    `strength` < 1 run min(int(steps * strength), steps)), timed by `estimate_seconds` from this machine's
    measured matmul speed. Returns {"bytes", "flops", "seconds", "steps"}."""
    from refldm.analysis.cost import estimate_pipeline, estimate_seconds, steps_run
    from refldm.cli.resources import available_memory, matmul_throughput
    from refldm.errors import TooLargeError
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    run = steps_run(steps, strength)
    cost = estimate_pipeline(pipe, batch, height, width, run, cfg)
    have = available_memory() if backend.name() == "numpy" else None
    if have is not None and cost["bytes"] > have:
        raise TooLargeError(f"{width}x{height} with batch {batch} needs about {gib(cost['bytes'])} of memory "
                            f"(estimated from the sizes); this machine has {gib(have)} available. Use a "
                            "smaller size")
    seconds = estimate_seconds(cost["flops"], matmul_throughput())
    if seconds > announce_after_s:
        counted = f"{run} steps" if run == steps else f"{run} of {steps} steps (strength {strength:g})"
        print(f"refldm: {width}x{height}, {counted}: estimated {_duration(seconds)} "
              f"({cost['flops'] / 1e12:.3g} TFLOP) and {gib(cost['bytes'])} of memory", file=sys.stderr)
    return {**cost, "seconds": seconds, "steps": run}


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes ({seconds:.0f} s)"


# the built-in model's training size (tools/train_tiny): far from it, its images mean nothing
BUILTIN_SIZE = 64
BUILTIN_SIZE_RANGE = (32, 128)  # sides within a factor 2 of 64 still look like its training images


def warn_run_choices(args, pipe, height, width) -> None:
    """One warning each, before the work, for choices that run but disappoint: the built-in model far from
    the 64x64 it was trained on; --dtype float16 on the CPU (NumPy has no fast float16 arithmetic)."""
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    low, high = BUILTIN_SIZE_RANGE
    if getattr(args, "model", None) is None and not (low <= height <= high and low <= width <= high):
        warnings.warn(f"the built-in model was trained on {BUILTIN_SIZE}x{BUILTIN_SIZE} images; at {width}x{height} "
                      f"it runs longer and its output means little (keep the sides within {low}..{high}, or give "
                      "-m MODEL)", stacklevel=2)
    if getattr(args, "dtype", None) == "float16" and backend.name() == "numpy":
        warnings.warn("--dtype float16 on the CPU runs 25-40x slower than float32: NumPy has no fast float16 "
                      "arithmetic (each product is converted element by element); use --dtype float32, which "
                      "gives the same image within float rounding, and --low-memory to keep 16-bit weights as "
                      "stored (docs/performance.md)", stacklevel=2)
