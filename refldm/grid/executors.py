"""Where the cells run: this process, local worker processes, or a Dask cluster. Each executor takes the
cells' tasks (in the order the grid wants them started: grouped by model) and yields their records as they
finish; every one calls the same `refldm.grid.cell.run_cell`, so the images are the same bytes (or another
module-level function of one task that never raises: refldm/grid/bundles.py's `run_bundle`).

    in_process(tasks)                   one after the other, here (the loaded model kept for the run)
    local_processes(tasks, n)           n spawned processes (concurrent.futures), each with its model cache
    on_dask(tasks, client)              Client.submit per cell; a worker lost mid-cell has its cell re-run
                                        elsewhere by the scheduler (dask's allowed-failures, default 3 tries)
    connect(address, timeout)           a Client for a scheduler address, or "local:N" (a LocalCluster)

May import: as the grid package (refldm/grid/__init__.py). dask.distributed is optional (the `cluster` extra).
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed

from refldm.grid.cell import clear_cache, run_cell

__all__ = ["in_process", "local_processes", "on_dask", "connect", "NEED_DASK"]

NEED_DASK = "--cluster needs dask.distributed, which is not installed: pip install 'refldm[cluster]'"


def _failed(task, error: str) -> dict:
    return {"index": task["index"], "status": "failed", "error": error, "png": None, "parameters": None,
            "seconds": None, "where": None}


def _set_environment(env: dict) -> None:  # a local worker's initializer: before NumPy is imported there
    os.environ.update(env)


def in_process(tasks, fn=run_cell):
    try:
        for task in tasks:
            yield fn(task)
    finally:
        clear_cache()  # the models loaded for the grid are not kept past it


def local_processes(tasks, n: int, fn=run_cell, worker_env=None):
    """worker_env(n) -> dict: each process's thread counts, set before it imports NumPy
    (refldm.accel.threads.process_environment; the CLI passes it); None: the processes inherit this one's."""
    if n < 1:
        raise ValueError(f"--workers must be >= 1, got {n}")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked thread pools or locks
    env = worker_env(n) if worker_env is not None else {}
    with ProcessPoolExecutor(max_workers=n, mp_context=context, initializer=_set_environment,
                             initargs=(env,)) as pool:
        futures = {pool.submit(fn, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as e:  # a worker process died (BrokenProcessPool): its cells are reported
                yield _failed(futures[future], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _distributed():
    try:
        import distributed
    except ImportError:
        raise RuntimeError(NEED_DASK) from None
    return distributed


def connect(address: str, timeout: float = 10.0, worker_env=None):
    """(client, cluster or None): "local:N" starts a LocalCluster of N one-thread worker processes (closed by
    the caller through `close`; worker_env as `local_cluster`); another address connects to a running
    scheduler, or fails in one line."""
    distributed = _distributed()
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--cluster {address}: give local:N with N >= 1 worker processes")
        cluster = local_cluster(n, worker_env=worker_env)
        return distributed.Client(cluster), cluster
    try:
        return distributed.Client(address, timeout=timeout), None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OSError(f"--cluster {address}: no Dask scheduler answered within {timeout:g} s ({reason})") from None


def local_cluster(n: int, worker_env=None, **kwargs):
    """A LocalCluster of n one-thread worker processes, each with the thread counts worker_env(n) gives
    (refldm.accel.threads.process_environment, from the CLI: cores / n threads for refldm and the BLAS, set
    before the worker starts, since dask's nanny would give the BLAS 1 thread and NumPy reads it on import;
    None: dask's defaults), and glibc's malloc as in any process (dask's MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap
    threshold: each of a cell's large temporary arrays then costs an mmap and fresh zeroed pages)."""
    import dask
    distributed = _distributed()
    env = worker_env(n) if worker_env is not None else {}
    spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env,
                 "MALLOC_TRIM_THRESHOLD_": None}  # None: unset (dask's 64 KiB makes every large array an mmap)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}):
        return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                        env=env, **kwargs)


def close(client, cluster=None) -> None:
    """Close the client, and the LocalCluster `connect("local:N")` started."""
    client.close()
    if cluster is not None:
        cluster.close()


def on_dask(tasks, client, fn=run_cell):
    distributed = _distributed()
    run = uuid.uuid4().hex[:12]
    futures = {}
    for order, task in enumerate(tasks):  # higher priority first: the model groups start in order
        future = client.submit(fn, task, key=f"refldm-grid-{run}-{task['index']}", pure=False,
                               priority=-order)
        futures[future] = task
    try:
        for future in distributed.as_completed(list(futures)):
            try:
                yield future.result()
            except Exception as e:  # lost on every worker it was tried on (KilledWorker), cancelled, ...
                yield _failed(futures[future], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            future.release()
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
