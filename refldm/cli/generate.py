"""``refldm txt2img``, ``refldm img2img``, ``refldm info`` and ``refldm demo``: the pipeline from the shell.

    refldm demo                                          # the embedded model: a captioned grid, timings
    refldm txt2img -p "a large red circle in the center on a white background" -o out.png
    refldm txt2img -m path/to/sd-folder -p "an astronaut riding a horse" --steps 20 --seed 1 -o out.png
    refldm img2img -i in.png --strength 0.7 -p "a large blue square in the center on a white background"
    refldm info path/to/sd-folder                        # each part's config, parameter count, dtype
    refldm txt2img -m sdxl-base --refiner sdxl-refiner --denoising-end 0.8 -p "an astronaut" -o out.png

MODEL (``-m``) is a diffusers folder (SD 1.x / 2.x, or SDXL: detected by its text_encoder_2) or an original
single-file ``.safetensors`` (SD 1.x / 2.x; give ``--config FOLDER`` or ``--tokenizer FOLDER`` with it; SDXL:
``--config SDXL_FOLDER``); without ``-m`` the model shipped inside refldm (refldm/default_model) is used.
Each PNG carries its generation parameters in a ``parameters`` text chunk, written as the Stable Diffusion
web UIs write it, so their "PNG info" readers show them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings

from refldm import backend
from refldm.cli.adapters import add_adapter_args, apply_adapter_args

from refldm.about import DEFAULT_MODEL  # noqa: E402  (the folder of the model shipped inside the package)

DEMO_PROMPTS = (
    "a large red circle in the center on a white background",
    "a large blue square in the top left on a white background",
    "a large green triangle in the bottom right on a black background",
    "a large yellow star in the center on a gray background",
    "a large purple diamond in the top right on a white background",
    "a large orange cross in the bottom left on a black background",
)


# the settings tools/train_tiny/evaluate.py measures the embedded model's quality with
DEMO_STEPS = 25
DEMO_CFG = 3.0  # measured best for colour on the default model (docs/default-model.md)
DEMO_SAMPLER = None  # the model's own scheduler (DDIM)


# ---------------------------------------------------------------------------------------------------------------
# argument parsing


def _sampler_name(value):
    """--sampler: any name refldm.schedulers.names knows, checked before the model loads."""
    from refldm.schedulers import names
    try:
        names.resolve(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _add_model_args(p, *, model_flag=True):
    if model_flag:
        p.add_argument("-m", "--model", default=None,
                       help="a diffusers SD folder or an SD 1.x/2.x single-file .safetensors "
                            "(default: the model shipped with refldm)")
    p.add_argument("--config", default=None,
                   help="for a single file: a diffusers folder with the model's configs, tokenizer and scheduler")
    p.add_argument("--tokenizer", default=None, help="for a single file without --config: a CLIP tokenizer folder")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="for an SD 2.x single file without --config (the weights do not tell)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="where the arrays live (default: numpy, or $REFLDM_BACKEND)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32")


# defaults for a model given with -m (diffusers' own); the built-in model uses DEMO_STEPS / DEMO_CFG
STEPS = 20
CFG = 7.5
CFG_RANGE = (0.0, 100.0)  # a finite guidance scale; beyond ~30 images saturate, 1e30 is flat grey
SEED_MAX = 2 ** 64 - 1    # torch's seed range, 0..2**64-1


def _add_generation_args(p):
    p.add_argument("-p", "--prompt", required=True, help='the prompt ("" for an unconditional image)')
    p.add_argument("-n", "--negative", default=None, help="the negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {STEPS}; {DEMO_STEPS} for the built-in model)")
    p.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale in [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (default {CFG:g}; "
                        f"{DEMO_CFG:g} for the built-in model; <= 1 turns guidance off)")
    p.add_argument("--seed", type=int, default=None, help="noise seed, 0..2**64-1 (default: random, printed)")
    p.add_argument("--sampler", default=None, type=_sampler_name,
                   help='sampler by name, as the web UIs write it ("DPM++ 2M Karras", "Euler a", "dpmpp_2m karras") '
                        "or refldm's (euler, dpm++2m); `refldm samplers` lists them (default: the model's own)")
    p.add_argument("-o", "--output", default=None, help="output image: .png (with the parameters chunk), .jpg, "
                                                         ".webp, ... (default refldm-txt2img.png / refldm-img2img.png)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("txt2img", help="generate an image from a prompt",
                              description="Generate an image from a text prompt and write it as a PNG.")
    _add_model_args(p)
    _add_generation_args(p)
    add_adapter_args(p)  # --lora, --lora-dir, --embedding, --prompt-syntax, --clip-skip (refldm/cli/adapters.py)
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of 8 "
                                                                  "(default: the model's training size)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height, a multiple of 8")
    p.add_argument("--refiner", default=None, help="SDXL: a refiner folder that finishes the base's latents")
    p.add_argument("--denoising-end", type=float, default=None,
                   help="SDXL: the fraction of the schedule the base runs (with --refiner; default 0.8)")
    p.set_defaults(func=run_txt2img)

    p = subparsers.add_parser("img2img", help="transform an image guided by a prompt",
                              description="Encode an image, noise it to --strength, and denoise it under a prompt.")
    _add_model_args(p)
    p.add_argument("-i", "--image", required=True, help="input image (its sides must be multiples of 8)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="how much to change: 0 keeps the image, 1 ignores it (default 0.8)")
    _add_generation_args(p)
    add_adapter_args(p)
    p.set_defaults(func=run_img2img)

    p = subparsers.add_parser("info", help="describe a model: configs, parameter counts, dtypes",
                              description="Print each part's config, parameter count and stored dtype.")
    p.add_argument("model", nargs="?", default=None,
                   help="a diffusers folder or a single-file .safetensors (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("demo", help="generate a captioned grid with the embedded model",
                              description="Load the model shipped with refldm, generate one image per prompt, "
                                          "write a captioned grid PNG and show where the time went.")
    p.add_argument("-o", "--output", default="refldm-demo.png", help="output image (default refldm-demo.png)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEMO_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--sampler", default=None, type=_sampler_name,
                   help="sampler by name (`refldm samplers` lists them; default: the model's own, DDIM)")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale (default {DEMO_CFG:g})")
    p.add_argument("-p", "--prompt", action="append", default=None,
                   help="a prompt for the grid (repeat for several; default: six shape prompts)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_demo)


# ---------------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _one_line_warnings():
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


def _use_backend(name):
    if name:
        backend.use(name)


def load_pipeline(model=None, *, config=None, tokenizer=None, prediction_type=None, dtype="float32",
                  img2img=False):
    """The pipeline for MODEL: a diffusers folder, a single .safetensors file, or None for the embedded model."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, is_sdxl_folder
    from refldm.checkpoints.weights import refuse_pickle
    if model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
            raise OSError(f"the embedded model is missing ({DEFAULT_MODEL}); reinstall refldm or give -m MODEL")
        pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype)
        pipe.name = "refldm-default"
        return pipe
    refuse_pickle(model)
    if os.path.isdir(model) and is_sdxl_folder(model):  # SDXL: a text_encoder_2 in model_index.json
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        return cls.from_pretrained(model, dtype=dtype)
    if os.path.isdir(model):
        return StableDiffusionPipeline.from_pretrained(model, dtype=dtype)
    if not os.path.exists(model):
        raise OSError(f"{model}: no such model folder or file")
    if not model.lower().endswith(".safetensors"):
        raise ValueError(f"{model}: not a model folder nor a .safetensors file")
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import read_header
    if convert.detect(read_header(model)[0]) == "sdxl":  # conditioner.embedders.* keys
        return StableDiffusionXLPipeline.from_single_file(model, config=config, dtype=dtype)
    return StableDiffusionPipeline.from_single_file(model, config=config, tokenizer=tokenizer, dtype=dtype,
                                                    prediction_type=prediction_type)


