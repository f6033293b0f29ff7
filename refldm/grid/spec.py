"""The grid's specification: its axes, parsed and checked, and its cells, each with every setting it runs with.

An axis is ``KIND=V1,V2,...`` (the web UI's X/Y/Z plot; values split as CSV, so a value holding a comma is
written in double quotes). The kinds:

    sampler     a sampler name (`refldm samplers`)      steps    denoising steps (>= 1)
    cfg         guidance scale in [0, 100]              seed     noise seed in 0..2**64-1
    prompt      search / replace ("Prompt S/R"): the first value is searched in the prompt (and the negative
                prompt), each value replaces it; the first cell keeps the prompt as written
    lora        the scale of the LoRA given with the grid (`lora=`; 0 runs without it)
    size        WIDTHxHEIGHT, multiples of 8               denoise  strength in (0, 1]: img2img's (with an image)
    clip_skip   diffusers' clip_skip (0: the last layer)            or the hires fix's (with hires_scale)
    checkpoint  a model folder or .safetensors file ("builtin": the model shipped with refldm)
    dtype       float32 | float64 | float16               accel    speed | reference (the host speed layer or
    rng         cpu | cuda (the web UI's CPU / NV noise)           the pure reference ops)

Every value of every axis is checked before any work (`GridSpec.cells` raises ValueError, one line naming the
axis and the value). A cell's settings are a plain dict (JSON-able): its noise comes from them alone (its seed,
rng, size), never from the order the cells run in, so every executor gives the same images.

May import: refldm.pipelines, refldm.schedulers, refldm.adapters, refldm.errors, refldm.about, refldm.files
(the grid package's rule, refldm/grid/__init__.py).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

from refldm.errors import TooLargeError

__all__ = ["Axis", "GridSpec", "Cell", "parse_axis", "KINDS", "MAX_CELLS"]

MAX_CELLS = 100  # a larger grid runs only with yes=True (--yes)

KINDS = ("sampler", "steps", "cfg", "seed", "prompt", "lora", "size", "denoise", "clip_skip", "checkpoint",
         "dtype", "accel", "rng")
ALIASES = {"cfg scale": "cfg", "cfg_scale": "cfg", "guidance": "cfg", "prompt s/r": "prompt", "prompt_sr": "prompt",
           "denoising": "denoise", "denoising strength": "denoise", "strength": "denoise", "clip skip": "clip_skip",
           "clip-skip": "clip_skip", "model": "checkpoint", "checkpoint name": "checkpoint", "ops": "accel",
           "lora scale": "lora", "rng source": "rng"}
DTYPES = ("float32", "float64", "float16")
ACCEL = {"speed": True, "reference": False}
BUILTIN = "builtin"  # the checkpoint axis' name for the model shipped inside refldm


@dataclass(frozen=True)
class Axis:
    """One axis: which grid direction (x, y, z), its kind, the values as typed, and as the cells take them."""

    name: str
    kind: str
    labels: tuple
    values: tuple

    def label(self, i: int) -> str:
        return f"{self.kind}: {self.labels[i]}"


def _split_values(text: str) -> list:
    return [v.strip() for v in next(csv.reader([text], skipinitialspace=True), [])]


def parse_axis(name: str, text) -> Axis:
    """``"steps=10,20"`` (or ``("steps", [10, 20])``) -> Axis, every value checked (ValueError, one line)."""
    where = f"--{name}"
    if isinstance(text, (tuple, list)):
        kind, raw = text[0], [str(v) for v in text[1]]
    else:
        kind, sep, rest = str(text).partition("=")
        if not sep:
            raise ValueError(f"{where} {text!r}: give KIND=V1,V2,... (kinds: {', '.join(KINDS)})")
        raw = _split_values(rest) if rest.strip() else []
    kind = kind.strip().lower()
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown axis kind {kind!r}; choose one of {', '.join(KINDS)}")
    where = f"{where} {kind}"
    if not raw:
        raise ValueError(f"{where}: the axis has no values")
    if kind == "prompt" and len(raw) < 2:
        raise ValueError(f"{where}: give the text to search and at least one replacement (prompt=dog,cat)")
    values = []
    for i, value in enumerate(raw):
        if value == "" and not (kind == "prompt" and i > 0):
            raise ValueError(f"{where}: value {i + 1} is empty")
        try:
            values.append(_PARSERS[kind](value))
        except ValueError as e:
            raise ValueError(f"{where}: {value!r}: {str(e).splitlines()[0]}") from None
    return Axis(name, kind, tuple(raw), tuple(values))


def _integer(value: str, low: int, high: int | None = None) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError("not an integer") from None
    if n < low or (high is not None and n > high):
        raise ValueError(f"must be >= {low}" if high is None else f"must lie in {low}..{high}")
    return n


def _number(value: str, low: float, high: float, *, open_low: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(x) or x > high or x < low or (open_low and x == low):
        raise ValueError(f"must lie in {'(' if open_low else '['}{low:g}, {high:g}]")
    return x


def _sampler(value: str) -> str:
    from refldm.schedulers import names
    names.resolve(value)  # unknown / unimplemented names: its message, first line
    return value


def _size(value: str) -> tuple:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match:
        raise ValueError("give WIDTHxHEIGHT, e.g. 512x512")
    w, h = int(match.group(1)), int(match.group(2))
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise ValueError("the sides must be positive multiples of 8")
    return w, h


def _checkpoint(value: str):
    if value.lower() == BUILTIN:
        return None
    if not os.path.exists(value):
        raise ValueError("no such model folder or file")
    if os.path.isfile(value) and not value.lower().endswith(".safetensors"):
        raise ValueError("not a model folder nor a .safetensors file")
    return value


def _choice(options):
    def parse(value):
        key = value.strip().lower()
        if key not in options:
            raise ValueError(f"choose one of {', '.join(options)}")
        return key
    return parse


def _rng(value: str) -> str:
    from refldm.pipelines.common import check_rng
    try:
        check_rng(value)
    except ValueError:
        raise ValueError("unknown random source; choose cpu or cuda (the web UI's CPU, NV, GPU are taken too)") \
            from None
    return value.strip().lower()


def _seed(value: str) -> int:
    from refldm.pipelines.common import SEED_MAX
    return _integer(value, 0, SEED_MAX)


def _lora(value: str) -> float:
    from refldm.adapters.lora import MAX_ALPHA
    return _number(value, -MAX_ALPHA, MAX_ALPHA)


_PARSERS = {
    "sampler": _sampler, "steps": lambda v: _integer(v, 1, 10000), "cfg": lambda v: _number(v, 0.0, 100.0),
    "seed": _seed, "prompt": str, "lora": _lora, "size": _size,
    "denoise": lambda v: _number(v, 0.0, 1.0, open_low=True), "clip_skip": lambda v: _integer(v, 0, 48),
    "checkpoint": _checkpoint, "dtype": _choice(DTYPES), "accel": _choice(tuple(ACCEL)), "rng": _rng,
}


@dataclass
class Cell:
    """One cell: its place (ix, iy, iz), its settings (a JSON-able dict), its file name in the output folder."""

    index: int
    ix: int
    iy: int
    iz: int
    settings: dict

    @property
    def file(self) -> str:
        return f"z{self.iz:02d}-y{self.iy:02d}-x{self.ix:02d}.png"

    def key(self) -> str:
        """The settings as canonical JSON: what a cell's PNG carries and --resume compares."""
        return json.dumps(self.settings, sort_keys=True, separators=(",", ":"))

    def model_key(self) -> tuple:
        """The loaded model a cell needs (cells are run grouped by it)."""
        s = self.settings
        return (s["checkpoint"] or "", s["dtype"], s["image"] is not None)


