"""Bad input to every op is one ValueError whose message names the op and the shapes (or dtypes) it got.

Each case runs on every backend of `on_backend`; arrays are built on the active backend inside the
case, so the check is the op's own validation, not a device mix-up. Each case runs twice: against the
reference ops (refldm.core.ops) and against the dispatcher the models call (refldm.core.functional, with
the speed layer on), which share their checks (refldm.core.checks): the same message either way.
"""

from __future__ import annotations

import numpy as np
import pytest

from refldm import accel, backend
from refldm.core import functional, ops


def a(*shape, dtype=np.float32):
    """A device array of ones of this shape (the values do not matter here)."""
    return backend.asarray(np.ones(shape, dtype=dtype))


def ints(*shape):
    return backend.asarray(np.zeros(shape, dtype=np.int64))


# (case id, call, substrings the message must contain)
CASES = [
    # conv2d
    ("conv2d rank", lambda: ops.conv2d(a(3, 8, 8), a(4, 3, 3, 3)), ["conv2d", "(3, 8, 8)", "(4, 3, 3, 3)"]),
    ("conv2d weight rank", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3)), ["conv2d", "(1, 3, 8, 8)", "(4, 3, 3)"]),
    ("conv2d channels", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 2, 3, 3)), ["conv2d", "(1, 3, 8, 8)", "(4, 2, 3, 3)"]),
    ("conv2d bias", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3), a(5)), ["conv2d", "(5,)", "(4,)"]),
    ("conv2d dtypes", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3, dtype=np.float64)),
     ["conv2d", "float32", "float64", "(1, 3, 8, 8)"]),
    ("conv2d int", lambda: ops.conv2d(ints(1, 3, 8, 8), ints(4, 3, 3, 3)), ["conv2d", "int64", "(1, 3, 8, 8)"]),
    ("conv2d stride", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3), stride=0), ["conv2d", "stride"]),
    ("conv2d stride form", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3), stride=(1, 2, 3)), ["conv2d", "stride"]),
    ("conv2d padding form", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3), padding=(1, 2, 3)), ["conv2d", "padding"]),
    ("conv2d padding sign", lambda: ops.conv2d(a(1, 3, 8, 8), a(4, 3, 3, 3), padding=-1), ["conv2d", "padding"]),
    ("conv2d too small", lambda: ops.conv2d(a(1, 3, 2, 2), a(4, 3, 3, 3)), ["conv2d", "(1, 3, 2, 2)", "3x3"]),
    # group_norm
    ("group_norm rank", lambda: ops.group_norm(a(6), 2), ["group_norm", "(6,)"]),
    ("group_norm groups", lambda: ops.group_norm(a(1, 6, 4), 4), ["group_norm", "(1, 6, 4)", "4 groups"]),
    ("group_norm zero groups", lambda: ops.group_norm(a(1, 6, 4), 0), ["group_norm", "(1, 6, 4)"]),
    ("group_norm weight", lambda: ops.group_norm(a(1, 6, 4), 2, a(5)), ["group_norm", "(5,)", "(1, 6, 4)"]),
    ("group_norm dtypes", lambda: ops.group_norm(a(1, 6, 4), 2, a(6, dtype=np.float64)),
     ["group_norm", "float32", "float64"]),
    # layer_norm
    ("layer_norm rank", lambda: ops.layer_norm(backend.asarray(np.float32(1.0))), ["layer_norm", "0-d"]),
    ("layer_norm weight", lambda: ops.layer_norm(a(2, 5), a(4)), ["layer_norm", "(4,)", "(2, 5)"]),
    ("layer_norm bias", lambda: ops.layer_norm(a(2, 5), a(5), a(3)), ["layer_norm", "(3,)", "(2, 5)"]),
    ("layer_norm dtypes", lambda: ops.layer_norm(a(2, 5), a(5, dtype=np.float64)), ["layer_norm", "float64"]),
    ("layer_norm int", lambda: ops.layer_norm(ints(2, 5)), ["layer_norm", "int64", "(2, 5)"]),
    # linear
    ("linear shape", lambda: ops.linear(a(2, 5), a(3, 4)), ["linear", "(2, 5)", "(3, 4)"]),
    ("linear weight rank", lambda: ops.linear(a(2, 5), a(5)), ["linear", "(2, 5)", "(5,)"]),
    ("linear bias", lambda: ops.linear(a(2, 5), a(3, 5), a(4)), ["linear", "(4,)", "(3,)"]),
    ("linear dtypes", lambda: ops.linear(a(2, 5), a(3, 5, dtype=np.float64)), ["linear", "float32", "float64"]),
    # activations
    ("silu int", lambda: ops.silu(ints(3, 2)), ["silu", "int64", "(3, 2)"]),
    ("gelu int", lambda: ops.gelu(ints(3)), ["gelu", "int64", "(3,)"]),
    ("gelu approximate", lambda: ops.gelu(a(3), approximate="fast"), ["gelu", "fast"]),
    ("quick_gelu int", lambda: ops.quick_gelu(ints(4)), ["quick_gelu", "int64", "(4,)"]),
    # geglu
    ("geglu odd weight", lambda: ops.geglu(a(2, 4), a(5, 4)), ["geglu", "(5, 4)", "(2, 4)"]),
    ("geglu shape", lambda: ops.geglu(a(2, 3), a(6, 4)), ["linear", "(2, 3)", "(6, 4)"]),
    ("geglu approximate", lambda: ops.geglu(a(2, 4), a(6, 4), approximate="x"), ["geglu", "'x'"]),
    # softmax
    ("softmax int", lambda: ops.softmax(ints(2, 3)), ["softmax", "int64", "(2, 3)"]),
    ("softmax axis", lambda: ops.softmax(a(2, 3), axis=2), ["softmax", "axis 2", "(2, 3)"]),
    # attention
    ("attention rank", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 1, 4, 8), a(2, 1, 4, 8)),
     ["scaled_dot_product_attention", "(2, 4, 8)", "(2, 1, 4, 8)"]),
    ("attention rank 1", lambda: ops.scaled_dot_product_attention(a(8), a(8), a(8)),
     ["scaled_dot_product_attention", "(8,)"]),
    ("attention d", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 5, 7), a(2, 5, 7)),
     ["scaled_dot_product_attention", "(2, 4, 8)", "(2, 5, 7)"]),
    ("attention keys vs values", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 5, 8), a(2, 6, 8)),
     ["scaled_dot_product_attention", "(2, 5, 8)", "(2, 6, 8)"]),
    ("attention batch", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(3, 5, 8), a(3, 5, 8)),
     ["scaled_dot_product_attention", "(2, 4, 8)", "(3, 5, 8)"]),
    ("attention dtypes", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 5, 8, dtype=np.float64),
                                                                  a(2, 5, 8)),
     ["scaled_dot_product_attention", "float32", "float64"]),
    ("attention mask shape", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 5, 8), a(2, 5, 8), mask=a(3, 5)),
     ["scaled_dot_product_attention", "(3, 5)", "(2, 4, 5)"]),
    ("attention mask dtype", lambda: ops.scaled_dot_product_attention(a(2, 4, 8), a(2, 5, 8), a(2, 5, 8),
                                                                      mask=a(4, 5, dtype=np.float64)),
     ["scaled_dot_product_attention", "float64", "(4, 5)"]),
    ("attention int", lambda: ops.scaled_dot_product_attention(ints(2, 4, 8), ints(2, 5, 8), ints(2, 5, 8)),
     ["scaled_dot_product_attention", "int64"]),
    # heads
    ("split_heads rank", lambda: ops.split_heads(a(4, 8), 2), ["split_heads", "(4, 8)"]),
    ("split_heads divisible", lambda: ops.split_heads(a(1, 4, 9), 2), ["split_heads", "(1, 4, 9)", "2 heads"]),
    ("merge_heads rank", lambda: ops.merge_heads(a(1, 4, 9)), ["merge_heads", "(1, 4, 9)"]),
    # upsample, embedding, timestep embedding
    ("upsample rank", lambda: ops.upsample_nearest2x(a(3, 4, 4)), ["upsample_nearest2x", "(3, 4, 4)"]),
    ("embedding float ids", lambda: ops.embedding(a(3), a(10, 4)), ["embedding", "float32", "(3,)"]),
    ("embedding table rank", lambda: ops.embedding(ints(3), a(10)), ["embedding", "(10,)"]),
    ("embedding range", lambda: ops.embedding(backend.asarray(np.array([0, 10])), a(10, 4)),
     ["embedding", "[0, 10)", "(10, 4)"]),
    ("embedding negative", lambda: ops.embedding(backend.asarray(np.array([-1, 2])), a(10, 4)),
     ["embedding", "[-1, 2]"]),
    ("timestep rank", lambda: ops.timestep_embedding(a(2, 3), 8), ["timestep_embedding", "(2, 3)"]),
    ("timestep dim", lambda: ops.timestep_embedding(a(2), 1), ["timestep_embedding", "dim", "1"]),
    ("timestep shift", lambda: ops.timestep_embedding(a(2), 2, downscale_freq_shift=1), ["timestep_embedding", "zero"]),
]


