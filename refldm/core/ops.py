"""The operations every model is built from: pure functions, arrays in, array out, each the equation
in its docstring written with the array namespace only. This file is the reference; read it top to
bottom (docs/ops.md explains the math of each op).

Layouts follow PyTorch so checkpoints load without transposes: images are (N, C, H, W), sequences are
(B, L, D), a conv weight is (C_out, C_in, kH, kW) and a linear weight is (D_out, D_in).
Every function gets its array namespace ``xp`` from its inputs (`refldm.backend.array_namespace`), so
the same code runs on NumPy, CuPy, and the test device.

Speed lives elsewhere, and nothing here knows of it. Models call the ops through
`refldm.core.functional`, which checks the arguments and picks, in that one place, between this file
and the host kernel of the same name in `refldm.accel` (threads, BLAS in place, cached blocks); each
kernel is proven equal to the code below it by tests/test_accel.py. With the speed layer off
(``REFLDM_ACCEL=0``, ``refldm.accel.enabled(False)`` or the CLI's ``--reference``), and on every GPU
backend, this file is what runs, so a breakpoint here is reached (docs/ops.md, "Stepping through the
reference"). The argument checks, shared with functional, live in `refldm.core.checks`.
"""

from __future__ import annotations

import math

from refldm.backend import array_namespace, erf
from refldm.core import checks

__all__ = [
    "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
    "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x", "embedding",
    "timestep_embedding", "ATTENTION_CHUNK_BYTES",
]

# Upper bound on the bytes of one block of attention scores (see scaled_dot_product_attention).
ATTENTION_CHUNK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------------
# Convolution

