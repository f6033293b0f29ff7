"""``refldm txt2img``, ``refldm img2img``, ``refldm info`` and ``refldm demo``: the pipeline from the shell.

    refldm demo                                          # the embedded model: a captioned grid, timings
    refldm txt2img -p "a large red circle in the center on a white background" -o out.png
    refldm txt2img -m path/to/sd-folder -p "an astronaut riding a horse" --steps 20 --seed 1 -o out.png
    refldm img2img -i in.png --strength 0.7 -p "a large blue square in the center on a white background"
    refldm info path/to/sd-folder                        # each part's config, parameter count, dtype
    refldm txt2img -m sdxl-base --refiner sdxl-refiner --denoising-end 0.8 -p "an astronaut" -o out.png
    refldm txt2img -m v1-5.safetensors --config sd15 -p "a castle" --seed 5 --rng cuda --ensd 31337 \
        --hires-scale 2 --hires-denoise 0.5 -o castle.png        # the web UI's NV noise, ENSD and hires fix
    refldm txt2img --from-png castle.png -m v1-5.safetensors --config sd15 -o again.png   # the same image

MODEL (``-m``) is a diffusers folder (SD 1.x / 2.x; SDXL: detected by its text_encoder_2; SD3 / SD3.5: by its
SD3Transformer2DModel, with the flow versions of the samplers) or an original single-file ``.safetensors``
(SD 1.x / 2.x; give ``--config FOLDER`` or ``--tokenizer FOLDER`` with it; SDXL: ``--config SDXL_FOLDER``; SD3:
``--config SD3_FOLDER``); without ``-m`` the model shipped inside refldm (refldm/default_model) is used.
Each PNG carries its generation parameters in a ``parameters`` text chunk, written as the Stable Diffusion
web UIs write it, so their "PNG info" readers show them.
"""

from __future__ import annotations

import inspect

import json
import os
import time

from refldm import backend
from refldm.about import DEFAULT_MODEL  # noqa: F401  (the folder of the model shipped inside the package)
from refldm.checkpoints.inspect import describe_model  # noqa: F401  (what `refldm info` prints; its old home)
from refldm.cli.adapters import add_adapter_args, apply_adapter_args
from refldm.cli.common import (CFG, DEMO_CFG, DEMO_SAMPLER, DEMO_STEPS, STEPS, add_generation_args,  # noqa: F401
                               add_model_args, check_cfg, check_generation_args, check_resources, check_seed,
                               check_steps, check_text, load_pipeline, one_line_warnings, resolve_defaults,
                               sampler_name, save_png, use_backend, warn_run_choices)

DEMO_PROMPTS = (
    "a large red circle in the center on a white background",
    "a large blue square in the top left on a white background",
    "a large green triangle in the bottom right on a black background",
    "a large yellow star in the center on a gray background",
    "a large purple diamond in the top right on a white background",
    "a large orange cross in the bottom left on a black background",
)


# ---------------------------------------------------------------------------------------------------------------
# argument parsing (the flags the generating commands share: refldm/cli/common.py)


