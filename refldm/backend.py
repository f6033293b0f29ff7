"""The one place that knows where arrays live: NumPy on the CPU or CuPy on an NVIDIA GPU.

Every other module asks this one (or its input arrays) for the array namespace ``xp`` and writes
``xp.exp(x)``, ``xp.matmul(a, b)``, never ``numpy.exp`` directly. The switch:

    REFLDM_BACKEND=cupy python ...            # environment, read at import
    refldm.backend.use("cupy")                # from Python, for the rest of the process
    with refldm.backend.use("cupy"): ...      # for a block, then back to what it was

A third backend, ``"fakegpu"``, exists for tests: NumPy arrays wrapped as if they lived on another
device (see ``refldm/fakedevice.py``). It fails, as CuPy would, on implicit host conversion and on
mixing host and device arrays, so CPU-only CI catches code that would break on a GPU.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy

__all__ = [
    "use", "name", "xp", "array_namespace", "asarray", "to_numpy", "resolve_dtype", "erf",
    "is_host", "num_threads", "set_num_threads", "parallel_map", "single_threaded_blas",
    "blas_threads_controllable", "gemm_into", "gemm_available", "BackendError", "BACKENDS",
]

BACKENDS = ("numpy", "cupy", "fakegpu")
DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


from refldm.errors import BackendError  # one home for the error classes


def _load(name: str):
    """Import and return the namespace module of backend `name`."""
    if name == "numpy":
        return numpy
    if name == "fakegpu":
        from refldm import fakedevice
        return fakedevice
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise BackendError(
                "backend 'cupy' needs CuPy: pip install 'refldm[gpu]' (cupy-cuda12x) "
                f"on a machine with an NVIDIA GPU ({e})") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # pragma: no cover - depends on the machine
            raise BackendError(f"backend 'cupy': CuPy is installed but no CUDA GPU is usable ({e})") from None
        if count < 1:  # pragma: no cover
            raise BackendError("backend 'cupy': CuPy is installed but no CUDA GPU is visible")
        return cupy
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


class _State:
    name = "numpy"
    module = numpy


_state = _State()


class use:
    """Switch the active backend; works as a plain call or as a context manager.

    ``use("cupy")`` switches for the rest of the process; ``with use("cupy"):`` switches back on exit.
    """

    def __init__(self, name: str):
        module = _load(name)
        self._previous = (_state.name, _state.module)
        _state.name, _state.module = name, module

    def __enter__(self):
        return _state.module

    def __exit__(self, *exc):
        _state.name, _state.module = self._previous
        return False


def name() -> str:
    """The active backend's name: "numpy", "cupy" or "fakegpu"."""
    return _state.name


def xp():
    """The active backend's array namespace (the module to call ``exp``, ``matmul``, ... on)."""
    return _state.module


def array_namespace(*arrays):
    """The namespace the given arrays belong to; Python scalars and None are skipped.

    Raises ValueError when arrays from two devices are mixed (host NumPy and GPU arrays). NumPy
    scalars such as ``numpy.float32(2)`` count as scalars, as they do for CuPy; 0-d NumPy arrays do not.
    """
    found = None
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool, complex, numpy.generic)):
            continue  # scalars (NumPy scalars too: CuPy accepts them beside its arrays) have no device
        mod = type(a).__module__.split(".")[0]
        if mod == "refldm":
            ns = _load("fakegpu")
        elif mod == "cupy":
            ns = _load("cupy")
        elif isinstance(a, (numpy.ndarray, numpy.generic)):
            ns = numpy
        else:
            raise ValueError(f"array_namespace: not an array: {type(a).__name__}")
        if found is None:
            found = ns
        elif ns is not found:
            raise ValueError(
                f"array_namespace: arrays from two devices are mixed ({found.__name__} and {ns.__name__}); "
                "move them with refldm.backend.asarray or to_numpy first")
    return found if found is not None else _state.module


def resolve_dtype(dtype):
    """Turn "float32" / "float64" / "float16" (or a NumPy dtype of those) into a NumPy dtype."""
    key = numpy.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return numpy.dtype(DTYPES[key])


