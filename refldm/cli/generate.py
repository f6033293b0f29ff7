"""``refldm txt2img``, ``refldm img2img``, ``refldm info`` and ``refldm demo``: the pipeline from the shell.

    refldm demo                                          # the embedded model: a captioned grid, timings
    refldm txt2img -p "a large red circle in the center on a white background" -o out.png
    refldm txt2img -m path/to/sd-folder -p "an astronaut riding a horse" --steps 20 --seed 1 -o out.png
    refldm img2img -i in.png --strength 0.7 -p "a large blue square in the center on a white background"
    refldm info path/to/sd-folder                        # each part's config, parameter count, dtype

MODEL (``-m``) is a diffusers folder or an original single-file ``.safetensors`` (SD 1.x / 2.x; give
``--config FOLDER`` or ``--tokenizer FOLDER`` with it); without ``-m`` the model shipped inside refldm
(refldm/default_model) is used. Each PNG carries its generation parameters in a ``parameters`` text
chunk, written as the Stable Diffusion web UIs write it, so their "PNG info" readers show them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings

from refldm import backend

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "default_model")

# refldm scheduler names -> the sampler names the web UIs write (and read) in the parameters chunk
SAMPLER_LABELS = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
    "euler-ancestral": "Euler a", "euler_ancestral": "Euler a", "heun": "Heun", "dpm2": "DPM2",
    "dpm2_a": "DPM2 a", "dpm++2m": "DPM++ 2M", "dpmpp_2m": "DPM++ 2M", "dpm++2m-karras": "DPM++ 2M Karras",
    "dpm++2s_a": "DPM++ 2S a", "unipc": "UniPC",
    "DDIMScheduler": "DDIM", "DDPMScheduler": "DDPM", "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun", "DPMSolverMultistepScheduler": "DPM++ 2M", "UniPCMultistepScheduler": "UniPC",
}

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


def _add_generation_args(p, *, steps=20):
    p.add_argument("-p", "--prompt", required=True, help='the prompt ("" for an unconditional image)')
    p.add_argument("-n", "--negative", default=None, help="the negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; "
                                                          "<= 1 turns guidance off)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    p.add_argument("--sampler", default=None,
                   help="scheduler by name, e.g. euler, ddim, dpm++2m (default: the model's own)")
    p.add_argument("-o", "--output", default=None, help="output PNG path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("txt2img", help="generate an image from a prompt",
                              description="Generate an image from a text prompt and write it as a PNG.")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of 8 "
                                                                  "(default: the model's training size)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height, a multiple of 8")
    p.set_defaults(func=run_txt2img)

    p = subparsers.add_parser("img2img", help="transform an image guided by a prompt",
                              description="Encode an image, noise it to --strength, and denoise it under a prompt.")
    _add_model_args(p)
    p.add_argument("-i", "--image", required=True, help="input image (its sides must be multiples of 8)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="how much to change: 0 keeps the image, 1 ignores it (default 0.8)")
    _add_generation_args(p)
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
    p.add_argument("-o", "--output", default="refldm-demo.png", help="output PNG (default refldm-demo.png)")
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEMO_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--sampler", default=None, help="scheduler by name (default: the model's own, DDIM)")
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


def load_pipeline(model=None, *, config=None, tokenizer=None, prediction_type=None, dtype="float32"):
    """The pipeline for MODEL: a diffusers folder, a single .safetensors file, or None for the embedded model."""
    from refldm.pipeline import StableDiffusionPipeline
    from refldm.weights import refuse_pickle
    if model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
            raise OSError(f"the embedded model is missing ({DEFAULT_MODEL}); reinstall refldm or give -m MODEL")
        pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype)
        pipe.name = "refldm-default"
        return pipe
    refuse_pickle(model)
    if os.path.isdir(model):
        return StableDiffusionPipeline.from_pretrained(model, dtype=dtype)
    if not os.path.exists(model):
        raise OSError(f"{model}: no such model folder or file")
    if not model.lower().endswith(".safetensors"):
        raise ValueError(f"{model}: not a model folder nor a .safetensors file")
    return StableDiffusionPipeline.from_single_file(model, config=config, tokenizer=tokenizer, dtype=dtype,
                                                    prediction_type=prediction_type)


def sampler_label(pipe, name) -> str:
    """The web UIs' name of the sampler (scheduler) used."""
    key = name or pipe.scheduler_config.get("_class_name", "")
    return SAMPLER_LABELS.get(key, SAMPLER_LABELS.get(str(key).lower(), str(key)))