def register(subparsers) -> None:
    p = subparsers.add_parser("txt2img", help="generate an image from a prompt",
                              description="Generate an image from a text prompt and write it as a PNG.")
    add_model_args(p)
    add_generation_args(p, prompt_required=False)  # -p, or --from-png's prompt
    add_adapter_args(p)  # --lora, --lora-dir, --embedding, --prompt-syntax, --clip-skip (refldm/cli/adapters.py)
    p.add_argument("-W", "--width", type=int, default=None, help="image width, a multiple of 8 "
                                                                  "(default: the model's training size)")
    p.add_argument("-H", "--height", type=int, default=None, help="image height, a multiple of 8")
    p.add_argument("--refiner", default=None, help="SDXL: a refiner folder that finishes the base's latents")
    p.add_argument("--denoising-end", type=float, default=None,
                   help="SDXL: the fraction of the schedule the base runs (with --refiner; default 0.8)")
    add_preview_args(p)
    add_noise_args(p)
    _add_control_arguments(p)  # --controlnet, --t2i-adapter, --control-image, --control-scale
    _add_ip_adapter_arguments(p)
    p.add_argument("--from-png", metavar="IMAGE", default=None,
                   help="generate with the settings an image carries (A1111 / Forge / refldm parameters, ComfyUI "
                        "graph; `refldm png-info` shows them); flags given as well override them")
    _add_t5_arguments(p)
    add_low_memory_args(p)
    add_flux_args(p)
    p.set_defaults(func=run_txt2img)

    p = subparsers.add_parser("img2img", help="transform an image guided by a prompt",
                              description="Encode an image, noise it to --strength, and denoise it under a prompt.")
    add_model_args(p)
    p.add_argument("-i", "--image", required=True, help="input image (its sides must be multiples of 8)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much to change: 0 keeps the image, 1 ignores it (default 0.8)")
    add_generation_args(p, prompt_required=False)  # -p, or --from-png's prompt
    add_adapter_args(p)
    add_preview_args(p)
    add_noise_args(p, hires=False)
    p.add_argument("--from-png", metavar="IMAGE", default=None,
                   help="use the settings an image carries (its Denoising strength as --strength); flags given "
                        "as well override them")
    _add_ip_adapter_arguments(p)
    add_low_memory_args(p)
    add_flux_args(p)
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
    p.add_argument("--sampler", default=None, type=sampler_name,
                   help="sampler by name (`refldm samplers` lists them; default: the model's own, DDIM)")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale (default {DEMO_CFG:g})")
    p.add_argument("-p", "--prompt", action="append", default=None,
                   help="a prompt for the grid (repeat for several; default: six shape prompts)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_demo)


def _add_ip_adapter_arguments(p) -> None:
    """--ip-adapter FILE --ip-image IMG [--ip-scale S] [--image-encoder FOLDER] (refldm/adapters/ip_adapter.py)."""
    p.add_argument("--ip-adapter", default=None, metavar="FILE",
                   help="an IP-Adapter .safetensors (ip-adapter_sd15, ip-adapter-plus_sd15, ip-adapter_sdxl, ...): "
                        "the image of --ip-image steers the result")
    p.add_argument("--ip-image", default=None, metavar="IMG", help="the IP-Adapter's reference image")
    p.add_argument("--ip-scale", type=float, default=None, metavar="S",
                   help="the IP-Adapter's weight (default 1.0; 0 turns it off, 0.5-0.7 keeps more of the prompt)")
    p.add_argument("--image-encoder", default=None, metavar="FOLDER",
                   help="the CLIP image encoder folder (default: image_encoder/ beside the --ip-adapter file)")


def _apply_ip_adapter(args, pipe, kwargs) -> dict:
    """Load --ip-adapter into `pipe`, put the --ip-image into `kwargs`; -> the PNG text field, written as the web
    UI's ControlNet units are: ``IP-Adapter: "Model: ip-adapter_sd15, Weight: 0.6, Image: cat.png"``."""
    file, image_path = getattr(args, "ip_adapter", None), getattr(args, "ip_image", None)
    scale, encoder = getattr(args, "ip_scale", None), getattr(args, "image_encoder", None)
    if file is None:
        for flag, given in (("--ip-image", image_path), ("--ip-scale", scale), ("--image-encoder", encoder)):
            if given is not None:
                raise ValueError(f"{flag} needs --ip-adapter FILE")
        return {}
    if image_path is None:
        raise ValueError("--ip-adapter needs --ip-image IMG (the reference image)")
    if not hasattr(pipe, "load_ip_adapter"):
        raise ValueError(f"--ip-adapter: {type(pipe).__name__} takes no IP-Adapter (the SD 1.x / 2.x and SDXL "
                         "pipelines do)")
    from refldm.adapters.ip_adapter import check_scale
    from refldm.core.images import load_image
    scale = 1.0 if scale is None else check_scale(scale, "--ip-scale")
    if not os.path.isfile(file):
        raise OSError(f"--ip-adapter {file}: no such file")
    beside = os.path.join(os.path.dirname(os.path.abspath(file)), "image_encoder")
    if encoder is not None and not os.path.isdir(encoder):
        raise OSError(f"--image-encoder {encoder}: no such folder")
    if encoder is None and not os.path.isdir(beside):
        raise OSError(f"--ip-adapter {file}: no image_encoder/ folder beside it; give --image-encoder FOLDER "
                      "(the CLIP image encoder the adapter was trained with)")
    image = load_image(image_path)
    pipe.load_ip_adapter(file, image_encoder_folder=os.path.abspath(encoder) if encoder else "image_encoder")
    pipe.set_ip_adapter_scale(scale)
    kwargs["ip_adapter_image"] = image
    name = os.path.splitext(os.path.basename(file))[0]
    return {"IP-Adapter": f"Model: {name}, Weight: {scale:g}, Image: {os.path.basename(image_path)}"}


def _ip_adapter_from_png(args, other: dict) -> None:
    """--from-png and the IP-Adapter field `_apply_ip_adapter` writes: honoured when --ip-adapter and --ip-image
    are given (the PNG keeps only their names), its Weight filling --ip-scale; else it stays unhonoured."""
    import re
    field = other.get("IP-Adapter")
    if field is None or getattr(args, "ip_adapter", None) is None or getattr(args, "ip_image", None) is None:
        return
    weight = re.search(r"Weight: ([^,]+)", str(field))
    if weight and args.ip_scale is None:
        try:
            args.ip_scale = float(weight.group(1))
        except ValueError:
            return
    other.pop("IP-Adapter")


def add_preview_args(p) -> None:
    """--preview-every N --preview-dir DIR --preview linear|tiny|vae [--taesd DIR] (refldm/pipelines/preview.py)."""
    p.add_argument("--preview-every", type=int, default=None, metavar="N",
                   help="write the noisy latent and the predicted x_0 of every N-th step as PNGs")
    p.add_argument("--preview-dir", default=None, metavar="DIR", help="the folder for the previews")
    p.add_argument("--preview", default="linear", choices=("linear", "tiny", "vae"),
                   help="the preview decoder: linear latent-to-RGB, TAESD (--taesd), or the model's VAE")
    p.add_argument("--taesd", default=None, metavar="DIR", help="an AutoencoderTiny (TAESD) folder for --preview tiny")


def _check_preview_args(args) -> None:
    """The preview flags, checked before the model loads (one line each)."""
    if args.preview_every is None:
        for flag in ("preview_dir", "taesd"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --preview-every N")
        return
    from refldm.pipelines.preview import check_preview
    if args.preview_dir is None:
        raise ValueError("--preview-every needs --preview-dir DIR")
    try:
        check_preview(args.preview_every, args.steps, args.preview_dir, args.preview)
    except ValueError as e:
        raise ValueError(str(e).replace("preview_every=", "--preview-every ").replace("(preview_dir)",
                                                                                     "(--preview-dir)")) from None
    if args.preview == "tiny" and args.taesd is None:
        raise ValueError("--preview tiny needs --taesd DIR, an AutoencoderTiny (TAESD) folder")


def _preview_kwargs(args, pipe) -> dict:
    """The pipeline's preview arguments from the (checked) flags; a TAESD folder is loaded here."""
    if args.preview_every is None:
        return {}
    call = getattr(type(pipe), "_generate", type(pipe).__call__)   # SD3 / FLUX: __call__(prompt, **kwargs)
    if "preview_every" not in inspect.signature(call).parameters:
        raise ValueError(f"--preview-every: {type(pipe).__name__} takes no previews "
                         "(SD 1.x / 2.x, SDXL, SD3 and FLUX pipelines do)")
    if args.preview == "tiny":
        from refldm.models.autoencoder_tiny import AutoencoderTiny
        pipe.tiny_vae = AutoencoderTiny.from_pretrained(args.taesd, dtype=args.dtype or "float32")
    return dict(preview_every=args.preview_every, preview_dir=args.preview_dir, preview=args.preview)


# ---------------------------------------------------------------------------------------------------------------
# the web UIs' noise options and hires fix (refldm/pipelines/common.py; docs/reproduce.md)

NOISE_FLAGS = {"rng": "--rng", "sampler_rng": "--sampler-rng", "ensd": "--ensd", "variation_seed": "--variation-seed",
               "variation_strength": "--variation-strength", "seed_resize_from": "--seed-resize-from",
               "hires_scale": "--hires-scale", "hires_steps": "--hires-steps", "hires_denoise": "--hires-denoise",
               "hires_upscaler": "--hires-upscaler", "hires_comfyui": "the ComfyUI second pass (--from-png)"}


def add_noise_args(p, hires: bool = True) -> None:
    g = p.add_argument_group("the web UIs' noise options" + (" and hires fix" if hires else "") +
                             " (docs/reproduce.md)")
    g.add_argument("--rng", default=None, metavar="cpu|cuda",
                   help="the noise's random stream: cpu (torch's CPU generator, the web UI's CPU) or cuda (torch's "
                        "GPU generator computed on the CPU, the web UI's NV); with it image i gets seed + i "
                        "(default: diffusers' noise)")
    g.add_argument("--sampler-rng", default=None, metavar="cpu|cuda",
                   help="the sampler's noise (ancestral / SDE samplers) from its own generator of this stream, "
                        "seeded with the seed (+ ENSD), as ComfyUI and sd.cpp")
    g.add_argument("--ensd", type=int, default=None, help="A1111's eta noise seed delta: the sampler's noise from "
                                                          "seed + ENSD")
    g.add_argument("--variation-seed", type=int, default=None, help="a second seed whose noise is mixed in")
    g.add_argument("--variation-strength", type=float, default=None,
                   help="how much of the variation seed's noise, in [0, 1] (spherical interpolation)")
    g.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="draw the noise as for a WxH image and paste it centred (A1111's 'Seed resize from')")
    if not hires:
        return
    g.add_argument("--hires-scale", type=float, default=None,
                   help="hires fix: upscale by this factor and run a second pass (A1111's 'Upscale by')")
    g.add_argument("--hires-steps", type=int, default=None, help="hires fix: the second pass's steps (default: "
                                                                 "as --steps)")
    g.add_argument("--hires-denoise", type=float, default=None,
                   help="hires fix: the second pass's denoising strength in (0, 1] (default 0.7)")
    g.add_argument("--hires-upscaler", default=None,
                   help='hires fix: "Latent" (bilinear, the default), "Latent (antialiased)", "Latent (bicubic)", '
                        '"Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)", or in pixels '
                        'through the VAE: "Lanczos", "Nearest"')


def takes(pipe, key: str) -> bool:
    """Whether a pipeline's call takes keyword `key` (SD3 / FLUX: through their ``_generate``)."""
    cls = type(pipe)
    return any(key in inspect.signature(getattr(cls, f)).parameters for f in ("__call__", "_generate")
               if hasattr(cls, f))


def _flag_message(e: ValueError) -> ValueError:
    """A pipeline's message about keyword `variation_strength` -> the same about --variation-strength."""
    import re
    pattern = re.compile(r"(?<![\w-])(" + "|".join(sorted(NOISE_FLAGS, key=len, reverse=True)) + r")(?!\w)(=?)")
    return ValueError(pattern.sub(lambda m: NOISE_FLAGS[m.group(1)] + (" " if m.group(2) else ""), str(e)))


def _size_flag(value, flag):
    import re
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value or "")
    if not match:
        raise ValueError(f"{flag} {value!r}: give WIDTHxHEIGHT, e.g. 512x512")
    return int(match.group(1)), int(match.group(2))


