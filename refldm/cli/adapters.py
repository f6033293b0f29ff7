"""Command-line flags for adapters and prompt syntax, shared by the generating subcommands.

    --lora FILE[:SCALE]      a LoRA file (repeatable), merged at SCALE (default 1)
    <lora:NAME:TE[:UNET]>    in the prompt, as the web UI's extra-network syntax: LORA_DIR/NAME.safetensors
                             at multiplier TE for the text encoder and UNET (default TE) for the U-Net;
                             the tag is removed from the prompt text (with --lora-dir)
    --embedding FILE         a textual-inversion embedding (repeatable)
    --prompt-syntax webui    (word:1.3), [word], BREAK, prompts over 75 tokens (refldm/adapters/prompt_weighting.py)
    --clip-skip K            condition on the text encoder's K-th layer from the end (diffusers' clip_skip)

`add_adapter_args(parser)` adds them; `apply_adapter_args(args, pipe)` loads what they name into the
pipeline and returns (prompt without its <lora:...> tags, extra keyword arguments for the pipeline call).
"""

from __future__ import annotations

import os
import re

__all__ = ["add_adapter_args", "apply_adapter_args", "parse_lora_flag", "extract_lora_tags"]

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tag: <kind:arg1:arg2...>


def add_adapter_args(p) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors (kohya or diffusers format) at SCALE (default 1); repeatable")
    p.add_argument("--lora-dir", default=None,
                   help="folder where <lora:NAME:SCALE> in the prompt finds NAME.safetensors")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="load a textual-inversion embedding (.safetensors); repeatable")
    p.add_argument("--prompt-syntax", choices=("plain", "webui"), default="plain",
                   help="webui: (word:1.3) weights, BREAK, prompts over 75 tokens (default plain, as diffusers)")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="use the text encoder's K-th layer from the end (1: the penultimate), as diffusers")


def parse_lora_flag(value: str) -> tuple[str, float]:
    """ "FILE" -> (FILE, 1.0); "FILE:0.7" -> (FILE, 0.7) (a colon not followed by a number is part of FILE)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


def extract_lora_tags(prompt: str) -> tuple[str, list]:
    """The prompt without its <lora:...> tags, and [(name, te_scale, unet_scale)] from them, as the web UI
    reads them (multipliers default to 1; the U-Net's defaults to the text encoder's)."""
    found = []
    for kind, body in EXTRA_NETWORK.findall(prompt):
        if kind != "lora":
            raise ValueError(f"<{kind}:{body}> in the prompt: refldm implements the <lora:NAME:SCALE> extra "
                             "network only")
        items = body.split(":")
        try:
            te = float(items[1]) if len(items) > 1 and items[1] else 1.0
            unet = float(items[2]) if len(items) > 2 and items[2] else te
        except ValueError:
            raise ValueError(f"<lora:{body}>: the multipliers must be numbers") from None
        found.append((items[0], te, unet))
    return EXTRA_NETWORK.sub("", prompt), found


def apply_adapter_args(args, pipe) -> tuple[str, dict]:
    """Load --embedding, --lora and the prompt's <lora:...> tags into `pipe`; (prompt, call kwargs)."""
    from refldm.adapters.lora import LoRA, apply_loras, load_lora
    from refldm.adapters.textual_inversion import load_textual_inversion
    for path in getattr(args, "embedding", None) or []:
        load_textual_inversion(pipe, path)
    loras = [parse_lora_flag(v) for v in getattr(args, "lora", None) or []]
    prompt, tags = extract_lora_tags(args.prompt)
    for name, te, unet in tags:
        folder = getattr(args, "lora_dir", None)
        if folder is None:
            raise ValueError(f"<lora:{name}:...> in the prompt needs --lora-dir (the folder of {name}.safetensors)")
        path = os.path.join(folder, name + ".safetensors")
        inside = os.path.realpath(folder)
        if os.path.isabs(name) or os.path.commonpath([inside, os.path.realpath(path)]) != inside:
            raise ValueError(f"<lora:{name}:...>: names a file outside --lora-dir {folder}; a LoRA name is "
                             "resolved inside that folder only")
        if not os.path.isfile(path):
            raise OSError(f"<lora:{name}:...>: {path} does not exist")
        lora = load_lora(path)
        if te == unet:
            loras.append((lora, te))
        else:  # one multiplier per model, as the web UI's <lora:name:te:unet>
            for target, scale in (("text_encoder", te), ("unet", unet)):
                layers = [layer for layer in lora.layers if layer.target == target]
                if layers:
                    loras.append((LoRA(lora.path, lora.format, layers), scale))
    if loras:
        apply_loras(pipe, loras, merge=True)
    kwargs = {}
    if getattr(args, "prompt_syntax", "plain") != "plain":
        kwargs["prompt_syntax"] = args.prompt_syntax
    if getattr(args, "clip_skip", None):
        kwargs["clip_skip"] = args.clip_skip
    return prompt, kwargs
