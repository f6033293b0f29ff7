"""Generation settings read back from an image: the Stable Diffusion web UIs' ``parameters`` text
(AUTOMATIC1111, Forge, and refldm, which writes the same format) and ComfyUI's embedded ``prompt`` graph.

    from refldm.core.pnginfo import read_image_info, parse_parameters, model_hash
    info = read_image_info("00012-1234.png")     # {"source": "a1111", "settings": {...}, "unsupported": [...]}
    settings = parse_parameters(text)             # the text alone
    model_hash("v1-5-pruned-emaonly.safetensors") # "6ce0161689", the web UI's "Model hash"

**Where the settings are.** A PNG carries text chunks (tEXt / iTXt / zTXt): A1111 and Forge write one
named ``parameters``; ComfyUI writes ``prompt`` (the graph it ran, in its API format: ``{node id:
{"class_type": ..., "inputs": {...}}}``, an input being a value or a link ``[node id, output index]``)
and ``workflow`` (the editor's layout, not read here). In a JPEG or WebP the web UIs put the
``parameters`` text in the EXIF UserComment (tag 0x9286, an 8-byte charset code then the text).

**The parameters text** (A1111 ``modules/infotext_utils.py``, ``parse_generation_parameters``):

    a castle on a hill, <lora:detail:0.6>              <- the prompt (any number of lines)
    Negative prompt: blurry, lowres                     <- from this line on: the negative prompt
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, ...

The last line is a list of ``Name: value`` fields separated by ", "; a value holding a comma, colon or
newline is written JSON-quoted (``Lora hashes: "detail: 0a1b2c3d4e5f"``). The web UI treats a last
line with fewer than three fields as part of the prompt; here a text without a fields line is
refused, since it has no seed to reproduce. Fields are turned into typed settings (``FIELDS``);
fields refldm does not know are kept verbatim under ``other``. Where a field is absent the web UI
assumes a default (``RNG``: GPU, ``Clip skip``: 1, ``ENSD``: 0, ``Variation seed strength``: 0);
those are filled in and named under ``defaults``.

**Model hash.** A1111 (since 2023) writes the first 10 hex digits of the checkpoint file's SHA-256
(:func:`model_hash`); older images carry 8 hex digits of the SHA-256 of 64 KiB read at offset 1 MiB
(:func:`legacy_model_hash`). LoRA hashes (``Lora hashes``) are 12 hex digits of the SHA-256 of a
safetensors file without its header (:func:`lora_hash`, the "addnet" hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

__all__ = ["parse_parameters", "parse_comfyui_prompt", "read_image_info", "read_image_text", "format_parameters",
           "quote_value", "model_hash", "legacy_model_hash", "lora_hash", "hash_matches", "parse_lora_tags",
           "FIELDS", "COMFYUI_NODES", "format_control_unit", "parse_control_unit", "control_units"]


# --------------------------------------------------------------------------------------------------
# The A1111 / Forge parameters text

# one field: a name (word characters, spaces, '-', '/'), a colon, then a JSON-quoted string or text up to ','
_FIELD = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_LORA = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)


def _int(name, low=None, high=None):
    def parse(value):
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not an integer") from None
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{name}: {number} is out of range ({bounds})")
        return number
    return parse


def _float(name, low=None, high=None):
    def parse(value):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a number") from None
        if number != number or (low is not None and number < low) or (high is not None and number > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name}: {number:g} is out of range {bounds}")
        return number
    return parse


def _size(name):
    def parse(value):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{name}: {value!r} is not WIDTHxHEIGHT")
        width, height = int(match.group(1)), int(match.group(2))
        if width < 1 or height < 1:
            raise ValueError(f"{name}: {value.strip()} has a zero side")
        return [width, height]
    return parse


def _text(value):
    return value.strip()


def _upper(value):
    return value.strip().upper()


def _hashes(name):
    """'a: 0123456789ab, b: ...' -> {"a": "0123456789ab", ...} (the web UI's 'Lora hashes', 'TI hashes')."""
    def parse(value):
        out = {}
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, digest = part.rpartition(":")
            if not sep or not key.strip():
                raise ValueError(f"{name}: {part.strip()!r} is not 'name: hash'")
            out[key.strip()] = digest.strip()
        return out
    return parse


# web UI field name -> (settings key, parser); the ranges are the ones the web UI's own controls allow
FIELDS = {
    "Steps": ("steps", _int("Steps", 1, 10000)),
    "Sampler": ("sampler", _text),
    "Schedule type": ("schedule_type", _text),
    "CFG scale": ("cfg_scale", _float("CFG scale", 0.0)),
    "Seed": ("seed", _int("Seed", 0, 2**64 - 1)),
    "Size": ("size", _size("Size")),
    "Model hash": ("model_hash", _text),
    "Model": ("model", _text),
    "VAE hash": ("vae_hash", _text),
    "VAE": ("vae", _text),
    "Clip skip": ("clip_skip", _int("Clip skip", 1, 12)),
    "Denoising strength": ("denoising_strength", _float("Denoising strength", 0.0, 1.0)),
    "RNG": ("rng", _upper),
    "ENSD": ("ensd", _int("ENSD", 0, 2**64 - 1)),
    "Eta": ("eta", _float("Eta", 0.0)),
    "Variation seed": ("variation_seed", _int("Variation seed", 0, 2**64 - 1)),
    "Variation seed strength": ("variation_seed_strength", _float("Variation seed strength", 0.0, 1.0)),
    "Seed resize from": ("seed_resize_from", _size("Seed resize from")),
    "Hires upscale": ("hires_upscale", _float("Hires upscale", 1.0, 8.0)),
    "Hires resize": ("hires_resize", _size("Hires resize")),
    "Hires steps": ("hires_steps", _int("Hires steps", 0, 10000)),
    "Hires upscaler": ("hires_upscaler", _text),
    "Hires sampler": ("hires_sampler", _text),
    "Hires schedule type": ("hires_schedule_type", _text),
    "Hires CFG Scale": ("hires_cfg_scale", _float("Hires CFG Scale", 0.0)),
    "Lora hashes": ("lora_hashes", _hashes("Lora hashes")),
    "TI hashes": ("ti_hashes", _hashes("TI hashes")),
    "Batch size": ("batch_size", _int("Batch size", 1)),
    "Batch pos": ("batch_pos", _int("Batch pos", 0)),
    "Version": ("version", _text),
}
# what the web UI assumes when a field is missing (infotext_utils: "Clip skip" 1, "RNG" GPU, the options' defaults)
DEFAULTS = {"clip_skip": 1, "rng": "GPU", "ensd": 0}
RNG_SOURCES = ("GPU", "CPU", "NV")


def quote_value(value) -> str:
    """A field value as the web UI writes it: JSON-quoted when it holds ',', ':' or a newline, else as is."""
    text = str(value)
    if not any(c in text for c in ',:\n"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_lora_tags(prompt: str) -> list:
    """``<lora:name:weight>`` tags in a prompt (A1111's extra networks; also ``<lyco:...>`` and the
    ``<lora:name:te_weight:unet_weight>`` form) -> [{"name", "weight", "unet_weight"?}, ...], in order.
    The weight defaults to 1 as in the web UI."""
    loras = []
    for kind, name, rest in _LORA.findall(prompt):
        numbers = [p for p in rest.split(":")[1:] if p.strip()]
        entry = {"name": name.strip()}
        try:
            weights = [float(p) for p in numbers if "=" not in p]
        except ValueError:
            raise ValueError(f"prompt: <{kind}:{name}{rest}> has a weight that is not a number") from None
        entry["weight"] = weights[0] if weights else 1.0
        if len(weights) > 1:
            entry["unet_weight"] = weights[1]
        loras.append(entry)
    return loras


def parse_parameters(text: str) -> dict:
    """The web UI's parameters text -> settings (see the module docstring for the format).

    Returns {"prompt", "negative_prompt", "loras", <typed fields by FIELDS' keys>, "width", "height"
    (from Size), "other": {unknown field: text}, "defaults": [keys filled with the web UI's defaults]}.
    Raises ValueError (one line, naming the field) for a text without a fields line, a field given
    twice, a value that does not parse or is out of range, an unknown RNG source.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("parameters: the text is empty")
    lines = text.strip().split("\n")
    fields_line = lines[-1].strip()
    found = _FIELD.findall(fields_line)
    if len(found) < 3 or not any(name.strip() == "Steps" for name, _ in found):
        raise ValueError("parameters: no fields line ('Steps: ..., Sampler: ..., Seed: ...') at the end of the text")
    prompt, negative, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    settings = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    settings["loras"] = parse_lora_tags(settings["prompt"])
    other = {}
    seen = set()
    for name, raw in found:
        name = name.strip()
        if name in seen:
            raise ValueError(f"parameters: the field {name!r} is given twice")
        seen.add(name)
        value = _unquote(raw)
        if name in FIELDS:
            key, parse = FIELDS[name]
            settings[key] = parse(value)
        else:
            other[name] = value
    if "size" in settings:
        settings["width"], settings["height"] = settings.pop("size")
    for required in ("steps", "seed"):
        if required not in settings:
            raise ValueError(f"parameters: the fields line has no {'Steps' if required == 'steps' else 'Seed'} field")
    defaults = []
    for key, value in DEFAULTS.items():
        if key not in settings:
            settings[key] = value
            defaults.append(key)
    if settings["rng"] not in RNG_SOURCES:
        raise ValueError(f"RNG: unknown source {settings['rng']!r}; the web UI writes one of {', '.join(RNG_SOURCES)}")
    if "variation_seed_strength" in settings and "variation_seed" not in settings:
        raise ValueError("parameters: 'Variation seed strength' without a 'Variation seed'")
    settings["other"] = other
    settings["defaults"] = defaults
    return settings


# the settings keys, in the web UI's field order, for writing them back (refldm's own PNGs)
_ORDER = ["steps", "sampler", "schedule_type", "cfg_scale", "seed", "size", "model_hash", "model", "vae_hash", "vae",
          "denoising_strength", "clip_skip", "rng", "ensd", "eta", "variation_seed", "variation_seed_strength",
          "seed_resize_from", "hires_upscale", "hires_resize", "hires_steps", "hires_upscaler", "hires_sampler",
          "hires_schedule_type", "hires_cfg_scale", "lora_hashes", "ti_hashes", "batch_size", "batch_pos", "version"]
_NAMES = {key: name for name, (key, _) in FIELDS.items()}


def format_parameters(settings: dict) -> str:
    """Settings (as :func:`parse_parameters` returns them) -> the web UI's parameters text.

    Fields filled with defaults (listed under ``defaults``) are left out, so parse(format(s)) == s.
    """
    lines = [settings.get("prompt", "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    skip = set(settings.get("defaults", ()))
    values = dict(settings)
    if "width" in values and "height" in values:
        values["size"] = [values["width"], values["height"]]
    fields = []
    for key in _ORDER:
        if key not in values or key in skip or values[key] is None:
            continue
        value = values[key]
        if isinstance(value, list):
            value = f"{value[0]}x{value[1]}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:g}"
        fields.append(f"{_NAMES[key]}: {quote_value(value)}")
    for name, value in settings.get("other", {}).items():
        fields.append(f"{name}: {quote_value(value)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# sd-webui-controlnet's units: "ControlNet 0", "ControlNet 1", ... one field per unit

# Its scripts/infotext.py (serialize_unit) writes each enabled unit as one field named "ControlNet <i>" whose
# value is "Name: value" pairs joined by ", " (the unit's attributes, snake_case turned into Capitalised Words,
# sliders at -1 left out), JSON-quoted as a whole by the web UI:
#     ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and
#     Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0,
#     Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
# Model is "file stem [hash]", the hash A1111's legacy 8-digit one of the model file (`legacy_model_hash`).
# T2I-Adapters are units too (Model: t2iadapter_canny_sd15v2 [...]). Older formats are not read.
_CONTROL_UNIT = re.compile(r"ControlNet (\d+)")


def format_control_unit(model: str, weight: float, module: str = "none", guidance_start: float = 0.0,
                        guidance_end: float = 1.0, resize_mode: str = "Just Resize") -> str:
    """One unit's value as sd-webui-controlnet writes it (above); model: "name [hash]". Floats as Python
    writes them (1.0), as the extension's str() does."""
    items = {"Module": module, "Model": model, "Weight": float(weight), "Resize Mode": resize_mode,
             "Low Vram": False, "Guidance Start": float(guidance_start), "Guidance End": float(guidance_end),
             "Pixel Perfect": False, "Control Mode": "Balanced"}
    for name, value in items.items():
        if any(c in str(value) for c in ",:\n"):
            raise ValueError(f"ControlNet unit: {name} {value!r} holds a comma or colon, which the format cannot carry")
    return ", ".join(f"{name}: {value}" for name, value in items.items())


def _unit_value(value: str):
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_control_unit(text: str, field: str = "ControlNet 0") -> dict:
    """A unit's value -> {"module", "model", "weight", "guidance_start", ...} (Capitalised Words back to
    snake_case, "True"/"False" and numbers typed); "model" "name [hash]" also gives "model_name" and
    "model_hash". Raises ValueError naming `field` for text that is not "Name: value" pairs or lacks Model."""
    unit = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition(": ")
        if not sep or not name:
            raise ValueError(f"{field}: {item.strip()!r} is not 'Name: value' (an older sd-webui-controlnet "
                             "format, not read)")
        unit["_".join(w.lower() for w in name.split(" "))] = _unit_value(value.strip())
    if "model" not in unit:
        raise ValueError(f"{field}: the unit names no Model")
    match = re.fullmatch(r"(.*?)\s*\[([0-9a-fA-F]+)\]", str(unit["model"]))
    unit["model_name"], unit["model_hash"] = (match.group(1), match.group(2)) if match else (str(unit["model"]), None)
    return unit


def control_units(other: dict) -> list:
    """The "ControlNet <i>" fields of a parsed text's ``other`` -> [(field name, its text)], by index."""
    found = [(int(m.group(1)), k) for k in other for m in [_CONTROL_UNIT.fullmatch(k)] if m]
    return [(k, other[k]) for _, k in sorted(found)]


# --------------------------------------------------------------------------------------------------
# ComfyUI's prompt graph

# the node types read here -> what they give; any other node type is reported as unsupported, by id and type
COMFYUI_NODES = {
    "CheckpointLoaderSimple": "the checkpoint (ckpt_name)",
    "CLIPTextEncode": "a prompt (text)",
    "CLIPSetLastLayer": "clip skip (stop_at_clip_layer = -clip skip)",
    "EmptyLatentImage": "width, height, batch_size",
    "KSampler": "seed, steps, cfg, sampler_name, scheduler, denoise",
    "KSamplerAdvanced": "noise_seed, steps, cfg, sampler_name, scheduler, add_noise, start/end step",
    "LoraLoader": "a LoRA (lora_name, strength_model, strength_clip)",
    "LoraLoaderModelOnly": "a LoRA on the U-Net only (lora_name, strength_model)",
    "VAEDecode": "the decode of the final latent",
    "VAELoader": "a separate VAE (vae_name)",
    "LatentUpscale": "a latent resize between passes (upscale_method, width, height)",
    "LatentUpscaleBy": "a latent resize between passes (upscale_method, scale_by)",
    "SaveImage": "output", "PreviewImage": "output",
}


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int))