def noise_kwargs(args) -> dict:
    """The pipeline's keyword arguments from the noise and hires flags (only those given), checked here,
    before the model loads, with the flags named."""
    from refldm.pipelines import common
    kwargs = {key: getattr(args, key, None) for key in NOISE_FLAGS}
    if kwargs["seed_resize_from"] is not None and not isinstance(kwargs["seed_resize_from"], tuple):
        kwargs["seed_resize_from"] = _size_flag(kwargs["seed_resize_from"], "--seed-resize-from")
    try:
        common.check_noise(*(kwargs[k] for k in ("rng", "sampler_rng", "ensd", "variation_seed",
                                                 "variation_strength", "seed_resize_from")))
        if getattr(args, "width", None) is not None and getattr(args, "height", None) is not None:
            common.check_hires(*(kwargs[k] for k in ("hires_scale", "hires_steps", "hires_denoise",
                                                     "hires_upscaler")), args.height, args.width,
                               kwargs["hires_comfyui"])
    except ValueError as e:
        raise _flag_message(e) from None
    return {k: v for k, v in kwargs.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# --from-png: the settings an image carries

# settings that do not change the image (or that refldm checks itself): not reported as unhonoured
_INFORMATIONAL = {"prompt", "negative_prompt", "loras", "other", "defaults", "model", "version", "model_hash",
                  "lora_hashes", "ti_hashes", "batch_size", "batch_pos", "passes", "unsupported"}


def _sampler_of(settings, source) -> str | None:
    from refldm.schedulers import names
    if source == "comfyui":
        name = settings.get("sampler")
        scheduler = settings.get("scheduler")
        name = f"{name} {scheduler}" if scheduler and scheduler != "normal" else name
    else:
        name = settings.get("sampler")
        kind = settings.get("schedule_type")
        if name and kind and kind.lower() not in ("automatic",) and kind.lower() not in name.lower():
            name = f"{name} {kind}"
    if name is None:
        return None
    try:
        names.resolve(name)
    except ValueError:
        raise ValueError(f"the image's sampler {name!r} is not one refldm runs (`refldm samplers` lists them)") \
            from None
    return name


def apply_png_settings(args) -> list:
    """Fill the flags not given on the command line from the settings `args.from_png` carries; returns the
    fields refldm cannot honour (by their web-UI names), and warns about each approximation."""
    import sys

    from refldm.core import pnginfo
    info = pnginfo.read_image_info(args.from_png)
    settings, source = dict(info["settings"]), info["source"]
    used = set(_INFORMATIONAL)
    unhonoured = [f"node {n}" for n in info["unsupported"]]

    def take(key, dest, convert=lambda v: v):
        used.add(key)
        if key in settings and getattr(args, dest, None) is None:
            setattr(args, dest, convert(settings[key]))

    if args.prompt is None:
        args.prompt = settings.get("prompt", "")
    if args.negative is None and settings.get("negative_prompt"):
        args.negative = settings["negative_prompt"]
    take("steps", "steps")
    take("cfg_scale", "cfg")
    take("seed", "seed")
    take("width", "width")
    take("height", "height")
    used.update(("sampler", "schedule_type", "scheduler"))
    if args.sampler is None:
        args.sampler = _sampler_of(settings, source)
    used.add("clip_skip")
    if settings.get("clip_skip", 1) > 1 and args.clip_skip is None:
        args.clip_skip = settings["clip_skip"] - 1  # the web UI counts the last layer as 1, diffusers as 0
    if source in ("a1111", "forge") and args.prompt_syntax == "plain":
        args.prompt_syntax = "webui"  # their (word:1.2) weights and BREAK
    used.add("rng")
    rng = settings.get("rng")
    if source == "comfyui":  # the whole batch from one CPU generator, the sampler's noise from a fresh one
        if args.sampler_rng is None:
            args.sampler_rng = "cpu"
    elif not (source == "refldm" and "rng" in settings.get("defaults", ())) and args.rng is None:
        args.rng = {"CPU": "cpu", "NV": "cuda", "GPU": "cuda"}[rng]
        if rng == "GPU":
            print(f"refldm: warning: {args.from_png}: RNG GPU (torch's CUDA generator) is reproduced by the "
                  "Philox stream as NV: to ~1e-6, exactly the GPU's numbers up to its thread count "
                  "(docs/reproduce.md)", file=sys.stderr)
    take("ensd", "ensd", lambda v: v or None)
    take("variation_seed", "variation_seed")
    take("variation_seed_strength", "variation_strength")
    take("seed_resize_from", "seed_resize_from", tuple)
    other = dict(settings.get("other", {}))
    unhonoured += _png_control(args, other)  # the web UI's "ControlNet <i>" units (popped from other)
    if "Sampler RNG" in other and args.sampler_rng is None:
        args.sampler_rng = other.pop("Sampler RNG")
    other.pop("Sampler RNG", None)
    image_mode = hasattr(args, "strength")  # img2img: no hires fix; Denoising strength is --strength
    if not image_mode:
        take("hires_upscale", "hires_scale")
        take("hires_steps", "hires_steps", lambda v: v or None)
        take("hires_upscaler", "hires_upscaler")
    if image_mode:
        take("denoising_strength", "strength")
    elif "hires_upscale" in settings:
        take("denoising_strength", "hires_denoise")
    elif source == "comfyui" and settings.get("denoising_strength") == 1.0:
        used.add("denoising_strength")
    if source == "comfyui":  # LoRA loader nodes (A1111's <lora:...> tags stay in the prompt for --lora-dir)
        unhonoured += [f"LoRA {entry['name']} (give it with --lora)" for entry in settings.get("loras", [])
                       if not any(os.path.basename(f.split(":")[0]) == entry["name"] for f in args.lora)]
    if source == "comfyui" and image_mode and len(settings.get("passes", [])) > 1:
        unhonoured.append(f"{len(settings['passes']) - 1} further sampler pass(es)")
    elif source == "comfyui" and not image_mode:  # a second sampler node: hires fix or split (pnginfo.comfyui_passes)
        second, problems = pnginfo.comfyui_passes(settings)
        unhonoured += problems
        for key, value in second.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if other.get("Hires schedule") == "ComfyUI" and "hires_resize" in settings and not image_mode:  # refldm's
        start = other.pop("Hires start", None)
        args.hires_comfyui = {"seed": int(other.pop("Hires seed", settings.get("seed", 0))),
                              "size": tuple(settings["hires_resize"]), "start": None if start is None else int(start)}
        other.pop("Hires schedule")
        used.add("hires_resize")
    for key in ("Original size", "Target size"):  # refldm's SDXL fields: honoured when they are the image size
        if key in other and other[key] == f"{args.width}x{args.height}":
            other.pop(key)
    if other.get("Crop") == "0x0":
        other.pop("Crop")
    _ip_adapter_from_png(args, other)  # with --ip-adapter: the PNG's IP-Adapter weight as --ip-scale
    names = {key: name for name, (key, _) in pnginfo.FIELDS.items()}
    unhonoured += [names.get(k, k) for k in settings if k not in used]
    unhonoured += list(other)
    args._png_model_hash = settings.get("model_hash")
    return unhonoured


# ---------------------------------------------------------------------------------------------------------------
# --controlnet / --t2i-adapter (refldm/pipelines/controlnet.py, refldm/pipelines/t2i_adapter.py; docs/control.md)


def _add_control_arguments(p) -> None:
    g = p.add_argument_group("control: ControlNets and T2I-Adapters (docs/control.md)")
    g.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="a ControlNet: a diffusers folder or a single .safetensors file (repeat for several)")
    g.add_argument("--t2i-adapter", action="append", default=[], metavar="MODEL",
                   help="a T2I-Adapter folder (repeat for several; with --controlnet too)")
    g.add_argument("--control-image", action="append", default=[], metavar="IMAGE",
                   help="a control image per model, in order: the --controlnet models' first, then the "
                        "--t2i-adapter ones; another size is resized with a warning")
    g.add_argument("--control-scale", action="append", type=float, default=None, metavar="S",
                   help="a conditioning scale per model, in the same order (default 1 each)")


