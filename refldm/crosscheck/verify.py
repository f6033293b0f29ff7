"""Scoring a port's outputs against a conformance bundle (`refldm.crosscheck.vectors`): ``refldm verify``.

A *candidate* is what a port computed on the bundle's inputs: a safetensors file, an ``.npz`` or a folder of
``.npy`` files (``<group>/<layer>.npy``), each tensor named as its case (``unet.t999.cond/conv_in``), or by the
original key prefix (``names="original"``: ``unet.t999.cond/model.diffusion_model.input_blocks.0.0``), or by
the port's own names through a map (a JSON object {port name: case name}; ``*`` in both stands for the same
text, e.g. {"my_unet_t999/*": "unet.t999.cond/*"}).

Each case the candidate provides is scored, in the bundle's data-flow order, in float64:

    max_abs = max |a - b|,   rel = max_abs / max |b|      (b the golden tensor; rel = 0 when both are 0)

and passes when rel <= the case's tolerance for the port's precision (float32 by default). A NaN or inf
where the golden value is finite fails, named; a tensor of another shape fails, naming the expected shape
(a tensor of the same size in another view, (N, C, H*W) for (N, C, H, W), is compared
in row-major order, with a note); a tensor that is no real number fails.
Names the bundle does not know are listed, not an error. The bundle is only read.
"""

from __future__ import annotations

import html
import json
import math
import os
import re

import numpy as np

from refldm.crosscheck.vectors import BundleError, CaseResult, load, score  # noqa: F401 (re-exported)

__all__ = ["CandidateError", "read_candidate", "resolve_names", "score", "verify", "Verification"]


class CandidateError(ValueError):
    """A candidate (or its map file) that cannot be read or matches nothing."""


def read_candidate(path) -> dict:
    """{name: array} from a safetensors file, an .npz, or a folder of .npy files (names = relative paths)."""
    from refldm.checkpoints.weights import load_file
    path = os.fspath(path)
    if os.path.isdir(path):
        out = {}
        for root, _, files in os.walk(path):
            for f in sorted(files):
                if not f.endswith(".npy"):
                    continue
                full = os.path.join(root, f)
                name = os.path.relpath(full, path)[: -len(".npy")].replace(os.sep, "/")
                try:
                    out[name] = np.load(full, allow_pickle=False)
                except (ValueError, OSError, EOFError) as e:
                    raise CandidateError(f"{full}: not a readable .npy file ({str(e).splitlines()[0]})") from None
        if not out:
            raise CandidateError(f"{path}: a folder with no .npy files")
        return out
    if not os.path.isfile(path):
        raise CandidateError(f"{path}: no such candidate file or folder")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise CandidateError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from None
    if path.endswith(".npy"):
        raise CandidateError(f"{path}: a single .npy has no case name; put the .npy files in a folder, "
                             "named <group>/<layer>.npy")
    try:
        return load_file(path)
    except (ValueError, OSError) as e:
        raise CandidateError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _read_map(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except OSError as e:
        raise CandidateError(f"{path}: cannot read the map file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CandidateError(f"{path}: the map file is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in mapping.items()):
        raise CandidateError(f"{path}: the map file must be a JSON object {{candidate name: case name}}")
    if not mapping:
        raise CandidateError(f"{path}: the map file names nothing (an empty object)")
    return mapping


def _apply_map(names, mapping: dict, cases: set, where: str) -> dict:
    """{candidate name: case name} through `mapping` (exact entries, then '*' patterns)."""
    out = {}
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", "(.*)") + "$"), v) for k, v in mapping.items()
                if "*" in k]
    for n in names:
        if n in mapping:
            out[n] = mapping[n]
            continue
        for rx, target in patterns:
            m = rx.match(n)
            if m:
                out[n] = target.replace("*", m.group(1), 1) if "*" in target else target
                break
    if not any(v in cases for v in out.values()):
        raise CandidateError(f"{where}: the map file maps no candidate tensor to a case of the bundle "
                             f"(e.g. {next(iter(mapping.items()))[0]!r} -> {next(iter(mapping.items()))[1]!r})")
    return out


