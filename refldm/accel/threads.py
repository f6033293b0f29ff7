"""The host thread pool: spread independent pieces of work over the CPU's cores.

NumPy's elementwise functions run on one core, and a multi-threaded BLAS call pays for waking and
joining its helper threads on every call. The accelerated ops therefore cut their work into
independent blocks (bands of rows, one head's query rows, ...) that the calling thread and the
pool's helper threads take one at a time (the caller works too, so a nested call cannot deadlock and
no block waits for a thread to wake up); ufuncs and BLAS release the GIL while they run. A block's result never depends on which thread ran
it or how many threads there are: the blocks are fixed by byte sizes, not by the thread count.

    REFLDM_NUM_THREADS=4            # environment, read on first use (default: the CPUs this process may use)
    refldm.accel.set_num_threads(4) # from Python
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time

from refldm.accel.blas import single_threaded_blas
from refldm.accel.errors import AccelError

MAX_THREADS = 1024  # far above any CPU's cores; more threads than this only exhaust the process's limits
# A helper that finds the queue empty keeps looking (yielding its core to any other runnable thread between
# looks) for this many seconds before it sleeps; 0 = sleep at once.
SPIN_SECONDS = 0.0

__all__ = ["num_threads", "set_num_threads", "parallel_map", "in_blocks", "process_environment"]


def _threads_from_env() -> int:
    value = os.environ.get("REFLDM_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_THREADS:
            raise AccelError(f"REFLDM_NUM_THREADS must be an integer from 1 to {MAX_THREADS}, got {value!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# The thread counts a worker process reads from its environment when it starts (NumPy's BLAS reads its own on
# import, so they must be set before the process imports NumPy).
THREAD_VARIABLES = ("REFLDM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def process_environment(n: int) -> dict:
    """The environment for each of n worker processes sharing this machine (refldm's grid workers): every
    variable of THREAD_VARIABLES set to max(1, CPUs // n), the speed layer's pool and the BLAS alike, unless
    this process's environment sets it already (then its value). Without it, n local processes would each
    start CPUs threads (oversubscribed), and Dask's workers get 1 BLAS thread."""
    if os.environ.get("REFLDM_NUM_THREADS"):
        threads = os.environ["REFLDM_NUM_THREADS"]
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        threads = str(max(1, cpus // n))
    return {key: os.environ.get(key) or threads for key in THREAD_VARIABLES}


class _Pool:
    """Helper threads that take work from a shared queue of jobs. The calling thread always works too,
    so `threads` threads compute with threads - 1 helpers."""

    def __init__(self, helpers: int):
        self.helpers = helpers
        self.queue = queue.SimpleQueue()
        for k in range(helpers):
            threading.Thread(target=self._serve, name=f"refldm-{k}", daemon=True).start()

    def _next(self):
        spin = SPIN_SECONDS
        if spin > 0:
            deadline = time.perf_counter() + spin
            while time.perf_counter() < deadline:
                try:
                    return self.queue.get_nowait()
                except queue.Empty:
                    os.sched_yield()
        return self.queue.get()

    def _serve(self):
        while True:
            job = self._next()
            if job is None:  # retired (set_num_threads): leave
                return
            job.work()

    def retire(self):
        for _ in range(self.helpers):
            self.queue.put(None)


class _State:
    threads = None    # read from the environment on first use
    pool = None       # the _Pool for `threads`, made on first parallel call
    lock = threading.Lock()


def num_threads() -> int:
    """How many host threads the accelerated ops use (REFLDM_NUM_THREADS, else the number of CPUs this
    process may run on). A bad REFLDM_NUM_THREADS raises AccelError here, naming the variable."""
    if _State.threads is None:
        _State.threads = _threads_from_env()
    return _State.threads


def set_num_threads(n: int) -> None:
    """Set the number of host threads (1 = everything on the calling thread).

    Safe while other threads compute: a call already running keeps the pool it started with; the next
    call makes a pool of the new size, and the old pool's helpers leave once its queue is empty.
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: expected an integer from 1 to {MAX_THREADS}, got {n!r}")
    _State.threads = n


def _pool(threads: int) -> _Pool:
    with _State.lock:
        if _State.pool is None or _State.pool.helpers != threads - 1:
            if _State.pool is not None:
                _State.pool.retire()
            _State.pool = _Pool(threads - 1)
        return _State.pool


class _Job:
    """fn over items, taken one at a time by whichever thread asks next (the caller and the helpers)."""

    def __init__(self, fn, items):
        self.fn, self.items = fn, items
        self.results = [None] * len(items)
        self.errors = {}                     # item index -> exception
        self.taken = itertools.count()       # next() is atomic: each index goes to exactly one thread
        self.left = len(items)
        self.lock = threading.Lock()
        self.done = threading.Event()

    def work(self):
        while (i := next(self.taken)) < len(self.items):
            try:
                self.results[i] = self.fn(self.items[i])
            except BaseException as e:  # noqa: BLE001 - raised by the caller, see parallel_map
                self.errors[i] = e
            with self.lock:
                self.left -= 1
                if self.left == 0:
                    self.done.set()

    def wait(self, pool: _Pool):
        """Until every item is finished; meanwhile run other jobs' items from the queue (a helper
        busy with a nested job's caller never leaves queued work waiting on it)."""
        while not self.done.is_set():
            try:
                other = pool.queue.get_nowait()
            except queue.Empty:
                self.done.wait(0.0005)
                continue
            if other is None:        # a retirement notice meant for a helper: pass it on
                pool.queue.put(None)
                self.done.wait(0.0005)
                continue
            other.work()


def parallel_map(fn, items) -> list:
    """[fn(item) for item in items], spread over the host threads; the results keep their order.

    The calling thread takes items like every helper, so a call made from inside an item (a nested
    call) cannot deadlock, and uses the helpers that are free. The host BLAS is held to one thread per
    call throughout, so every item computes the same bytes whichever thread runs it and for any thread
    count. Runs serially with one thread or a single item. An exception in an item is raised here
    (the one of the lowest item index), after all the other items have finished.
    """
    items = list(items)
    threads = num_threads()
    with single_threaded_blas():
        if threads == 1 or len(items) < 2:
            return [fn(item) for item in items]
        pool = _pool(threads)  # a local reference: set_num_threads elsewhere cannot take it away
        job = _Job(fn, items)
        for _ in range(min(pool.helpers, len(items) - 1)):
            pool.queue.put(job)
        job.work()
        job.wait(pool)
        if job.errors:
            raise job.errors[min(job.errors)]
        return job.results


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
    _State.pool = None
    _State.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