def _control_models(args) -> int:
    return len(getattr(args, "controlnet", None) or []) + len(getattr(args, "t2i_adapter", None) or [])


def _check_control_arguments(args) -> None:
    """The control flags, checked before the model loads (one line each)."""
    import math
    n, images = _control_models(args), getattr(args, "control_image", None) or []
    scales = getattr(args, "control_scale", None) or []
    if not n:
        for flag, given in (("--control-image", images), ("--control-scale", scales)):
            if given:
                raise ValueError(f"{flag} needs --controlnet MODEL or --t2i-adapter MODEL")
        return
    if len(images) != n:
        raise ValueError(f"--control-image: {len(images)} image{'s' * (len(images) != 1)} for {n} model"
                         f"{'s' * (n != 1)} (--controlnet, --t2i-adapter); give one per model, in order")
    if len(scales) > n:
        raise ValueError(f"--control-scale: {len(scales)} scales for {n} model{'s' * (n != 1)}")
    for s in scales:
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"--control-scale {s:g}: must be a finite number >= 0")
    for path in images:
        if not os.path.isfile(path):
            raise OSError(f"--control-image {path}: no such image file")
    for flag, paths in (("--controlnet", args.controlnet), ("--t2i-adapter", args.t2i_adapter)):
        for path in paths:
            if not os.path.exists(path):
                raise OSError(f"{flag} {path}: no such folder or file")
    if getattr(args, "hires_scale", None) is not None:
        raise ValueError("--hires-scale: not with --controlnet / --t2i-adapter (the control is made for the "
                         "first pass's size)")


