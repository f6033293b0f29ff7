"""Property tests for refldm.core.ops.scaled_dot_product_attention, on every backend of `on_backend`.

Reference: explicit loops over the leading (batch, head) index computing softmax(Q K^T * scale + M) V
with scipy.special.softmax, in float64 (relative error <= 1e-10); torch's
scaled_dot_product_attention (float64 <= 1e-10, float32 <= 1e-5). Invariants: a single key returns
its value; chunked equals unchunked; a causal row ignores later keys; an additive -inf mask equals
dropping those keys. On NumPy the op runs one head at a time in cache-sized blocks on a thread pool;
on the fake device (and a GPU) it runs all heads at once in memory-bounded chunks: both are covered.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refldm import accel, backend
from refldm.core import functional as ops  # as the models call them: the host kernels on NumPy, the reference elsewhere
from tests.conftest import require
from tests.test_ops import TOL, check_out, dev, randn, rel, torch_of

FIXTURE = [HealthCheck.function_scoped_fixture]
sdpa = ops.scaled_dot_product_attention


def attention_reference(q, k, v, mask=None, is_causal=False, scale=None):
    """Loop over every leading index; float64."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    lead, (lq, d), lk = q.shape[:-2], q.shape[-2:], k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = np.zeros(lead + (lq, lk)) if mask is None else np.broadcast_to(mask, lead + (lq, lk))
    if mask is not None and mask.dtype == bool:
        m = np.where(m, 0.0, -np.inf)
    out = np.empty(lead + (lq, v.shape[-1]))
    for idx in np.ndindex(*lead):
        s = q[idx] @ k[idx].T * scale + m[idx]
        if is_causal:
            s = s + np.where(np.arange(lk)[None, :] > np.arange(lq)[:, None], -np.inf, 0.0)
        out[idx] = scipy.special.softmax(s, axis=-1) @ v[idx]
    return out


@st.composite
def attention_cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    lq, lk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    mask = draw(st.sampled_from(["none", "additive", "bool", "causal", "additive+causal"]))
    if "causal" in mask:
        lk = max(lk, lq)  # every query keeps at least one key
    return dict(lead=lead, lq=lq, lk=lk, d=draw(st.integers(1, 8)), dv=draw(st.integers(1, 6)), mask=mask,
                mask_shape=draw(st.sampled_from(["full", "rows", "keys"])),
                scale=draw(st.sampled_from([None, 0.3, 2.0])), chunk=draw(st.sampled_from([None, 1, 200])),
                seed=draw(st.integers(0, 2**31)))


def attention_inputs(case, dtype):
    s, lead = case["seed"], case["lead"]
    q = randn(s, *lead, case["lq"], case["d"], dtype=dtype)
    k = randn(s + 1, *lead, case["lk"], case["d"], dtype=dtype)
    v = randn(s + 2, *lead, case["lk"], case["dv"], dtype=dtype)
    mask = None
    # mask shapes that broadcast: full (..., Lq, Lk), one row (1, Lk) for every query, or (Lq, 1)
    shape = {"full": lead + (case["lq"], case["lk"]), "rows": (1, case["lk"]), "keys": (case["lq"], 1)}
    if case["mask"].startswith("additive"):
        mask = randn(s + 3, *shape[case["mask_shape"]], dtype=dtype)
        if case["mask_shape"] != "keys":  # drop some keys, but keep key 0 for every query
            rng = np.random.default_rng(s + 4)
            drop = rng.random(mask.shape) < 0.3
            drop[..., 0] = False
            mask[drop] = -np.inf
    elif case["mask"] == "bool":
        rng = np.random.default_rng(s + 3)
        mask = rng.random(shape[case["mask_shape"]]) < 0.7
        mask[..., 0] = True
    return q, k, v, mask


def run(case, q, k, v, mask):
    return sdpa(dev(q), dev(k), dev(v), mask=None if mask is None else dev(mask),
                is_causal="causal" in case["mask"], scale=case["scale"], max_chunk_bytes=case["chunk"])