def parameters_text(prompt, negative, steps, sampler, cfg, seed, width, height, model, strength=None) -> str:
    """The generation parameters in the web UIs' format (their "PNG info" parses it):

        a red circle
        Negative prompt: blurry
        Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: v1-5, Denoising strength: 0.7
    """
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {cfg:g}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model}"]
    if strength is not None:
        fields.append(f"Denoising strength: {strength:g}")
    from refldm import __version__
    fields.append(f"Version: refldm {__version__}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image, path, parameters: str | None = None) -> None:
    """Write a PIL image as PNG with a ``parameters`` text chunk (tEXt; iTXt where the text is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"{path}: the folder {folder} does not exist")
    image.save(path, format="PNG", pnginfo=info)


def _check_generation_args(args):
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("width", "height"):
        value = getattr(args, flag, None)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{flag} must be a positive multiple of 8, got {value}")


def _generate(args, image=None):
    _check_generation_args(args)
    _use_backend(args.backend)
    with _one_line_warnings():
        pipe = load_pipeline(args.model, config=args.config, tokenizer=args.tokenizer,
                             prediction_type=args.prediction_type, dtype=args.dtype)
        kwargs = {}
        if image is None:
            kwargs.update(height=args.height, width=args.width)
        else:
            kwargs.update(image=image, strength=args.strength)
        out = pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                   guidance_scale=args.cfg, seed=args.seed, scheduler=args.sampler, progress=not args.quiet,
                   **kwargs)
    img = out.images[0]
    text = parameters_text(args.prompt, args.negative, args.steps, sampler_label(pipe, args.sampler), args.cfg,
                           out.seed, img.width, img.height, pipe.name,
                           strength=None if image is None else args.strength)
    default = "refldm-txt2img.png" if image is None else "refldm-img2img.png"
    path = args.output or default
    save_png(img, path, text)
    t = out.timings
    print(f"wrote {path} ({img.width}x{img.height}, seed {out.seed}, {args.steps} steps, "
          f"denoise {t.get('denoise', 0):.2f} s)")
    return 0


def run_txt2img(args) -> int:
    return _generate(args)


def run_img2img(args) -> int:
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(args.image):
        raise OSError(f"{args.image}: no such image file")
    if not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must lie in [0, 1], got {args.strength}")
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{args.image}: not an image file PIL can read") from None
    return _generate(args, image=image)


# ---------------------------------------------------------------------------------------------------------------
# info: from the configs and the safetensors headers only (no weights are read)


def describe_model(model=None) -> dict:
    """{part: {"config": ..., "parameters": n, "dtypes": [...]}} of a folder or single file, without loading it."""
    from refldm import convert
    from refldm.weights import find_weights, read_config, read_header, refuse_pickle
    if model is None:
        model = DEFAULT_MODEL
    refuse_pickle(model)
    out = {}
    if os.path.isdir(model):
        index = read_config(model, "model_index.json")
        for part in ("unet", "vae", "text_encoder"):
            folder = os.path.join(model, part)
            if not os.path.isdir(folder):
                raise OSError(f"{model}: the model folder has no {part}/")
            stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
            count, dtypes = 0, set()
            for path in find_weights(folder, stem):
                header, _, _ = read_header(path)
                for info in header.values():
                    count += _numel(info["shape"])
                    dtypes.add(info["dtype"])
            out[part] = {"class": (index.get(part) or [None, None])[-1], "parameters": count,
                         "dtypes": sorted(dtypes), "config": read_config(folder)}
        tok = os.path.join(model, "tokenizer")
        vocab = os.path.join(tok, "vocab.json")
        n_vocab = None
        if os.path.isfile(vocab):
            with open(vocab, encoding="utf-8") as f:
                n_vocab = len(json.load(f))
        out["tokenizer"] = {"class": (index.get("tokenizer") or [None, None])[-1], "vocabulary": n_vocab}
        out["scheduler"] = {"class": (index.get("scheduler") or [None, None])[-1],
                            "config": read_config(os.path.join(model, "scheduler"), "scheduler_config.json")}
        return out
    if not os.path.isfile(model):
        raise OSError(f"{model}: no such model folder or file")
    header, metadata, _ = read_header(model)
    kind = convert.detect(header)
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
    _use_backend(args.backend)
    prompts = list(args.prompt or DEMO_PROMPTS)
    steps = args.steps or DEMO_STEPS
    cfg = DEMO_CFG if args.cfg is None else args.cfg
    sampler = args.sampler or DEMO_SAMPLER
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    with _one_line_warnings():
        start = time.perf_counter()
        pipe = load_pipeline(None)
        load = time.perf_counter() - start
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, seed=args.seed, scheduler=sampler,
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