class _Graph:
    def __init__(self, graph: dict):
        if not isinstance(graph, dict) or not graph:
            raise ValueError("prompt: the ComfyUI graph is not a JSON object of nodes")
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs", {}), dict):
                raise ValueError(f"prompt: node {node_id} has no class_type / inputs")
        self.nodes = graph
        self.unsupported = sorted({f"{i}: {n['class_type']}" for i, n in graph.items()
                                   if n["class_type"] not in COMFYUI_NODES}, key=_node_order)

    def node(self, link, what):
        node_id = str(link[0])
        if node_id not in self.nodes:
            raise ValueError(f"prompt: {what} links to node {node_id}, which the graph does not have")
        return node_id, self.nodes[node_id]

    def value(self, node_id, name, kind=None):
        """An input's literal value; a link to another node (a primitive, a custom node) is followed through
        nodes that pass a value on unchanged ('value' / 'seed' / 'text' inputs) and else named."""
        node = self.nodes[node_id]
        inputs = node.get("inputs", {})
        if name not in inputs:
            raise ValueError(f"prompt: node {node_id} ({node['class_type']}) has no input {name!r}")
        value = inputs[name]
        hops = 0
        while _is_link(value) and hops < 16:
            src_id, src = self.node(value, f"node {node_id} input {name!r}")
            candidates = [v for k, v in src.get("inputs", {}).items() if k in (name, "value", "seed", "text", "int",
                                                                            "float", "string")]
            if len(candidates) != 1:
                raise ValueError(f"prompt: node {node_id} input {name!r} comes from node {src_id} "
                                 f"({src['class_type']}), which refldm cannot evaluate")
            value, hops = candidates[0], hops + 1
        if kind is not None:
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"prompt: node {node_id} input {name!r} = {value!r} "
                                 f"is not a {kind.__name__}") from None
        return value

    def text(self, link, what):
        """The prompt text of a conditioning link (a CLIPTextEncode; anything else is named)."""
        if not _is_link(link):
            raise ValueError(f"prompt: the {what} is not linked to a node")
        node_id, node = self.node(link, what)
        if node["class_type"] != "CLIPTextEncode":
            raise ValueError(f"prompt: the {what} comes from node {node_id} ({node['class_type']}), "
                             "not a CLIPTextEncode")
        return self.value(node_id, "text", str)


