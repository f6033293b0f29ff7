"""The backend switch (refldm/backend.py) and the fake device (refldm/fakedevice.py).

The fake device exists so that CPU-only CI fails where CuPy would: these tests pin down that it does
refuse implicit host conversion and host/device mixing, and that the switch itself behaves (call and
context manager, REFLDM_BACKEND, a clear error where cupy is missing, dtype names, the host thread pool).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from refldm import backend, fakedevice

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
    assert out.stdout.split() == ["fakegpu", "refldm.fakedevice"]
    out = python("from refldm import backend; print(backend.name())")
    assert out.stdout.strip() == "numpy"


def test_refldm_backend_env_with_a_bad_name_fails_at_import():
    out = python("import refldm.backend", REFLDM_BACKEND="tpu")
    assert out.returncode != 0
    assert "BackendError" in out.stderr and "'tpu'" in out.stderr


@pytest.mark.skipif(has_cupy(), reason="cupy and a GPU are present here")
def test_refldm_backend_env_cupy_where_absent_fails_clearly():
    out = python("import refldm.backend", REFLDM_BACKEND="cupy")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("refldm.backend.BackendError") and "cupy" in last.lower()


def test_refldm_num_threads_env():
    out = python("from refldm import backend; print(backend.num_threads())", REFLDM_NUM_THREADS="3")
    assert out.stdout.strip() == "3", out.stderr
    out = python("import refldm.backend", REFLDM_NUM_THREADS="many")
    assert out.returncode != 0 and "REFLDM_NUM_THREADS" in out.stderr


# --------------------------------------------------------------------------------------------------
# host thread pool and BLAS threads

def test_parallel_map_keeps_order_and_raises():
    before = backend.num_threads()
    try:
        backend.set_num_threads(3)
        assert backend.parallel_map(lambda i: i * i, range(50)) == [i * i for i in range(50)]
        names = set(backend.parallel_map(lambda i: threading.current_thread().name, range(40)))
        assert any(n.startswith("refldm") for n in names)

        def boom(i):
            if i == 7:
                raise KeyError("seven")
            return i

        with pytest.raises(KeyError, match="seven"):
            backend.parallel_map(boom, range(20))
        # a nested call from a worker runs serially instead of waiting on the busy pool
        nested = backend.parallel_map(lambda i: sum(backend.parallel_map(lambda j: j, range(i))), range(10))
        assert nested == [sum(range(i)) for i in range(10)]
        backend.set_num_threads(1)
        assert backend.parallel_map(lambda i: threading.current_thread().name, range(3)) == \
            [threading.current_thread().name] * 3
    finally:
        backend.set_num_threads(before)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="set_num_threads"):
            backend.set_num_threads(bad)


def test_single_threaded_blas_restores_the_thread_count():
    if not backend.blas_threads_controllable():
        pytest.skip("no OpenBLAS found in this process")
    controls = backend._openblas_controls()
    before = [get() for get, _ in controls]
    with backend.single_threaded_blas():
        assert [get() for get, _ in controls] == [1] * len(controls)
        with backend.single_threaded_blas():  # nested: the inner exit must not restore early
            pass
        assert [get() for get, _ in controls] == [1] * len(controls)
    assert [get() for get, _ in controls] == before


# --------------------------------------------------------------------------------------------------
# gemm_into: C = A B (+ C) in place, straight to the host BLAS where it can

def test_numpy_blas_gemm_is_found_where_openblas_is():
    """NumPy's wheels ship OpenBLAS: there, the direct gemm (and so the host conv path) must be in use."""
    if not backend.blas_threads_controllable():
        pytest.skip("no OpenBLAS found in this process")
    assert backend.gemm_available(np.float32) and backend.gemm_available(np.float64)
    assert not backend.gemm_available(np.float16)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13), (np.float16, 1e-2)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_into_matches_matmul_on_windows(dtype, tol, accumulate):
    """Windows of larger arrays (row strides != row lengths), accumulate or overwrite, every dtype
    (float16 takes the NumPy fallback); the parts of C outside the window are never touched."""
    rng = np.random.default_rng(3)
    for m, k, n in [(1, 1, 1), (4, 7, 5), (33, 65, 17), (128, 96, 300)]:
        big_a = rng.standard_normal((m, k + 5)).astype(dtype)
        big_b = rng.standard_normal((k, n + 9)).astype(dtype)
        big_c = rng.standard_normal((m + 2, n + 4)).astype(dtype)
        a, b, c = big_a[:, 3:3 + k], big_b[:, 2:2 + n], big_c[1:1 + m, 4:]
        before = big_c.copy()
        expected = (c.astype(np.float64) if accumulate else 0.0) + a.astype(np.float64) @ b.astype(np.float64)
        backend.gemm_into(a, b, c, accumulate=accumulate)
        scale = np.abs(expected).max()
        assert np.abs(c - expected).max() <= tol * scale * max(1, k)
        outside = np.ones(big_c.shape, dtype=bool)
        outside[1:1 + m, 4:] = False
        np.testing.assert_array_equal(big_c[outside], before[outside])


def test_gemm_into_takes_the_numpy_path_for_what_blas_cannot_read():
    """A column stride, C overlapping an input, or unaligned data goes to NumPy and still gives the product."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 10))[:, ::2]            # column stride 2
    b = rng.standard_normal((5, 4))
    c = np.zeros((6, 4))
    backend.gemm_into(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-13)
    assert not backend._gemm_ready(a, b, c)
    buf = rng.standard_normal((4, 8))
    a2, c2 = buf[:, :4], buf[:, 4:]                      # C shares a buffer with A
    assert not backend._gemm_ready(a2, np.eye(4), c2)
    raw = np.zeros(8 * 12 + 1, dtype=np.uint8)[1:]       # float64 data one byte off alignment
    unaligned = raw.view(np.float64).reshape(3, 4)
    assert not unaligned.flags.aligned and not backend._gemm_ready(np.eye(3), np.ones((3, 4)), unaligned)
    backend.gemm_into(np.eye(3), np.ones((3, 4)), unaligned)
    np.testing.assert_array_equal(unaligned, np.ones((3, 4)))


def test_gemm_into_on_the_fake_device(fake):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    c = fake.asarray(np.ones((3, 2)))
    backend.gemm_into(fake.asarray(a), fake.asarray(b), c, accumulate=True)
    np.testing.assert_allclose(backend.to_numpy(c), 1.0 + a @ b, rtol=1e-13)
