"""The hand-written operations every model is built from: pure functions, arrays in, array out.

Layouts follow PyTorch so checkpoints load without transposes: images are (N, C, H, W), sequences are
(B, L, D), a conv weight is (C_out, C_in, kH, kW) and a linear weight is (D_out, D_in).
Every function gets its array namespace ``xp`` from its inputs (`refldm.backend.array_namespace`), so
the same code runs on NumPy, CuPy, and the test device. docs/ops.md explains the math of each.

Speed without hiding the math: matrix products go to BLAS (cuBLAS on a GPU), which uses every core.
NumPy's elementwise functions use one core and stream the whole array through memory once per
operation, so on the host the elementwise parts are written as a few in-place passes over a block of
rows (``_in_blocks``): each block stays in the CPU cache while its passes run, and the blocks are
spread over a small thread pool (`refldm.backend.parallel_map`). On a GPU a single block covers the
array, so each pass is one kernel.
"""

from __future__ import annotations

import math

from refldm.backend import (array_namespace, blas_threads_controllable, erf, gemm_available, gemm_into,
                            is_host, parallel_map, single_threaded_blas)

__all__ = [
    "conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
    "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x", "embedding",
    "timestep_embedding", "ATTENTION_CHUNK_BYTES", "ATTENTION_BLOCK_BYTES", "CONV_CHUNK_BYTES",
    "CONV_BAND_BYTES", "HOST_BLOCK_BYTES",
]

# Upper bound on the bytes of one block of attention scores (see scaled_dot_product_attention).
ATTENTION_CHUNK_BYTES = 64 * 2**20
# On the host, attention works on blocks of scores of about this size (one head, 128 query rows at 4096
# keys in float32): small enough to stay in the CPU's cache between the products and the softmax
# passes, large enough for efficient matrix products (measured on one core: 0.5 MiB blocks cost 7%
# more time, 16 MiB blocks 5% more).
ATTENTION_BLOCK_BYTES = 2 * 2**20
# Upper bound on the bytes of the shifted input copies one band of a convolution builds (see conv2d).
CONV_CHUNK_BYTES = 128 * 2**20
# On the host, a stride-1 convolution accumulates the output in bands of rows of about this many bytes,
# so that a band stays in the core's cache across all of its kernel taps (see _conv2d_taps). Measured
# on the SD VAE decoder's 128-512 channel convolutions: 0.5-1 MiB bands cost 5-30% more time, 4 MiB
# about the same.
CONV_BAND_BYTES = 2 * 2**20
# On the host, elementwise passes run on blocks of about this many bytes (see _in_blocks).
HOST_BLOCK_BYTES = 512 * 2**10


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _check_float(op: str, *arrays):
    dtypes = {a.dtype for a in arrays if a is not None}
    if len(dtypes) > 1:
        _fail(op, f"dtypes differ: {', '.join(sorted(str(d) for d in dtypes))} (shapes "
                  f"{', '.join(str(tuple(a.shape)) for a in arrays if a is not None)})")
    for d in dtypes:
        if d.kind != "f":
            _fail(op, f"expected floating-point arrays, got {d} (shapes "
                      f"{', '.join(str(tuple(a.shape)) for a in arrays if a is not None)})")


def _pair(v, op, what):
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    _fail(op, f"{what} must be an int or a pair of ints, got {v!r}")


def _padding(padding, op):
    """int | (ph, pw) | ((top, bottom), (left, right)) -> (top, bottom, left, right)."""
    if isinstance(padding, int):
        return (padding,) * 4
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(isinstance(p, int) for p in padding):
            return padding[0], padding[0], padding[1], padding[1]
        if all(isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(i, int) for i in p)
               for p in padding):
            (t, b), (l, r) = padding
            return int(t), int(b), int(l), int(r)
    _fail(op, f"padding must be an int, (ph, pw) or ((top, bottom), (left, right)), got {padding!r}")


