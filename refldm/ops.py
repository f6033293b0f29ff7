"""The hand-written operations every model is built from: pure functions, arrays in, array out.

Layouts follow PyTorch so checkpoints load without transposes: images are (N, C, H, W), sequences are
(B, L, D), a conv weight is (C_out, C_in, kH, kW) and a linear weight is (D_out, D_in).
Every function gets its array namespace ``xp`` from its inputs (`refldm.backend.array_namespace`), so
the same code runs on NumPy, CuPy, and the test device. docs/ops.md explains the math of each.
"""

from __future__ import annotations

import math

from refldm.backend import array_namespace, erf

__all__ = [
    "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
    "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x", "embedding",
    "timestep_embedding", "ATTENTION_CHUNK_BYTES",
]

# Upper bound on the bytes of one block of attention scores (see scaled_dot_product_attention).
ATTENTION_CHUNK_BYTES = 64 * 2**20


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _check_float(op: str, *arrays):
    dtypes = {a.dtype for a in arrays if a is not None}
    if len(dtypes) > 1:
        _fail(op, f"dtypes differ: {', '.join(sorted(str(d) for d in dtypes))}")
    for d in dtypes:
        if d.kind != "f":
            _fail(op, f"expected floating-point arrays, got {d}")


def _pair(v, op, what):
    if isinstance(v, int):
        return v, v
    if len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    _fail(op, f"{what} must be an int or a pair of ints, got {v!r}")


