"""``refldm png-info IMAGE``: the generation settings an image carries, as JSON.

Reads the A1111 / Forge / refldm ``parameters`` text (PNG text chunk, or the EXIF UserComment of a
JPEG / WebP) or ComfyUI's ``prompt`` graph; the parsing is refldm/core/pnginfo.py.
"""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "png-info", help="print the generation settings an image carries (A1111, Forge, ComfyUI, refldm) as JSON",
        description="Print, as JSON, the settings stored in an image by AUTOMATIC1111, Forge, ComfyUI or refldm: "
                    "prompt, negative prompt, steps, sampler, schedule, CFG scale, seed, size, model and its hash, "
                    "clip skip, RNG source, ENSD, variation seed, hires fix, LoRAs.")
    p.add_argument("image", help="a PNG (or JPEG / WebP) written by a Stable Diffusion web UI or refldm")
    p.add_argument("--strict", action="store_true",
                   help="exit with an error when a ComfyUI graph has nodes refldm does not run (named)")
    p.add_argument("--model", metavar="FILE",
                   help="also check this checkpoint file against the image's Model hash (a warning when it differs)")
    p.set_defaults(func=run_png_info)


def run_png_info(args) -> int:
    import sys

    from refldm.core import pnginfo

    info = pnginfo.read_image_info(args.image)
    if args.strict and info["unsupported"]:
        raise ValueError(f"{args.image}: the ComfyUI graph has nodes refldm does not run: "
                         f"{', '.join(info['unsupported'])}")
    if args.model:
        recorded = info["settings"].get("model_hash")
        if recorded:
            ok = pnginfo.hash_matches(args.model, recorded)
            info["model_hash_matches"] = ok
            if not ok:
                print(f"refldm: warning: {args.model} has hash {pnginfo.model_hash(args.model)}, the image was made "
                      f"with Model hash {recorded}", file=sys.stderr)
        else:
            info["model_hash"] = pnginfo.model_hash(args.model)
    _control_units(info)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _control_units(info: dict) -> None:
    """sd-webui-controlnet's "ControlNet <i>" fields, also shown parsed under "controlnet" (one entry each)."""
    from refldm.core import pnginfo
    units = []
    for name, text in pnginfo.control_units(info["settings"].get("other", {})):
        try:
            units.append({"field": name, **pnginfo.parse_control_unit(text, name)})
        except ValueError as e:
            units.append({"field": name, "error": str(e)})
    if units:
        info["controlnet"] = units
