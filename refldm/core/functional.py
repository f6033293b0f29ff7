"""The ops as the models call them, ``from refldm.core import functional as F`` then ``F.conv2d(...)``, as
torch.nn.functional sits over torch's kernels. This is the one place where the speed layer plugs in.

Each function checks its arguments (`refldm.core.checks`, the very checks the reference makes, so a
bad call gets the same message either way) and then runs one of two implementations of one equation:

- the host kernel of the same name in `refldm.accel` (threads, BLAS in place, cached blocks), when
  ``accel.active(xp)``: the arrays are NumPy arrays and the speed layer is on (the default);
- otherwise the reference op in `refldm.core.ops`, the equation in its docstring: on every GPU backend,
  and on the host with ``REFLDM_ACCEL=0``, ``refldm.accel.enabled(False)`` or the CLI's ``--reference``.

tests/test_accel.py proves each kernel equal to its reference op. To step through the reference in a
debugger, switch the speed layer off and set breakpoints in refldm/core/ops.py (docs/ops.md, "Stepping
through the reference"). The ops that are fast as written (split_heads, merge_heads, embedding,
timestep_embedding) have no kernel: the names here are the reference's own functions.
"""

from __future__ import annotations

import math

from refldm import accel
from refldm.backend import array_namespace
from refldm.core import checks, ops
from refldm.core.ops import ATTENTION_CHUNK_BYTES, embedding, merge_heads, split_heads, timestep_embedding

__all__ = [
    "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
    "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x", "embedding",
    "timestep_embedding", "ATTENTION_CHUNK_BYTES",
]


def _fast(*arrays) -> bool:
    """True when the speed layer takes this call: host (NumPy) arrays, with the switch on."""
    return accel.active(array_namespace(*arrays))


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """`ops.conv2d`: 2-D cross-correlation, y = b + sum_{u, v} w[:, :, u, v] @ window(u, v)."""
    sh, sw, top, bottom, left, right = checks.conv2d(x, weight, bias, stride, padding)
    if _fast(x, weight, bias):
        return accel.conv2d(x, weight, bias, (sh, sw), (top, bottom, left, right))
    return ops.conv2d(x, weight, bias, stride, padding)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """`ops.group_norm`: y = (x - mu_g) / sqrt(var_g + eps) * gamma[c] + beta[c]."""
    checks.group_norm(x, num_groups, weight, bias)
    if _fast(x, weight, bias):
        return accel.group_norm(x, num_groups, weight, bias, eps)
    return ops.group_norm(x, num_groups, weight, bias, eps)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """`ops.layer_norm`: y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta over the last axis."""
    checks.layer_norm(x, weight, bias)
    if _fast(x, weight, bias) and x.dtype.itemsize >= 4:  # float16: the reference's float32 statistics
        return accel.layer_norm(x, weight, bias, eps)
    return ops.layer_norm(x, weight, bias, eps)


def linear(x, weight, bias=None):
    """`ops.linear`: y = x W^T + b."""
    checks.linear(x, weight, bias)
    if _fast(x, weight, bias):
        return accel.linear(x, weight, bias)
    return ops.linear(x, weight, bias)


def silu(x):
    """`ops.silu`: x / (1 + exp(-x))."""
    checks.silu(x)
    if _fast(x):
        return accel.silu(x)
    return ops.silu(x)


def gelu(x, approximate: str = "none"):
    """`ops.gelu`: x/2 * (1 + erf(x / sqrt(2))), or its tanh approximation."""
    checks.gelu(x, approximate)
    if _fast(x):
        return accel.gelu(x, approximate)
    return ops.gelu(x, approximate)


def quick_gelu(x):
    """`ops.quick_gelu`: x / (1 + exp(-1.702 x))."""
    checks.quick_gelu(x)
    if _fast(x):
        return accel.quick_gelu(x)
    return ops.quick_gelu(x)


def geglu(x, weight, bias=None, approximate: str = "none"):
    """`ops.geglu`: [h, g] = x W^T + b, h * gelu(g)."""
    checks.geglu(x, weight, approximate)
    checks.linear(x, weight, bias)
    if _fast(x, weight, bias):
        return accel.geglu(x, weight, bias, approximate)
    return ops.geglu(x, weight, bias, approximate)


def softmax(x, axis: int = -1):
    """`ops.softmax`: exp(x_i - max(x)) / sum_j exp(x_j - max(x)); the kernel covers the last axis."""
    checks.softmax(x, axis)
    if _fast(x) and axis % x.ndim == x.ndim - 1:
        return accel.softmax(x)
    return ops.softmax(x, axis)


def scaled_dot_product_attention(q, k, v, mask=None, is_causal: bool = False, scale=None,
                                 max_chunk_bytes: int | None = None):
    """`ops.scaled_dot_product_attention`: softmax(Q K^T * scale + M) V, scale = 1/sqrt(d) unless given,
    at most `max_chunk_bytes` (default ATTENTION_CHUNK_BYTES) of scores at once."""
    mask = checks.scaled_dot_product_attention(q, k, v, mask)  # None, or additive, (..., Lq, Lk)
    if _fast(q, k, v, mask):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        budget = ATTENTION_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
        return accel.scaled_dot_product_attention(q, k, v, mask, is_causal, scale, budget)
    return ops.scaled_dot_product_attention(q, k, v, mask, is_causal, scale, max_chunk_bytes)


def upsample_nearest2x(x):
    """`ops.upsample_nearest2x`: y[n, c, i, j] = x[n, c, floor(i/2), floor(j/2)]."""
    checks.upsample_nearest2x(x)
    if _fast(x):
        return accel.upsample_nearest2x(x)
    return ops.upsample_nearest2x(x)
