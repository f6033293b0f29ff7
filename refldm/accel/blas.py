"""The host BLAS (OpenBLAS, the one NumPy ships): its thread count, and an in-place gemm.

Two things NumPy cannot ask its BLAS for, reached here the way threadpoolctl does, through the
OpenBLAS library this process has already loaded (found in /proc/self/maps, Linux):
- `single_threaded_blas()`: run BLAS calls on the calling thread only (inside the thread pool, and
  for small products, where waking BLAS's own threads costs more than the product);
- `gemm_into(a, b, c, accumulate)`: C = A B (+ C) in place, reading windows of larger arrays where
  they lie. A convolution is a sum of such products, one per kernel tap.
Where no OpenBLAS is found, nothing is changed and gemm_into computes with numpy.matmul.
"""

from __future__ import annotations

import os
import threading

import numpy

__all__ = ["single_threaded_blas", "blas_threads_controllable", "gemm_into", "gemm_available",
           "small_product"]


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
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


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


def _call_gemm(fn, a, b, c, beta, b_transposed=False):
    """c = a @ b + beta c, or a @ b^T + beta c; b as it lies, (K, N), or (N, K) when transposed."""
    item = a.itemsize
    m, k = a.shape
    n = b.shape[0] if b_transposed else b.shape[1]
    fn(_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS if b_transposed else _CBLAS_NO_TRANS, m, n, k, 1.0,
       a.ctypes.data, a.strides[0] // item, b.ctypes.data, b.strides[0] // item,
       beta, c.ctypes.data, c.strides[0] // item)


def _gemm_self_test(fn, dtype) -> bool:
    """Accumulate a small product with windows of larger arrays and compare with NumPy."""
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((5, 9)).astype(dtype)[:, 2:7]      # (5, 5), leading dimension 9
    b = rng.standard_normal((5, 11)).astype(dtype)[:, 1:4]     # (5, 3), leading dimension 11
    c = rng.standard_normal((5, 6)).astype(dtype)
    expected = c[:, 1:4] + a @ b
    bt = numpy.ascontiguousarray(b.T)
    expected_t = a @ b
    out_t = numpy.empty((5, 3), dtype=dtype)
    try:
        _call_gemm(fn, a, b, c[:, 1:4], 1.0)
        _call_gemm(fn, a, bt, out_t, 0.0, b_transposed=True)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False
    return bool(numpy.allclose(c[:, 1:4], expected, rtol=1e-5, atol=1e-5)
                and numpy.allclose(out_t, expected_t, rtol=1e-5, atol=1e-5))


def _gemm_ready(a, b, c, b_transposed=False):
    """True when the host BLAS can run c = a @ b + beta c (a @ b^T + beta c) on these arrays as they lie."""
    if not (type(a) is type(b) is type(c) is numpy.ndarray and a.ndim == b.ndim == c.ndim == 2):
        return False
    if not (a.dtype == b.dtype == c.dtype) or a.dtype not in _CBLAS_GEMM or not c.flags.writeable:
        return False
    if not (a.flags.aligned and b.flags.aligned and c.flags.aligned):
        return False
    (m, k), (k2, n) = a.shape, (b.shape[::-1] if b_transposed else b.shape)
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


def gemm_into(a, b, c, accumulate: bool = False, b_transposed: bool = False) -> None:
    """c = a @ b  (accumulate=False)  or  c += a @ b  (accumulate=True), for 2-D arrays, in place;
    with b_transposed=True, b is given as (N, K) and the product is a @ b^T.

    a: (M, K), b: (K, N), c: (M, N). The rows of each may be a window of a larger row-major array
    (unit stride along a row, any stride between rows). On the host, float32 and float64 go straight
    to the BLAS gemm (C = alpha A B + beta C with alpha = 1, beta = 0 or 1): no temporary, no copy of
    a window. Everything else (float16, other strides) computes the same with numpy.matmul.
    """
    if _gemm_ready(a, b, c, b_transposed):
        _call_gemm(_Blas.gemm[a.dtype], a, b, c, 1.0 if accumulate else 0.0, b_transposed)
    else:
        b = b.T if b_transposed else b
        if accumulate:
            c += numpy.matmul(a, b)
        else:
            numpy.matmul(a, b, out=c)


def small_product(m: int, n: int, k: int) -> bool:
    """True for a matrix product too small to pay for BLAS's helper threads: under about SMALL_FLOPS
    multiply-adds, one core finishes before the others would have woken up (the built-in model's
    products are all of this kind)."""
    return m * n * k <= SMALL_FLOPS


# M N K below which a product runs on one BLAS thread: about 1-2 ms of one core at 50 GFLOP/s. On a
# busy machine, handing a product to BLAS's sleeping helper threads can cost whole scheduler time
# slices; the built-in model's products are all below this, SD's are far above it.
SMALL_FLOPS = 2**26


def _after_fork_in_child():
    """A forked child has none of the parent's threads: undo a BLAS limit that was in force at the
    fork (the child has no way to close that block)."""
    if _Blas.depth and _Blas.controls:
        for (_, set_), n in zip(_Blas.controls, _Blas.saved):
            set_(n)
    _Blas.depth = 0
    _Blas.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
