"""The porting kit at scale: conformance bundles (refldm.crosscheck.vectors) of many models or configs, one bundle
per job, through the grid's executors (this process, local processes, a Dask cluster).

    from refldm.grid.bundles import run_bundles
    run_bundles([{"tiny": "sd15", "out": "b/tiny-sd15"}, {"model": "models/v1-5", "out": "b/v1-5"}], workers=2)

A job is {"model": FOLDER} or {"tiny": KIND}, with "out" (its bundle folder) and the keyword arguments of
`refldm.crosscheck.vectors.generate` (parts, dtype, size, steps, prompts, detail). Each job runs where it is
sent and writes its bundle there: on a cluster, "out" must be a folder every worker reaches (a shared file
system; docs/scale-out.md). A job that fails is reported with its error; the others go on.

May import: as the grid package (refldm/grid/__init__.py); refldm.crosscheck (the same layer).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings

__all__ = ["run_bundle", "run_bundles", "OPTIONS"]

OPTIONS = ("parts", "dtype", "size", "steps", "prompts", "detail", "max_sequence_length")


def run_bundle(job: dict) -> dict:
    """Write one bundle; its record: index, status ("ok" | "failed"), error, cases, out, seconds, where."""
    from refldm.crosscheck import vectors
    start = time.perf_counter()
    cases = error = None
    options = {k: job[k] for k in OPTIONS if job.get(k) is not None}
    switch = job.get("accel_switch")
    try:
        with (switch(False) if switch is not None else contextlib.nullcontext()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the suite's over-long prompt is cut on purpose
            if job.get("tiny"):
                manifest = vectors.generate_tiny(job["tiny"], job["out"], **options)
            else:
                manifest = vectors.generate(job["model"], job["out"], **options)
        cases, status = len(manifest["cases"]), "ok"
    except Exception as e:  # recorded; the other bundles go on
        message = str(e).strip().splitlines()
        status, error = "failed", f"{type(e).__name__}: {message[0] if message else ''}".rstrip(": ")
    return {"index": job["index"], "status": status, "error": error, "cases": cases, "out": job["out"],
            "seconds": round(time.perf_counter() - start, 3), "where": f"{socket.gethostname()}:{os.getpid()}"}


def run_bundles(jobs: list, client=None, workers: int | None = None, progress: bool = True,
                accel_switch=None, worker_env=None) -> list:
    """Run every job (see the module docstring) here, in `workers` local processes or on a Dask `client`;
    the records in the jobs' order. Each job is checked first (a model folder that exists, one of model / tiny).
    accel_switch: refldm.accel.enabled (the CLI passes it): each bundle is computed with the reference ops
    alone, as `refldm vectors` does, so that it does not depend on the machine's speed-layer kernels.
    worker_env(n): the local processes' thread counts (refldm.accel.threads.process_environment)."""
    from tqdm.auto import tqdm

    from refldm.grid import executors
    tasks = []
    for i, job in enumerate(jobs):
        if bool(job.get("model")) == bool(job.get("tiny")):
            raise ValueError(f"bundle {i + 1}: give a model folder or a tiny kind (one of them)")
        if job.get("model") and not os.path.isdir(job["model"]):
            raise ValueError(f"{job['model']}: no such model folder")
        if not job.get("out"):
            raise ValueError(f"bundle {i + 1}: no output folder")
        tasks.append({**job, "index": i, "accel_switch": accel_switch})
    outs = [os.path.abspath(t["out"]) for t in tasks]
    if len(set(outs)) != len(outs):
        raise ValueError("two bundles would be written to the same folder; give each its own")
    if client is not None:
        results = executors.on_dask(tasks, client, fn=run_bundle)
    elif workers:
        results = executors.local_processes(tasks, workers, fn=run_bundle, worker_env=worker_env)
    else:
        results = executors.in_process(tasks, fn=run_bundle)
    records = {}
    with tqdm(total=len(tasks), unit="bundle", desc="vectors", disable=not progress) as bar:
        for record in results:
            records[record["index"]] = record
            bar.update(1)
    return [records[i] for i in range(len(tasks))]