def _control_label(path) -> str:
    """A model as sd-webui-controlnet names it: "file stem [legacy hash of the weights file]"."""
    from refldm.checkpoints.weights import find_weights
    from refldm.core.pnginfo import legacy_model_hash
    path = os.path.normpath(path)
    weights = path if os.path.isfile(path) else find_weights(path)[0]
    name = os.path.splitext(os.path.basename(path))[0]
    return f"{name} [{legacy_model_hash(weights)}]"


def _apply_control(args, pipe):
    """-> (the pipeline to call, {"ControlNet <i>": unit text}): the ControlNets and T2I-Adapters loaded, checked
    against the U-Net's family, and the pipeline's U-Net wrapped (`refldm.pipelines.t2i_adapter.with_control`)."""
    import sys
    if not _control_models(args):
        return pipe, {}
    if getattr(pipe, "transformer", None) is not None or not hasattr(pipe, "unet"):
        raise ValueError("--controlnet / --t2i-adapter: for the U-Net models (SD 1.x / 2.x, SDXL)")
    from refldm.core.images import load_image
    from refldm.core.pnginfo import format_control_unit
    from refldm.models.controlnet import ControlNetModel
    from refldm.models.t2i_adapter import T2IAdapter
    from refldm.pipelines.t2i_adapter import with_control
    dtype = pipe.dtype.name
    nets, adapters = [], []
    for path in args.controlnet:
        try:
            nets.append(ControlNetModel.from_single_file(path, dtype=dtype) if os.path.isfile(path)
                        else ControlNetModel.from_pretrained(path, dtype=dtype))
        except ValueError as e:
            raise ValueError(f"--controlnet {path}: {e}") from None
    for path in args.t2i_adapter:
        adapters.append(T2IAdapter.from_pretrained(path, dtype=dtype))
    n = len(nets) + len(adapters)
    scales = list(args.control_scale or []) + [1.0] * (n - len(args.control_scale or []))
    images = [load_image(p) for p in args.control_image]
    height, width = args.height or pipe.default_size, args.width or pipe.default_size
    try:
        wrapped = with_control(pipe, nets, adapters, images, scales, height=height, width=width, steps=args.steps,
                               guidance_scale=args.cfg)
    except ValueError as e:  # another family, widths that do not fit: name the flag
        flag = "--controlnet" if "ControlNet" in str(e) else "--t2i-adapter"
        raise ValueError(f"{flag}: {e}") from None
    labels = [_control_label(p) for p in args.controlnet + args.t2i_adapter]
    for k, (label, recorded) in enumerate(zip(labels, getattr(args, "_png_control", []))):
        if recorded != label:
            print(f"refldm: warning: {args.from_png}: ControlNet {k} was {recorded}, now {label}", file=sys.stderr)
    fields = {f"ControlNet {k}": format_control_unit(label, s) for k, (label, s) in enumerate(zip(labels, scales))}
    return wrapped, fields


