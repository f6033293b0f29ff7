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

import numpy

__all__ = [
    "use", "name", "xp", "array_namespace", "asarray", "to_numpy", "resolve_dtype", "erf",
    "BackendError", "BACKENDS",
]

BACKENDS = ("numpy", "cupy", "fakegpu")
DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here."""


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

    Raises ValueError when arrays from two devices are mixed (host NumPy and GPU arrays).
    """
    found = None
    for a in arrays:
        if a is None or isinstance(a, (int, float, bool, complex)):
            continue
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


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise, on x's device.

    NumPy has no erf, so this is the one place that uses scipy.special (cupyx.scipy.special on a GPU).
    """
    ns = array_namespace(x)
    if ns is numpy:
        from scipy.special import erf as _erf
        return _erf(x)
    if ns.__name__ == "cupy":  # pragma: no cover - needs a GPU
        from cupyx.scipy.special import erf as _erf
        return _erf(x)
    return ns.erf(x)


_env = os.environ.get("REFLDM_BACKEND")
if _env:
    use(_env.strip().lower())