def resolve_names(bundle, names, mode: str = "diffusers", mapping=None, group: str | None = None) -> dict:
    """{candidate name: case name} for the candidate's tensor names.

    group: the candidate is one pass named without the group (a trace file of `refldm trace` or
    tools/trace_diffusers.py): ``conv_in`` -> ``<group>/conv_in``, ``<root>`` -> ``<group>/output``; a trace's
    ``input/*`` tensors are skipped.
    """
    cases = {c.name for c in bundle.cases}
    if group is not None:
        if not any(c.group == group for c in bundle.cases):
            groups = list(dict.fromkeys(c.group for c in bundle.cases))
            raise CandidateError(f"the bundle has no group {group!r} (it has {', '.join(groups[:4])}, ...)")
        return {n: f"{group}/{'output' if n == '<root>' else n}" for n in names if not n.startswith("input/")}
    if mapping is not None:
        where = mapping if isinstance(mapping, str) else "map"
        mapping = _read_map(mapping) if isinstance(mapping, (str, os.PathLike)) else dict(mapping)
        return _apply_map(names, mapping, cases, where)
    if mode == "original":
        by_original, seen = {}, {}
        for c in bundle.cases:
            if c.original:
                key = f"{c.group}/{c.original}"
                seen[key] = seen.get(key, 0) + 1
                by_original[key] = c.name
        table = {k: v for k, v in by_original.items() if seen[k] == 1}
        return {n: table.get(n, n) for n in names}  # names without an original form stay as they are
    if mode != "diffusers":
        raise ValueError(f"names={mode!r}; choose 'diffusers' or 'original'")
    return {n: n for n in names}