def _png_control(args, other: dict) -> list:
    """--from-png: the web UI's "ControlNet <i>" units, taken out of `other`. The image holds neither the models
    nor the control images: give them again (--controlnet / --t2i-adapter MODEL --control-image IMAGE, in the
    recorded order); the recorded weights fill --control-scale when it is not given. Returns what is not honoured."""
    from refldm.core import pnginfo
    units, unhonoured = [], []
    for name, text in pnginfo.control_units(other):
        other.pop(name)
        try:
            units.append((name, pnginfo.parse_control_unit(text, name)))
        except ValueError as e:
            unhonoured.append(str(e))
    n = _control_models(args)
    if not n:
        return unhonoured + [f"{name} ({u['model']}; give it again: --controlnet or --t2i-adapter MODEL "
                             "--control-image IMAGE)" for name, u in units]
    if len(units) != n:
        unhonoured.append(f"{len(units)} ControlNet units ({n} models given)")
    if args.control_scale is None and units:
        args.control_scale = [float(u.get("weight", 1.0)) for _, u in units][:n]
    args._png_control = [u["model"] for _, u in units]
    for name, u in units:
        if u.get("module", "none") not in ("none", "None"):
            unhonoured.append(f"{name} preprocessor {u['module']} (give the preprocessed control image; "
                              "`refldm control` makes some)")
        if (u.get("guidance_start", 0), u.get("guidance_end", 1)) != (0, 1):
            unhonoured.append(f"{name} Guidance Start/End")
        if u.get("control_mode", "Balanced") != "Balanced":
            unhonoured.append(f"{name} Control Mode {u['control_mode']}")
    return unhonoured


# ---------------------------------------------------------------------------------------------------------------
# txt2img, img2img


def _generate(args, image=None):
    import sys

    from refldm.core.images import check_output
    unhonoured = apply_png_settings(args) if getattr(args, "from_png", None) else []
    if unhonoured:
        print(f"refldm: warning: {args.from_png}: refldm cannot honour {', '.join(unhonoured)}; the image will "
              "differ", file=sys.stderr)
    if args.prompt is None:
        raise ValueError("give the prompt with -p (or --from-png IMAGE)")
    if image is not None and args.strength is None:
        args.strength = 0.8
    if image is not None and not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must lie in [0, 1], got {args.strength}")
    check_generation_args(args)
    noise = noise_kwargs(args)
    flux_defaults(args)  # a FLUX model: its steps and true-CFG defaults (before the SD ones)
    resolve_defaults(args)
    default = "refldm-txt2img.png" if image is None else "refldm-img2img.png"
    path = check_output(default if args.output is None else args.output)  # before the work, not after
    _check_preview_args(args)
    _check_control_arguments(args)
    use_backend(args.backend)
    check_weights_fit(args)  # before loading: a 24 GB bf16 file converted to float32 would not fit
    with one_line_warnings():
        pipe = _load_without_t5(args, image is not None) or load_pipeline(
            args.model, config=args.config, tokenizer=args.tokenizer, prediction_type=args.prediction_type,
            dtype=args.dtype, max_length=args.max_length, img2img=image is not None,
            weights_dtype=weights_dtype_of(args))
        if is_flux_pipeline(pipe):
            return generate_flux(args, pipe, path, image, noise)
        recorded, have = getattr(args, "_png_model_hash", None), getattr(pipe, "model_hash", None)
        if recorded and have and not have.startswith(recorded.lower()[:10]):
            print(f"refldm: warning: the model's hash is {have}, {args.from_png} was made with Model "
                  f"hash {recorded}: another checkpoint gives another image", file=sys.stderr)
        refused = [NOISE_FLAGS[k] for k in noise if not takes(pipe, k)]
        if refused:
            raise ValueError(f"{', '.join(refused)}: {type(pipe).__name__} does not take "
                             f"{'them' if len(refused) > 1 else 'it'} (hires fix: SD 1.x / 2.x and SDXL text-to-image)")
        refiner, end = _refiner_args(args, pipe)
        if getattr(pipe, "transformer", None) is not None:
            _check_sd3_args(args)
        prompt, kwargs = apply_adapter_args(args, pipe)  # LoRAs, embeddings, prompt syntax (cli/adapters.py)
        kwargs.update(_preview_kwargs(args, pipe))  # --preview-every (refldm/pipelines/preview.py)
        ip_fields = _apply_ip_adapter(args, pipe, kwargs)  # --ip-adapter --ip-image (refldm/adapters/ip_adapter.py)
        if image is None:
            if "hires_scale" in noise:  # the size is known now (the model's default when not given)
                size = pipe.default_size
                try:
                    from refldm.pipelines.common import check_hires
                    check_hires(noise["hires_scale"], noise.get("hires_steps"), noise.get("hires_denoise"),
                                noise.get("hires_upscaler"), args.height or size, args.width or size,
                                noise.get("hires_comfyui"))
                except ValueError as e:
                    raise _flag_message(e) from None
                if refiner is not None:
                    raise ValueError("--hires-scale and --refiner: choose one")
            kwargs.update(height=args.height, width=args.width, **noise)
            warn_run_choices(args, pipe, args.height, args.width)
            check_resources(pipe, 1, args.height, args.width, args.steps, args.cfg)
        else:
            kwargs.update(image=image, strength=args.strength, **noise)
            warn_run_choices(args, pipe, image.height, image.width)
            check_resources(pipe, 1, image.height, image.width, args.steps, args.cfg, strength=args.strength)
        if refiner is not None:
            kwargs.update(denoising_end=end, output_type="latent")
        pipe, control = _apply_control(args, pipe)  # --controlnet / --t2i-adapter: the U-Net wrapped; PNG fields
        out = pipe(prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                   guidance_scale=args.cfg, seed=args.seed, sampler=args.sampler, progress=not args.quiet,
                   **kwargs)
        made = out.generation[0].replace(prompt=args.prompt)  # the prompt as typed, <lora:...> tags included
        if control:
            made = made.replace(fields={**made.fields, **control})
        made = made.replace(fields={**made.fields, **ip_fields})
        if refiner is not None:  # SDXL's ensemble: the refiner denoises the last (1 - end) of the schedule
            out = refiner(args.prompt, negative_prompt=args.negative, image=out.latents, denoising_start=end,
                          num_inference_steps=args.steps, guidance_scale=args.cfg, seed=out.seed,
                          sampler=args.sampler, progress=not args.quiet)
            made = made.replace(extra={**made.extra, "Refiner": refiner.name, "Refiner switch at": f"{end:g}"})
    img = out.images[0]
    text = made.text()  # the pipeline's parameters text (refldm.pipelines.common.GenerationParameters)
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