def sampler_label(pipe, name) -> str:
    """The web UIs' name of the sampler used ("DPM++ 2M Karras"), as their parameters chunk records it."""
    from refldm.schedulers import names
    key = name or pipe.scheduler_config.get("_class_name", "")
    try:
        return names.label(key)
    except ValueError:
        return str(key)


from refldm.core.images import parameters_text  # noqa: E402  (the web UIs' format; also used by the pipeline)


def save_png(image, path, parameters: str | None = None) -> None:
    """Write a PIL image with the ``parameters`` text (a PNG tEXt/iTXt chunk; EXIF UserComment in a JPEG),
    atomically: the file is complete or untouched (refldm.core.images.save_pil)."""
    from refldm.core.images import check_output, save_pil
    save_pil(image, check_output(path), parameters)


def check_seed(seed, flag="--seed"):
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{flag} {seed} is outside 0..2**64-1 ({SEED_MAX}), the range torch and diffusers take")


def check_cfg(cfg, flag="--cfg"):
    if cfg is not None and not (math.isfinite(cfg) and CFG_RANGE[0] <= cfg <= CFG_RANGE[1]):
        raise ValueError(f"{flag} {cfg:g} is outside [{CFG_RANGE[0]:g}, {CFG_RANGE[1]:g}] (values <= 1 turn "
                         "guidance off; 3 to 15 are usual)")


