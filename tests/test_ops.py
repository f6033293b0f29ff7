"""Property tests for refldm/core/ops.py (everything but attention, which has tests/test_ops_attention.py).

Each op is checked three ways, on every backend of the `on_backend` fixture (numpy, the fake device,
cupy where present):
- against an independent reference that is not the op itself (explicit loops, scipy, math.erf), in
  float64: relative error max|a - b| / max|b| <= 1e-10;
- against torch.nn.functional (float64 <= 1e-10, float32 <= 1e-5), when torch is installed (CI
  installs it; elsewhere these skip);
- on invariants that hold whatever the implementation (softmax rows sum to 1, a centred identity
  kernel is the identity, group_norm output has zero mean and unit variance per group, ...).
Array values are random normal draws from a seed hypothesis picks; hypothesis chooses the shapes and
options. Outputs must stay on the active backend and keep the input dtype. The ops are called as the
models call them, through refldm.core.functional: on NumPy that runs the host kernels (the speed
layer), on the fake device the reference in ops.py, so both meet the same independent references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import scipy.special
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refldm import backend
from refldm.core import functional as ops  # as the models call them: the host kernels on NumPy, the reference elsewhere
from tests.conftest import require

TOL = {np.float64: 1e-10, np.float32: 1e-5}  # relative error, max|a - b| / max|b|
FIXTURE = [HealthCheck.function_scoped_fixture]  # on_backend only switches the backend: safe to share
DTYPES = st.sampled_from([np.float64, np.float32])


def rel(a, b, scale=None) -> float:
    """Relative error max|a - b| / max|b| of a (any backend) against the host reference b; `scale`,
    when given, replaces max|b| as the denominator."""
    a = backend.to_numpy(a).astype(np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference shape {b.shape}"
    if scale is None:
        scale = np.abs(b).max() if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max(initial=0.0))


def dev(a):
    """A host array onto the active backend."""
    return backend.asarray(a)


def check_out(y, dtype, shape):
    """y lives on the active backend, with the expected dtype and shape."""
    assert backend.array_namespace(y) is backend.xp(), f"output on {type(y)}, not the active backend"
    assert y.dtype == np.dtype(dtype), f"dtype {y.dtype} != {np.dtype(dtype)}"
    assert tuple(y.shape) == tuple(shape), f"shape {tuple(y.shape)} != {tuple(shape)}"


def randn(seed, *shape, dtype=np.float64, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=dtype)


def torch_of(a):
    torch = require("torch")
    return torch.from_numpy(np.array(a, order="C"))  # a copy, keeping 0-d arrays 0-d


# --------------------------------------------------------------------------------------------------
# conv2d

@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    form = draw(st.sampled_from(["int", "pair", "asym"]))
    if form == "int":
        p = draw(st.integers(0, 2))
        padding, pads = p, (p, p, p, p)
    elif form == "pair":
        ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        padding, pads = (ph, pw), (ph, ph, pw, pw)
    else:
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    h = draw(st.integers(max(1, kh - pads[0] - pads[1]), 9))
    w = draw(st.integers(max(1, kw - pads[2] - pads[3]), 9))
    return dict(n=draw(st.integers(1, 2)), c_in=draw(st.integers(1, 4)), c_out=draw(st.integers(1, 4)),
                h=h, w=w, kh=kh, kw=kw, stride=(sh, sw) if draw(st.booleans()) or sh != sw else sh,
                sh=sh, sw=sw, padding=padding, pads=pads, bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31)))


def conv_inputs(case, dtype):
    s = case["seed"]
    x = randn(s, case["n"], case["c_in"], case["h"], case["w"], dtype=dtype)
    w = randn(s + 1, case["c_out"], case["c_in"], case["kh"], case["kw"], dtype=dtype)
    b = randn(s + 2, case["c_out"], dtype=dtype) if case["bias"] else None
    return x, w, b


def conv2d_reference(x, w, b, sh, sw, pads):
    """Direct definition, float64: scipy's 2-D correlation per (image, out channel, in channel),
    summed over in channels, then every s-th row and column."""
    top, bottom, left, right = pads
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, hp, wp = xpad.shape
    c_out, _, kh, kw = w.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.zeros((n, c_out, ho, wo))
    for i in range(n):
        for o in range(c_out):
            acc = sum(scipy.signal.correlate2d(xpad[i, ci], w[o, ci].astype(np.float64), mode="valid")
                      for ci in range(c))
            y[i, o] = acc[::sh, ::sw][:ho, :wo] + (b[o] if b is not None else 0.0)
    return y


@settings(max_examples=80, suppress_health_check=FIXTURE)
@given(case=conv_cases())
def test_conv2d_matches_direct_correlation_in_float64(on_backend, case):
    x, w, b = conv_inputs(case, np.float64)
    y = ops.conv2d(dev(x), dev(w), None if b is None else dev(b), stride=case["stride"],
                   padding=case["padding"])
    ref = conv2d_reference(x, w, b, case["sh"], case["sw"], case["pads"])
    check_out(y, np.float64, ref.shape)
    top, bottom, left, right = case["pads"]
    assert ref.shape[2] == (case["h"] + top + bottom - case["kh"]) // case["sh"] + 1
    assert rel(y, ref) <= 1e-10


@settings(max_examples=50, suppress_health_check=FIXTURE)
@given(case=conv_cases(), dtype=DTYPES)
def test_conv2d_matches_torch(on_backend, case, dtype):
    torch = require("torch")
    x, w, b = conv_inputs(case, dtype)
    y = ops.conv2d(dev(x), dev(w), None if b is None else dev(b), stride=case["stride"],
                   padding=case["padding"])
    top, bottom, left, right = case["pads"]
    xt = torch.nn.functional.pad(torch_of(x), (left, right, top, bottom))  # torch pads symmetrically only
    ref = torch.nn.functional.conv2d(xt, torch_of(w), None if b is None else torch_of(b),
                                     stride=(case["sh"], case["sw"])).numpy()
    check_out(y, dtype, ref.shape)
    assert rel(y, ref) <= TOL[dtype]


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(k=st.sampled_from([1, 3, 5]), c=st.integers(1, 4), h=st.integers(1, 8), w=st.integers(1, 8),
       seed=st.integers(0, 2**31), dtype=DTYPES)
def test_conv2d_with_centred_identity_kernel_is_identity(on_backend, k, c, h, w, seed, dtype):
    x = randn(seed, 2, c, h, w, dtype=dtype)
    kernel = np.zeros((c, c, k, k), dtype=dtype)
    kernel[np.arange(c), np.arange(c), k // 2, k // 2] = 1.0
    y = ops.conv2d(dev(x), dev(kernel), padding=k // 2)
    check_out(y, dtype, x.shape)
    np.testing.assert_array_equal(backend.to_numpy(y), x)  # every other product is an exact zero


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7),
       seed=st.integers(0, 2**31))
def test_conv2d_1x1_equals_per_pixel_linear(on_backend, c_in, c_out, h, w, seed):
    x = randn(seed, 2, c_in, h, w)
    weight = randn(seed + 1, c_out, c_in)
    bias = randn(seed + 2, c_out)
    y = ops.conv2d(dev(x), dev(weight.reshape(c_out, c_in, 1, 1)), dev(bias))
    pixels = ops.linear(dev(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), dev(weight), dev(bias))
    assert rel(y, backend.to_numpy(pixels).transpose(0, 3, 1, 2)) <= 1e-13


def test_conv2d_vae_downsampler_asymmetric_padding(on_backend):
    """The SD VAE's Downsample2D pads (0, 1, 0, 1) and convolves 3x3 with stride 2."""
    x, w, b = randn(3, 1, 4, 8, 8), randn(4, 5, 4, 3, 3), randn(5, 5)
    y = ops.conv2d(dev(x), dev(w), dev(b), stride=2, padding=((0, 1), (0, 1)))
    check_out(y, np.float64, (1, 5, 4, 4))
    assert rel(y, conv2d_reference(x, w, b, 2, 2, (0, 1, 0, 1))) <= 1e-10


