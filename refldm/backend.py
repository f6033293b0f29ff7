"""The one place that knows where arrays live: NumPy on the CPU or CuPy on an NVIDIA GPU.

Every other module asks this one (or its input arrays) for the array namespace ``xp`` and writes
``xp.exp(x)``, ``xp.matmul(a, b)``, never ``numpy.exp`` directly. The switch:

    REFLDM_BACKEND=cupy python ...            # environment, read at import
    refldm.backend.use("cupy")                # from Python, for the rest of the process
    with refldm.backend.use("cupy"): ...      # for a block, then back to what it was

A REFLDM_BACKEND that cannot run here (CuPy missing, an unknown name) does not stop the import: the
first use of the backend raises BackendError, one line naming the variable.

The host thread pool, BLAS controls and C-library bindings are not here: they belong to the speed
layer, `refldm.accel` (``refldm.accel.enabled(False)`` runs the reference ops only, as REFLDM_ACCEL=0
does; the CLI's ``--reference`` calls it). This module knows the array namespace and nothing else.

A third backend, ``"fakegpu"``, exists for tests: NumPy arrays wrapped as if they lived on another
device (see ``refldm/testing/fakedevice.py``). It fails, as CuPy would, on implicit host conversion and on
mixing host and device arrays, so CPU-only CI catches code that would break on a GPU.
"""

from __future__ import annotations

import os

import numpy

__all__ = [
    "use", "name", "xp", "array_namespace", "asarray", "to_numpy", "resolve_dtype", "erf",
    "is_host", "BackendError", "BACKENDS",
]

BACKENDS = ("numpy", "cupy", "fakegpu")
DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


from refldm.errors import BackendError  # one home for the error classes


def _load(name: str):
    """Import and return the namespace module of backend `name`."""
    if name == "numpy":
        return numpy
    if name == "fakegpu":
        from refldm.testing import fakedevice
        return fakedevice
    if name == "cupy":
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise BackendError(
                "backend 'cupy' needs CuPy: pip install 'refldm[gpu]' (CUDA 12) or 'refldm[gpu-cuda13]' "
                f"(CUDA 13) on a machine with an NVIDIA GPU ({e})") from None
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
    error = None  # a BackendError from REFLDM_BACKEND, raised on first use (see _use_from_env)


_state = _State()


class use:
    """Switch the active backend; works as a plain call or as a context manager.

    ``use("cupy")`` switches for the rest of the process; ``with use("cupy"):`` switches back on exit.
    """

    def __init__(self, name: str):
        module = _load(name)
        self._previous = (_state.name, _state.module, _state.error)
        _state.name, _state.module, _state.error = name, module, None

    def __enter__(self):
        return _state.module

    def __exit__(self, *exc):
        _state.name, _state.module, _state.error = self._previous
        return False


def _active():
    """The active backend's module; raises the pending REFLDM_BACKEND error, if any."""
    if _state.error is not None:
        raise _state.error
    return _state.module


def name() -> str:
    """The active backend's name: "numpy", "cupy" or "fakegpu"."""
    _active()
    return _state.name


def xp():
    """The active backend's array namespace (the module to call ``exp``, ``matmul``, ... on)."""
    return _active()


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
    return found if found is not None else _active()


def resolve_dtype(dtype):
    """Turn "float32" / "float64" / "float16" (or a NumPy dtype of those) into a NumPy dtype."""
    key = numpy.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return numpy.dtype(DTYPES[key])


def asarray(x, dtype=None):
    """Put `x` (a NumPy array, a list, or an array of any backend) on the active backend."""
    ns = _active()
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


def is_host(ns) -> bool:
    """True when namespace `ns` computes on the CPU with NumPy."""
    return ns is numpy


def _use_from_env():
    """REFLDM_BACKEND, read at import. A backend that cannot run here is not an error yet: it is kept
    and raised (BackendError, one line naming the variable) on first use of the backend, so that
    `import refldm` and commands that pick another backend (--backend numpy) still work."""
    value = os.environ.get("REFLDM_BACKEND", "").strip().lower()
    if not value:
        return
    try:
        use(value)
    except BackendError as e:
        _state.error = BackendError(f"REFLDM_BACKEND={value}: {e}")


_use_from_env()