def _padding(padding, op):
    """int | (ph, pw) | ((top, bottom), (left, right)) -> (top, bottom, left, right)."""
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 2 and all(len(p) == 2 for p in padding):
        (t, b), (l, r) = padding
        return int(t), int(b), int(l), int(r)
    _fail(op, f"padding must be an int, (ph, pw) or ((top, bottom), (left, right)), got {padding!r}")


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as in every CNN framework.

    y[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[n, c, s_h*i + u, s_w*j + v]

    x: (N, C_in, H, W); weight: (C_out, C_in, kH, kW); bias: (C_out,) or None.
    stride: int or (s_h, s_w). padding: int, (p_h, p_w) for symmetric zero padding, or
    ((top, bottom), (left, right)) for asymmetric padding (the SD VAE's downsampler pads (0, 1, 0, 1)).
    Output: (N, C_out, H_out, W_out), H_out = (H + top + bottom - kH) // s_h + 1.

    A 1x1 stride-1 conv is one matrix product over the channels; a stride-1 3x3 (or any stride-1 k x k)
    conv is kH*kW matrix products on shifted views of the flattened padded image, with no copies of
    the input (the "shift-and-accumulate" form); other strides gather each tap's pixels first.
    """
    op = "conv2d"
    if x.ndim != 4 or weight.ndim != 4:
        _fail(op, f"expected x (N, C, H, W) and weight (C_out, C_in, kH, kW), got x {tuple(x.shape)}, "
                  f"weight {tuple(weight.shape)}")
    n, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c != c_in:
        _fail(op, f"x has {c} channels but weight {tuple(weight.shape)} expects {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        _fail(op, f"bias shape {tuple(bias.shape)} != ({c_out},)")
    _check_float(op, x, weight, bias)
    sh, sw = _pair(stride, op, "stride")
    if sh < 1 or sw < 1:
        _fail(op, f"stride must be >= 1, got {stride!r}")
    top, bottom, left, right = _padding(padding, op)
    if min(top, bottom, left, right) < 0:
        _fail(op, f"padding must be >= 0, got {padding!r}")
    hp, wp = h + top + bottom, w + left + right
    if hp < kh or wp < kw:
        _fail(op, f"padded input {hp}x{wp} is smaller than the {kh}x{kw} kernel")
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    xp = array_namespace(x, weight, bias)

    if kh == kw == 1 and sh == sw == 1 and top == bottom == left == right == 0:
        # 1x1: y[n] = W (C_out, C_in) @ x[n] (C_in, H*W)
        y = xp.matmul(weight.reshape(c_out, c_in), x.reshape(n, c, h * w))
    elif sh == sw == 1:
        # shift-and-accumulate: flatten the padded image row-major with width wp; tap (u, v) is then the
        # contiguous window starting at u*wp + v. Computing every output at all wp columns (the last kw-1
        # per row are discarded) makes each tap one (C_out, C_in) @ (C_in, ho*wp) product on a view.
        length = ho * wp
        flat = xp.zeros((n, c, hp * wp + kw - 1), dtype=x.dtype)
        flat[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, top:top + h, left:left + w] = x
        taps = weight.transpose(2, 3, 0, 1)  # (kH, kW, C_out, C_in)
        y = None
        for u in range(kh):
            for v in range(kw):
                start = u * wp + v
                t = xp.matmul(taps[u, v], flat[:, :, start:start + length])
                if y is None:
                    y = t
                else:
                    y += t
        y = y.reshape(n, c_out, ho, wp)[:, :, :, :wo]
        y = xp.ascontiguousarray(y).reshape(n, c_out, ho * wo)
    else:
        # general stride: pad, then for each tap gather the strided pixels (N, C, ho, wo) and multiply
        xpad = x
        if top or bottom or left or right:
            xpad = xp.zeros((n, c, hp, wp), dtype=x.dtype)
            xpad[:, :, top:top + h, left:left + w] = x
        y = None
        for u in range(kh):
            for v in range(kw):
                patch = xpad[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw]
                t = xp.matmul(weight[:, :, u, v], patch.reshape(n, c, ho * wo))
                if y is None:
                    y = t
                else:
                    y += t
    if bias is not None:
        y += bias.reshape(1, c_out, 1)
    return y.reshape(n, c_out, ho, wo)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Group normalisation (Wu & He, 2018).

    The C channels are split into G groups; over each sample's group g (its C/G channels and all
    positions) with mean mu_g and biased variance var_g:
        y = (x - mu_g) / sqrt(var_g + eps) * gamma[c] + beta[c]

    x: (N, C, ...) with C divisible by G; weight (gamma), bias (beta): (C,) or None. Output: x's shape.
    """
    op = "group_norm"
    if x.ndim < 2:
        _fail(op, f"expected x (N, C, ...), got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if num_groups < 1 or c % num_groups:
        _fail(op, f"{c} channels cannot be split into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            _fail(op, f"{name} shape {tuple(p.shape)} != ({c},)")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    g = x.reshape(n, num_groups, -1)
    mean = xp.mean(g, axis=-1, keepdims=True)
    centred = g - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    centred *= 1.0 / xp.sqrt(var + eps)
    y = centred.reshape(x.shape)
    affine = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y *= weight.reshape(affine)
    if bias is not None:
        y += bias.reshape(affine)
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """Layer normalisation over the last axis (Ba et al., 2016).

    y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, mean and biased variance over the last axis.

    x: (..., D); weight (gamma), bias (beta): (D,) or None. Output: x's shape.
    """
    op = "layer_norm"
    if x.ndim < 1:
        _fail(op, "expected at least a 1-d array")
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            _fail(op, f"{name} shape {tuple(p.shape)} != ({d},) for x {tuple(x.shape)}")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)
    y = x - mean
    var = xp.mean(y * y, axis=-1, keepdims=True)
    y *= 1.0 / xp.sqrt(var + eps)
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


def linear(x, weight, bias=None):
    """Affine map on the last axis: y = x W^T + b.

    x: (..., D_in); weight: (D_out, D_in); bias: (D_out,) or None. Output: (..., D_out).
    """
    op = "linear"
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        _fail(op, f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (expected x (..., "
                  f"{weight.shape[1] if weight.ndim == 2 else '?'}))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(op, f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    y = xp.matmul(x.reshape(-1, x.shape[-1]), weight.T)
    if bias is not None:
        y += bias
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def silu(x):
    """SiLU / swish: silu(x) = x * sigmoid(x) = x / (1 + exp(-x))."""
    xp = array_namespace(x)
    return x / (1.0 + xp.exp(-x))


def gelu(x, approximate: str = "none"):
    """GELU (Hendrycks & Gimpel, 2016).

    "none":  gelu(x) = x/2 * (1 + erf(x / sqrt(2)))                          (exact)
    "tanh":  gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))    (approximation)
    """
    xp = array_namespace(x)
    if approximate == "none":
        return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    _fail("gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: quick_gelu(x) = x * sigmoid(1.702 x)."""
    xp = array_namespace(x)
    return x / (1.0 + xp.exp(-1.702 * x))


def geglu(x, weight, bias=None):
    """GEGLU feed-forward gate (Shazeer, 2020): [h, g] = x W^T + b split in two halves on the last axis;
    geglu(x) = h * gelu(g).

    x: (..., D_in); weight: (2 * D_out, D_in); bias: (2 * D_out,). Output: (..., D_out).
    """
    if weight.ndim != 2 or weight.shape[0] % 2:
        _fail("geglu", f"weight must be (2 * D_out, D_in), got {tuple(weight.shape)}")
    proj = linear(x, weight, bias)
    half = weight.shape[0] // 2
    return proj[..., :half] * gelu(proj[..., half:])


def softmax(x, axis: int = -1):
    """Numerically stable softmax: softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)).

    Subtracting the maximum changes nothing mathematically and keeps exp from overflowing.
    """
    xp = array_namespace(x)
    if x.dtype.kind != "f":
        _fail("softmax", f"expected a floating-point array, got {x.dtype}")
    e = x - xp.max(x, axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


def scaled_dot_product_attention(q, k, v, mask=None, is_causal: bool = False, scale=None,
                                 max_chunk_bytes: int | None = None):
    """Scaled dot-product attention (Vaswani et al., 2017), memory-bounded by chunking the queries.

    Attention(Q, K, V) = softmax(Q K^T * scale + M) V,  scale = 1/sqrt(d) unless given,

    where M is the additive mask (0 to keep, -inf or a large negative number to drop) and, with
    is_causal, M[i, j] = -inf for j > i. Rows are computed in blocks of queries so that one block of
    scores takes at most `max_chunk_bytes` (default ATTENTION_CHUNK_BYTES); the result is the same,
    only the peak memory is bounded: B*H*Lq*Lk scores are never held at once.

    q: (..., Lq, d); k: (..., Lk, d); v: (..., Lk, d_v); the leading axes (batch, heads) must match.
    mask: broadcastable to (..., Lq, Lk), additive. Output: (..., Lq, d_v).
    The softmax normalisation is applied to the output rows (divide by the row sums after P V), which
    is exact and touches Lq*d_v values instead of Lq*Lk.
    """
    op = "scaled_dot_product_attention"
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        _fail(op, f"q, k, v must have the same rank >= 2, got {tuple(q.shape)}, {tuple(k.shape)}, "
                  f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:-2] != k.shape[:-2] \
            or k.shape[:-2] != v.shape[:-2]:
        _fail(op, f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_float(op, q, k, v, mask)
    xp = array_namespace(q, k, v, mask)
    lq, d = q.shape[-2:]
    lk = k.shape[-2]
    if mask is not None:
        try:
            mask = xp.broadcast_to(mask, q.shape[:-2] + (lq, lk))
        except ValueError:
            _fail(op, f"mask {tuple(mask.shape)} does not broadcast to {q.shape[:-2] + (lq, lk)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qs = q * xp.asarray(scale, dtype=q.dtype)
    kt = xp.swapaxes(k, -1, -2)
    lead = 1
    for s in q.shape[:-2]:
        lead *= s
    budget = ATTENTION_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    rows = max(1, min(lq, budget // max(1, lead * lk * q.dtype.itemsize)))
    out = xp.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for i in range(0, lq, rows):
        j = min(lq, i + rows)
        s = xp.matmul(qs[..., i:j, :], kt)  # (..., rows, Lk)
        if mask is not None:
            s += mask[..., i:j, :]
        if is_causal:
            s += _causal_block(xp, i, j, lk, s.dtype)
        s -= xp.max(s, axis=-1, keepdims=True)
        xp.exp(s, out=s)
        denom = xp.sum(s, axis=-1, keepdims=True)
        o = xp.matmul(s, v)
        o /= denom
        out[..., i:j, :] = o
    return out


def _causal_block(xp, i, j, lk, dtype):
    """Rows i..j-1 of the causal mask: 0 where key <= query, -inf after."""
    rows = xp.arange(i, j).reshape(-1, 1)
    cols = xp.arange(lk).reshape(1, -1)
    return xp.where(cols > rows, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


def split_heads(x, heads: int):
    """(B, L, H*d) -> (B, H, L, d): view each token's features as H heads of size d."""
    b, l, hd = x.shape
    if hd % heads:
        _fail("split_heads", f"{hd} features cannot be split into {heads} heads")
    return x.reshape(b, l, heads, hd // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, d) -> (B, L, H*d), the inverse of split_heads."""
    b, h, l, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, l, h * d)


def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling: y[n, c, i, j] = x[n, c, floor(i/2), floor(j/2)].

    x: (N, C, H, W) -> (N, C, 2H, 2W).
    """
    if x.ndim != 4:
        _fail("upsample_nearest2x", f"expected (N, C, H, W), got {tuple(x.shape)}")
    xp = array_namespace(x)
    n, c, h, w = x.shape
    y = xp.empty((n, c, h, 2, w, 2), dtype=x.dtype)
    y[...] = x.reshape(n, c, h, 1, w, 1)
    return y.reshape(n, c, 2 * h, 2 * w)


def embedding(ids, table):
    """Embedding lookup: y[..., :] = table[ids[...], :].

    ids: integer array of any shape, each in [0, V); table: (V, D). Output: ids.shape + (D,).
    """
    op = "embedding"
    if table.ndim != 2:
        _fail(op, f"table must be (V, D), got {tuple(table.shape)}")
    if ids.dtype.kind not in "iu":
        _fail(op, f"ids must be integers, got {ids.dtype}")
    xp = array_namespace(ids, table)
    if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= table.shape[0]):
        _fail(op, f"ids must lie in [0, {table.shape[0]}), got range [{int(xp.min(ids))}, {int(xp.max(ids))}]")
    return xp.take(table, ids.reshape(-1), axis=0).reshape(tuple(ids.shape) + (table.shape[1],))


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal timestep embedding (Vaswani et al., 2017; as diffusers' get_timestep_embedding).

    With half = dim // 2 and frequencies f_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),
    i = 0..half-1:  emb(t) = [sin(scale * t * f), cos(scale * t * f)]  (or [cos, sin] when
    flip_sin_to_cos), zero-padded by one column when dim is odd.

    timesteps: (N,) (scalars become (1,)); output (N, dim), in the timesteps' dtype if floating,
    else float32.
    """
    op = "timestep_embedding"
    xp = array_namespace(timesteps)
    t = xp.asarray(timesteps)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        _fail(op, f"timesteps must be a scalar or 1-d, got shape {tuple(t.shape)}")
    if dim < 2:
        _fail(op, f"dim must be >= 2, got {dim}")
    half = dim // 2
    if half - downscale_freq_shift == 0:
        _fail(op, f"half - downscale_freq_shift is zero (dim={dim}, shift={downscale_freq_shift})")
    dtype = t.dtype if t.dtype.kind == "f" else xp.float32
    t = t.astype(dtype)
    exponent = -math.log(max_period) * xp.arange(half, dtype=dtype) / (half - downscale_freq_shift)
    args = t.reshape(-1, 1) * xp.exp(exponent).reshape(1, -1) * scale
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    emb = xp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=dtype)], axis=-1)
    return emb
