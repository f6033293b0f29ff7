"""The C math library's float32 functions through ctypes (used by refldm.core.random)."""

from __future__ import annotations

# The C library's float32 math, for refldm.core.random's torch-compatible noise on CPUs where torch uses its
# scalar kernel (logf/cosf/sinf give the same bits as torch there). A ctypes binding, so it lives in the speed layer
# beside the BLAS binding.

_LIBM = None


def libm_float32():
    """The C math library with ``logf``, ``cosf``, ``sinf`` set up for float32 calls, or None where none loads."""
    global _LIBM
    if _LIBM is None:
        import ctypes
        import ctypes.util
        _LIBM = False
        name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name)
            for fn in ("logf", "cosf", "sinf"):
                f = getattr(lib, fn)
                f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
            _LIBM = lib
        except (OSError, AttributeError, TypeError):
            pass
    return _LIBM or None
