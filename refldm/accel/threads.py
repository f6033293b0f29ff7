"""The host thread pool: spread independent pieces of work over the CPU's cores.

NumPy's elementwise functions run on one core, and a multi-threaded BLAS call pays for waking and
joining its helper threads on every call. The accelerated ops therefore cut their work into
independent blocks (bands of rows, one head's query rows, ...) and hand the blocks to this pool;
ufuncs and BLAS release the GIL while they run. A block's result never depends on which thread ran
it or how many threads there are: the blocks are fixed by byte sizes, not by the thread count.

    REFLDM_NUM_THREADS=4            # environment, read on first use (default: the CPUs this process may use)
    refldm.accel.set_num_threads(4) # from Python
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from refldm.accel.blas import single_threaded_blas
from refldm.accel.errors import AccelError

__all__ = ["num_threads", "set_num_threads", "parallel_map", "in_blocks"]


def _threads_from_env() -> int:
    value = os.environ.get("REFLDM_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise AccelError(f"REFLDM_NUM_THREADS must be a positive integer, got {value!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Pool:
    threads = None    # read from the environment on first use
    executor = None   # (threads, ThreadPoolExecutor), made on first parallel call
    lock = threading.Lock()
    local = threading.local()  # .worker is True inside a pool thread


def num_threads() -> int:
    """How many host threads the accelerated ops use (REFLDM_NUM_THREADS, else the number of CPUs this
    process may run on). A bad REFLDM_NUM_THREADS raises AccelError here, naming the variable."""
    if _Pool.threads is None:
        _Pool.threads = _threads_from_env()
    return _Pool.threads


def set_num_threads(n: int) -> None:
    """Set the number of host threads (1 = everything on the calling thread).

    Safe while other threads compute: a call already running keeps the pool it started with; the next
    call makes a pool of the new size. A pool nobody uses any more ends its threads when it is
    garbage-collected (concurrent.futures does that).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
    _Pool.threads = n


def _mark_worker():
    _Pool.local.worker = True


def _executor(threads: int) -> ThreadPoolExecutor:
    with _Pool.lock:
        if _Pool.executor is None or _Pool.executor[0] != threads:
            _Pool.executor = (threads, ThreadPoolExecutor(threads, thread_name_prefix="refldm",
                                                          initializer=_mark_worker))
        return _Pool.executor[1]


def parallel_map(fn, items) -> list:
    """[fn(item) for item in items], spread over the host thread pool; the results keep their order.

    The host BLAS is held to one thread per call throughout, whether the items run on the pool (which
    already gives every core a worker) or serially: so every item computes the same bytes for any
    thread count. Runs serially with one thread, with a single item, or when called from inside a
    pool thread (so a nested call cannot deadlock). An exception in any item is raised here.
    """
    items = list(items)
    threads = num_threads()
    with single_threaded_blas():
        if threads == 1 or len(items) < 2 or getattr(_Pool.local, "worker", False):
            return [fn(item) for item in items]
        executor = _executor(threads)  # a local reference: set_num_threads elsewhere cannot shut it down
        return list(executor.map(fn, items))


def in_blocks(n_rows: int, row_bytes: int, work, block_bytes: int) -> None:
    """Call work(i, j) on row ranges [i, j) that together cover range(n_rows), each exactly once, in
    blocks of about `block_bytes` on the thread pool. `work` must write only rows i..j-1 of its output.
    The ranges depend on the sizes only, never on the number of threads."""
    if n_rows * row_bytes <= block_bytes:
        work(0, n_rows)
        return
    rows = max(1, block_bytes // max(1, row_bytes))
    parallel_map(lambda i: work(i, min(n_rows, i + rows)), range(0, n_rows, rows))


def _after_fork_in_child():
    """A forked child has none of the parent's threads: forget the pool."""
    _Pool.executor = None
    _Pool.local = threading.local()
    _Pool.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
