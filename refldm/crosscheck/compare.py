"""Comparing two traces layer by layer: which layer first goes wrong, which is worst, where error grows.

For every activation name the two traces share, with `b` the reference (a golden float64 trace, or
diffusers), in `a`'s execution order:

    max_abs = max |a - b|                 (computed in float64)
    rel     = max |a - b| / max |b|       (the house definition of relative error)
    growth  = rel / max(rel of every earlier layer)

A layer is *over tolerance* when rel > rtol (or a non-finite value appears in one trace and not the
other, or the sizes differ). Arrays of one size but different shapes (diffusers keeps the VAE
attention's group norm output as (N, C, H*W), refldm as (N, C, H, W)) are compared in row-major order,
with a note. The *first* such layer in execution order is where to look: every later
layer sees its error. `growth` says how much a layer's error exceeds anything before it; its largest
value marks where error grows fastest (an ill-conditioned op, or a bug that the tolerance hides).

    from refldm.crosscheck.compare import compare
    report = compare("mine.safetensors", "golden_f64.safetensors", rtol=1e-4)
    print(report)                  # per-layer table and summary
    report.first_bad.name          # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from refldm.crosscheck import trace as _trace


@dataclasses.dataclass
class LayerDiff:
    """One shared activation: its errors, and whether it is over tolerance."""

    index: int  # position in the compared order
    name: str
    shape: tuple
    max_abs: float
    max_ref: float  # max |b|
    rel: float
    growth: float  # rel / the largest rel before it (inf when every earlier layer was exact)
    over: bool
    note: str = ""  # "shape (2, 3) != (3, 2)", "non-finite", ...


@dataclasses.dataclass
class Comparison:
    """The result of `compare`: rows in execution order, the names found in only one trace, a summary."""

    rows: list
    only_a: list
    only_b: list
    rtol: float
    name_a: str = "A"
    name_b: str = "B"

    @property
    def first_bad(self):
        """The first layer over tolerance (a LayerDiff), or None when every layer is within it."""
        return next((r for r in self.rows if r.over), None)

    @property
    def worst(self):
        """The layer with the largest relative error, or None when nothing was compared."""
        return max(self.rows, key=lambda r: r.rel, default=None)

    @property
    def fastest_growth(self):
        """The layer whose error most exceeds every error before it (ignoring exact layers)."""
        rows = [r for r in self.rows[1:] if r.rel > 0]
        return max(rows, key=lambda r: r.growth, default=None)

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def summary(self) -> str:
        n_bad = sum(r.over for r in self.rows)
        lines = [(f"compared {len(self.rows)} layers ({self.name_a} against reference {self.name_b}), "
                 f"rtol {self.rtol:g}: {n_bad} over tolerance")]
        if self.only_a or self.only_b:
            lines.append(f"only in {self.name_a}: {len(self.only_a)}{_few(self.only_a)}; "
                         f"only in {self.name_b}: {len(self.only_b)}{_few(self.only_b)}")
        first, worst, grow = self.first_bad, self.worst, self.fastest_growth
        if first is not None:
            lines.append(f"first over tolerance: #{first.index} {first.name} rel {first.rel:.3e}"
                         + (f" ({first.note})" if first.note else ""))
        if worst is not None:
            lines.append(f"worst: #{worst.index} {worst.name} rel {worst.rel:.3e} (max abs {worst.max_abs:.3e})")
        if grow is not None:
            lines.append(f"fastest growth: #{grow.index} {grow.name} rel {grow.rel:.3e}, "
                         f"{_ratio(grow.growth)} the largest error before it")
        return "\n".join(lines)

    def table(self) -> str:
        head = f"{'#':>4}  {'max abs':>10}  {'rel':>10}  {'growth':>8}  name"
        lines = [head]
        marked = False
        for r in self.rows:
            mark = ""
            if r.over and not marked:
                mark, marked = "  <-- first over tolerance", True
            elif r.over:
                mark = "  *"
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"{r.index:>4}  {r.max_abs:>10.3e}  {r.rel:>10.3e}  {_short(r.growth):>8}  "
                         f"{r.name}{note}{mark}")
        return "\n".join(lines)

    def __str__(self):
        return self.table() + "\n\n" + self.summary()


def _few(names, n=3):
    return "" if not names else " (" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + ")"


def _short(growth: float) -> str:
    if math.isinf(growth):
        return "inf"
    if math.isnan(growth):
        return "-"
    return f"x{growth:.3g}"


def _ratio(growth: float) -> str:
    return "infinitely above (all before were exact)" if math.isinf(growth) else f"{growth:.3g} times"


def layer_error(a, b) -> tuple[float, float, float, str]:
    """(max |a-b|, max |b|, relative error, note) for two arrays of one shape, computed in float64.

    Non-finite values must sit at the same places with the same values; otherwise rel is inf.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    fa, fb = np.isfinite(a), np.isfinite(b)
    note = ""
    if not (fa.all() and fb.all()):
        same = np.array_equal(fa, fb) and np.array_equal(a[~fa], b[~fb], equal_nan=True)
        if not same:
            return math.inf, float(np.max(np.abs(b[fb]), initial=0.0)), math.inf, "non-finite values differ"
        note = "both non-finite at the same places"
        a, b = a[fa], b[fb]
    if a.size == 0:
        return 0.0, 0.0, 0.0, note
    max_abs = float(np.max(np.abs(a - b)))
    max_ref = float(np.max(np.abs(b)))
    if max_ref == 0.0:
        rel = 0.0 if max_abs == 0.0 else math.inf
    else:
        rel = max_abs / max_ref
    return max_abs, max_ref, rel, note