# --------------------------------------------------------------------------------------------------
# group_norm and layer_norm

def group_norm_reference(x, groups, gamma, beta, eps):
    """Explicit loop over samples and groups, float64."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    cg = c // groups
    y = np.empty_like(x)
    for i in range(n):
        for g in range(groups):
            part = x[i, g * cg:(g + 1) * cg]
            y[i, g * cg:(g + 1) * cg] = (part - part.mean()) / math.sqrt(part.var() + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


@st.composite
def group_norm_cases(draw):
    groups = draw(st.integers(1, 4))
    return dict(n=draw(st.integers(1, 3)), groups=groups, c=groups * draw(st.integers(1, 3)),
                spatial=tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))),
                affine=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3])),
                offset=draw(st.sampled_from([0.0, 3.0])), seed=draw(st.integers(0, 2**31)))


def group_norm_inputs(case, dtype):
    s = case["seed"]
    x = randn(s, case["n"], case["c"], *case["spatial"], dtype=dtype) + np.asarray(case["offset"], dtype)
    gamma = randn(s + 1, case["c"], dtype=dtype) if case["affine"] else None
    beta = randn(s + 2, case["c"], dtype=dtype) if case["affine"] else None
    return x, gamma, beta


@settings(max_examples=60, suppress_health_check=FIXTURE)
@given(case=group_norm_cases())
def test_group_norm_matches_per_group_loops_in_float64(on_backend, case):
    x, gamma, beta = group_norm_inputs(case, np.float64)
    y = ops.group_norm(dev(x), case["groups"], None if gamma is None else dev(gamma),
                       None if beta is None else dev(beta), eps=case["eps"])
    check_out(y, np.float64, x.shape)
    assert rel(y, group_norm_reference(x, case["groups"], gamma, beta, case["eps"])) <= 1e-10


@settings(max_examples=40, suppress_health_check=FIXTURE)
@given(case=group_norm_cases(), dtype=DTYPES)
def test_group_norm_matches_torch(on_backend, case, dtype):
    torch = require("torch")
    x, gamma, beta = group_norm_inputs(case, dtype)
    assume(x[0].size // case["groups"] > 1)  # torch refuses groups of a single value
    y = ops.group_norm(dev(x), case["groups"], None if gamma is None else dev(gamma),
                       None if beta is None else dev(beta), eps=case["eps"])
    xt = torch_of(x) if x.ndim > 2 else torch_of(x).unsqueeze(-1)  # torch wants (N, C, *) with * >= 0 dims
    ref = torch.nn.functional.group_norm(xt, case["groups"], None if gamma is None else torch_of(gamma),
                                         None if beta is None else torch_of(beta), eps=case["eps"])
    ref = ref.numpy().reshape(x.shape)
    check_out(y, dtype, x.shape)
    assert rel(y, ref) <= TOL[dtype]


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(case=group_norm_cases())
def test_group_norm_output_has_zero_mean_unit_variance_per_group(on_backend, case):
    """Without affine and with eps = 0, every (sample, group) slice has mean 0 and variance 1."""
    x, _, _ = group_norm_inputs(case, np.float64)
    if x[0].size // case["groups"] < 2:
        return  # a single value per group has no variance to normalise
    y = backend.to_numpy(ops.group_norm(dev(x), case["groups"], eps=0.0))
    per_group = y.reshape(case["n"], case["groups"], -1)
    groups = x.reshape(case["n"], case["groups"], -1)
    cond = np.abs(groups).max(axis=-1) / groups.std(axis=-1)  # as in the layer_norm test below
    assert (np.abs(per_group.mean(axis=-1)) <= 1e-14 * cond + 1e-13).all()
    assert (np.abs(per_group.var(axis=-1) - 1.0) <= 1e-14 * cond + 1e-13).all()


def test_group_norm_on_large_blocks_matches_reference(on_backend):
    """Big enough that the host path splits the rows into several blocks (and threads)."""
    x = randn(5, 2, 64, 32, 32) + 2.0
    gamma, beta = randn(6, 64), randn(7, 64)
    y = ops.group_norm(dev(x), 32, dev(gamma), dev(beta), eps=1e-6)
    assert rel(y, group_norm_reference(x, 32, gamma, beta, 1e-6)) <= 1e-10


@st.composite
def layer_norm_cases(draw):
    return dict(lead=tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))),
                d=draw(st.integers(1, 40)), affine=draw(st.sampled_from(["both", "weight", "none"])),
                eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12])), seed=draw(st.integers(0, 2**31)))


def layer_norm_inputs(case, dtype):
    s = case["seed"]
    x = randn(s, *case["lead"], case["d"], dtype=dtype) + np.asarray(1.5, dtype)
    gamma = randn(s + 1, case["d"], dtype=dtype) if case["affine"] != "none" else None
    beta = randn(s + 2, case["d"], dtype=dtype) if case["affine"] == "both" else None
    return x, gamma, beta


def layer_norm_reference(x, gamma, beta, eps):
    """Row by row, float64."""
    rows = x.astype(np.float64).reshape(-1, x.shape[-1])
    y = np.stack([(r - r.mean()) / math.sqrt(r.var() + eps) for r in rows]).reshape(x.shape)
    return y * (1.0 if gamma is None else gamma) + (0.0 if beta is None else beta)


@settings(max_examples=60, suppress_health_check=FIXTURE)
@given(case=layer_norm_cases())
def test_layer_norm_matches_row_loop_in_float64(on_backend, case):
    x, gamma, beta = layer_norm_inputs(case, np.float64)
    y = ops.layer_norm(dev(x), None if gamma is None else dev(gamma), None if beta is None else dev(beta),
                       eps=case["eps"])
    check_out(y, np.float64, x.shape)
    assert rel(y, layer_norm_reference(x, gamma, beta, case["eps"])) <= 1e-10


@settings(max_examples=40, suppress_health_check=FIXTURE)
@given(case=layer_norm_cases(), dtype=DTYPES)
def test_layer_norm_matches_torch(on_backend, case, dtype):
    torch = require("torch")
    x, gamma, beta = layer_norm_inputs(case, dtype)
    y = ops.layer_norm(dev(x), None if gamma is None else dev(gamma), None if beta is None else dev(beta),
                       eps=case["eps"])
    ref = torch.nn.functional.layer_norm(torch_of(x), (case["d"],), None if gamma is None else torch_of(gamma),
                                         None if beta is None else torch_of(beta), eps=case["eps"]).numpy()
    check_out(y, dtype, x.shape)
    assert rel(y, ref) <= TOL[dtype]


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(rows=st.integers(1, 300), d=st.integers(2, 64), seed=st.integers(0, 2**31))
def test_layer_norm_rows_have_zero_mean_unit_variance(on_backend, rows, d, seed):
    x = randn(seed, rows, d, scale=3.0) - 2.0
    y = backend.to_numpy(ops.layer_norm(dev(x), eps=0.0))
    # x - mean(x) is exact up to rounding of x itself, eps * max|x|, which is eps * cond relative to
    # the row's standard deviation: rows of nearly equal values are ill-conditioned for any method
    cond = np.abs(x).max(axis=-1) / x.std(axis=-1)
    assert (np.abs(y.mean(axis=-1)) <= 1e-14 * cond + 1e-13).all()
    assert (np.abs(y.var(axis=-1) - 1.0) <= 1e-14 * cond + 1e-13).all()


# --------------------------------------------------------------------------------------------------
# linear and geglu

@settings(max_examples=50, suppress_health_check=FIXTURE)
@given(lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), d_in=st.integers(1, 12),
       d_out=st.integers(1, 12), bias=st.booleans(), seed=st.integers(0, 2**31), dtype=DTYPES)
def test_linear_matches_explicit_sum_and_torch(on_backend, lead, d_in, d_out, bias, seed, dtype):
    x = randn(seed, *lead, d_in, dtype=dtype)
    w = randn(seed + 1, d_out, d_in, dtype=dtype)
    b = randn(seed + 2, d_out, dtype=dtype) if bias else None
    y = ops.linear(dev(x), dev(w), None if b is None else dev(b))
    check_out(y, dtype, tuple(lead) + (d_out,))
    rows = x.astype(np.float64).reshape(-1, d_in)
    ref = np.array([[sum(r[i] * w[o, i] for i in range(d_in)) + (b[o] if bias else 0.0) for o in range(d_out)]
                    for r in rows]).reshape(tuple(lead) + (d_out,))
    assert rel(y, ref) <= (1e-10 if dtype == np.float64 else 1e-5)
    torch = require("torch")
    ref_t = torch.nn.functional.linear(torch_of(x), torch_of(w), None if b is None else torch_of(b)).numpy()
    assert rel(y, ref_t) <= TOL[dtype]


def gelu_reference(x, approximate="none"):
    """Elementwise with math.erf / math.tanh, float64."""
    if approximate == "none":
        f = np.vectorize(lambda t: 0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))))
    else:
        f = np.vectorize(lambda t: 0.5 * t * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3))))
    return f(x.astype(np.float64)) if x.size else x.astype(np.float64)


@settings(max_examples=40, suppress_health_check=FIXTURE)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), d_in=st.integers(1, 10),
       d_out=st.integers(1, 10), bias=st.booleans(), seed=st.integers(0, 2**31), dtype=DTYPES)
def test_geglu_matches_reference_and_torch(on_backend, lead, d_in, d_out, bias, seed, dtype):
    x = randn(seed, *lead, d_in, dtype=dtype)
    w = randn(seed + 1, 2 * d_out, d_in, dtype=dtype)
    b = randn(seed + 2, 2 * d_out, dtype=dtype) if bias else None
    y = ops.geglu(dev(x), dev(w), None if b is None else dev(b))
    check_out(y, dtype, tuple(lead) + (d_out,))
    proj = np.einsum("...i,oi->...o", x.astype(np.float64), w.astype(np.float64)) + (0.0 if b is None else b)
    ref = proj[..., :d_out] * gelu_reference(proj[..., d_out:])
    assert rel(y, ref) <= (1e-10 if dtype == np.float64 else 1e-5)
    torch = require("torch")
    h, g = torch.nn.functional.linear(torch_of(x), torch_of(w), None if b is None else torch_of(b)).chunk(2, -1)
    assert rel(y, (h * torch.nn.functional.gelu(g)).numpy()) <= TOL[dtype]


def test_geglu_tanh_option_and_large_input(on_backend):
    """Many rows (several host blocks); the tanh-gelu gate option."""
    x, w, b = randn(0, 2, 600, 16), randn(1, 64, 16), randn(2, 64)
    for approximate in ("none", "tanh"):
        y = ops.geglu(dev(x), dev(w), dev(b), approximate=approximate)
        proj = x @ w.T + b
        assert rel(y, proj[..., :32] * gelu_reference(proj[..., 32:], approximate)) <= 1e-10


# --------------------------------------------------------------------------------------------------
# activations

def silu_reference(x):
    return np.vectorize(lambda t: t / (1.0 + math.exp(-t)))(x.astype(np.float64)) if x.size else x


def quick_gelu_reference(x):
    return np.vectorize(lambda t: t / (1.0 + math.exp(-1.702 * t)))(x.astype(np.float64)) if x.size else x


ACTIVATIONS = {
    "silu": (ops.silu, silu_reference, lambda F, t: F.silu(t)),
    "gelu": (ops.gelu, gelu_reference, lambda F, t: F.gelu(t)),
    "gelu_tanh": (lambda a: ops.gelu(a, approximate="tanh"), lambda a: gelu_reference(a, "tanh"),
                  lambda F, t: F.gelu(t, approximate="tanh")),
    "quick_gelu": (ops.quick_gelu, quick_gelu_reference, lambda F, t: t * (1.702 * t).sigmoid()),
}

activation_shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3)


def activation_scale(x, ref):
    """Errors of an activation are measured against max(|f(x)|, |x|): on negative inputs f(x) is a
    tiny difference (1 + tanh(-6) ~ 1e-5), whose own relative error says nothing about the op."""
    return max(np.abs(ref).max(initial=0.0), np.abs(x).max(initial=0.0))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@settings(max_examples=24, suppress_health_check=FIXTURE)
@given(shape=activation_shapes, scale=st.sampled_from([1.0, 4.0, 20.0]), seed=st.integers(0, 2**31))
def test_activation_matches_math_reference_in_float64(on_backend, name, shape, scale, seed):
    op, reference, _ = ACTIVATIONS[name]
    x = randn(seed, *shape, scale=scale)
    y = op(dev(x))
    check_out(y, np.float64, x.shape)
    assert rel(y, reference(x), scale=activation_scale(x, reference(x))) <= 1e-10


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@settings(max_examples=16, suppress_health_check=FIXTURE)
@given(shape=activation_shapes, scale=st.sampled_from([1.0, 4.0, 20.0]), seed=st.integers(0, 2**31),
       dtype=DTYPES)
def test_activation_matches_torch(on_backend, name, shape, scale, seed, dtype):
    torch = require("torch")
    op, _, torch_op = ACTIVATIONS[name]
    x = randn(seed, *shape, scale=scale, dtype=dtype)
    y = op(dev(x))
    check_out(y, dtype, x.shape)
    ref = torch_op(torch.nn.functional, torch_of(x)).numpy()
    assert rel(y, ref, scale=activation_scale(x, ref)) <= TOL[dtype]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_activation_odd_part_is_identity(on_backend, name, dtype):
    """f(x) - f(-x) = x for x * (a CDF-like gate g with g(x) + g(-x) = 1): silu, both gelus, quick_gelu.
    Many values, so the host path runs several blocks on the thread pool."""
    op = ACTIVATIONS[name][0]
    x = randn(11, 300_000, scale=3.0, dtype=dtype)
    diff = backend.to_numpy(op(dev(x))).astype(np.float64) - backend.to_numpy(op(dev(-x))).astype(np.float64)
    assert rel(diff, x) <= (1e-12 if dtype == np.float64 else 1e-6)


def test_gelu_float32_uses_float32_accurate_erf(on_backend):
    """On the host float32 gelu evaluates erf by Abramowitz & Stegun 7.1.26; over [-10, 10] it must
    agree with the exact float64 gelu to float32 resolution (and so stay within 1e-5 of torch)."""
    x = np.linspace(-10.0, 10.0, 100_001)
    y = ops.gelu(dev(x.astype(np.float32)))
    check_out(y, np.float32, x.shape)
    assert rel(y, gelu_reference(x)) <= 2e-7
    assert float(backend.to_numpy(ops.gelu(dev(np.zeros(3, np.float32))))[0]) == 0.0


# --------------------------------------------------------------------------------------------------
# softmax

@settings(max_examples=50, suppress_health_check=FIXTURE)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), data=st.data(),
       scale=st.sampled_from([1.0, 30.0, 1000.0]), seed=st.integers(0, 2**31), dtype=DTYPES)
def test_softmax_matches_scipy_and_torch_and_rows_sum_to_one(on_backend, shape, data, scale, seed, dtype):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = randn(seed, *shape, scale=scale, dtype=dtype)
    y = ops.softmax(dev(x), axis=axis)
    check_out(y, dtype, x.shape)
    yh = backend.to_numpy(y).astype(np.float64)
    assert rel(y, scipy.special.softmax(x.astype(np.float64), axis=axis)) <= TOL[dtype]
    assert np.abs(yh.sum(axis=axis) - 1.0).max() <= (1e-12 if dtype == np.float64 else 1e-6)
    assert yh.min() >= 0.0 and np.isfinite(yh).all()  # large scales must not overflow
    torch = require("torch")
    assert rel(y, torch.nn.functional.softmax(torch_of(x), dim=axis).numpy()) <= TOL[dtype]


@settings(max_examples=20, suppress_health_check=FIXTURE)
@given(rows=st.integers(1, 5), cols=st.integers(1, 9), shift=st.sampled_from([-500.0, 3.0, 700.0]),
       seed=st.integers(0, 2**31))
def test_softmax_is_shift_invariant(on_backend, rows, cols, shift, seed):
    x = randn(seed, rows, cols)
    assert rel(ops.softmax(dev(x + shift)), backend.to_numpy(ops.softmax(dev(x)))) <= 1e-12


def test_softmax_many_rows_sum_to_one(on_backend):
    x = randn(3, 3000, 257, scale=10.0, dtype=np.float32)  # several host blocks
    y = backend.to_numpy(ops.softmax(dev(x)))
    assert np.abs(y.sum(axis=-1, dtype=np.float64) - 1.0).max() <= 1e-6
    assert rel(y, scipy.special.softmax(x.astype(np.float64), axis=-1)) <= 1e-5


# --------------------------------------------------------------------------------------------------
# heads, upsampling, embedding

@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(b=st.integers(1, 3), l=st.integers(1, 6), heads=st.integers(1, 4), d=st.integers(1, 5),
       seed=st.integers(0, 2**31))
def test_split_and_merge_heads_match_torch_layout_and_invert(on_backend, b, l, heads, d, seed):
    x = randn(seed, b, l, heads * d)
    s = ops.split_heads(dev(x), heads)
    check_out(s, np.float64, (b, heads, l, d))
    ref = x.reshape(b, l, heads, d).transpose(0, 2, 1, 3)  # torch: view(b, l, h, d).transpose(1, 2)
    for bi in range(b):
        for h in range(heads):
            np.testing.assert_array_equal(backend.to_numpy(s)[bi, h], x[bi, :, h * d:(h + 1) * d])
    np.testing.assert_array_equal(backend.to_numpy(s), ref)
    np.testing.assert_array_equal(backend.to_numpy(ops.merge_heads(s)), x)


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       seed=st.integers(0, 2**31), dtype=DTYPES)
def test_upsample_nearest2x_matches_loops_and_torch(on_backend, n, c, h, w, seed, dtype):
    x = randn(seed, n, c, h, w, dtype=dtype)
    y = ops.upsample_nearest2x(dev(x))
    check_out(y, dtype, (n, c, 2 * h, 2 * w))
    ref = np.empty((n, c, 2 * h, 2 * w), dtype=dtype)
    for i in range(2 * h):
        for j in range(2 * w):
            ref[:, :, i, j] = x[:, :, i // 2, j // 2]
    np.testing.assert_array_equal(backend.to_numpy(y), ref)
    torch = require("torch")
    np.testing.assert_array_equal(backend.to_numpy(y), torch.nn.functional.interpolate(
        torch_of(x), scale_factor=2.0, mode="nearest").numpy())


def test_upsample_nearest2x_large_input(on_backend):
    x = randn(1, 2, 300, 20, 20, dtype=np.float32)  # several host blocks
    y = backend.to_numpy(ops.upsample_nearest2x(dev(x)))
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(ids_shape=st.lists(st.integers(0, 5), min_size=1, max_size=2), v=st.integers(1, 20),
       d=st.integers(1, 6), seed=st.integers(0, 2**31), int_dtype=st.sampled_from([np.int64, np.int32]))
def test_embedding_matches_lookup_loop_and_torch(on_backend, ids_shape, v, d, seed, int_dtype):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, size=ids_shape).astype(int_dtype)
    table = randn(seed + 1, v, d, dtype=np.float32)
    y = ops.embedding(dev(ids), dev(table))
    check_out(y, np.float32, tuple(ids_shape) + (d,))
    ref = np.array([table[i] for i in ids.reshape(-1)]).reshape(tuple(ids_shape) + (d,))
    np.testing.assert_array_equal(backend.to_numpy(y), ref)
    torch = require("torch")
    np.testing.assert_array_equal(backend.to_numpy(y), torch.nn.functional.embedding(
        torch_of(ids.astype(np.int64)), torch_of(table)).numpy())


# --------------------------------------------------------------------------------------------------
# timestep embedding

class _Float64Arange:
    """Stands in for the `torch` module inside diffusers.models.embeddings: the same functions, except
    that `arange` builds float64, so get_timestep_embedding computes its frequencies in float64."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def arange(self, *args, **kwargs):
        kwargs["dtype"] = self._torch.float64
        return self._torch.arange(*args, **kwargs)