def asarray(x, dtype=None):
    """Put `x` (a NumPy array, a list, or an array of any backend) on the active backend."""
    ns = _state.module
    if dtype is not None:
        dtype = resolve_dtype(dtype) if isinstance(dtype, str) else numpy.dtype(dtype)
    if ns is numpy:
        return numpy.asarray(to_numpy(x), dtype=dtype)
    if _state.name == "fakegpu":
        return ns.asarray(to_numpy(x), dtype=dtype)
    return ns.asarray(x, dtype=dtype)  # cupy accepts host arrays and cupy arrays alike


def to_numpy(x):
    """Bring an array of any backend to the host as a NumPy array (an explicit, deliberate copy)."""
    if isinstance(x, numpy.ndarray):
        return x
    if hasattr(x, "get"):  # cupy.ndarray and the fake device array both use .get()
        return x.get()
    return numpy.asarray(x)


def erf(x, out=None):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise, on x's device.

    NumPy has no erf, so this is the one place that uses scipy.special (cupyx.scipy.special on a GPU).
    `out`, if given, is an array of x's shape, dtype and device that receives the result.
    """
    ns = array_namespace(x, out)
    if ns is numpy:
        from scipy.special import erf as _erf
    elif ns.__name__ == "cupy":  # pragma: no cover - needs a GPU
        from cupyx.scipy.special import erf as _erf
    else:
        _erf = ns.erf
    return _erf(x) if out is None else _erf(x, out=out)


# ---------------------------------------------------------------------------------------------------
# Host parallelism. NumPy's elementwise ufuncs run on one core; BLAS already uses them all. The ops
# therefore cut their elementwise work into cache-sized blocks and hand the blocks to a small thread
# pool (ufuncs and BLAS release the GIL while they run). On a GPU none of this applies: one kernel
# covers the whole array.

def is_host(ns) -> bool:
    """True when namespace `ns` computes on the CPU with NumPy (where blocks and threads pay off)."""
    return ns is numpy


def _threads_from_env() -> int:
    value = os.environ.get("REFLDM_NUM_THREADS", "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            raise BackendError(f"REFLDM_NUM_THREADS must be a positive integer, got {value!r}") from None
        if n < 1:
            raise BackendError(f"REFLDM_NUM_THREADS must be a positive integer, got {value!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Pool:
    threads = 1
    executor = None
    local = threading.local()  # .worker is True inside a pool thread


_pool = _Pool()


def num_threads() -> int:
    """How many host threads the ops use for their elementwise blocks (REFLDM_NUM_THREADS, else the
    number of CPUs this process may run on)."""
    return _pool.threads


def set_num_threads(n: int) -> None:
    """Set the number of host threads the ops use (1 = everything on the calling thread)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
    if n != _pool.threads and _pool.executor is not None:
        _pool.executor.shutdown(wait=True)
        _pool.executor = None
    _pool.threads = n


def _mark_worker():
    _pool.local.worker = True


def parallel_map(fn, items) -> list:
    """[fn(item) for item in items], spread over the host thread pool; the results keep their order.

    While the pool runs, the host BLAS is held to one thread per call (`single_threaded_blas`): the
    pool already gives every core a worker. Runs serially with one thread, with a single item, or
    when called from inside a pool thread (so a nested call cannot deadlock). An exception in any
    item is raised here.
    """
    items = list(items)
    if _pool.threads == 1 or len(items) < 2 or getattr(_pool.local, "worker", False):
        return [fn(item) for item in items]
    if _pool.executor is None:
        _pool.executor = ThreadPoolExecutor(_pool.threads, thread_name_prefix="refldm",
                                            initializer=_mark_worker)
    with single_threaded_blas():
        return list(_pool.executor.map(fn, items))