def _as_trace(t):
    if isinstance(t, _trace.Trace):
        return t
    if isinstance(t, _trace.Recorder):
        return _trace.Trace(t.activations)
    if isinstance(t, dict):
        return _trace.Trace(t)
    return _trace.load(t)


def compare(a, b, rtol: float = 1e-4, names=None) -> Comparison:
    """Compare trace `a` with reference trace `b` layer by layer (see the module docstring).

    `a`, `b`: trace file paths, `refldm.crosscheck.trace.Trace`s, `Recorder`s or {name: array} dicts.
    `names`: optional glob patterns restricting the layers compared.
    """
    import fnmatch

    ta, tb = _as_trace(a), _as_trace(b)
    pa, pb = ta.metadata.get("part"), tb.metadata.get("part")
    if pa and pb and pa != pb:
        raise ValueError(f"{_label(ta, 'A')} traces {pa} but {_label(tb, 'B')} traces {pb}; compare traces of one part")
    if not (rtol >= 0):
        raise ValueError(f"rtol must be a non-negative number, not {rtol!r}")
    keep = (lambda n: True) if not names else (lambda n: any(fnmatch.fnmatchcase(n, p) for p in names))
    shared = [n for n in ta.activations if n in tb.activations and keep(n)]
    only_a = [n for n in ta.activations if n not in tb.activations and keep(n)]
    only_b = [n for n in tb.activations if n not in ta.activations and keep(n)]
    rows, largest = [], 0.0
    for i, name in enumerate(shared):
        x, y = ta.activations[name], tb.activations[name]
        if x.size != y.size:
            row = LayerDiff(i, name, tuple(x.shape), math.inf, math.nan, math.inf, math.inf, True,
                            f"shape {tuple(x.shape)} != {tuple(y.shape)}")
        else:
            # the same values in another view ((N, C, H*W) vs (N, C, H, W)) compare in row-major order
            max_abs, max_ref, rel, note = layer_error(x.reshape(-1), y.reshape(-1))
            if tuple(x.shape) != tuple(y.shape):
                note = f"shape {tuple(x.shape)} vs {tuple(y.shape)}, compared flat" + (f"; {note}" if note else "")
            growth = rel / largest if largest > 0 else (math.inf if rel > 0 else math.nan)
            row = LayerDiff(i, name, tuple(x.shape), max_abs, max_ref, rel, growth, not rel <= rtol, note)
        if not math.isnan(row.rel):
            largest = max(largest, row.rel)
        rows.append(row)
    return Comparison(rows, only_a, only_b, rtol, _label(ta, "A"), _label(tb, "B"))


def _label(t, default):
    return t.path if t.path else default