def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as in every CNN framework.

    y[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[n, c, s_h*i + u, s_w*j + v]

    x: (N, C_in, H, W); weight: (C_out, C_in, kH, kW); bias: (C_out,) or None.
    stride: int or (s_h, s_w). padding: int, (p_h, p_w) for symmetric zero padding, or
    ((top, bottom), (left, right)) for asymmetric padding (the SD VAE's downsampler pads (0, 1, 0, 1)).
    Output: (N, C_out, H_out, W_out), H_out = (H + top + bottom - kH) // s_h + 1.

    Computed as a sum of per-tap products: for each kernel tap (u, v), the pixels it sees form a
    strided window of x_pad, and that window times the tap's (C_out, C_in) weights is a matrix product
    over the channels:  y = b + sum_{u, v} w[:, :, u, v] @ window(u, v).
    """
    sh, sw, top, bottom, left, right = checks.conv2d(x, weight, bias, stride, padding)
    xp = array_namespace(x, weight, bias)
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    hp, wp = h + top + bottom, w + left + right                         # x_pad: x at rows top.., columns left..
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    x_pad = xp.zeros((n, c, hp, wp), dtype=x.dtype)
    x_pad[:, :, top:top + h, left:left + w] = x
    y = xp.zeros((n, c_out, ho * wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            # window[n, c, i, j] = x_pad[n, c, s_h*i + u, s_w*j + v], (N, C_in, H_out, W_out)
            window = x_pad[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw]
            y += xp.matmul(weight[:, :, u, v], window.reshape(n, c, ho * wo))  # (C_out, C_in) @ (N, C_in, Ho*Wo)
    if bias is not None:
        y += bias.reshape(1, c_out, 1)
    return y.reshape(n, c_out, ho, wo)


# --------------------------------------------------------------------------------------------------
# Normalisation

def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Group normalisation (Wu & He, 2018).

    The C channels are split into G groups; over each sample's group g (its C/G channels and all
    positions) with mean mu_g and biased variance var_g = mean((x - mu_g)^2):
        y = (x - mu_g) / sqrt(var_g + eps) * gamma[c] + beta[c]

    x: (N, C, ...) with C divisible by G; weight (gamma), bias (beta): (C,) or None. Output: x's shape.
    """
    checks.group_norm(x, num_groups, weight, bias)
    xp = array_namespace(x, weight, bias)
    n, c = x.shape[:2]
    groups = x.reshape(n, num_groups, -1)                               # (N, G, C/G * positions)
    mu = xp.mean(groups, axis=-1, keepdims=True)                        # mu_g, (N, G, 1)
    var = xp.mean((groups - mu) ** 2, axis=-1, keepdims=True)           # var_g, (N, G, 1)
    y = ((groups - mu) / xp.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)                          # gamma[c], beta[c] broadcast
    if weight is not None:
        y = y * weight.reshape(per_channel)
    if bias is not None:
        y = y + bias.reshape(per_channel)
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """Layer normalisation over the last axis (Ba et al., 2016).

    y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, mean and biased variance over the last axis.

    x: (..., D); weight (gamma), bias (beta): (D,) or None. Output: x's shape.
    """
    checks.layer_norm(x, weight, bias)
    if x.dtype.itemsize < 4:  # float16: the statistics in float32, as torch (x^2 overflows float16 past 256)
        wide = [None if a is None else a.astype("float32") for a in (x, weight, bias)]
        return layer_norm(*wide, eps=eps).astype(x.dtype)
    xp = array_namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)                           # (..., 1)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)              # (..., 1)
    y = (x - mean) / xp.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# --------------------------------------------------------------------------------------------------
# Linear layers and activations

def linear(x, weight, bias=None):
    """Affine map on the last axis: y = x W^T + b.

    x: (..., D_in); weight: (D_out, D_in); bias: (D_out,) or None. Output: (..., D_out).
    """
    checks.linear(x, weight, bias)
    xp = array_namespace(x, weight, bias)
    y = xp.matmul(x.reshape(-1, x.shape[-1]), weight.T)  # (rows, D_out)
    if bias is not None:
        y += bias
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def silu(x):
    """SiLU / swish: silu(x) = x * sigmoid(x) = x / (1 + exp(-x)). Output: x's shape and dtype."""
    checks.silu(x)
    xp = array_namespace(x)
    return x / (1.0 + xp.exp(-x))


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x, approximate: str = "none"):
    """GELU (Hendrycks & Gimpel, 2016).

    "none":  gelu(x) = x/2 * (1 + erf(x / sqrt(2)))                          (exact)
    "tanh":  gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))    (approximation)
    Output: x's shape and dtype. (The host's float32 kernel evaluates erf by a polynomial accurate to
    1.5e-7, as torch's CPU kernel does; see refldm/accel/kernels.py.)
    """
    checks.gelu(x, approximate)
    xp = array_namespace(x)
    if approximate == "none":
        inner = erf(x * _SQRT_HALF).astype(x.dtype, copy=False)  # SciPy's float16 erf answers in float32
    else:
        inner = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return x / 2 * (1.0 + inner)


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: quick_gelu(x) = x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x)).
    Output: x's shape."""
    checks.quick_gelu(x)
    xp = array_namespace(x)
    return x / (1.0 + xp.exp(-1.702 * x))


def geglu(x, weight, bias=None, approximate: str = "none"):
    """GEGLU feed-forward gate (Shazeer, 2020): [h, g] = x W^T + b split in two halves on the last axis;
    geglu(x) = h * gelu(g).

    x: (..., D_in); weight: (2 * D_out, D_in); bias: (2 * D_out,). Output: (..., D_out).
    """
    checks.geglu(x, weight, approximate)
    proj = linear(x, weight, bias)  # (..., 2 * D_out)
    half = weight.shape[0] // 2
    h, g = proj[..., :half], proj[..., half:]
    return h * gelu(g, approximate)


def softmax(x, axis: int = -1):
    """Numerically stable softmax: softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)).

    Subtracting the maximum changes nothing mathematically and keeps exp from overflowing.
    x: any shape; axis: the axis to normalise over. Output: x's shape and dtype.
    """
    checks.softmax(x, axis)
    xp = array_namespace(x)
    if x.shape[axis] == 0:
        return x.copy()
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))                # exp(x_i - max(x))
    return e / xp.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Attention