timestep_options = dict(
    dim=st.integers(2, 41), flip=st.booleans(), shift=st.sampled_from([0.0, 1.0, 0.5, -2.0]),
    scale=st.sampled_from([1.0, 0.5, 1000.0]), max_period=st.sampled_from([10000, 100, 5]),
    timesteps=st.lists(st.integers(0, 1000), min_size=1, max_size=4))


@settings(max_examples=80, suppress_health_check=FIXTURE)
@given(**timestep_options)
def test_timestep_embedding_matches_diffusers_in_float64(on_backend, monkeypatch, dim, flip, shift, scale,
                                                         max_period, timesteps):
    """diffusers builds the frequencies in float32; inside this test its module sees a float64 arange,
    so the reference is the same formula in float64 (integer timesteps are exact in its .float()).
    As in the float32 test below, the two exps may differ by one unit in the last place, and sin/cos of
    an argument a then differ by up to |a| * 2^-52: the bound is 4 float64 steps of the largest argument
    max|t| * scale (every frequency is <= 1), plus 1e-12 (at t = 675, scale 1000: 6e-10)."""
    torch = require("torch")
    embeddings = require("diffusers.models.embeddings")
    assume(dim // 2 - shift != 0)  # the frequencies would divide by zero (an error, tested elsewhere)
    monkeypatch.setattr(embeddings, "torch", _Float64Arange(torch))
    t = np.asarray(timesteps, dtype=np.float64)
    ref = embeddings.get_timestep_embedding(torch.tensor(timesteps), dim, flip_sin_to_cos=flip,
                                            downscale_freq_shift=shift, scale=scale, max_period=max_period)
    assert ref.dtype == torch.float64
    y = ops.timestep_embedding(dev(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                               max_period=max_period)
    check_out(y, np.float64, (len(timesteps), dim))
    bound = 1e-12 + 4 * max(timesteps) * scale * 2.0**-52
    assert np.max(np.abs(backend.to_numpy(y) - ref.numpy())) <= bound
    if dim % 2:
        assert not backend.to_numpy(y)[:, -1].any()  # the odd column is zero padding


@settings(max_examples=50, suppress_health_check=FIXTURE)
@given(**{**timestep_options, "scale": st.sampled_from([1.0, 0.5])})
def test_timestep_embedding_float32_matches_diffusers(on_backend, dim, flip, shift, scale, max_period, timesteps):
    """Both compute in float32 with the same operations in the same order, but their exp may differ by
    one unit in the last place, and sin/cos of an argument a then differ by up to |a| * 2^-23. Every
    frequency is <= 1, so the bound is 4 float32 steps of the largest argument max|t| * scale, plus 1e-6
    (about 5e-4 at t = 1000: float32 cannot place sin(1000 f) more finely)."""
    torch = require("torch")
    embeddings = require("diffusers.models.embeddings")
    assume(dim // 2 - shift != 0)  # the frequencies would divide by zero (an error, tested elsewhere)
    ref = embeddings.get_timestep_embedding(torch.tensor(timesteps), dim, flip_sin_to_cos=flip,
                                            downscale_freq_shift=shift, scale=scale, max_period=max_period)
    y = ops.timestep_embedding(dev(np.asarray(timesteps, dtype=np.int64)), dim, flip_sin_to_cos=flip,
                               downscale_freq_shift=shift, scale=scale, max_period=max_period)
    check_out(y, np.float32, (len(timesteps), dim))
    largest_arg = max(timesteps) * scale
    assert rel(y, ref.numpy()) <= 1e-6 + 4 * largest_arg * 2.0 ** -23


def test_timestep_embedding_scalar_and_values(on_backend):
    y = ops.timestep_embedding(dev(np.asarray(0.0)), 6)  # t = 0: sin 0 = 0, cos 0 = 1
    check_out(y, np.float64, (1, 6))
    np.testing.assert_array_equal(backend.to_numpy(y), [[0, 0, 0, 1, 1, 1]])
    y = ops.timestep_embedding(5, 4, flip_sin_to_cos=True, downscale_freq_shift=0)
    check_out(y, np.float32, (1, 4))  # a Python int: float32 on the active backend
    f = np.exp(-math.log(10000) * np.arange(2) / 2)
    assert rel(y, np.concatenate([np.cos(5 * f), np.sin(5 * f)])[None]) <= 1e-6


# --------------------------------------------------------------------------------------------------
# every op has tests

def test_every_public_op_is_covered():
    """Every public op is called (as ops.<name>) by at least one test of tests/test_ops*.py; the set of
    covered ops is read from the test functions themselves, so a new op without a test fails here."""
    import ast
    import pathlib
    covered = set()
    for path in pathlib.Path(__file__).parent.glob("test_ops*.py"):
        tree = ast.parse(path.read_text())
        helpers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        aliases = {}  # module-level names bound to ops: sdpa = ops.x, ACTIVATIONS = {"silu": (ops.silu, ...)}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                named = {sub.attr for sub in ast.walk(node.value)
                         if isinstance(sub, ast.Attribute) and getattr(sub.value, "id", "") == "ops"}
                for t in node.targets:
                    if isinstance(t, ast.Name) and named:
                        aliases[t.id] = named

        def ops_used(node, seen):
            """ops.<name> (or an alias of one) in `node`, and in the module's helpers it calls."""
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and getattr(sub.value, "id", "") == "ops":
                    covered.add(sub.attr)
                elif isinstance(sub, ast.Name) and sub.id in aliases:
                    covered.update(aliases[sub.id])
                elif isinstance(sub, ast.Name) and sub.id in helpers and sub.id not in seen:
                    seen.add(sub.id)
                    ops_used(helpers[sub.id], seen)

        for name, f in helpers.items():
            if name.startswith("test_"):
                ops_used(f, {name})
    ops_in_module = {name for name in ops.__all__ if callable(getattr(ops, name))}
    assert ops_in_module <= covered, f"ops without tests: {sorted(ops_in_module - covered)}"


# --------------------------------------------------------------------------------------------------
# float16 (allowed on the GPU; NumPy runs it too, slowly)

def test_ops_in_float16_stay_float16_and_close(on_backend):
    """float16 in, float16 out; each op within 1e-2 relative of its float64 reference computed from
    the same float16-rounded inputs (float16 resolves about 1e-3)."""
    h = lambda *shape, s=0: randn(s, *shape, dtype=np.float16)  # noqa: E731
    f64 = lambda a: a.astype(np.float64)  # noqa: E731
    x, w, b = h(1, 4, 6, 6), h(3, 4, 3, 3, s=1), h(3, s=2)
    cases = [
        (ops.conv2d(dev(x), dev(w), dev(b), padding=1), conv2d_reference(f64(x), f64(w), f64(b), 1, 1, (1,) * 4)),
        (ops.group_norm(dev(x), 2, dev(h(4, s=3)), dev(h(4, s=4))),
         group_norm_reference(f64(x), 2, f64(h(4, s=3)), f64(h(4, s=4)), 1e-5)),
        (ops.layer_norm(dev(h(3, 8)), dev(h(8, s=5))), layer_norm_reference(f64(h(3, 8)), f64(h(8, s=5)), None, 1e-5)),
        (ops.silu(dev(h(50))), silu_reference(f64(h(50)))),
        (ops.gelu(dev(h(50))), gelu_reference(f64(h(50)))),
        (ops.softmax(dev(h(4, 9))), scipy.special.softmax(f64(h(4, 9)), axis=-1)),
        (ops.linear(dev(h(3, 5)), dev(h(4, 5, s=6))), f64(h(3, 5)) @ f64(h(4, 5, s=6)).T),
    ]
    for y, ref in cases:
        check_out(y, np.float16, ref.shape)
        assert rel(y, ref) <= 1e-2