# A multi-threaded OpenBLAS call wakes its helper threads and waits for them at the end. For the many
# small products of blocked attention that costs tens of microseconds per call on an idle machine, and
# whole scheduler time slices on a busy one; inside the pool each worker should multiply on its own.
# NumPy has no switch for this, so, like threadpoolctl, we call OpenBLAS's own setter, found among
# the libraries this process has loaded (Linux). Where none is found, nothing is changed.
_OPENBLAS_SYMBOLS = [  # (get, set) as exported by the scipy-openblas wheels NumPy ships and by plain builds
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
]


class _Blas:
    libraries = None  # ctypes handles of the loaded OpenBLAS libraries, found on first use
    controls = None   # [(get, set)] for each loaded OpenBLAS
    gemm = None       # {dtype: ctypes function} (cblas ?gemm), see gemm_into
    depth = 0        # how many single_threaded_blas() blocks are open
    saved = []
    lock = threading.Lock()


def _loaded_openblas():
    """The OpenBLAS libraries this process has loaded (ctypes handles, Linux), found once."""
    if _Blas.libraries is None:
        libraries = []
        try:
            import ctypes
            with open("/proc/self/maps") as maps:
                paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()
                                and ".so" in line})
            libraries = [ctypes.CDLL(path) for path in paths]
        except (OSError, ValueError):  # not Linux, or an unreadable map: leave BLAS alone
            libraries = []
        _Blas.libraries = libraries
    return _Blas.libraries


def _openblas_controls():
    if _Blas.controls is None:
        import ctypes
        found = []
        for lib in _loaded_openblas():
            for get, set_ in _OPENBLAS_SYMBOLS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    getter, setter = getattr(lib, get), getattr(lib, set_)
                    getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                    found.append((getter, setter))
                    break
        _Blas.controls = found
    return _Blas.controls


def blas_threads_controllable() -> bool:
    """True when `single_threaded_blas` can actually limit the host BLAS (a loaded OpenBLAS was found)."""
    return bool(_openblas_controls())


class single_threaded_blas:
    """Context manager: host BLAS calls run on the calling thread only, until the block ends.

    Nested and concurrent blocks are counted; the first one in saves and lowers the thread counts,
    the last one out restores them. A no-op where no OpenBLAS is found.
    """

    def __enter__(self):
        controls = _openblas_controls()
        with _Blas.lock:
            if _Blas.depth == 0 and controls:
                _Blas.saved = [get() for get, _ in controls]
                for _, set_ in controls:
                    set_(1)
            _Blas.depth += 1
        return self

    def __exit__(self, *exc):
        with _Blas.lock:
            _Blas.depth -= 1
            if _Blas.depth == 0:
                for (_, set_), n in zip(_openblas_controls(), _Blas.saved):
                    set_(n)
        return False


# ---------------------------------------------------------------------------------------------------
# C = A B + beta C, in place. NumPy's matmul always writes a fresh product, so a sum of products
# (a convolution is nine of them, one per kernel tap) costs a temporary and an extra pass over memory
# per term. BLAS's gemm accumulates into C itself, and reads a matrix where it lies in memory through
# its leading dimension, so a window of a larger array needs no copy. NumPy has no way to ask for
# either, so, as for the thread count above, we call the gemm of the OpenBLAS NumPy itself uses. The
# function is checked against numpy.matmul on first use; anything it cannot take goes to NumPy.

_CBLAS_GEMM = {  # dtype -> symbols, ILP64 (64-bit integers, the "64_" suffix) and LP64 builds
    numpy.dtype(numpy.float32): ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "scipy_cblas_sgemm", "cblas_sgemm"),
    numpy.dtype(numpy.float64): ("scipy_cblas_dgemm64_", "cblas_dgemm64_", "scipy_cblas_dgemm", "cblas_dgemm"),
}
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111


def _find_gemm():
    import ctypes
    found = {}
    for dtype, symbols in _CBLAS_GEMM.items():
        scalar = ctypes.c_float if dtype == numpy.float32 else ctypes.c_double
        for lib in _loaded_openblas():
            name = next((sym for sym in symbols if hasattr(lib, sym)), None)
            if name is None:
                continue
            index = ctypes.c_int64 if name.endswith("64_") else ctypes.c_int
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, index, index, index, scalar,
                           ctypes.c_void_p, index, ctypes.c_void_p, index, scalar, ctypes.c_void_p, index]
            if _gemm_self_test(fn, dtype):
                found[dtype] = fn
                break
    return found