@dataclass
class GridSpec:
    """A grid: the base settings every cell starts from, and up to three axes (``"KIND=V1,V2"`` each).

    prompt / negative / steps / cfg / seed / sampler / width / height: as txt2img's; model: a folder or a
    .safetensors file (None: the built-in model); lora (a .safetensors file) at lora_scale; clip_skip; rng
    ("cpu" | "cuda"; None: diffusers' noise); accel (True: the speed layer, False: the reference ops, None: as
    the process is); image (a path: img2img at strength `denoise`, default 0.75); hires_scale (the hires fix,
    its denoising strength `denoise`); out: the output folder; max_cells: the largest grid run without yes.
    """

    prompt: str
    x: object = None
    y: object = None
    z: object = None
    negative: str | None = None
    model: str | None = None
    dtype: str = "float32"
    steps: int = 20
    cfg: float = 7.5
    seed: int = 0
    sampler: str | None = None
    width: int | None = None
    height: int | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    clip_skip: int | None = None
    rng: str | None = None
    accel: bool | None = None
    image: str | None = None
    denoise: float | None = None
    hires_scale: float | None = None
    out: str = "refldm-grid"
    max_cells: int = MAX_CELLS
    extra: dict = field(default_factory=dict)  # further pipeline keyword arguments (JSON values), every cell

    def axes(self) -> list:
        """The parsed axes, in x, y, z order (those given); ValueError names the first bad one."""
        found = [parse_axis(name, getattr(self, name)) for name in ("x", "y", "z") if getattr(self, name)]
        if not found:
            raise ValueError("give at least one axis: --x KIND=V1,V2,... (kinds: " + ", ".join(KINDS) + ")")
        seen = {}
        for axis in found:
            if axis.kind in seen:
                raise ValueError(f"--{seen[axis.kind]} and --{axis.name} both vary {axis.kind}; one axis per kind")
            seen[axis.kind] = axis.name
        return found

    def _base(self) -> dict:
        from refldm.pipelines.common import check_guidance, check_seed, check_steps
        check_seed(self.seed, "seed")
        check_steps(self.steps, "steps")
        check_guidance(self.cfg, "cfg")
        if self.sampler is not None:
            _sampler(self.sampler)
        for flag in ("width", "height"):
            value = getattr(self, flag)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{flag} must be a positive multiple of 8, got {value}")
        for name, value, low, high, open_low in (("denoise", self.denoise, 0.0, 1.0, True),
                                                 ("hires_scale", self.hires_scale, 1.0, 8.0, False),
                                                 ("lora_scale", self.lora_scale, -1e6, 1e6, False)):
            if value is not None:
                try:
                    _number(str(value), low, high, open_low=open_low)
                except ValueError as e:
                    raise ValueError(f"{name} {value!r}: {e}") from None
        if self.denoise is not None and self.image is None and self.hires_scale is None:
            raise ValueError("denoise (--strength) needs an image (-i IMAGE, img2img) or hires_scale (--hires-scale)")
        if self.clip_skip is not None and not (isinstance(self.clip_skip, int) and self.clip_skip >= 0):
            raise ValueError(f"clip_skip must be an integer >= 0, got {self.clip_skip!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.model is not None:
            _checkpoint_named(self.model, "model")
        if self.lora is not None and not os.path.isfile(self.lora):
            raise ValueError(f"lora {self.lora}: no such file")
        image_hash = None
        if self.image is not None:
            if not os.path.isfile(self.image):
                raise ValueError(f"image {self.image}: no such file")
            with open(self.image, "rb") as f:
                image_hash = hashlib.sha256(f.read()).hexdigest()
        return {"prompt": self.prompt, "negative": self.negative, "steps": int(self.steps), "cfg": float(self.cfg),
                "seed": int(self.seed), "sampler": self.sampler, "width": self.width, "height": self.height,
                "checkpoint": self.model, "dtype": self.dtype, "lora": self.lora,
                "lora_scale": float(self.lora_scale), "clip_skip": self.clip_skip,
                "rng": None if self.rng is None else _rng(self.rng),
                "accel": None if self.accel is None else ("speed" if self.accel else "reference"),
                "image": self.image, "image_sha256": image_hash, "denoise": self.denoise,
                "hires_scale": self.hires_scale, "extra": dict(self.extra)}

    def cells(self, yes: bool = False) -> tuple:
        """(axes, cells): the whole grid, every value checked, before any work. A grid of more than max_cells
        cells is refused (TooLargeError) unless `yes`."""
        axes = self.axes()
        base = self._base()
        shape = [len(a.values) for a in axes] + [1] * (3 - len(axes))
        total = shape[0] * shape[1] * shape[2]
        if total > self.max_cells and not yes:
            dims = " x ".join(f"{len(a.values)} {a.kind}" for a in axes)
            raise TooLargeError(f"the grid has {total} cells ({dims}), more than {self.max_cells}; give --yes "
                                "(yes=True) to run it")
        for axis in axes:
            _check_axis_fits(axis, base)
        out = []
        for iz in range(shape[2]):
            for iy in range(shape[1]):
                for ix in range(shape[0]):
                    settings = dict(base)
                    for axis, i in zip(axes, (ix, iy, iz)):
                        _apply(settings, axis, i)
                    _check_cell(settings, axes, (ix, iy, iz))
                    out.append(Cell(len(out), ix, iy, iz, settings))
        return axes, out

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _checkpoint_named(value, name):
    try:
        return _checkpoint(value)
    except ValueError as e:
        raise ValueError(f"{name} {value}: {e}") from None


def _check_axis_fits(axis: Axis, base: dict) -> None:
    """What an axis needs from the base settings (the LoRA file, an image or the hires fix, the text to search)."""
    where = f"--{axis.name} {axis.kind}"
    if axis.kind == "lora" and base["lora"] is None:
        raise ValueError(f"{where}: give the LoRA file (--lora FILE); the axis sets its scale")
    if axis.kind == "denoise" and base["image"] is None and base["hires_scale"] is None:
        raise ValueError(f"{where}: the denoising strength needs an image (-i IMAGE, img2img) or --hires-scale")
    if axis.kind == "prompt":
        search = axis.values[0]
        if search not in base["prompt"] and search not in (base["negative"] or ""):
            raise ValueError(f"{where}: {search!r} does not occur in the prompt (the first value is searched)")


def _check_cell(settings: dict, axes, at) -> None:
    """What only the combination decides: the hires fix's final size (multiples of 8)."""
    if settings["hires_scale"] is not None and settings["width"] and settings["height"]:
        from refldm.pipelines.common import check_hires
        try:
            check_hires(settings["hires_scale"], None, settings["denoise"], None, settings["height"],
                        settings["width"])
        except ValueError as e:
            where = ", ".join(a.label(i) for a, i in zip(axes, at))
            raise ValueError(f"the cell {where}: {e}") from None


def _apply(settings: dict, axis: Axis, i: int) -> None:
    value = axis.values[i]
    if axis.kind == "prompt":
        search = axis.values[0]
        settings["prompt"] = settings["prompt"].replace(search, value)
        if settings["negative"]:
            settings["negative"] = settings["negative"].replace(search, value)
    elif axis.kind == "size":
        settings["width"], settings["height"] = value
    elif axis.kind == "lora":
        settings["lora_scale"] = value
    elif axis.kind == "checkpoint":
        settings["checkpoint"] = value
    elif axis.kind == "clip_skip":
        settings["clip_skip"] = value or None
    else:
        settings[axis.kind] = value