def check_steps(steps, flag="--steps"):
    if steps is not None and steps < 1:
        raise ValueError(f"{flag} must be >= 1, got {steps}")


def resolve_defaults(args):
    """--steps / --cfg not given: the built-in model's recommended settings, or diffusers' for -m MODEL."""
    builtin = getattr(args, "model", None) is None
    if args.steps is None:
        args.steps = DEMO_STEPS if builtin else STEPS
    if args.cfg is None:
        args.cfg = DEMO_CFG if builtin else CFG


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


def _check_generation_args(args):
    check_text(args.prompt, "--prompt")
    check_text(args.negative, "--negative")
    check_steps(args.steps)
    check_cfg(args.cfg)
    check_seed(args.seed)
    for flag in ("width", "height"):
        value = getattr(args, flag, None)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{flag} must be a positive multiple of 8, got {value}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_resources(pipe, batch, height, width, steps, cfg, *, announce_after_s: float = 30.0) -> None:
    """Before a run: refuse it when its estimated memory exceeds what the machine has (saying what it would
    take), and print an estimated time when it looks long."""
    from refldm.cli.resources import available_memory, matmul_throughput
    from refldm.pipelines.sd import TooLargeError
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    cost = pipe.estimate(batch, height, width, steps, cfg)
    have = available_memory() if backend.name() == "numpy" else None
    if have is not None and cost["bytes"] > have:
        raise TooLargeError(f"{width}x{height} with batch {batch} needs about {_gib(cost['bytes'])} of memory "
                            f"(estimated from the sizes); this machine has {_gib(have)} available. Use a "
                            "smaller size")
    seconds = cost["flops"] / (0.5 * matmul_throughput())  # the U-Net runs at about half the speed of a plain matmul
    if seconds > announce_after_s:
        print(f"refldm: {width}x{height}, {steps} steps: estimated {seconds / 60:.1f} minutes "
              f"({cost['flops'] / 1e12:.3g} TFLOP) and {_gib(cost['bytes'])} of memory", file=sys.stderr)