def _add_t5_arguments(p) -> None:
    p.add_argument("--no-t5", action="store_true",
                   help="SD3 / SD3.5: leave the T5 encoder out (it is not loaded; zeros stand in for its states, as "
                        "diffusers' text_encoder_3=None): 4.7 B parameters less, a different image")


def _load_without_t5(args, img2img: bool):
    """--no-t5: the SD3 pipeline of -m (a folder, or a single file with --config) loaded without T5; None when
    the flag is not given. Another kind of model is refused in one line (FLUX needs its T5)."""
    if not getattr(args, "no_t5", False):
        return None
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import read_header
    from refldm.cli.common import set_max_length
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline, is_sd3_folder
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    model = args.model
    if model and os.path.isdir(model) and is_sd3_folder(model):
        pipe = cls.from_pretrained(model, dtype=args.dtype, use_t5=False, weights_dtype=weights_dtype_of(args))
    elif model and os.path.isfile(model) and model.lower().endswith(".safetensors") \
            and convert.is_sd3(read_header(model)[0]):
        if args.config is None:
            raise ValueError(f"{model}: an SD3 / SD3.5 single file; give --config SD3_FOLDER (a diffusers SD3 "
                             "folder with the model's configs, tokenizers and scheduler)")
        pipe = cls.from_single_file(model, args.config, dtype=args.dtype, use_t5=False,
                                     weights_dtype=weights_dtype_of(args))
    else:
        raise ValueError(f"--no-t5: {model or 'the embedded model'} is not an SD3 / SD3.5 model (only SD3 runs "
                         "without its T5 encoder)")
    set_max_length(pipe, args.max_length)
    return pipe


def _check_sd3_args(args):
    """What an SD3 model does not take from the command line, refused in one line each (the adapters and the web
    UIs' prompt syntax are written for the U-Net models' CLIP text encoder and U-Net)."""
    for flag, given in (("--lora", getattr(args, "lora", None)), ("--embedding", getattr(args, "embedding", None)),
                        ("--prompt-syntax", getattr(args, "prompt_syntax", "plain") not in (None, "plain")),
                        ("<lora:...> in the prompt", "<lora:" in (args.prompt or ""))):
        if given:
            raise ValueError(f"{flag}: not supported for SD3 models in refldm (LoRAs, embeddings and prompt "
                             "weighting are implemented for the U-Net models: SD 1.x / 2.x / SDXL)")


def run_img2img(args) -> int:
    from refldm.core.images import load_image
    if not os.path.isfile(args.image):
        raise OSError(f"{args.image}: no such image file")
    image = load_image(args.image)  # 16-bit scaled to 8; truncated or huge files: one line naming the file
    return _generate(args, image=image)


# ---------------------------------------------------------------------------------------------------------------
# --low-memory (weights kept as stored) and FLUX.1


def add_low_memory_args(p) -> None:
    """--low-memory: every model loads with weights_dtype="stored" (refldm/checkpoints/stored.py)."""
    p.add_argument("--low-memory", action="store_true",
                   help="keep the weights in the dtype the files store them in (float16 / bfloat16, memory-mapped) "
                        "and convert each layer's weight to --dtype only while it runs: about half the memory for "
                        "16-bit files, the same image bit for bit")


def weights_dtype_of(args):
    return "stored" if getattr(args, "low_memory", False) else None


def check_weights_fit(args) -> None:
    """Before loading -m MODEL without --low-memory: its weights, counted from the safetensors headers
    (refldm/checkpoints/inspect.py), converted to --dtype must fit the available memory; otherwise refused in one
    line with the estimate, pointing to --low-memory (then the run's own estimate is checked after loading)."""
    if weights_dtype_of(args) or getattr(args, "model", None) is None or backend.name() != "numpy":
        return
    import numpy as np

    from refldm.cli.common import gib
    from refldm.cli.resources import available_memory
    from refldm.errors import TooLargeError
    have = available_memory()
    if have is None or not os.path.exists(args.model):
        return
    try:
        params = sum(int(d.get("parameters", 0) or 0) for d in describe_model(args.model).values())
    except (OSError, ValueError):  # a folder or file the loader will name the fault of
        return
    need = params * np.dtype(args.dtype or "float32").itemsize
    if need > have:
        raise TooLargeError(f"{args.model}: its {params:,} weights need about {gib(need)} of memory as {args.dtype} "
                            f"(estimated from the file headers, before loading); this machine has {gib(have)} "
                            "available. Use --low-memory (the weights stay as the files store them, memory-mapped, "
                            "converted one layer at a time)")