def _in_blocks(xp, n_rows: int, row_bytes: int, work, block_bytes: int = HOST_BLOCK_BYTES):
    """Call work(i, j) on row ranges [i, j) that together cover range(n_rows), each exactly once.

    On the host (NumPy) the ranges hold about `block_bytes` each and run on the thread pool; on a GPU
    one call covers all rows. `work` must write only rows i..j-1 of its output.
    """
    if not is_host(xp) or n_rows * row_bytes <= block_bytes:
        work(0, n_rows)
        return
    rows = max(1, block_bytes // max(1, row_bytes))
    parallel_map(lambda i: work(i, min(n_rows, i + rows)), range(0, n_rows, rows))


def _elementwise(op: str, x, compute):
    """out = f(x) elementwise, where compute(xp, xb, ob) writes f(xb) into ob, one block at a time."""
    _check_float(op, x)
    xp = array_namespace(x)
    flat = x.reshape(-1)  # a view when x is contiguous
    out = xp.empty(flat.shape, dtype=x.dtype)
    _in_blocks(xp, flat.size, x.dtype.itemsize, lambda i, j: compute(xp, flat[i:j], out[i:j]))
    return out.reshape(x.shape)


def _sums(xp, a, subscripts, b=None):
    """Sums over the trailing axes by einsum: "ij->i" is sum_j a[i, j], "ij,ij->i" is sum_j a[i, j]^2
    when b is a. On the host einsum's vectorised loop is about three times faster than xp.sum (whose
    pairwise summation we do not need at these lengths: the error stays near float32 resolution)."""
    return xp.einsum(subscripts, a) if b is None else xp.einsum(subscripts, a, b)


# --------------------------------------------------------------------------------------------------
# Convolution

def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as in every CNN framework.

    y[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[n, c, s_h*i + u, s_w*j + v]

    x: (N, C_in, H, W); weight: (C_out, C_in, kH, kW); bias: (C_out,) or None.
    stride: int or (s_h, s_w). padding: int, (p_h, p_w) for symmetric zero padding, or
    ((top, bottom), (left, right)) for asymmetric padding (the SD VAE's downsampler pads (0, 1, 0, 1)).
    Output: (N, C_out, H_out, W_out), H_out = (H + top + bottom - kH) // s_h + 1.

    The paths that compute this same sum: an unpadded 1x1 stride-1 conv is one matrix product over
    the channels. A stride-1 conv is a sum of matrix products on windows of the flattened padded
    image (shift-and-accumulate): on the host one product per tap, accumulated in place by BLAS
    (`_conv2d_taps`); elsewhere kH products on shifted copies (`_conv2d_shifted`). Other strides
    gather every tap's pixels into one matrix first (im2col, `_conv2d_gathered`). All but the first
    work in bands of output rows, which bounds their memory.
    """
    op = "conv2d"
    if x.ndim != 4 or weight.ndim != 4:
        _fail(op, f"expected x (N, C, H, W) and weight (C_out, C_in, kH, kW), got x {tuple(x.shape)}, "
                  f"weight {tuple(weight.shape)}")
    n, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c != c_in:
        _fail(op, f"x {tuple(x.shape)} has {c} channels but weight {tuple(weight.shape)} expects {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        _fail(op, f"bias shape {tuple(bias.shape)} != ({c_out},) for weight {tuple(weight.shape)}")
    _check_float(op, x, weight, bias)
    sh, sw = _pair(stride, op, "stride")
    if sh < 1 or sw < 1:
        _fail(op, f"stride must be >= 1, got {stride!r}")
    top, bottom, left, right = _padding(padding, op)
    if min(top, bottom, left, right) < 0:
        _fail(op, f"padding must be >= 0, got {padding!r}")
    hp, wp = h + top + bottom, w + left + right
    if hp < kh or wp < kw:
        _fail(op, f"padded input {hp}x{wp} (x {tuple(x.shape)}, padding {padding!r}) is smaller than "
                  f"the {kh}x{kw} kernel")
    xp = array_namespace(x, weight, bias)

    if kh == kw == 1 and sh == sw == 1 and top == bottom == left == right == 0:
        # y[n] = W (C_out, C_in) @ x[n] (C_in, H*W)
        y = xp.matmul(weight.reshape(c_out, c_in), x.reshape(n, c, h * w))  # (N, C_out, H*W)
        if bias is not None:
            y += bias.reshape(1, c_out, 1)
        return y.reshape(n, c_out, h, w)

    flat = _pad_flat(xp, x, top, bottom, left, right, kw - 1)
    if sh == sw == 1:
        if is_host(xp) and gemm_available(x.dtype):
            return _conv2d_taps(xp, flat, weight, bias, hp, wp)
        return _conv2d_shifted(xp, flat, weight, bias, hp, wp)
    return _conv2d_gathered(xp, flat, weight, bias, hp, wp, sh, sw)


def _pad_flat(xp, x, top, bottom, left, right, tail):
    """The zero-padded image, each channel flattened row by row (rows of length wp), `tail` zeros after
    it: (N, C, hp*wp + tail) with flat[n, c, (top + i)*wp + left + j] = x[n, c, i, j]. Only the border
    is zeroed, and on the host the channels are filled in blocks on the thread pool."""
    n, c, h, w = x.shape
    hp, wp = h + top + bottom, w + left + right
    flat = xp.empty((n * c, hp * wp + tail), dtype=x.dtype)
    src = x.reshape(n * c, h, w)

    def fill(i, j):
        img = flat[i:j, : hp * wp].reshape(j - i, hp, wp)
        img[:, :top] = 0
        img[:, top + h:] = 0
        img[:, top:top + h, :left] = 0
        img[:, top:top + h, left + w:] = 0
        img[:, top:top + h, left:left + w] = src[i:j]
        flat[i:j, hp * wp:] = 0

    _in_blocks(xp, n * c, (hp * wp + tail) * x.dtype.itemsize, fill, block_bytes=CONV_BAND_BYTES)
    return flat.reshape(n, c, hp * wp + tail)


def _conv2d_taps(xp, flat, weight, bias, hp, wp):
    """Stride-1 conv on the host: one BLAS product per kernel tap, accumulated in place.

    Output pixel (i, j) with tap (u, v) reads flat[(i + u)*wp + (j + v)] = flat[i*wp + j + (u*wp + v)]:
    for a fixed tap, the inputs of output rows r0..r1-1 (computed at all wp columns; the last kw - 1
    of each row wrap around and are dropped) are one contiguous window of `flat`, starting at
    (r0 + u)*wp + v. So, for one image n and one band of rows,

        y (C_out, rows*wp) = sum_{u, v} w[:, :, u, v] (C_out, C_in) @ flat[n, :, window(u, v)] (C_in, rows*wp)

    Each term is `gemm_into(..., accumulate=True)`: BLAS reads the window where it lies and adds the
    product into y, so there is neither a copy of the input nor a temporary per tap. A band is about
    CONV_BAND_BYTES of output, small enough to stay in cache across its kH*kW products; the bands run
    on the thread pool, each product on one core.
    """
    n, c = flat.shape[:2]
    c_out, _, kh, kw = weight.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    taps = xp.ascontiguousarray(weight.transpose(2, 3, 0, 1))  # taps[u, v] = w[:, :, u, v], (C_out, C_in)
    rows = max(1, min(ho, CONV_BAND_BYTES // max(1, c_out * wp * flat.dtype.itemsize)))
    out = xp.empty((n, c_out, ho, wo), dtype=flat.dtype)

    def band(job):
        i, r0 = job
        r1 = min(ho, r0 + rows)
        length = (r1 - r0) * wp
        y = xp.empty((c_out, length), dtype=flat.dtype)
        for u in range(kh):
            for v in range(kw):
                start = (r0 + u) * wp + v
                gemm_into(taps[u, v], flat[i, :, start:start + length], y, accumulate=u > 0 or v > 0)
        y = y.reshape(c_out, r1 - r0, wp)[:, :, :wo]  # drop the kw - 1 wrapped columns
        if bias is None:
            out[i, :, r0:r1] = y
        else:
            xp.add(y, bias.reshape(c_out, 1, 1), out=out[i, :, r0:r1])

    parallel_map(band, [(i, r0) for i in range(n) for r0 in range(0, ho, rows)])
    return out


def _conv2d_shifted(xp, flat, weight, bias, hp, wp):
    """Stride-1 conv by shift-and-accumulate on the flattened padded image `flat` (N, C, hp*wp + kw-1).

    Output pixel (i, j) with tap (u, v) reads flat[(i + u)*wp + (j + v)] = flat[i*wp + j + (u*wp + v)]:
    for a fixed tap, the inputs of all outputs are one contiguous window, shifted by u*wp + v. So
    computing every output row at all wp columns (the last kw - 1 of each row are dropped) makes each
    tap a (C_out, C_in) @ (C_in, ho*wp) product on a window, with no im2col matrix.
    The kw taps of a kernel row differ only by the shift v, so we stack kw copies of the image moved
    left by v = 0..kw-1 ((N, kw*C_in, ...)); kernel row u is then a single product with
    K = kw*C_in on the window starting at u*wp, and y is the sum of kH products:
        y[n, :, i*wp + j] = sum_u W_u (C_out, kw*C_in) @ stacked[n, :, (i + u)*wp + j]
    with W_u[o, v*C_in + c] = w[o, c, u, v].
    """
    n, c = flat.shape[:2]
    c_out, _, kh, kw = weight.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    w_rows = weight.transpose(2, 0, 3, 1).reshape(kh, c_out, kw * c)  # W_u, u = 0..kH-1
    out = xp.empty((n, c_out, ho, wo), dtype=flat.dtype)
    band = max(1, min(ho, CONV_CHUNK_BYTES // max(1, n * kw * c * wp * flat.dtype.itemsize) - (kh - 1)))
    for r0 in range(0, ho, band):  # bands of output rows r0..r1-1, to bound the copies' memory
        r1 = min(ho, r0 + band)
        span = (r1 - r0 + kh - 1) * wp  # the flat inputs this band reads
        stacked = xp.empty((n, kw, c, span), dtype=flat.dtype)
        for v in range(kw):
            stacked[:, v] = flat[:, :, r0 * wp + v: r0 * wp + v + span]  # the image moved left by v
        stacked = stacked.reshape(n, kw * c, span)
        length = (r1 - r0) * wp
        y = xp.matmul(w_rows[0], stacked[:, :, :length])  # (N, C_out, rows*wp)
        for u in range(1, kh):
            y += xp.matmul(w_rows[u], stacked[:, :, u * wp: u * wp + length])
        y = y.reshape(n, c_out, r1 - r0, wp)[:, :, :, :wo]  # drop the kw - 1 wrapped columns
        if bias is None:
            out[:, :, r0:r1] = y
        else:
            xp.add(y, bias.reshape(1, c_out, 1, 1), out=out[:, :, r0:r1])
    return out


def _conv2d_gathered(xp, flat, weight, bias, hp, wp, sh, sw):
    """Strided conv by im2col: gather each tap's strided pixels, then one matrix product.

    cols[n, (u, v, c), (i, j)] = x_pad[n, c, s_h*i + u, s_w*j + v];   y[n] = W (C_out, kH*kW*C_in) @ cols[n]
    with W[o, (u, v, c)] = w[o, c, u, v]. For stride 2 cols is kH*kW/4 times the input's size.
    """
    n, c = flat.shape[:2]
    c_out, _, kh, kw = weight.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    padded = flat[:, :, : hp * wp].reshape(n, c, hp, wp)
    w_mat = weight.transpose(0, 2, 3, 1).reshape(c_out, kh * kw * c)
    out = xp.empty((n, c_out, ho, wo), dtype=flat.dtype)
    band = max(1, min(ho, CONV_CHUNK_BYTES // max(1, n * kh * kw * c * wo * flat.dtype.itemsize)))
    for r0 in range(0, ho, band):
        r1 = min(ho, r0 + band)
        cols = xp.empty((n, kh, kw, c, r1 - r0, wo), dtype=flat.dtype)
        for u in range(kh):
            for v in range(kw):
                i0 = sh * r0 + u
                cols[:, u, v] = padded[:, :, i0: i0 + sh * (r1 - r0 - 1) + 1: sh, v: v + sw * (wo - 1) + 1: sw]
        y = xp.matmul(w_mat, cols.reshape(n, kh * kw * c, (r1 - r0) * wo))  # (N, C_out, rows*wo)
        y = y.reshape(n, c_out, r1 - r0, wo)
        if bias is None:
            out[:, :, r0:r1] = y
        else:
            xp.add(y, bias.reshape(1, c_out, 1, 1), out=out[:, :, r0:r1])
    return out


# --------------------------------------------------------------------------------------------------
# Normalisation

def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Group normalisation (Wu & He, 2018).

    The C channels are split into G groups; over each sample's group g (its C/G channels and all
    positions) with mean mu_g and biased variance var_g:
        y = (x - mu_g) / sqrt(var_g + eps) * gamma[c] + beta[c]

    x: (N, C, ...) with C divisible by G; weight (gamma), bias (beta): (C,) or None. Output: x's shape.
    The variance is computed from the centred values (two passes), which keeps float64 exact to ~1e-15.
    """
    op = "group_norm"
    if x.ndim < 2:
        _fail(op, f"expected x (N, C, ...), got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        _fail(op, f"x {tuple(x.shape)}: {c} channels cannot be split into {num_groups!r} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            _fail(op, f"{name} shape {tuple(p.shape)} != ({c},) for x {tuple(x.shape)}")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    cg = c // num_groups
    rows = x.reshape(n * num_groups, cg, -1)  # one row per (sample, group): (N*G, C/G, positions)
    out = xp.empty(rows.shape, dtype=x.dtype)
    # gamma and beta per (sample, group) row: (N*G, C/G, 1)
    gamma = None if weight is None else xp.broadcast_to(weight.reshape(1, num_groups, cg),
                                                        (n, num_groups, cg)).reshape(-1, cg, 1)
    beta = None if bias is None else xp.broadcast_to(bias.reshape(1, num_groups, cg),
                                                     (n, num_groups, cg)).reshape(-1, cg, 1)

    size = cg * rows.shape[2]  # values per group

    def work(i, j):
        xb, ob = rows[i:j], out[i:j]
        mean = _sums(xp, xb, "ijk->i").reshape(-1, 1, 1) / size           # mu_g, (rows, 1, 1)
        xp.subtract(xb, mean, out=ob)                                       # x - mu_g
        var = _sums(xp, ob, "ijk,ijk->i", ob).reshape(-1, 1, 1) / size     # var_g = mean((x - mu_g)^2)
        rstd = 1.0 / xp.sqrt(var + eps)
        if gamma is None:
            ob *= rstd
        else:
            ob *= rstd * gamma[i:j]                                          # * gamma[c] / sqrt(var_g + eps)
        if beta is not None:
            ob += beta[i:j]                                                  # + beta[c]

    _in_blocks(xp, rows.shape[0], rows[0].size * x.dtype.itemsize, work)
    return out.reshape(x.shape)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """Layer normalisation over the last axis (Ba et al., 2016).

    y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta, mean and biased variance over the last axis.

    x: (..., D); weight (gamma), bias (beta): (D,) or None. Output: x's shape.
    """
    op = "layer_norm"
    if x.ndim < 1:
        _fail(op, "expected at least a 1-d array, got a 0-d array")
    d = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            _fail(op, f"{name} shape {tuple(p.shape)} != ({d},) for x {tuple(x.shape)}")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    rows = x.reshape(-1, d)  # (rows, D)
    out = xp.empty(rows.shape, dtype=x.dtype)

    def work(i, j):
        xb, ob = rows[i:j], out[i:j]
        xp.subtract(xb, (_sums(xp, xb, "ij->i") / d).reshape(-1, 1), out=ob)   # x - mean(x)
        var = _sums(xp, ob, "ij,ij->i", ob).reshape(-1, 1) / d                  # mean((x - mean)^2)
        ob *= 1.0 / xp.sqrt(var + eps)
        if weight is not None:
            ob *= weight
        if bias is not None:
            ob += bias

    _in_blocks(xp, rows.shape[0], d * x.dtype.itemsize, work)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Linear layers and activations

def linear(x, weight, bias=None):
    """Affine map on the last axis: y = x W^T + b.

    x: (..., D_in); weight: (D_out, D_in); bias: (D_out,) or None. Output: (..., D_out).
    """
    op = "linear"
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        _fail(op, f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (expected x (..., "
                  f"{weight.shape[1] if weight.ndim == 2 else '?'}) and weight (D_out, D_in))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(op, f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},) for weight {tuple(weight.shape)}")
    _check_float(op, x, weight, bias)
    xp = array_namespace(x, weight, bias)
    y = xp.matmul(x.reshape(-1, x.shape[-1]), weight.T)  # (rows, D_out)
    if bias is not None:
        y += bias
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def _silu_into(xp, x, out):
    xp.negative(x, out=out)       # -x
    xp.exp(out, out=out)          # exp(-x)
    out += 1.0                    # 1 + exp(-x)
    xp.divide(x, out, out=out)    # x / (1 + exp(-x))


def silu(x):
    """SiLU / swish: silu(x) = x * sigmoid(x) = x / (1 + exp(-x)). Output: x's shape and dtype."""
    return _elementwise("silu", x, _silu_into)


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# Abramowitz & Stegun, Handbook of Mathematical Functions (1964), formula 7.1.26: for z >= 0
#   1 - erf(z) = (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2),  t = 1 / (1 + p z),
# with an absolute error <= 1.5e-7, about one float32 rounding step near 1 (torch's vectorised CPU
# erf uses the same formula).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # a1 .. a5


def _gelu_as_into(xp, x, out):
    """Exact-form gelu for float32/float16 on the host, erf by formula 7.1.26 above.

    erf is odd, so x erf(x/sqrt(2)) = |x| erf(|x|/sqrt(2)), and
        gelu(x) = x/2 (1 + erf(x/sqrt(2))) = (x + |x| (1 - r(t) exp(-x^2/2))) / 2,
    r(t) = a1 t + ... + a5 t^5, t = 1 / (1 + p |x|/sqrt(2)). Some 20 fast elementwise passes over a
    cached block instead of SciPy's erf, which costs 12-16 ns of CPU time per element.
    """
    a = xp.abs(x)                                    # |x|
    t = a * (_AS_P * _SQRT_HALF)
    t += 1.0
    xp.reciprocal(t, out=t)                          # t = 1 / (1 + p |x|/sqrt(2))
    xp.multiply(t, _AS_A[4], out=out)                # r(t) by Horner: ((((a5 t + a4) t + a3) t + a2) t + a1) t
    for coefficient in _AS_A[3::-1]:
        out += coefficient
        out *= t
    xp.multiply(a, a, out=t)
    t *= -0.5
    xp.exp(t, out=t)                                 # exp(-x^2/2)
    out *= t                                         # 1 - erf(|x|/sqrt(2))
    xp.subtract(1.0, out, out=out)                   # erf(|x|/sqrt(2))
    out *= a
    out += x
    out *= 0.5                                       # (x + |x| erf(|x|/sqrt(2))) / 2


def _gelu_into(xp, x, out, approximate):
    if approximate == "none" and is_host(xp) and x.dtype.itemsize < 8:
        _gelu_as_into(xp, x, out)
        return
    if approximate == "none":
        xp.multiply(x, _SQRT_HALF, out=out)   # x / sqrt(2)
        erf(out, out=out)                     # erf(x / sqrt(2)), exact
    else:
        xp.multiply(x, x, out=out)            # x^2
        out *= 0.044715
        out += 1.0
        out *= x                              # x + 0.044715 x^3
        out *= _SQRT_2_OVER_PI
        xp.tanh(out, out=out)                 # tanh(sqrt(2/pi) (x + 0.044715 x^3))
    out += 1.0
    out *= x
    out *= 0.5                                # x/2 * (1 + ...)


def _check_approximate(op, approximate):
    if approximate not in ("none", "tanh"):
        _fail(op, f"approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu(x, approximate: str = "none"):
    """GELU (Hendrycks & Gimpel, 2016).

    "none":  gelu(x) = x/2 * (1 + erf(x / sqrt(2)))                          (exact)
    "tanh":  gelu(x) = x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))    (approximation)
    Output: x's shape and dtype. On the host, float32/float16 evaluate erf by Abramowitz & Stegun
    7.1.26 (|error| <= 1.5e-7, as torch's CPU kernel does); float64, and every GPU dtype, use the
    exact erf.
    """
    _check_approximate("gelu", approximate)
    return _elementwise("gelu", x, lambda xp, xb, ob: _gelu_into(xp, xb, ob, approximate))


def _quick_gelu_into(xp, x, out):
    xp.multiply(x, -1.702, out=out)   # -1.702 x
    xp.exp(out, out=out)
    out += 1.0
    xp.divide(x, out, out=out)        # x / (1 + exp(-1.702 x))


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: quick_gelu(x) = x * sigmoid(1.702 x). Output: x's shape."""
    return _elementwise("quick_gelu", x, _quick_gelu_into)


def geglu(x, weight, bias=None, approximate: str = "none"):
    """GEGLU feed-forward gate (Shazeer, 2020): [h, g] = x W^T + b split in two halves on the last axis;
    geglu(x) = h * gelu(g).

    x: (..., D_in); weight: (2 * D_out, D_in); bias: (2 * D_out,). Output: (..., D_out).
    """
    op = "geglu"
    if weight.ndim != 2 or weight.shape[0] % 2:
        _fail(op, f"weight must be (2 * D_out, D_in), got {tuple(weight.shape)} (x {tuple(x.shape)})")
    _check_approximate(op, approximate)
    proj = linear(x, weight, bias)  # (..., 2 * D_out)
    xp = array_namespace(proj)
    half = weight.shape[0] // 2
    rows = proj.reshape(-1, 2 * half)
    out = xp.empty((rows.shape[0], half), dtype=proj.dtype)

    def work(i, j):
        h, g, ob = rows[i:j, :half], rows[i:j, half:], out[i:j]
        _gelu_into(xp, g, ob, approximate)   # gelu(g)
        ob *= h                              # h * gelu(g)

    _in_blocks(xp, rows.shape[0], 2 * half * proj.dtype.itemsize, work)
    return out.reshape(proj.shape[:-1] + (half,))


def softmax(x, axis: int = -1):
    """Numerically stable softmax: softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)).

    Subtracting the maximum changes nothing mathematically and keeps exp from overflowing.
    x: any shape; axis: the axis to normalise over. Output: x's shape and dtype.
    """
    op = "softmax"
    _check_float(op, x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        _fail(op, f"axis {axis!r} is out of range for x {tuple(x.shape)}")
    xp = array_namespace(x)
    moved = axis % x.ndim != x.ndim - 1
    if moved:
        x = xp.moveaxis(x, axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    out = xp.empty(rows.shape, dtype=x.dtype)

    def work(i, j):
        ob = out[i:j]
        xp.subtract(rows[i:j], xp.max(rows[i:j], axis=-1, keepdims=True), out=ob)  # x - max(x)
        xp.exp(ob, out=ob)
        ob /= xp.sum(ob, axis=-1, keepdims=True)

    if x.shape[-1]:
        _in_blocks(xp, rows.shape[0], x.shape[-1] * x.dtype.itemsize, work)
    out = out.reshape(x.shape)
    return xp.moveaxis(out, -1, axis) if moved else out


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

    Three exact rearrangements save time: the scale is folded into q (Lq*d multiplications instead of
    Lq*Lk); the softmax denominator is applied to the output rows after P V (Lq*d_v divisions instead
    of Lq*Lk); and the row sums of P come out of the same matrix product, as the last column of
    P [V | 1]. On the host each block is one head and a few query rows (ATTENTION_BLOCK_BYTES of
    scores, so the block stays in cache), and blocks run on the thread pool.
    """
    op = "scaled_dot_product_attention"
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        _fail(op, f"q, k, v must have the same rank >= 2, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                  f"v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:-2] != k.shape[:-2] \
            or k.shape[:-2] != v.shape[:-2]:
        _fail(op, f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                  "(expected (..., Lq, d), (..., Lk, d), (..., Lk, d_v))")
    if mask is not None and mask.dtype.kind == "b":
        xp = array_namespace(q, mask)
        mask = xp.where(mask, xp.asarray(0, dtype=q.dtype), xp.asarray(-xp.inf, dtype=q.dtype))
    _check_float(op, q, k, v, mask)
    xp = array_namespace(q, k, v, mask)
    lead = q.shape[:-2]
    lq, d = q.shape[-2:]
    lk, dv = v.shape[-2:]
    if mask is not None:
        try:
            mask = xp.broadcast_to(mask, lead + (lq, lk))  # a view: nothing is copied
        except ValueError:
            _fail(op, f"mask {tuple(mask.shape)} does not broadcast to {lead + (lq, lk)} (q {tuple(q.shape)}, "
                      f"k {tuple(k.shape)})")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qs = q * xp.asarray(scale, dtype=q.dtype)                      # q * scale, (..., Lq, d)
    kt = xp.swapaxes(k, -1, -2)                                    # K^T, (..., d, Lk)
    v1 = xp.concatenate([v, xp.ones(lead + (lk, 1), dtype=v.dtype)], axis=-1)  # [V | 1], (..., Lk, d_v+1)
    out = xp.empty(lead + (lq, dv), dtype=q.dtype)

    def block(g, i, j):
        """Output rows i..j-1 for the leading index g (a tuple, or Ellipsis for all heads at once)."""
        s = xp.matmul(qs[g][..., i:j, :], kt[g])                  # scores, (..., rows, Lk)
        if mask is not None:
            s += mask[g][..., i:j, :]
        if is_causal:
            s += _causal_block(xp, i, j, lk, s.dtype)
        s -= xp.max(s, axis=-1, keepdims=True)
        xp.exp(s, out=s)                                           # P up to its row sums
        o = xp.matmul(s, v1[g])                                    # [P V | P 1], (..., rows, d_v + 1)
        xp.divide(o[..., :dv], o[..., dv:], out=out[g][..., i:j, :])

    budget = ATTENTION_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
    n_lead = math.prod(lead)
    if is_host(xp) and n_lead > 0 and blas_threads_controllable():
        # one head at a time, in cache-sized blocks of query rows, spread over the thread pool; each
        # block's two products run single-threaded (the pool already occupies every core)
        rows = max(1, min(lq, min(budget, ATTENTION_BLOCK_BYTES) // max(1, lk * q.dtype.itemsize)))
        items = [(g, i, min(lq, i + rows)) for g in _ndindex(lead) for i in range(0, lq, rows)]
        with single_threaded_blas():
            parallel_map(lambda item: block(*item), items)
    else:
        # all heads at once, in chunks of query rows within the memory bound (on a GPU: a few kernels)
        rows = max(1, min(lq, budget // max(1, n_lead * lk * q.dtype.itemsize)))
        for i in range(0, lq, rows):
            block(Ellipsis, i, min(lq, i + rows))
    return out


def _ndindex(shape):
    """Every index tuple of an array of `shape`, in C order (a host-side loop over the leading axes)."""
    if not shape:
        yield ()
        return
    for first in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (first,) + rest


def _causal_block(xp, i, j, lk, dtype):
    """Rows i..j-1 of the causal mask: 0 where key <= query, -inf after."""
    rows = xp.arange(i, j).reshape(-1, 1)
    cols = xp.arange(lk).reshape(1, -1)
    return xp.where(cols > rows, xp.asarray(-xp.inf, dtype=dtype), xp.asarray(0, dtype=dtype))


def split_heads(x, heads: int):
    """(B, L, H*d) -> (B, H, L, d): view each token's features as H heads of size d (no copy)."""
    if x.ndim != 3:
        _fail("split_heads", f"expected x (B, L, H*d), got {tuple(x.shape)}")
    b, l, hd = x.shape
    if not isinstance(heads, int) or heads < 1 or hd % heads:
        _fail("split_heads", f"x {tuple(x.shape)}: {hd} features cannot be split into {heads!r} heads")
    return x.reshape(b, l, heads, hd // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, H, L, d) -> (B, L, H*d), the inverse of split_heads."""
    if x.ndim != 4:
        _fail("merge_heads", f"expected x (B, H, L, d), got {tuple(x.shape)}")
    b, h, l, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, l, h * d)


# --------------------------------------------------------------------------------------------------
# Resampling and lookups

def upsample_nearest2x(x):
    """Nearest-neighbour 2x upsampling: y[n, c, i, j] = x[n, c, floor(i/2), floor(j/2)].

    x: (N, C, H, W) -> (N, C, 2H, 2W).
    """
    if x.ndim != 4:
        _fail("upsample_nearest2x", f"expected x (N, C, H, W), got {tuple(x.shape)}")
    xp = array_namespace(x)
    n, c, h, w = x.shape
    src = x.reshape(n * c, h, 1, w, 1)
    y = xp.empty((n * c, h, 2, w, 2), dtype=x.dtype)

    def work(i, j):
        y[i:j] = src[i:j]  # each pixel into its 2x2 square, by broadcasting

    _in_blocks(xp, n * c, 4 * h * w * x.dtype.itemsize, work)
    return y.reshape(n, c, 2 * h, 2 * w)


def embedding(ids, table):
    """Embedding lookup: y[..., :] = table[ids[...], :].

    ids: integer array of any shape, each in [0, V); table: (V, D). Output: ids.shape + (D,).
    """
    op = "embedding"
    if table.ndim != 2:
        _fail(op, f"table must be (V, D), got {tuple(table.shape)}")
    if ids.dtype.kind not in "iu":
        _fail(op, f"ids must be integers, got {ids.dtype} (ids {tuple(ids.shape)})")
    xp = array_namespace(ids, table)
    if ids.size and (int(xp.min(ids)) < 0 or int(xp.max(ids)) >= table.shape[0]):
        _fail(op, f"ids must lie in [0, {table.shape[0]}) for table {tuple(table.shape)}, got range "
                  f"[{int(xp.min(ids))}, {int(xp.max(ids))}]")
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
    op = "timestep_embedding"
    xp = array_namespace(timesteps)
    t = xp.asarray(timesteps)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        _fail(op, f"timesteps must be a scalar or 1-d, got shape {tuple(t.shape)}")
    if not isinstance(dim, int) or dim < 2:
        _fail(op, f"dim must be an int >= 2, got {dim!r}")
    half = dim // 2
    if half - downscale_freq_shift == 0:
        _fail(op, f"half - downscale_freq_shift is zero (dim={dim}, shift={downscale_freq_shift})")
    dtype = t.dtype if t.dtype.kind == "f" else xp.float32
    t = t.astype(dtype)
    exponent = -math.log(max_period) * xp.arange(half, dtype=dtype) / (half - downscale_freq_shift)
    args = t.reshape(-1, 1) * xp.exp(exponent).reshape(1, -1) * scale  # (N, half)
    parts = [xp.cos(args), xp.sin(args)] if flip_sin_to_cos else [xp.sin(args), xp.cos(args)]
    emb = xp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = xp.concatenate([emb, xp.zeros((emb.shape[0], 1), dtype=dtype)], axis=-1)
    return emb