def scaled_dot_product_attention(q, k, v, mask=None, is_causal: bool = False, scale=None,
                                 max_chunk_bytes: int | None = None):
    """Scaled dot-product attention (Vaswani et al., 2017), memory-bounded by chunking the queries.

    Attention(Q, K, V) = softmax(Q K^T * scale + M) V,  scale = 1/sqrt(d) unless given,

    where M is the additive mask (0 to keep, -inf or a large negative number to drop; a boolean mask
    means True = keep, as in torch) and, with is_causal, M[i, j] = -inf for j > i. Rows are computed in
    blocks of queries so that one block of scores takes at most `max_chunk_bytes` (default
    ATTENTION_CHUNK_BYTES): B*H*Lq*Lk scores are never held at once, and the result is the same.

    q: (..., Lq, d); k: (..., Lk, d); v: (..., Lk, d_v); the leading axes (batch, heads) must match.
    mask: broadcastable to (..., Lq, Lk). Output: (..., Lq, d_v).
    """
    mask = checks.scaled_dot_product_attention(q, k, v, mask)           # None, or additive, (..., Lq, Lk)
    xp = array_namespace(q, k, v, mask)
    lead, (lq, d), (lk, dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    budget = ATTENTION_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    rows = max(1, min(lq, budget // max(1, math.prod(lead) * lk * q.dtype.itemsize)))
    out = xp.empty(lead + (lq, dv), dtype=q.dtype)
    for i in range(0, lq, rows):  # query rows i..j-1: at most `budget` bytes of scores at once
        j = min(lq, i + rows)
        s = xp.matmul(q[..., i:j, :], xp.swapaxes(k, -1, -2)) * scale  # Q K^T * scale, (..., rows, Lk)
        if mask is not None:
            s = s + mask[..., i:j, :]                                   # + M
        if is_causal:
            s = s + _causal_mask(xp, i, j, lk, s.dtype)
        out[..., i:j, :] = xp.matmul(softmax(s), v)                     # softmax(...) V, (..., rows, d_v)
    return out


def _causal_mask(xp, i, j, lk, dtype):
    """Rows i..j-1 of the causal mask: 0 where key <= query, -inf after."""
    rows = xp.arange(i, j).reshape(-1, 1)
    cols = xp.arange(lk).reshape(1, -1)
    return xp.where(cols > rows, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


def split_heads(x, heads: int):
    """(B, L, H*d) -> (B, H, L, d): view each token's features as H heads of size d (no copy)."""
    checks.split_heads(x, heads)
    b, l, hd = x.shape
    return x.reshape(b, l, heads, hd // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, d) -> (B, L, H*d), the inverse of split_heads."""
    checks.merge_heads(x)
    b, h, l, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, l, h * d)


# --------------------------------------------------------------------------------------------------
# Resampling and lookups

def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling: y[n, c, i, j] = x[n, c, floor(i/2), floor(j/2)].

    x: (N, C, H, W) -> (N, C, 2H, 2W).
    """
    checks.upsample_nearest2x(x)
    xp = array_namespace(x)
    return xp.repeat(xp.repeat(x, 2, axis=2), 2, axis=3)  # each row twice, then each column twice


def embedding(ids, table):
    """Embedding lookup: y[..., :] = table[ids[...], :].

    ids: integer array of any shape, each in [0, V); table: (V, D). Output: ids.shape + (D,).
    """
    checks.embedding(ids, table)
    xp = array_namespace(ids, table)
    return xp.take(table, ids.reshape(-1), axis=0).reshape(tuple(ids.shape) + (table.shape[1],))


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal timestep embedding (Vaswani et al., 2017; as diffusers' get_timestep_embedding).

    With half = dim // 2 and frequencies f_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),
    i = 0..half-1:  emb(t) = [sin(t * f * scale), cos(t * f * scale)]  (or [cos, sin] when
    flip_sin_to_cos), zero-padded by one column when dim is odd.

    timesteps: (N,) (scalars become (1,)); output (N, dim), in the timesteps' dtype if floating,
    else float32.
    """
    xp = array_namespace(timesteps)
    t = xp.asarray(timesteps)
    if t.ndim == 0:
        t = t.reshape(1)
    checks.timestep_embedding(t, dim, downscale_freq_shift)
    half = dim // 2
    dtype = t.dtype if t.dtype.kind == "f" else xp.float32
    t = t.astype(dtype)
    exponent = -math.log(max_period) * xp.arange(half, dtype=dtype) / (half - downscale_freq_shift)
    args = t.reshape(-1, 1) * xp.exp(exponent).reshape(1, -1) * scale  # (N, half)
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    emb = xp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=dtype)], axis=-1)
    return emb