def add_flux_args(p) -> None:
    """FLUX.1's own options (refldm/pipelines/flux.py)."""
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="FLUX.1-dev: the distilled guidance fed to the transformer (default 3.5); FLUX.1-schnell has "
                        "none (a value is ignored with a warning). --cfg is FLUX's true CFG (default 1: off)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="FLUX: T5 prompt tokens, 1..512 (default 512)")


FLUX_STEPS, FLUX_SCHNELL_STEPS, FLUX_TRUE_CFG = 28, 4, 1.0  # diffusers' FluxPipeline default; schnell's usual 4


def flux_defaults(args) -> None:
    """For a FLUX model: --steps 28 (dev) or 4 (schnell), --cfg 1 (no true CFG) when not given."""
    from refldm.cli.common import is_flux_model
    model = getattr(args, "model", None)
    if not is_flux_model(model):
        for flag, dest in (("--guidance", "guidance"), ("--max-sequence-length", "max_sequence_length")):
            if getattr(args, dest, None) is not None:
                raise ValueError(f"{flag}: a FLUX.1 option; -m names no FLUX model")
        return
    folder = model if os.path.isdir(model) else getattr(args, "config", None)
    schnell = False
    if folder and os.path.isfile(os.path.join(folder, "transformer", "config.json")):
        with open(os.path.join(folder, "transformer", "config.json"), encoding="utf-8") as f:
            schnell = not json.load(f).get("guidance_embeds", False)
    if args.steps is None:
        args.steps = FLUX_SCHNELL_STEPS if schnell else FLUX_STEPS
    if args.cfg is None:
        args.cfg = FLUX_TRUE_CFG


def is_flux_pipeline(pipe) -> bool:
    from refldm.pipelines.flux import FluxPipeline
    return isinstance(pipe, FluxPipeline)


def generate_flux(args, pipe, path, image, noise) -> int:
    """txt2img / img2img with a FLUX pipeline: --guidance (dev), --cfg as true CFG with -n, --max-sequence-length."""
    unsupported = [(flag, given) for flag, given in (
        ("--lora", getattr(args, "lora", None)), ("--embedding", getattr(args, "embedding", None)),
        ("--prompt-syntax", getattr(args, "prompt_syntax", "plain") not in (None, "plain")),
        ("--clip-skip", getattr(args, "clip_skip", None) is not None),
        ("<lora:...> in the prompt", "<lora:" in (args.prompt or "")),
        ("--sampler", args.sampler is not None), ("--refiner", getattr(args, "refiner", None)),
        (", ".join(NOISE_FLAGS[k] for k in noise if k.startswith("hires")), any(k.startswith("hires") for k in noise)))
        if given]
    if unsupported:
        raise ValueError(f"{unsupported[0][0]}: not supported for FLUX models in refldm (FLUX runs its flow-matching "
                         "Euler sampler; LoRAs, embeddings, prompt syntax, refiner and hires fix are implemented for "
                         "the U-Net models)")
    kwargs = dict(negative_prompt=args.negative, true_cfg_scale=args.cfg, guidance_scale=args.guidance,
                  num_inference_steps=args.steps, seed=args.seed, progress=not args.quiet, **noise)
    kwargs.update(_preview_kwargs(args, pipe))  # --preview-every: FLUX's previews unpack the 2x2 patches
    if args.max_sequence_length is not None:
        kwargs["max_sequence_length"] = args.max_sequence_length
    if image is None:
        kwargs.update(height=args.height, width=args.width)
        check_resources(pipe, 1, args.height, args.width, args.steps, args.cfg if args.negative else 1.0)
    else:
        kwargs.update(image=image, strength=args.strength)
        check_resources(pipe, 1, image.height, image.width, args.steps, args.cfg if args.negative else 1.0,
                        strength=args.strength)
    out = pipe(args.prompt, **kwargs)
    img = out.images[0]
    save_png(img, path, out.parameters[0] if out.parameters else None)
    print(f"wrote {path} ({img.width}x{img.height}, seed {out.seed}, {args.steps} steps, "
          f"denoise {out.timings.get('denoise', 0):.2f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# info: from the configs and the safetensors headers only (refldm/checkpoints/inspect.py; no weights are read)


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
    use_backend(args.backend)
    with one_line_warnings():
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
    text = out.generation[0].replace(prompt=" | ".join(prompts), negative_prompt=None).text()  # the grid's
    save_png(grid, args.output, text)
    t = out.timings
    total = load + sum(t.values())
    d = pipe.text_encoder.config.hidden_size
    n_tok = pipe.tokenizer.model_max_length
    print(f"refldm demo: {b} prompts through the embedded model ({pipe.name}), backend {backend.name()}")
    print(f"  prompt    -> tokens      ({b}, {n_tok})  CLIP BPE, [BOS] ... [EOS] and padding")
    print(f"  tokens    -> embeddings  ({b}, {n_tok}, {d})  CLIP text encoder; with the empty prompt's, "
          f"the context is ({2 * b if cfg > 1 else b}, {n_tok}, {d})")
    print(f"  noise     -> latents     {latent}  {steps} steps of {pipe.sampler_label(sampler)}, "
          f"CFG scale {cfg:g} (U-Net batch {2 * b if cfg > 1 else b})")
    print(f"  latents   -> image       ({b}, 3, {size[0]}, {size[1]})  VAE decoder, x{pipe.vae_scale_factor} per side")
    print(f"  compression: {pixels} pixel values / {latent_values} latent values = "
          f"{pixels / latent_values:g}x")
    print(f"  time: load {load:.2f} s, text encode {t['text encode']:.2f} s, denoise {t['denoise']:.2f} s "
          f"({t['denoise'] / steps * 1000:.0f} ms/step), decode {t['decode']:.2f} s; total {total:.2f} s")
    print(f"wrote {args.output}")
    return 0
