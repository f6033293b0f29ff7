"""Grids and sweeps: the web UI's X/Y/Z plot, run in this process, in local worker processes or on a Dask cluster.

    from refldm.grid import GridSpec, run
    spec = GridSpec("a red circle", x="sampler=Euler a,DPM++ 2M Karras", y="steps=10,20", out="grid/")
    manifest = run(spec)                              # here; run(spec, workers=2); run(spec, client=Client(...))

What a run writes into `spec.out`: one PNG per cell (zZZ-yYY-xXX.png, with the web UIs' ``parameters`` text
and the cell's settings), one labelled grid image per z value (grid.png, or grid-zZZ.png), and manifest.json
(every cell: its settings, file, status, error, seconds, where it ran; rewritten as cells arrive, at most
every MANIFEST_EVERY_S seconds, and at the end). Every write is atomic.

The whole grid is checked before any work (refldm/grid/spec.py). Every cell's noise comes from its own
settings, so the same grid gives the same bytes however it runs. Cells that share a model run together and
each process loads a model once (refldm/grid/cell.py). A cell that fails is recorded (manifest, and a crossed
tile in the grid image); the others go on. ``resume=True`` keeps every cell whose PNG carries the same
settings and refuses a folder with PNGs of other settings (named; nothing is overwritten).

May import: refldm.pipelines, refldm.adapters, refldm.models, refldm.schedulers, refldm.core,
refldm.checkpoints, refldm.files, refldm.errors, refldm.about (never the speed layer: the accel setting is
applied through the `accel_switch` the caller passes, refldm.accel.enabled from the CLI; never the CLI).
"""

from __future__ import annotations

import io
import json
import os
import re
import time

from refldm.files import atomic_write
from refldm.grid.spec import KINDS, MAX_CELLS, Axis, Cell, GridSpec, parse_axis

__all__ = ["run", "GridSpec", "Axis", "Cell", "parse_axis", "KINDS", "MAX_CELLS", "plan"]

MANIFEST = "manifest.json"
MANIFEST_EVERY_S = 2.0  # the manifest is rewritten at most this often while cells arrive, and at the end
_CELL_FILE = re.compile(r"z\d+-y\d+-x\d+\.png")


def _grid_file(axes, iz: int) -> str:
    return f"grid-z{iz:02d}.png" if len(axes) == 3 else "grid.png"


def _difference(found: dict, wanted: dict) -> str:
    for key in sorted(set(found) | set(wanted)):
        if found.get(key) != wanted.get(key):
            return f"{key} {json.dumps(found.get(key))}, this grid's {json.dumps(wanted.get(key))}"
    return "the same settings"