@settings(max_examples=120, suppress_health_check=FIXTURE)
@given(case=attention_cases())
def test_attention_matches_loop_reference_in_float64(on_backend, case):
    q, k, v, mask = attention_inputs(case, np.float64)
    y = run(case, q, k, v, mask)
    check_out(y, np.float64, case["lead"] + (case["lq"], case["dv"]))
    ref = attention_reference(q, k, v, mask, "causal" in case["mask"], case["scale"])
    assert rel(y, ref) <= 1e-10


@settings(max_examples=60, suppress_health_check=FIXTURE)
@given(case=attention_cases(), dtype=st.sampled_from([np.float64, np.float32]))
def test_attention_matches_torch(on_backend, case, dtype):
    torch = require("torch")
    q, k, v, mask = attention_inputs(case, dtype)
    y = run(case, q, k, v, mask)
    causal = "causal" in case["mask"]
    tmask = None if mask is None else torch_of(mask)
    if causal and tmask is not None:  # torch takes a mask or is_causal, not both: fold causal into the mask
        lq, lk = case["lq"], case["lk"]
        tri = torch.ones(lq, lk, dtype=torch.bool).tril()
        if tmask.dtype == torch.bool:
            tmask = tmask & tri
        else:
            tmask = tmask + torch.zeros(lq, lk, dtype=tmask.dtype).masked_fill(~tri, float("-inf"))
        causal = False
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch_of(q), torch_of(k), torch_of(v), attn_mask=tmask, is_causal=causal, scale=case["scale"]).numpy()
    check_out(y, dtype, ref.shape)
    assert rel(y, ref) <= TOL[dtype]


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(lead=st.lists(st.integers(1, 3), max_size=2), lq=st.integers(1, 8), d=st.integers(1, 6),
       dv=st.integers(1, 6), seed=st.integers(0, 2**31), dtype=st.sampled_from([np.float64, np.float32]))
def test_attention_over_a_single_key_returns_its_value(on_backend, lead, lq, d, dv, seed, dtype):
    q = randn(seed, *lead, lq, d, dtype=dtype, scale=5.0)
    k = randn(seed + 1, *lead, 1, d, dtype=dtype)
    v = randn(seed + 2, *lead, 1, dv, dtype=dtype)
    y = backend.to_numpy(sdpa(dev(q), dev(k), dev(v)))
    np.testing.assert_array_equal(y, np.broadcast_to(v, tuple(lead) + (lq, dv)))  # weight exp(0) / 1 = 1