def _node_order(label: str):
    head = label.split(":", 1)[0]
    return (0, int(head), label) if head.isdigit() else (1, 0, label)


def _range_check(sampler: dict, node_id: str, kind: str) -> None:
    checks = [("steps", 1, 10000), ("cfg", 0.0, None), ("denoise", 0.0, 1.0), ("seed", 0, 2**64 - 1)]
    for key, low, high in checks:
        if key in sampler and sampler[key] is not None:
            v = sampler[key]
            if v < low or (high is not None and v > high):
                bounds = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"prompt: node {node_id} ({kind}) {key} = {v} is out of range ({bounds})")


def parse_comfyui_prompt(graph) -> dict:
    """ComfyUI's API-format ``prompt`` graph (a dict, or its JSON text) -> settings.

    The sampler nodes (KSampler / KSamplerAdvanced) are ordered along their latent links, first pass
    first (a second pass on an upscaled latent is ComfyUI's hires fix). For each: seed, steps, cfg,
    sampler and scheduler names (ComfyUI's), denoise, the positive and negative prompt texts, where its
    latent comes from; the checkpoint and LoRAs are read along the model link, clip skip along the clip
    link of the first prompt. The top-level keys are those of the first pass, named as the A1111 parser
    names them (prompt, negative_prompt, steps, seed, cfg_scale, sampler, scheduler, width, height, ...);
    "passes" lists every pass, "unsupported" every node type not in COMFYUI_NODES ("id: ClassType").
    ComfyUI draws its initial noise on the CPU (torch's generator), so "rng" is "CPU".
    """
    if isinstance(graph, (str, bytes)):
        try:
            graph = json.loads(graph)
        except ValueError as e:
            raise ValueError(f"prompt: not JSON ({e})") from None
    g = _Graph(graph)
    samplers = {i: n for i, n in g.nodes.items() if n["class_type"] in ("KSampler", "KSamplerAdvanced")}
    if not samplers:
        raise ValueError("prompt: the ComfyUI graph has no KSampler or KSamplerAdvanced node")

    passes = {}
    for node_id, node in samplers.items():
        kind = node["class_type"]
        inputs = node.get("inputs", {})
        p = {"node": node_id, "class_type": kind}
        p["seed"] = g.value(node_id, "seed" if kind == "KSampler" else "noise_seed", int)
        p["steps"] = g.value(node_id, "steps", int)
        p["cfg"] = g.value(node_id, "cfg", float)
        p["sampler_name"] = g.value(node_id, "sampler_name", str)
        p["scheduler"] = g.value(node_id, "scheduler", str)
        if kind == "KSampler":
            p["denoise"] = g.value(node_id, "denoise", float) if "denoise" in inputs else 1.0
        else:
            p["add_noise"] = g.value(node_id, "add_noise", str) == "enable"
            p["start_at_step"] = g.value(node_id, "start_at_step", int)
            p["end_at_step"] = g.value(node_id, "end_at_step", int)
            p["return_with_leftover_noise"] = g.value(node_id, "return_with_leftover_noise", str) == "enable"
        _range_check(p, node_id, kind)
        p["prompt"] = g.text(inputs.get("positive"), f"positive prompt of node {node_id}")
        p["negative_prompt"] = g.text(inputs.get("negative"), f"negative prompt of node {node_id}")
        latent = inputs.get("latent_image")
        if not _is_link(latent):
            raise ValueError(f"prompt: node {node_id} ({kind}) has no latent_image link")
        src_id, src = g.node(latent, f"latent_image of node {node_id}")
        p["latent_from"] = f"{src_id}: {src['class_type']}"
        if src["class_type"] == "EmptyLatentImage":
            p["width"] = g.value(src_id, "width", int)
            p["height"] = g.value(src_id, "height", int)
            p["batch_size"] = g.value(src_id, "batch_size", int) if "batch_size" in src["inputs"] else 1
            for key in ("width", "height"):
                if p[key] < 8 or p[key] % 8:
                    raise ValueError(f"prompt: node {src_id} (EmptyLatentImage) {key} = {p[key]} is not a positive "
                                     "multiple of 8")
        elif src["class_type"] == "LatentUpscale":
            p["upscale"] = {"method": g.value(src_id, "upscale_method", str), "width": g.value(src_id, "width", int),
                            "height": g.value(src_id, "height", int),
                            "crop": g.value(src_id, "crop", str) if "crop" in src["inputs"] else "disabled"}
            p["_upstream"] = str(src["inputs"]["samples"][0]) if _is_link(src["inputs"].get("samples")) else None
        elif src["class_type"] == "LatentUpscaleBy":
            p["upscale"] = {"method": g.value(src_id, "upscale_method", str),
                            "scale_by": g.value(src_id, "scale_by", float)}
            p["_upstream"] = str(src["inputs"]["samples"][0]) if _is_link(src["inputs"].get("samples")) else None
        elif src["class_type"] in ("KSampler", "KSamplerAdvanced"):
            p["_upstream"] = src_id
        # the model chain: LoRA loaders down to the checkpoint loader
        loras, link, hops = [], inputs.get("model"), 0
        while _is_link(link) and hops < 64:
            mid, mnode = g.node(link, f"model of node {node_id}")
            if mnode["class_type"] in ("LoraLoader", "LoraLoaderModelOnly"):
                entry = {"name": g.value(mid, "lora_name", str),
                         "strength_model": g.value(mid, "strength_model", float)}
                if mnode["class_type"] == "LoraLoader":
                    entry["strength_clip"] = g.value(mid, "strength_clip", float)
                loras.append(entry)
                link = mnode["inputs"].get("model")
            elif mnode["class_type"] == "CheckpointLoaderSimple":
                p["model"] = g.value(mid, "ckpt_name", str)
                break
            else:
                p["model_from"] = f"{mid}: {mnode['class_type']}"
                break
            hops += 1
        p["loras"] = loras[::-1]  # nearest the checkpoint first
        # clip skip along the positive prompt's clip link
        pos_id, pos = g.node(inputs["positive"], f"positive prompt of node {node_id}")
        link, hops = pos["inputs"].get("clip"), 0
        while _is_link(link) and hops < 64:
            cid, cnode = g.node(link, f"clip of node {pos_id}")
            if cnode["class_type"] == "CLIPSetLastLayer":
                layer = g.value(cid, "stop_at_clip_layer", int)
                if layer > -1:
                    raise ValueError(f"prompt: node {cid} (CLIPSetLastLayer) stop_at_clip_layer = {layer} is out "
                                     "of range (<= -1)")
                p.setdefault("clip_skip", -layer)
            if cnode["class_type"] not in ("CLIPSetLastLayer", "LoraLoader"):
                break
            link, hops = cnode["inputs"].get("clip"), hops + 1
        p.setdefault("clip_skip", 1)
        passes[node_id] = p

    # order the passes along the latent links: a pass whose latent comes from no other pass is first
    order, placed = [], set()
    while len(order) < len(passes):
        ready = [i for i, p in passes.items() if i not in placed and (p.get("_upstream") not in passes
                                                                      or p.get("_upstream") in placed)]
        if not ready:
            raise ValueError("prompt: the sampler nodes' latent links form a cycle")
        ready.sort(key=lambda i: _node_order(i + ":"))
        order.append(ready[0])
        placed.add(ready[0])
    first = passes[order[0]]
    settings = {"prompt": first["prompt"], "negative_prompt": first["negative_prompt"], "seed": first["seed"],
                "steps": first["steps"], "cfg_scale": first["cfg"], "sampler": first["sampler_name"],
                "scheduler": first["scheduler"], "denoising_strength": first.get("denoise", 1.0)}
    for key in ("width", "height", "batch_size", "model", "clip_skip"):
        if key in first:
            settings[key] = first[key]
    settings["loras"] = first["loras"]
    vaes = sorted(g.value(i, "vae_name", str) for i, n in g.nodes.items() if n["class_type"] == "VAELoader")
    if vaes:
        settings["vae"] = vaes[0] if len(vaes) == 1 else vaes
    settings["rng"] = "CPU"
    for p in passes.values():
        p.pop("_upstream", None)
    settings["passes"] = [passes[i] for i in order]
    settings["unsupported"] = g.unsupported
    return settings