def plan(spec: GridSpec, *, resume: bool = False, yes: bool = False) -> tuple:
    """(axes, cells, done): the whole grid checked, and the cells a resumed folder already holds ({index: png
    bytes}). Raises before any work: a bad axis value, too many cells, a folder holding another grid."""
    from refldm.grid.cell import read_cell_key
    axes, cells = spec.cells(yes=yes)
    out = os.fspath(spec.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out}: not a folder (the grid's output folder)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{out}: the folder {parent} does not exist")
    done = {}
    if not os.path.isdir(out):
        return axes, cells, done
    mine = {cell.file: cell for cell in cells}
    present = sorted(name for name in os.listdir(out) if _CELL_FILE.fullmatch(name))
    if not resume:
        held = [name for name in present if name in mine] + ([MANIFEST] if os.path.exists(os.path.join(out, MANIFEST))
                                                             else [])
        if held:
            raise FileExistsError(f"{out}: holds a grid already ({held[0]}); give --resume to continue it, or "
                                  "another folder")
    for name in present:
        path = os.path.join(out, name)
        if name not in mine:
            raise FileExistsError(f"{path}: a cell of another grid (this grid has no such cell); --resume "
                                  "continues the same grid only; nothing was overwritten")
        found = read_cell_key(path)
        cell = mine[name]
        if found != cell.key():
            why = "no refldm grid settings in it" if found is None else \
                _difference(json.loads(found), json.loads(cell.key()))
            raise FileExistsError(f"{path}: a PNG of other parameters ({why}); --resume continues the same grid "
                                  "only; nothing was overwritten")
        with open(path, "rb") as f:
            done[cell.index] = f.read()
    return axes, cells, done


def _write_json(path, data) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def run(spec: GridSpec, client=None, workers: int | None = None, *, resume: bool = False, yes: bool = False,
        progress: bool = True, loader=None, accel_switch=None, worker_env=None, on_result=None) -> dict:
    """Run the grid `spec`; returns the manifest (also written to spec.out/manifest.json).

    client: a dask.distributed Client (cells as Client.submit tasks); workers: N local processes; neither:
    this process. loader(model, dtype=, img2img=): the pipeline for a checkpoint (default: the grid's own,
    refldm.grid.cell.default_loader; a module-level function or functools.partial, as it travels to
    workers). accel_switch: refldm.accel.enabled, for an accel axis (or spec.accel). worker_env(n): the local
    worker processes' thread counts (refldm.accel.threads.process_environment; the CLI passes both from the
    speed layer, which the grid never imports). on_result(record): called
    with each cell's record as it arrives. progress: a tqdm bar of cells done / total with the ETA.
    """
    from refldm.grid import executors
    if client is not None and workers is not None:
        raise ValueError("give a Dask client or --workers N, not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a whole number >= 1, got {workers!r}")
    axes, cells, done = plan(spec, resume=resume, yes=yes)
    if accel_switch is None and any(c.settings["accel"] is not None for c in cells):
        raise ValueError("the accel setting needs accel_switch=refldm.accel.enabled (the CLI passes it)")
    out = os.fspath(spec.out)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    records = {}
    for cell in cells:
        records[cell.index] = {"index": cell.index, "x": cell.ix, "y": cell.iy, "z": cell.iz, "file": cell.file,
                               "labels": [a.label(i) for a, i in zip(axes, (cell.ix, cell.iy, cell.iz))],
                               "settings": cell.settings, "status": "pending", "error": None, "seconds": None,
                               "where": None}
        if cell.index in done:
            records[cell.index]["status"] = "resumed"
    where = ("dask " + str(getattr(client, "scheduler", None) and client.scheduler.address)) if client is not None \
        else f"{workers} local processes" if workers else "in-process"
    manifest = {"refldm_grid": 1, "axes": [{"name": a.name, "kind": a.kind, "values": list(a.labels)} for a in axes],
                "executor": where, "cells": [records[c.index] for c in cells], "grids": []}
    todo = sorted((c for c in cells if c.index not in done), key=lambda c: (c.model_key(), c.index))
    tasks = [{"index": c.index, "settings": c.settings, "key": c.key(), "loader": loader,
              "accel_switch": accel_switch} for c in todo]
    if client is not None:
        results = executors.on_dask(tasks, client)
    elif workers:
        results = executors.local_processes(tasks, workers, worker_env=worker_env)
    else:
        results = executors.in_process(tasks)
    from tqdm.auto import tqdm
    images = dict(done)
    written = float("-inf")
    bar = tqdm(total=len(cells), initial=len(done), unit="cell", desc="grid", disable=not progress)
    try:
        for result in results:
            cell = cells[result["index"]]
            record = records[cell.index]
            if result["status"] == "ok":
                png = result["png"]
                atomic_write(os.path.join(out, cell.file), lambda f: f.write(png))
                images[cell.index] = png
            record.update(status=result["status"], error=result["error"], seconds=result["seconds"],
                          where=result["where"], parameters=result["parameters"])
            if time.perf_counter() - written > MANIFEST_EVERY_S:  # a large grid: not rewritten per cell
                _write_json(os.path.join(out, MANIFEST), manifest)
                written = time.perf_counter()
            bar.update(1)
            if on_result is not None:
                on_result(record)
    finally:
        bar.close()
        getattr(results, "close", lambda: None)()
    manifest["grids"] = _draw(out, axes, cells, images)
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _draw(out, axes, cells, images) -> list:
    from PIL import Image

    from refldm.grid.cell import png_bytes
    from refldm.grid.image import draw_grid
    nx, ny = (len(axes[0].values), len(axes[1].values) if len(axes) > 1 else 1)
    columns = [axes[0].label(i) for i in range(nx)]
    rows = [axes[1].label(i) for i in range(ny)] if len(axes) > 1 else [""]
    written = []
    for iz in range(len(axes[2].values) if len(axes) == 3 else 1):
        tiles = {}
        for cell in cells:
            if cell.iz == iz:
                png = images.get(cell.index)
                tiles[(cell.iy, cell.ix)] = None if png is None else Image.open(io.BytesIO(png)).convert("RGB")
        title = axes[2].label(iz) if len(axes) == 3 else None
        grid = draw_grid(tiles, columns, rows, title)
        name = _grid_file(axes, iz)
        data = png_bytes(grid, None, None)
        atomic_write(os.path.join(out, name), lambda f: f.write(data))
        written.append(name)
    return written