@settings(max_examples=40, suppress_health_check=FIXTURE)
@given(case=attention_cases())
def test_chunked_attention_equals_unchunked(on_backend, case):
    """Query blocks of one row (max_chunk_bytes=1) give the rows that one block of all rows gives."""
    q, k, v, mask = attention_inputs(case, np.float64)
    whole = run({**case, "chunk": 2**40}, q, k, v, mask)
    one_row = run({**case, "chunk": 1}, q, k, v, mask)
    assert rel(one_row, backend.to_numpy(whole)) <= 1e-13


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_attention_long_sequence_blocks_and_threads(on_backend, threads):
    """Long enough for many host blocks; the thread count must not change a single bit."""
    q, k, v = randn(0, 2, 2, 700, 8), randn(1, 2, 2, 500, 8), randn(2, 2, 2, 500, 5)
    before = accel.num_threads()
    try:
        accel.set_num_threads(1)
        serial = backend.to_numpy(sdpa(dev(q), dev(k), dev(v)))
        accel.set_num_threads(threads)
        y = sdpa(dev(q), dev(k), dev(v))
    finally:
        accel.set_num_threads(before)
    np.testing.assert_array_equal(backend.to_numpy(y), serial)
    assert rel(y, attention_reference(q, k, v)) <= 1e-10


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(lq=st.integers(2, 9), extra=st.integers(0, 4), d=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_causal_row_ignores_later_keys(on_backend, lq, extra, d, seed):
    """Row i of causal attention is unchanged when keys and values after i are replaced."""
    lk = lq + extra
    q, k, v = randn(seed, 2, lq, d), randn(seed + 1, 2, lk, d), randn(seed + 2, 2, lk, d)
    y = backend.to_numpy(sdpa(dev(q), dev(k), dev(v), is_causal=True))
    for i in range(lq):
        k2, v2 = k.copy(), v.copy()
        k2[:, i + 1:] = randn(seed + 3 + i, 2, lk - i - 1, d) * 100.0
        v2[:, i + 1:] = randn(seed + 4 + i, 2, lk - i - 1, d) * 100.0
        y2 = backend.to_numpy(sdpa(dev(q), dev(k2), dev(v2), is_causal=True))
        np.testing.assert_array_equal(y2[:, i], y[:, i])
        # and row i equals unmasked attention over keys 0..i
        assert rel(y[:, i], backend.to_numpy(sdpa(dev(q[:, i:i + 1]), dev(k[:, :i + 1]),
                                                  dev(v[:, :i + 1])))[:, 0]) <= 1e-12


@settings(max_examples=30, suppress_health_check=FIXTURE)
@given(lq=st.integers(1, 6), lk=st.integers(2, 9), d=st.integers(1, 5), seed=st.integers(0, 2**31),
       as_bool=st.booleans())
def test_masked_keys_equal_dropped_keys(on_backend, lq, lk, d, seed, as_bool):
    """A -inf (or False) mask column removes that key exactly as if it were not there."""
    rng = np.random.default_rng(seed)
    keep = rng.random(lk) < 0.5
    keep[rng.integers(lk)] = True
    q, k, v = randn(seed, 3, lq, d), randn(seed + 1, 3, lk, d), randn(seed + 2, 3, lk, d)
    mask = keep if as_bool else np.where(keep, 0.0, -np.inf)
    y = sdpa(dev(q), dev(k), dev(v), mask=dev(mask))
    dropped = sdpa(dev(q), dev(np.ascontiguousarray(k[:, keep])), dev(np.ascontiguousarray(v[:, keep])))
    assert rel(y, backend.to_numpy(dropped)) <= 1e-13


def test_additive_mask_shifts_scores(on_backend):
    """A constant additive mask changes nothing (softmax is shift-invariant); a per-key one weighs keys."""
    q, k, v = randn(0, 2, 4, 3), randn(1, 2, 5, 3), randn(2, 2, 5, 4)
    plain = backend.to_numpy(sdpa(dev(q), dev(k), dev(v)))
    assert rel(sdpa(dev(q), dev(k), dev(v), mask=dev(np.full((4, 5), 7.5))), plain) <= 1e-13
    bias = randn(3, 5)
    assert rel(sdpa(dev(q), dev(k), dev(v), mask=dev(bias)), attention_reference(q, k, v, bias)) <= 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_large_scores_do_not_overflow(on_backend, dtype):
    """Scores near 1e5 (exp would overflow without the max subtraction): every output row is still a
    convex combination of the value rows, so it lies within their range."""
    q, k = randn(0, 1, 2, 6, 4, scale=300.0, dtype=dtype), randn(1, 1, 2, 7, 4, scale=300.0, dtype=dtype)
    v = randn(2, 1, 2, 7, 3, dtype=dtype)
    y = backend.to_numpy(sdpa(dev(q), dev(k), dev(v)))
    assert np.isfinite(y).all()
    lo, hi = v.min(axis=-2, keepdims=True), v.max(axis=-2, keepdims=True)
    slack = 1e-6 * np.abs(v).max()
    assert (y >= lo - slack).all() and (y <= hi + slack).all()


def test_attention_in_float16(on_backend):
    """float16 (a GPU dtype) in and out, within 1e-2 of the float64 reference on the same inputs."""
    q, k, v = (randn(s, 2, 3, 20, 8, dtype=np.float16) for s in range(3))
    y = sdpa(dev(q), dev(k), dev(v), is_causal=True)
    check_out(y, np.float16, (2, 3, 20, 8))
    assert rel(y, attention_reference(q, k, v, is_causal=True)) <= 1e-2