@pytest.fixture(params=["ops", "functional"])
def through(request, monkeypatch):
    """The cases call `ops.<name>`; with "functional" that name means refldm.core.functional here."""
    if request.param == "functional":
        monkeypatch.setitem(globals(), "ops", functional)
    with accel.enabled(True):
        yield request.param


@pytest.mark.parametrize("call, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_value_error(on_backend, through, call, expected):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


def test_every_op_has_a_bad_input_case():
    covered = {c[0].split()[0] for c in CASES}
    aliases = {"attention": "scaled_dot_product_attention", "upsample": "upsample_nearest2x",
               "timestep": "timestep_embedding"}
    covered = {aliases.get(name, name) for name in covered}
    public = {name for name in ops.__all__ if callable(getattr(ops, name))}
    assert public <= covered, f"ops without a bad-input case: {sorted(public - covered)}"
    assert public == {name for name in functional.__all__ if callable(getattr(functional, name))}


def test_mixing_host_and_device_arrays_is_refused():
    """On a device backend an op given one host array and one device array fails before computing."""
    with backend.use("fakegpu"):
        x = backend.asarray(np.ones((1, 2, 4, 4), np.float32))
        w = np.ones((3, 2, 3, 3), np.float32)  # left on the host by mistake
        with pytest.raises(ValueError, match="mixed"):
            ops.conv2d(x, w)
        with pytest.raises(ValueError, match="mixed"):
            ops.layer_norm(x, np.ones(4, np.float32))