def _generate(args, image=None):
    from refldm.core.images import check_output
    _check_generation_args(args)
    resolve_defaults(args)
    default = "refldm-txt2img.png" if image is None else "refldm-img2img.png"
    path = check_output(default if args.output is None else args.output)  # before the work, not after
    _use_backend(args.backend)
    with _one_line_warnings():
        pipe = load_pipeline(args.model, config=args.config, tokenizer=args.tokenizer,
                             prediction_type=args.prediction_type, dtype=args.dtype, img2img=image is not None)
        refiner, end = _refiner_args(args, pipe)
        prompt, kwargs = apply_adapter_args(args, pipe)  # LoRAs, embeddings, prompt syntax (cli/adapters.py)
        if image is None:
            kwargs.update(height=args.height, width=args.width)
            check_resources(pipe, 1, args.height, args.width, args.steps, args.cfg)
        else:
            kwargs.update(image=image, strength=args.strength)
            check_resources(pipe, 1, image.height, image.width, args.steps, args.cfg)
        if refiner is not None:
            kwargs.update(denoising_end=end, output_type="latent")
        out = pipe(prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                   guidance_scale=args.cfg, seed=args.seed, sampler=args.sampler, progress=not args.quiet,
                   **kwargs)
        if refiner is not None:  # SDXL's ensemble: the refiner denoises the last (1 - end) of the schedule
            out = refiner(args.prompt, negative_prompt=args.negative, image=out.latents, denoising_start=end,
                          num_inference_steps=args.steps, guidance_scale=args.cfg, seed=out.seed,
                          sampler=args.sampler, progress=not args.quiet)
    img = out.images[0]
    text = parameters_text(args.prompt, args.negative, args.steps, sampler_label(pipe, args.sampler), args.cfg,
                           out.seed, img.width, img.height, pipe.name,
                           strength=None if image is None else args.strength)
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the micro-conditioning sizes it was given
        text += (f", Original size: {img.width}x{img.height}, Target size: {img.width}x{img.height}, "
                 "Crop: 0x0")
        if refiner is not None:
            text += f", Refiner: {refiner.name}, Refiner switch at: {end:g}"
    save_png(img, path, text)
    t = out.timings
    print(f"wrote {path} ({img.width}x{img.height}, seed {out.seed}, {args.steps} steps, "
          f"denoise {t.get('denoise', 0):.2f} s)")
    return 0


def run_txt2img(args) -> int:
    return _generate(args)


def _refiner_args(args, pipe):
    """(refiner pipeline or None, denoising_end) from --refiner / --denoising-end, checked."""
    refiner, end = getattr(args, "refiner", None), getattr(args, "denoising_end", None)
    if end is not None and not 0 < end < 1:
        raise ValueError(f"--denoising-end must lie strictly between 0 and 1, got {end:g}")
    if refiner is None:
        if end is not None:
            raise ValueError("--denoising-end needs --refiner FOLDER (the model that finishes the schedule)")
        return None, None
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, is_sdxl_folder
    if getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError("--refiner needs an SDXL base model (-m SDXL_FOLDER)")
    if not os.path.isdir(refiner) or not is_sdxl_folder(refiner):
        raise ValueError(f"--refiner {refiner}: not an SDXL folder (no text_encoder_2 in its model_index.json)")
    ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner, dtype=args.dtype)
    if not ref.requires_aesthetics_score:
        raise ValueError(f"--refiner {refiner}: a base model, not a refiner (its model_index.json has no "
                         "requires_aesthetics_score)")
    return ref, 0.8 if end is None else end


def run_img2img(args) -> int:
    from refldm.core.images import load_image
    if not os.path.isfile(args.image):
        raise OSError(f"{args.image}: no such image file")
    if not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must lie in [0, 1], got {args.strength}")
    image = load_image(args.image)  # 16-bit scaled to 8; truncated or huge files: one line naming the file
    return _generate(args, image=image)


# ---------------------------------------------------------------------------------------------------------------
# info: from the configs and the safetensors headers only (no weights are read)