def _call_gemm(fn, a, b, c, beta):
    item = a.itemsize
    m, k = a.shape
    n = b.shape[1]
    fn(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS, m, n, k, 1.0,
       a.ctypes.data, a.strides[0] // item, b.ctypes.data, b.strides[0] // item,
       beta, c.ctypes.data, c.strides[0] // item)


def _gemm_self_test(fn, dtype) -> bool:
    """Accumulate a small product with windows of larger arrays and compare with NumPy."""
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((5, 9)).astype(dtype)[:, 2:7]      # (5, 5), leading dimension 9
    b = rng.standard_normal((5, 11)).astype(dtype)[:, 1:4]     # (5, 3), leading dimension 11
    c = rng.standard_normal((5, 6)).astype(dtype)
    expected = c[:, 1:4] + a @ b
    try:
        _call_gemm(fn, a, b, c[:, 1:4], 1.0)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False
    return bool(numpy.allclose(c[:, 1:4], expected, rtol=1e-5, atol=1e-5))


def _gemm_ready(a, b, c):
    """True when the host BLAS can run c = a @ b + beta c on these arrays as they lie."""
    if not (type(a) is type(b) is type(c) is numpy.ndarray and a.ndim == b.ndim == c.ndim == 2):
        return False
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in _CBLAS_GEMM or not c.flags.writeable:
        return False
    if not (a.flags.aligned and b.flags.aligned and c.flags.aligned):
        return False
    (m, k), (k2, n) = a.shape, b.shape
    if k2 != k or c.shape != (m, n) or 0 in (m, n, k):
        return False
    item = a.itemsize
    for arr in (a, b, c):  # rows in order, unit stride along a row, a leading dimension BLAS accepts
        s0, s1 = arr.strides
        if s1 != item or s0 % item or s0 < arr.shape[1] * item:
            return False
    if numpy.may_share_memory(c, a) or numpy.may_share_memory(c, b):
        return False
    return gemm_available(a.dtype)


def gemm_available(dtype) -> bool:
    """True when `gemm_into` can hand host arrays of this dtype to the BLAS gemm directly."""
    dtype = numpy.dtype(dtype)
    if dtype not in _CBLAS_GEMM:
        return False
    if _Blas.gemm is None:
        _Blas.gemm = _find_gemm()
    return dtype in _Blas.gemm


def gemm_into(a, b, c, accumulate: bool = False) -> None:
    """c = a @ b  (accumulate=False)  or  c += a @ b  (accumulate=True), for 2-D arrays, in place.

    a: (M, K), b: (K, N), c: (M, N). The rows of each may be a window of a larger row-major array
    (unit stride along a row, any stride between rows). On the host, float32 and float64 go straight
    to the BLAS gemm (C = alpha A B + beta C with alpha = 1, beta = 0 or 1): no temporary, no copy of
    a window. Everything else (a GPU, float16, other strides) computes the same with xp.matmul.
    """
    if _gemm_ready(a, b, c):
        _call_gemm(_Blas.gemm[a.dtype], a, b, c, 1.0 if accumulate else 0.0)
    else:
        xp = array_namespace(a, b, c)
        if accumulate:
            c += xp.matmul(a, b)
        else:
            xp.matmul(a, b, out=c)


def _after_fork_in_child():
    """A forked child has none of the parent's threads: forget the pool, and undo a BLAS limit that
    was in force at the fork (the child has no way to close that block)."""
    _pool.executor = None
    _pool.local = threading.local()
    if _Blas.depth and _Blas.controls:
        for (_, set_), n in zip(_Blas.controls, _Blas.saved):
            set_(n)
    _Blas.depth = 0
    _Blas.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_pool.threads = _threads_from_env()


_env = os.environ.get("REFLDM_BACKEND")
if _env:
    use(_env.strip().lower())