# ComfyUI's latent upscale methods that are the web UI's latent upscalers (torch's interpolate, no antialias)
COMFYUI_UPSCALERS = {"bilinear": "Latent", "bicubic": "Latent (bicubic)", "nearest-exact": "Latent (nearest-exact)"}
_SAME = ("prompt", "negative_prompt", "cfg", "sampler_name", "scheduler", "model", "loras", "clip_skip")


def _runs_whole_schedule(p: dict) -> bool:
    """A first pass from pure noise over the whole schedule (KSampler denoise 1, or KSamplerAdvanced 0 .. end)."""
    if p["class_type"] == "KSampler":
        return p["denoise"] > 0.9999
    return p["add_noise"] and p["start_at_step"] == 0 and p["end_at_step"] >= p["steps"]


def comfyui_passes(settings: dict) -> tuple:
    """(pipeline keyword arguments, what cannot be run) for the sampler passes of a ComfyUI graph
    (`parse_comfyui_prompt`'s "passes"). One pass over the whole schedule: nothing to add. Two passes, the
    second on the first's latents, resized or not (LatentUpscale / LatentUpscaleBy with bilinear, bicubic or
    nearest-exact, no crop), with the same prompts, CFG, sampler, scheduler, model, LoRAs and clip skip,
    map onto the hires pass (`refldm.pipelines.common.hires_pass`, ``hires_comfyui``):

        KSampler (denoise 1) -> [upscale] -> KSampler (denoise d)                 ComfyUI's "hires fix"
        KSamplerAdvanced (add_noise, 0 .. k, return_with_leftover_noise)
            -> [upscale] -> KSamplerAdvanced (no add_noise, k .. end, the same steps)   a split schedule

    Anything else is named, one entry per reason ("node 7 (KSampler): another cfg than node 3")."""
    passes = settings.get("passes", [])
    if not passes:
        return {}, []
    first = passes[0]
    label = (lambda p: f"node {p['node']} ({p['class_type']})")
    problems = []
    if len(passes) == 1:
        if not _runs_whole_schedule(first):
            problems.append(_partial(first, label(first)))
        return {}, [m for m in problems if m]
    if len(passes) > 2:
        return {}, [f"{len(passes) - 1} further sampler passes after {label(first)} (refldm runs one more: "
                    "ComfyUI's hires fix or a split schedule)"]
    second = passes[1]
    problems += [f"{label(second)}: another {key} than node {first['node']}" for key in _SAME
                 if second.get(key) != first.get(key)]
    width, height = first.get("width"), first.get("height")
    if width is None or height is None:
        problems.append(f"{label(first)}: its latent is not an EmptyLatentImage")
        return {}, problems
    up = second.get("upscale")
    size, upscaler = (width, height), "Latent"
    if up is not None:
        if up["method"] not in COMFYUI_UPSCALERS:
            problems.append(f"{label(second)}: latent upscale_method {up['method']!r} (refldm has "
                            f"{', '.join(COMFYUI_UPSCALERS)})")
        upscaler = COMFYUI_UPSCALERS.get(up["method"], "Latent")
        if up.get("crop", "disabled") != "disabled":
            problems.append(f"{label(second)}: latent upscale crop {up['crop']!r}")
        if "scale_by" in up:
            size = (round(width // 8 * up["scale_by"]) * 8, round(height // 8 * up["scale_by"]) * 8)
        else:
            size = (up["width"] // 8 * 8, up["height"] // 8 * 8)
        if min(size) < 8:
            problems.append(f"{label(second)}: latent upscale to {up.get('width')}x{up.get('height')}")
    elif not second.get("latent_from", "").endswith(("KSampler", "KSamplerAdvanced")):
        problems.append(f"{label(second)}: its latent comes from {second.get('latent_from')}")
    kwargs = {"hires_scale": size[0] / width, "hires_steps": second["steps"], "hires_upscaler": upscaler}
    comfy = {"seed": second["seed"], "size": size}
    if first["class_type"] == "KSampler" and second["class_type"] == "KSampler":
        if not _runs_whole_schedule(first):
            problems.append(_partial(first, label(first)))
        kwargs["hires_denoise"] = second["denoise"]
    elif first["class_type"] == second["class_type"] == "KSamplerAdvanced":
        k = first["end_at_step"]
        split = (first["add_noise"] and first["start_at_step"] == 0 and 0 < k < first["steps"]
                 and first["return_with_leftover_noise"] and not second["add_noise"]
                 and second["start_at_step"] == k and second["end_at_step"] >= second["steps"] == first["steps"])
        if not split:
            problems.append(f"{label(first)} -> {label(second)}: only a split schedule (0 .. k with leftover noise, "
                            "then k .. end without add_noise, the same steps) runs as two KSamplerAdvanced passes")
        kwargs["hires_denoise"] = 1.0
        comfy["start"] = k
    else:
        problems.append(f"{label(first)} -> {label(second)}: a KSampler and a KSamplerAdvanced pass together")
    kwargs["hires_comfyui"] = comfy
    return kwargs, problems


def _partial(p: dict, label: str) -> str:
    if p["class_type"] == "KSampler":
        return f"{label}: denoise {p['denoise']:g} on an empty latent"
    return (f"{label}: add_noise {'enable' if p['add_noise'] else 'disable'}, steps {p['start_at_step']} .. "
            f"{p['end_at_step']} of {p['steps']} (refldm runs a first pass from pure noise over all steps)")


# --------------------------------------------------------------------------------------------------
# Reading an image file

def read_image_text(path) -> dict:
    """The text an image carries: its PNG text chunks (tEXt, zTXt, iTXt) by keyword, and for JPEG / WebP
    the EXIF UserComment as "parameters". One clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            texts = {k: v for k, v in getattr(im, "text", {}).items()} if hasattr(im, "text") else {}
            for key, value in im.info.items():
                if isinstance(value, str) and key not in texts:
                    texts[key] = value
            comment = im.getexif().get_ifd(0x8769).get(0x9286) if not texts.get("parameters") else None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if comment:
        texts["parameters"] = _user_comment(comment)
    return texts


def _user_comment(raw) -> str:
    """EXIF UserComment: an 8-byte charset code ("UNICODE\\0", "ASCII\\0\\0\\0") then the text."""
    if isinstance(raw, str):
        return raw
    code, body = bytes(raw[:8]), bytes(raw[8:])
    if code.startswith(b"UNICODE"):
        big = len(body) >= 2 and body[0] == 0 and body[1] != 0
        little = len(body) >= 2 and body[1] == 0 and body[0] != 0
        encoding = "utf-16-le" if little and not big else "utf-16-be"
        return body.decode(encoding, errors="replace")
    return body.decode("utf-8", errors="replace").rstrip("\0")


def read_image_info(path) -> dict:
    """The generation settings an image carries -> {"file", "source", "settings", "unsupported"}.

    source "a1111" for a parameters text (A1111, Forge, refldm: the same format; "forge" when its
    Version field says so), "comfyui" for a prompt graph. Raises ValueError naming the file when it
    carries neither (listing the text chunks it does have) or when what it carries does not parse.
    """
    texts = read_image_text(path)
    path = os.fspath(path)
    try:
        if texts.get("parameters", "").strip():
            settings = parse_parameters(texts["parameters"])
            version = settings.get("version", "")
            source = ("forge" if version.startswith("f") and "v1." in version else
                      "refldm" if version.startswith("refldm") else "a1111")
            return {"file": path, "source": source, "settings": settings, "unsupported": []}
        if texts.get("prompt", "").strip():
            settings = parse_comfyui_prompt(texts["prompt"])
            return {"file": path, "source": "comfyui", "settings": settings,
                    "unsupported": settings.pop("unsupported")}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    found = ", ".join(sorted(texts)) or "none"
    raise ValueError(f"{path}: no generation parameters (no 'parameters' text, no ComfyUI 'prompt' graph; "
                     f"text chunks: {found})")


# --------------------------------------------------------------------------------------------------
# Hashes of checkpoint files, as the web UIs write them

def _sha256(path, start: int = 0, length: int | None = None) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left is None or left > 0:
                chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
                if not chunk:
                    break
                digest.update(chunk)
                if left is not None:
                    left -= len(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder; give the checkpoint file") from None
    return digest.hexdigest()


def model_hash(path) -> str:
    """A1111's "Model hash": the first 10 hex digits of SHA-256 over the whole checkpoint file
    (``modules/hashes.py`` sha256, ``shorthash``)."""
    return _sha256(path)[:10]


def legacy_model_hash(path) -> str:
    """The "Model hash" of images made before 2023: 8 hex digits of SHA-256 over the 64 KiB
    at byte offset 0x100000 of the file (A1111 ``sd_models.model_hash``)."""
    return _sha256(path, 0x100000, 0x10000)[:8]


def lora_hash(path) -> str:
    """A1111's LoRA short hash ("Lora hashes"): the first 12 hex digits of SHA-256 over a safetensors
    file after its header (8-byte length + JSON header skipped: the "addnet" hash); other files whole."""
    path = os.fspath(path)
    start = 0
    if path.endswith(".safetensors"):
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        if len(head) < 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        start = 8 + int.from_bytes(head, "little")
    return _sha256(path, start)[:12]


def hash_matches(path, recorded: str) -> bool:
    """Whether a checkpoint file has the recorded "Model hash": 10 digits, the new hash; 8, the legacy one."""
    recorded = recorded.strip().lower()
    if len(recorded) == 8:
        return legacy_model_hash(path) == recorded
    return model_hash(path)[:len(recorded)] == recorded if recorded else False