def describe_model(model=None) -> dict:
    """{part: {"config": ..., "parameters": n, "dtypes": [...]}} of a folder or single file, without loading it."""
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import find_weights, read_config, read_header, refuse_pickle
    if model is None:
        model = DEFAULT_MODEL
    refuse_pickle(model)
    out = {}
    if os.path.isdir(model):
        index = read_config(model, "model_index.json")
        parts = ("unet", "vae", "text_encoder", "text_encoder_2") if "text_encoder_2" in index else \
            ("unet", "vae", "text_encoder")
        for part in parts:
            if part == "text_encoder" and "text_encoder_2" in index and (index.get(part) or [None])[-1] is None:
                continue  # an SDXL refiner has the second text encoder only
            folder = os.path.join(model, part)
            if not os.path.isdir(folder):
                raise OSError(f"{model}: the model folder has no {part}/")
            stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
            count, dtypes = 0, set()
            for path in find_weights(folder, stem):
                header, _, _ = read_header(path)
                for info in header.values():
                    count += _numel(info["shape"])
                    dtypes.add(info["dtype"])
            out[part] = {"class": (index.get(part) or [None, None])[-1], "parameters": count,
                         "dtypes": sorted(dtypes), "config": read_config(folder)}
        for name in ("tokenizer", "tokenizer_2"):
            if (index.get(name) or [None])[-1] is None and (name == "tokenizer_2" or "text_encoder_2" in index):
                continue  # not an SDXL folder, or an SDXL refiner (no first tokenizer)
            tok = os.path.join(model, name)
            vocab, fast = os.path.join(tok, "vocab.json"), os.path.join(tok, "tokenizer.json")
            n_vocab = None
            if os.path.isfile(fast):  # transformers 5's one file: the vocabulary is its BPE model's
                with open(fast, encoding="utf-8") as f:
                    n_vocab = len((json.load(f).get("model") or {}).get("vocab") or {})
            elif os.path.isfile(vocab):
                with open(vocab, encoding="utf-8") as f:
                    n_vocab = len(json.load(f))
            out[name] = {"class": (index.get(name) or [None, None])[-1], "vocabulary": n_vocab}
        out["scheduler"] = {"class": (index.get("scheduler") or [None, None])[-1],
                            "config": read_config(os.path.join(model, "scheduler"), "scheduler_config.json")}
        return out
    if not os.path.isfile(model):
        raise OSError(f"{model}: no such model folder or file")
    header, metadata, _ = read_header(model)
    kind = convert.detect(header)
    if kind == "sdxl":  # counts and dtypes per network; SDXL configs are not read off the shapes
        for part, pre, cls in (("unet", convert.UNET_PREFIX, "UNet2DConditionModel"),
                               ("vae", convert.VAE_PREFIX, "AutoencoderKL"),
                               ("text_encoder", convert.XL_CLIP_PREFIX, "CLIPTextModel"),
                               ("text_encoder_2", convert.XL_OPEN_CLIP_PREFIX, "CLIPTextModelWithProjection")):
            infos = [v for k, v in header.items() if k.startswith(pre)]
            out[part] = {"class": cls, "parameters": sum(_numel(i["shape"]) for i in infos),
                         "dtypes": sorted({i["dtype"] for i in infos}), "config": {"_layout": "SDXL single file"}}
        return out
    prefixes = {"unet": (convert.UNET_PREFIX,), "vae": (convert.VAE_PREFIX,),
                "text_encoder": (convert.CLIP_PREFIX if kind == "sd1" else convert.OPEN_CLIP_PREFIX,)}

    class _Shape:  # infer_configs only reads .shape
        def __init__(self, shape):
            self.shape = tuple(shape)

    configs = convert.infer_configs({k: _Shape(v["shape"]) for k, v in header.items()}, kind)
    for part, pre in prefixes.items():
        infos = [v for k, v in header.items() if k.startswith(pre)]
        out[part] = {"class": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                               "text_encoder": "CLIPTextModel"}[part],
                     "parameters": sum(_numel(i["shape"]) for i in infos),
                     "dtypes": sorted({i["dtype"] for i in infos}),
                     "config": dict(configs[part], _inferred_from_shapes=f"{kind.upper()} single file")}
    other = [k for k in header if not k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                    "cond_stage_model."))]
    if other:
        out["other tensors"] = {"count": len(other), "examples": sorted(other)[:5]}
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run_info(args) -> int:
    info = describe_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    where = args.model or f"{DEFAULT_MODEL} (the embedded model)"
    print(f"model: {where}")
    total = 0
    for part, d in info.items():
        if "parameters" in d:
            total += d["parameters"]
            print(f"\n{part}: {d['class']}, {d['parameters']:,} parameters, stored as {', '.join(d['dtypes'])}")
        else:
            print(f"\n{part}: " + ", ".join(f"{k} {v}" for k, v in d.items() if k != "config"))
        for key, value in (d.get("config") or {}).items():
            print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    print(f"\ntotal: {total:,} parameters")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# demo


