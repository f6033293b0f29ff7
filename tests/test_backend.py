"""The backend switch (refldm/backend.py) and the fake device (refldm/testing/fakedevice.py).

The fake device exists so that CPU-only CI fails where CuPy would: these tests pin down that it does
refuse implicit host conversion and host/device mixing, and that the switch itself behaves (call and
context manager, REFLDM_BACKEND, a clear error where cupy is missing, dtype names, the host thread pool).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refldm import backend
from refldm.testing import fakedevice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_cupy() -> bool:
    try:
        backend.use("cupy").__exit__()
        return True
    except backend.BackendError:
        return False


def python(code: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (so REFLDM_* variables are read at import)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REFLDM_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=120)


# --------------------------------------------------------------------------------------------------
# the fake device

@pytest.fixture
def fake():
    with backend.use("fakegpu") as ns:
        yield ns


def test_fake_device_refuses_implicit_host_conversion(fake):
    x = backend.asarray(np.arange(6.0).reshape(2, 3))
    assert isinstance(x, fakedevice.ndarray)
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError):
        np.array(x)
    with pytest.raises(TypeError):
        np.exp(x)  # a NumPy ufunc on a device array
    with pytest.raises(TypeError):
        np.sum(x)  # a NumPy function on a device array


def test_fake_device_refuses_mixing_host_and_device(fake):
    x = backend.asarray(np.ones(3))
    host = np.ones(3)
    for mix in (lambda: x + host, lambda: host + x, lambda: x * host, lambda: fake.matmul(x, host),
                lambda: fake.concatenate([x, host])):
        with pytest.raises(TypeError, match="host NumPy array was mixed|implicit conversion"):
            mix()
    with pytest.raises(ValueError, match="mixed"):
        backend.array_namespace(x, host)


def test_fake_device_accepts_scalars_like_cupy(fake):
    x = backend.asarray(np.ones(3, np.float32))
    for y in (x * 2, x * 2.5, x + np.float32(1), fake.exp(x), fake.asarray(3.0, dtype=np.float32) * x):
        assert isinstance(y, fakedevice.ndarray)
    assert (x * 2.5).dtype == np.float32  # Python scalars do not promote
    assert backend.array_namespace(x, 2.0, np.float64(3.0), None) is fake


def test_fake_device_reductions_stay_on_device(fake):
    x = backend.asarray(np.arange(4.0))
    total = fake.sum(x)
    assert isinstance(total, fakedevice.ndarray) and total.shape == ()
    assert float(total) == 6.0  # an explicit scalar conversion is allowed, as on CuPy
    assert isinstance(x.max(), fakedevice.ndarray)


def test_fake_device_views_and_in_place_updates(fake):
    x = backend.asarray(np.zeros((2, 3)))
    view = x[:, 1:]
    view += 1.0
    x[0, 0] = 5.0
    fake.exp(x[1], out=x[1])
    np.testing.assert_array_equal(backend.to_numpy(x), [[5, 1, 1], [1, np.e, np.e]])


def test_to_numpy_copies_device_arrays_to_the_host(fake):
    data = np.arange(5.0)
    x = backend.asarray(data)
    back = backend.to_numpy(x)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, data)
    back[0] = 99.0  # a copy: the device array is unchanged
    assert backend.to_numpy(x)[0] == 0.0
    assert backend.to_numpy(data) is data  # host arrays pass through
    np.testing.assert_array_equal(backend.to_numpy([1, 2]), [1, 2])


def test_erf_on_every_backend_with_out():
    import math
    values = np.linspace(-3, 3, 13)
    expected = [math.erf(v) for v in values]
    for name in ("numpy", "fakegpu"):
        with backend.use(name):
            x = backend.asarray(values)
            np.testing.assert_allclose(backend.to_numpy(backend.erf(x)), expected, rtol=1e-15, atol=1e-16)
            out = backend.xp().empty_like(x)
            assert backend.erf(x, out=out) is out
            np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-15, atol=1e-16)


# --------------------------------------------------------------------------------------------------
# the switch

def test_use_as_a_call_switches_until_switched_back():
    assert backend.name() == "numpy"
    try:
        backend.use("fakegpu")
        assert backend.name() == "fakegpu" and backend.xp() is fakedevice
        assert isinstance(backend.asarray([1.0]), fakedevice.ndarray)
    finally:
        backend.use("numpy")
    assert backend.name() == "numpy" and backend.xp() is np


def test_use_as_a_context_manager_restores_even_after_an_error():
    with backend.use("fakegpu") as ns:
        assert ns is fakedevice and backend.name() == "fakegpu"
        with backend.use("numpy"):
            assert backend.name() == "numpy"
        assert backend.name() == "fakegpu"
    assert backend.name() == "numpy"
    with pytest.raises(RuntimeError):
        with backend.use("fakegpu"):
            raise RuntimeError("inside")
    assert backend.name() == "numpy"


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(backend.BackendError) as info:
        backend.use("tpu")
    assert "'tpu'" in str(info.value) and "numpy" in str(info.value) and "\n" not in str(info.value)
    assert backend.name() == "numpy"


@pytest.mark.skipif(has_cupy(), reason="cupy and a GPU are present here")
def test_asking_for_cupy_where_absent_is_one_clear_error():
    with pytest.raises(backend.BackendError) as info:
        backend.use("cupy")
    message = str(info.value)
    assert "cupy" in message.lower() and "\n" not in message
    assert "pip install" in message or "GPU" in message
    assert backend.name() == "numpy"


def test_asarray_moves_between_backends_with_dtype():
    host = np.arange(4, dtype=np.float64)
    with backend.use("fakegpu"):
        d = backend.asarray(host, dtype="float32")
        assert isinstance(d, fakedevice.ndarray) and d.dtype == np.float32
        assert backend.asarray(d) is not None
    back = backend.asarray(d)  # numpy active: a device array comes back to the host
    assert type(back) is np.ndarray and back.dtype == np.float32
    np.testing.assert_array_equal(back, host)


def test_array_namespace_rules():
    assert backend.array_namespace(np.ones(2), 3.0, None) is np
    assert backend.array_namespace(1.0, np.float32(2)) is backend.xp()  # scalars only: the active one
    with pytest.raises(ValueError, match="not an array"):
        backend.array_namespace([1.0, 2.0])


def test_resolve_dtype():
    assert backend.resolve_dtype("float32") == np.float32
    assert backend.resolve_dtype("float64") == np.float64
    assert backend.resolve_dtype("float16") == np.float16
    assert backend.resolve_dtype(np.float32) == np.float32
    assert backend.resolve_dtype(np.dtype("float64")) == np.float64
    for bad in ("int8", "bfloat16", "double", np.int32):
        with pytest.raises(ValueError, match="unsupported dtype") as info:
            backend.resolve_dtype(bad)
        assert "float32" in str(info.value)


# --------------------------------------------------------------------------------------------------
# environment variables, in fresh interpreters

def test_refldm_backend_env_selects_the_backend_at_import():
    out = python("from refldm import backend; print(backend.name(), type(backend.asarray([1.0])).__module__)",
                 REFLDM_BACKEND="fakegpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fakegpu", "refldm.testing.fakedevice"]
    out = python("from refldm import backend; print(backend.name())")
    assert out.stdout.strip() == "numpy"


def test_refldm_backend_env_with_a_bad_name_fails_on_first_use_not_at_import():
    """`import refldm.backend` must not crash (a command may pick another backend with --backend); the
    first use of the backend raises BackendError with one line naming the variable."""
    out = python("import refldm, refldm.backend; print('imported')", REFLDM_BACKEND="tpu")
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr
    out = python("from refldm import backend; backend.asarray([1.0])", REFLDM_BACKEND="tpu")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("refldm.errors.BackendError: REFLDM_BACKEND=tpu")
    assert "'tpu'" in last and "numpy" in last
    out = python("from refldm import backend; backend.use('numpy'); print(backend.name())", REFLDM_BACKEND="tpu")
    assert out.stdout.strip() == "numpy", out.stderr  # an explicit choice replaces the bad variable


@pytest.mark.skipif(has_cupy(), reason="cupy and a GPU are present here")
def test_refldm_backend_env_cupy_where_absent_fails_clearly_on_first_use():
    out = python("import refldm.backend", REFLDM_BACKEND="cupy")
    assert out.returncode == 0, out.stderr
    out = python("from refldm import backend; backend.xp()", REFLDM_BACKEND="cupy")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("refldm.errors.BackendError: REFLDM_BACKEND=cupy")
    assert "cupy" in last.lower()


@pytest.mark.parametrize("value", ["0", "abc", "-2", "100000"])
def test_refldm_num_threads_env_bad_value_fails_on_first_use(value):
    out = python("from refldm import accel; print(accel.num_threads())", REFLDM_NUM_THREADS="3")
    assert out.stdout.strip() == "3", out.stderr
    out = python("import refldm, refldm.backend, refldm.core.ops, refldm.core.functional; print('imported')",
                 REFLDM_NUM_THREADS=value)
    assert out.returncode == 0, out.stderr
    out = python("from refldm import accel; accel.num_threads()", REFLDM_NUM_THREADS=value)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "REFLDM_NUM_THREADS must be an integer from 1 to 1024" in last and repr(value) in last
