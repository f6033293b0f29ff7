"""A pretend second device, for testing GPU discipline on a machine without a GPU.

``refldm.backend.use("fakegpu")`` makes this module the array namespace. Its arrays hold NumPy data
but behave like CuPy arrays in the ways that break code written only for NumPy:

- implicit conversion to the host fails: ``numpy.asarray(a)``, ``numpy.exp(a)``, ``a + host_array``
  raise TypeError, as CuPy does; ``a.get()`` or ``refldm.backend.to_numpy(a)`` is the explicit way;
- mixing host (``numpy.ndarray``) and device arrays in one call raises TypeError;
- full reductions return 0-d device arrays, not Python or NumPy scalars.

Every NumPy function is reachable as ``fakedevice.<name>`` and runs on the unwrapped data, so
op code written against the namespace (``xp.matmul``, ``xp.exp``) runs unchanged.
"""

from __future__ import annotations

import numpy as _np

_HOST_ERROR = ("fakegpu: implicit conversion of a device array to a host NumPy array is not allowed; "
               "use refldm.backend.to_numpy(a) (as CuPy requires .get())")


class ndarray:
    """An array that lives on the pretend device; wraps a NumPy array `_a`."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy ufuncs refuse device arrays, as they refuse CuPy arrays

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError(_HOST_ERROR)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(_HOST_ERROR + f" (numpy.{func.__name__} was called on a device array)")

    def get(self):
        """Copy to the host, the explicit way (CuPy's ``ndarray.get``)."""
        return self._a.copy()

    # shape and type, as on any array
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray(self._a.T))
    flags = property(lambda self: self._a.flags)

    def __getattr__(self, name):
        if name.startswith("__"):
            # no protocol is forwarded: __array_interface__, __array_struct__, __buffer__ and the like
            # would let NumPy read the data behind our back (CuPy arrays have none of them)
            raise AttributeError(f"fakegpu.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)
        return _wrap_callable(attr) if callable(attr) else _wrap(attr)

    def __repr__(self):
        return f"fakegpu.{self._a!r}"

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(_np.asarray(v)) for v in self._a)

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap(idx)])

    def __setitem__(self, idx, value):
        self._a[_unwrap(idx)] = _unwrap(value)


def _binary(op):
    def method(self, other):
        return _wrap(getattr(self._a, op)(_unwrap(other)))
    method.__name__ = op
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
            "lshift", "rshift", "lt", "le", "gt", "ge", "eq", "ne"):
    for _name in (f"__{_op}__", f"__r{_op}__", f"__i{_op}__"):
        if hasattr(_np.ndarray, _name):
            setattr(ndarray, _name, _binary(_name))
for _name in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(ndarray, _name, (lambda n: lambda self: _wrap(getattr(self._a, n)()))(_name))
ndarray.__hash__ = None


def _unwrap(x):
    """Device array -> its NumPy data; a host array here is the mistake we exist to catch."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise TypeError("fakegpu: a host NumPy array was mixed with device arrays; "
                        "move it with refldm.backend.asarray first")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, _np.ndarray):
        return ndarray(x)
    if isinstance(x, _np.generic) and not isinstance(x, (_np.dtype,)):
        return ndarray(_np.asarray(x))  # CuPy reductions give 0-d arrays, not scalars
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _wrap_callable(f):
    def call(*args, **kwargs):
        return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = getattr(f, "__name__", "call")
    call.__doc__ = getattr(f, "__doc__", None)
    return call


def asarray(a, dtype=None):
    """Copy host data to the device (explicit, like ``cupy.asarray``)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else ndarray(a._a.astype(dtype))
    return ndarray(_np.array(a, dtype=dtype))


array = asarray


def erf(x, out=None):
    """erf(x) elementwise, on the device (what cupyx.scipy.special.erf gives on a real GPU)."""
    from scipy.special import erf as _erf
    if out is None:
        return ndarray(_erf(_unwrap(x)))
    _erf(_unwrap(x), out=_unwrap(out))
    return out


def __getattr__(name):
    attr = getattr(_np, name)
    if isinstance(attr, type) or not callable(attr):
        return attr  # dtypes (float32 ...), constants (pi, newaxis ...)
    return _wrap_callable(attr)