def _wrap(draw, text, font, width):
    """Split `text` into lines no wider than `width` pixels (a word longer than that gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line or not lines else lines


def captioned_grid(images, captions, columns=3, scale=3):
    """One image: the cells in a grid (each upscaled `scale` x, nearest), each caption wrapped below its cell."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    w, h = images[0].width * scale, images[0].height * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, c, font, w) for c in captions]
    left, top, right, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + 3
    cap_h = line_h * max(len(lines) for lines in wrapped) + 6
    pad = 8
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + cap_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (im, lines) in enumerate(zip(images, wrapped)):
        x = pad + (k % columns) * (w + pad)
        y = pad + (k // columns) * (h + cap_h + pad)
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + h + 4 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def run_demo(args) -> int:
    from refldm.core.images import check_output
    prompts = list(args.prompt or DEMO_PROMPTS)
    steps = DEMO_STEPS if args.steps is None else args.steps
    cfg = DEMO_CFG if args.cfg is None else args.cfg
    sampler = args.sampler or DEMO_SAMPLER
    for prompt in prompts:
        check_text(prompt, "--prompt")
    check_steps(steps)
    check_cfg(cfg)
    check_seed(args.seed)
    check_output(args.output)
    _use_backend(args.backend)
    with _one_line_warnings():
        start = time.perf_counter()
        pipe = load_pipeline(None)
        load = time.perf_counter() - start
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, seed=args.seed, sampler=sampler,
                   progress=not args.quiet)
    b = len(prompts)
    size = out.images[0].height, out.images[0].width
    latent = tuple(out.latents.shape)
    pixels = 3 * size[0] * size[1]
    latent_values = latent[1] * latent[2] * latent[3]
    grid = captioned_grid(out.images, prompts)
    text = parameters_text(" | ".join(prompts), None, steps, sampler_label(pipe, sampler), cfg, out.seed,
                           size[1], size[0], pipe.name)
    save_png(grid, args.output, text)
    t = out.timings
    total = load + sum(t.values())
    d = pipe.text_encoder.config.hidden_size
    n_tok = pipe.tokenizer.model_max_length
    print(f"refldm demo: {b} prompts through the embedded model ({pipe.name}), backend {backend.name()}")
    print(f"  prompt    -> tokens      ({b}, {n_tok})  CLIP BPE, [BOS] ... [EOS] and padding")
    print(f"  tokens    -> embeddings  ({b}, {n_tok}, {d})  CLIP text encoder; with the empty prompt's, "
          f"the context is ({2 * b if cfg > 1 else b}, {n_tok}, {d})")
    print(f"  noise     -> latents     {latent}  {steps} steps of {sampler_label(pipe, sampler)}, "
          f"CFG scale {cfg:g} (U-Net batch {2 * b if cfg > 1 else b})")
    print(f"  latents   -> image       ({b}, 3, {size[0]}, {size[1]})  VAE decoder, x{pipe.vae_scale_factor} per side")
    print(f"  compression: {pixels} pixel values / {latent_values} latent values = "
          f"{pixels / latent_values:g}x")
    print(f"  time: load {load:.2f} s, text encode {t['text encode']:.2f} s, denoise {t['denoise']:.2f} s "
          f"({t['denoise'] / steps * 1000:.0f} ms/step), decode {t['decode']:.2f} s; total {total:.2f} s")
    print(f"wrote {args.output}")
    return 0