class Verification:
    """The result of `verify`: one CaseResult per case of the bundle, in data-flow order."""

    def __init__(self, bundle, results, extra, candidate: str, precision: str):
        self.bundle = bundle
        self.results = results
        self.extra = extra
        self.candidate = candidate
        self.precision = precision

    @property
    def provided(self) -> list:
        return [r for r in self.results if r.status != "not provided"]

    @property
    def first_failure(self):
        return next((r for r in self.results if r.status == "FAIL"), None)

    @property
    def last_pass_before_failure(self):
        last = None
        for r in self.results:
            if r.status == "FAIL":
                return last
            if r.status == "pass":
                last = r
        return None

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def counts(self) -> dict:
        out = {"pass": 0, "FAIL": 0, "not provided": 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def summary_lines(self) -> list:
        n = self.counts()
        lines = [f"{n['pass']} pass, {n['FAIL']} FAIL, {n['not provided']} not provided "
                 f"(of {len(self.results)} cases; tolerances for {self.precision})"]
        if self.extra:
            shown = ", ".join(self.extra[:5]) + (", ..." if len(self.extra) > 5 else "")
            lines.append(f"candidate names the bundle does not know ({len(self.extra)}, ignored): {shown}")
        first = self.first_failure
        if first is not None:
            i = self._index(first)
            lines.append(f"first failing: #{i} {first.name}: rel {first.rel:.3e} > tolerance {first.tolerance:.1e}"
                         + (f" ({first.note})" if first.note else ""))
            last = self.last_pass_before_failure
            lines.append(f"last passing before it: #{self._index(last)} {last.name}" if last is not None
                         else "last passing before it: none")
        else:
            lines.append("every case provided passes")
        return lines

    def _index(self, r) -> int:
        return self.bundle.case(r.name).index

    def table(self) -> str:
        lines = [f"{'#':>5}  {'status':<6}  {'max abs':>10}  {'rel':>10}  {'tol':>8}  case"]
        pending = []

        def flush():
            if pending:
                lines.append(f"{'':>5}  {'-':<6}  {'':>10}  {'':>10}  {'':>8}  ({len(pending)} not provided: "
                             f"{pending[0]}" + (f" .. {pending[-1]})" if len(pending) > 1 else ")"))
                pending.clear()

        for i, r in enumerate(self.results):
            if r.status == "not provided":
                pending.append(r.name)
                continue
            flush()
            mark = "  <-- first failing" if r is self.first_failure else ""
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"{i:>5}  {r.status:<6}  {r.max_abs:>10.3e}  {r.rel:>10.3e}  {r.tolerance:>8.1e}  "
                         f"{r.name}{note}{mark}")
        flush()
        return "\n".join(lines)

    def to_json(self) -> dict:
        def num(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else \
                ("inf" if isinstance(x, float) and math.isinf(x) else x)
        first, last = self.first_failure, self.last_pass_before_failure
        return {"bundle": self.bundle.folder, "candidate": self.candidate, "precision": self.precision,
                "ok": self.ok, "counts": self.counts(), "extra_names": self.extra,
                "first_failing": first.name if first else None,
                "last_passing_before": last.name if (first and last) else None,
                "cases": [{"index": i, "name": r.name, "status": r.status, "max_abs": num(r.max_abs),
                           "rel": num(r.rel), "tolerance": r.tolerance, "note": r.note}
                          for i, r in enumerate(self.results)]}

    def html(self) -> str:
        return _html_report(self)


def verify(bundle, candidate, names: str = "diffusers", mapping=None, precision: str = "float32",
           group: str | None = None) -> Verification:
    """Score `candidate` (a path or {name: array}) against `bundle` (a path or a Bundle); `group`: see
    `resolve_names`."""
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load(bundle)
    label = os.fspath(candidate) if isinstance(candidate, (str, os.PathLike)) else "candidate"
    tensors = read_candidate(candidate) if isinstance(candidate, (str, os.PathLike)) else dict(candidate)
    names_map = resolve_names(bundle, list(tensors), names, mapping, group)
    known = {c.name for c in bundle.cases}
    by_case, extra = {}, []
    for cand_name, case_name in names_map.items():
        if case_name in known:
            by_case[case_name] = tensors[cand_name]
        else:
            extra.append(cand_name)
    extra += [n for n in tensors if n not in names_map and not (group and n.startswith("input/"))]
    if not by_case:
        shown = ", ".join(list(tensors)[:3])
        raise CandidateError(f"{label}: provides none of the bundle's {len(known)} cases (its names: {shown}"
                             f"{', ...' if len(tensors) > 3 else ''}; cases are named like "
                             f"{bundle.cases[0].name!r})")
    results = []
    for case in bundle.cases:
        if case.name in by_case:
            results.append(score(case, by_case[case.name], precision))
        else:
            results.append(CaseResult(case.name, "not provided", tolerance=float(case.tolerance[precision])))
    return Verification(bundle, results, sorted(extra), label, precision)


# ---------------------------------------------------------------------------------------------------
# The HTML report: a table and an inline SVG plot of log10(rel) against the case's position


def _html_report(v: Verification) -> str:
    rows = [(i, r) for i, r in enumerate(v.results) if r.status != "not provided"]
    width, height, pad = 960, 360, 50
    n = max(len(v.results) - 1, 1)
    lo, hi = -17.0, 1.0

    def y(val):
        val = min(max(val, lo), hi)
        return pad + (hi - val) / (hi - lo) * (height - 2 * pad)

    def x(i):
        return pad + i / n * (width - 2 * pad)

    def lg(val):
        if val is None or math.isnan(val):
            return lo
        if math.isinf(val):
            return hi
        return math.log10(val) if val > 0 else lo

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="#fafafa" '
           'stroke="#999"/>']
    for k in range(int(lo), int(hi) + 1, 2):
        svg.append(f'<line x1="{pad}" x2="{width - pad}" y1="{y(k):.1f}" y2="{y(k):.1f}" stroke="#e0e0e0"/>'
                   f'<text x="{pad - 6}" y="{y(k) + 4:.1f}" text-anchor="end">1e{k}</text>')
    # part boundaries along the x axis
    last_part = None
    for i, r in enumerate(v.results):
        part = v.bundle.case(r.name).part
        if part != last_part:
            svg.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{pad}" y2="{height - pad}" stroke="#ccc" '
                       f'stroke-dasharray="3,3"/><text x="{x(i) + 3:.1f}" y="{pad + 12}" fill="#666">'
                       f'{html.escape(part)}</text>')
            last_part = part
    tol_pts = " ".join(f"{x(i):.1f},{y(lg(r.tolerance) if r.tolerance > 0 else lo):.1f}" for i, r in rows)
    if tol_pts:
        svg.append(f'<polyline points="{tol_pts}" fill="none" stroke="#f0a000" stroke-width="1"/>')
    for i, r in rows:
        colour = "#2a7" if r.status == "pass" else "#d22"
        svg.append(f'<circle cx="{x(i):.1f}" cy="{y(lg(r.rel)):.1f}" r="2.5" fill="{colour}">'
                   f'<title>#{i} {html.escape(r.name)}: rel {r.rel:.3e} (tol {r.tolerance:.1e})</title></circle>')
    svg.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">case, in data-flow order '
               '(depth through the network)</text>')
    svg.append(f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
               'relative error max|a-b|/max|b|</text></svg>')
    table = ["<table><tr><th>#</th><th>status</th><th>max abs</th><th>rel</th><th>tol</th><th>case</th></tr>"]
    for i, r in rows:
        cls = "pass" if r.status == "pass" else "fail"
        table.append(f'<tr class="{cls}"><td>{i}</td><td>{r.status}</td><td>{r.max_abs:.3e}</td>'
                     f'<td>{r.rel:.3e}</td><td>{r.tolerance:.1e}</td><td>{html.escape(r.name)}'
                     f'{(" (" + html.escape(r.note) + ")") if r.note else ""}</td></tr>')
    table.append("</table>")
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in v.summary_lines())
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>refldm verify</title><style>"
            "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;font-size:12px;text-align:left}"
            "tr.fail{background:#fdd}tr.pass td:nth-child(2){color:#2a7}</style></head><body>"
            f"<h1>refldm verify</h1><p>bundle {html.escape(v.bundle.folder)}; candidate "
            f"{html.escape(v.candidate)}</p>{summary}"
            "<p>Green: pass, red: FAIL, orange line: the tolerance of each case. An error that starts at one "
            "case and grows after it marks the first thing to fix.</p>"
            + "\n".join(svg) + "\n" + "\n".join(table) + "</body></html>\n")
