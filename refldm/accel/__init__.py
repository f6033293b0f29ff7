"""The speed layer: everything that exists only to make the host (NumPy) ops fast.

refldm/core/ops.py is the reference: each op computes the equation in its docstring with the array
namespace alone. Models call the ops through refldm/core/functional.py, the one place where the speed
layer plugs in: on the host, an op whose reference would be slow has its (already checked) inputs handed
to the kernel of the same name here,

    if _fast(x, weight, bias):                      # accel.active(xp): NumPy arrays, switch on
        return accel.conv2d(x, weight, bias, (sh, sw), (top, bottom, left, right))
    return ops.conv2d(x, weight, bias, stride, padding)

What lives here: the thread pool (`threads`), the host BLAS's thread count and an in-place gemm
through ctypes (`blas`), and the fast kernels (`kernels`: per-tap in-place convolution, blocked
attention, in-place elementwise passes, the float32 erf polynomial). tests/test_accel.py proves every
kernel equal to its reference op. Models, samplers and the pipelines never import this package; the
CLI imports it for ``--reference`` only.

May import: nothing from refldm but itself and refldm.errors (it works on plain NumPy arrays).

The switch (the reference runs everywhere when it is off; GPU backends always run the reference):

    REFLDM_ACCEL=0 refldm demo              # environment: 0 = reference only, 1 = accelerated (default)
    refldm txt2img --reference ...          # every computing command takes --reference
    refldm.accel.enabled(False)             # from Python, for the rest of the process
    with refldm.accel.enabled(False): ...   # for a block, then back to what it was
"""

from __future__ import annotations

import os

import numpy

from refldm.accel.blas import blas_threads_controllable, gemm_available, gemm_into, single_threaded_blas
from refldm.accel.errors import AccelError
from refldm.accel.kernels import (conv2d, geglu, gelu, group_norm, layer_norm, linear, quick_gelu,
                                  scaled_dot_product_attention, silu, softmax, upsample_nearest2x)
from refldm.accel.threads import num_threads, parallel_map, set_num_threads

__all__ = [
    "active", "enabled", "is_enabled", "AccelError", "num_threads", "set_num_threads", "parallel_map",
    "single_threaded_blas", "blas_threads_controllable", "gemm_into", "gemm_available",
    "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
    "scaled_dot_product_attention", "upsample_nearest2x",
]

ENV = "REFLDM_ACCEL"


def _from_env() -> bool:
    value = os.environ.get(ENV, "").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise AccelError(f"{ENV} must be 0 (run the reference ops only) or 1 (use the accelerated host "
                     f"ops, the default), got {value!r}")


class _Switch:
    on = None  # None: not decided yet, read REFLDM_ACCEL on first use


def is_enabled() -> bool:
    """True when the accelerated host kernels are in use (REFLDM_ACCEL, or the last `enabled` call).
    A REFLDM_ACCEL other than 0 or 1 raises AccelError here, naming the variable."""
    if _Switch.on is None:
        _Switch.on = _from_env()
    return _Switch.on


def active(xp) -> bool:
    """True when an op on arrays of namespace `xp` should run its accelerated kernel: the switch is on
    and the arrays are host NumPy arrays (CuPy and the fake device always run the reference).
    The first call also reads REFLDM_NUM_THREADS, so that a bad value is reported even by a run whose
    arrays are too small ever to need the thread pool."""
    if xp is not numpy or not is_enabled():
        return False
    num_threads()
    return True


class enabled:
    """Turn the accelerated kernels on or off, for the whole process; a plain call or a context manager.

    ``enabled(False)`` runs the pure reference from then on; ``with enabled(False):`` for a block,
    then back to what it was. Overrides REFLDM_ACCEL.
    """

    def __init__(self, on: bool = True):
        if not isinstance(on, bool):
            raise TypeError(f"accel.enabled: expected True or False, got {on!r}")
        self._previous = _Switch.on
        _Switch.on = on

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _Switch.on = self._previous
        return False
