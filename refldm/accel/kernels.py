"""The host (NumPy) versions of the ops that are worth making fast, each equal to its reference in
refldm/core/ops.py (tests/test_accel.py proves it op by op).

Every function here takes arguments the op has already checked (shapes, dtypes, paddings) and host
NumPy arrays, and computes the same equation as the op it accelerates. What makes them fast:
- Elementwise work runs as a few in-place passes over a block of rows (`in_blocks`): the block stays
  in the CPU cache while its passes run, and the blocks are spread over the thread pool.
- A stride-1 convolution is one in-place BLAS product per kernel tap, on windows of the flattened
  padded image (no im2col matrix, no temporary per tap), in cache-sized bands of output rows; on a
  small image it is one im2col product, and a 3x3 one with many channels runs by Winograd's F(2x2, 3x3).
- Attention works per head on cache-sized blocks of query rows, folds the scale into q, and divides
  by the softmax row sums after the product P V; where NumPy's float32 exp is slow on values whose exp
  is subnormal (its AVX2 build: measured at first use), a block whose shifted scores fall that low is
  clamped at -86 first.
- gelu in float32 evaluates erf by a short polynomial instead of SciPy's erf; GEGLU computes its
  projection in tiles and gates each tile in cache, never writing the projection out whole.
- Small matrix products run on one BLAS thread (waking BLAS's helper threads costs more).
"""

from __future__ import annotations

import math

import numpy as np

from refldm.accel import winograd
from refldm.accel.blas import gemm_available, gemm_into, single_threaded_blas, small_product
from refldm.accel.threads import in_blocks, parallel_map

__all__ = ["conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "quick_gelu", "geglu", "softmax",
           "scaled_dot_product_attention", "upsample_nearest2x"]

# Elementwise passes run on blocks of about this many bytes (see in_blocks).
HOST_BLOCK_BYTES = 512 * 2**10
# A stride-1 convolution accumulates its output in bands of rows of about this many bytes, so that a
# band stays in the core's cache across all of its kernel taps. Measured on the SD VAE decoder's
# 128-512 channel convolutions: 0.5-1 MiB bands cost 5-30% more time, 4 MiB about the same.
CONV_BAND_BYTES = 2 * 2**20
# Upper bound on the bytes of the im2col matrix of one band of a strided convolution, and of a small
# image's whole im2col matrix (_conv2d_small).
CONV_CHUNK_BYTES = 128 * 2**20
# A stride-1 convolution whose output has at most this many pixels over the whole batch (N Ho Wo) runs
# as one im2col product (_conv2d_small) instead of one product per tap. Measured on one core with SD's
# 3x3 convolutions at batch 2: 8x8 images (1280 channels) take 44% of the per-tap time, 16x16 71-76%,
# 32x32 (640 channels) 91%; at 64x64 the per-tap form is 10% faster.
SMALL_IMAGE_COLUMNS = 2048
# 3x3 stride-1 convolutions with at least WINOGRAD_CHANNELS input and output channels and at least
# WINOGRAD_PIXELS output pixels over the batch (N Ho Wo) run by Winograd's F(2x2, 3x3) (winograd.py), in
# float32 and float64. Measured (AVX2 EPYC, OpenBLAS Haswell kernels, 2 threads, batch 2), time against the path
# each conv took before:
#   against one im2col product (_conv2d_small): 640->640 at 32x32 0.59x, 1280->1280 at 32x32 0.65x,
#   960->640 at 32x32 0.59x, 1280->1280 at 16x16 0.84-0.89x, 2560->1280 at 16x16 0.82x; but 1280->1280
#   at 8x8 1.4x (16 tiles per image make thin products) and, with batch 1, 1.2x at 16x16 (one band:
#   its transforms run on one thread); batch 1 at 32x32 0.73x, at 64x64 0.59x;
#   against one product per tap: SD's U-Net at 64x64 320->320 0.67x, 640->320 0.85x, 640->640 0.61x,
#   the VAE's 512->512 at 128x128 0.74x; but 256->256 at 256x256 1.16x (few channels).
# Since the transforms lost two transpositions (round 4, winograd.py), fewer channels pay too (alternating
# calls, medians of 5, 2 threads, against the per-tap form): 256->256 at 256x256 0.62x (AVX2) and 0.83x
# (AVX-512), 128->128 at 512x512 0.67x and 1.06x; the SD 1.x VAE's 512x512 decode with the threshold at
# 320 / 256 / 128 channels: 10.41 / 8.91 / 8.05 s (AVX2), 6.58 / 6.24 / 6.27 s (AVX-512).
# WINOGRAD = False turns it off.
WINOGRAD = True
WINOGRAD_CHANNELS = 128
WINOGRAD_PIXELS = 2 * 16 * 16
# A large matrix product runs in blocks of this many rows (or columns) on the thread pool (see _matmul).
PRODUCT_BLOCK_ROWS = 512
# GEGLU computes its projection in tiles of about GEGLU_ROWS rows by GEGLU_COLUMNS columns of each half (see
# geglu): the two tiles and the gate's temporaries stay in cache, and the projection is never written out
# whole (in SDXL's U-Net each is (2048, 10240) float32, 84 MB, which the untiled form wrote to memory, read
# back to add the bias and read again for the gate). Measured in the U-Net steps themselves, alternating
# with the untiled form in one process (AVX2 set-up: OpenBLAS's Haswell kernels, NumPy's AVX2 loops, 2
# threads): SD 1.x, the step's 16 GEGLUs, medians of 4 rounds: untiled 1.18 s, tiles of 256 x 256 1.17 s,
# 512 x 512 1.13 s, 256 x 1024 1.09 s; SDXL, its 70 GEGLUs, 256 x 256 tiles: 17.7-20.4 s (5 steps) against
# 19.0-19.9 s (5 steps); single calls in isolation differ by less than the machine's noise. Later, 9-15
# rounds of the step's GEGLU shapes, each tile size in turn (round 4, docs/performance.md): 512 rows
# instead of 256 (OpenBLAS packs each weight tile for twice the rows) took SDXL's GEGLUs from 16.96 to
# 16.53 s (AVX2) and 10.72 to 10.06 s (AVX-512); SD 1.x's from 1.04 to 1.05 s (AVX2) and 0.71 to 0.68 s.
GEGLU_ROWS = 512
GEGLU_COLUMNS = 1024
# Attention works on blocks of scores of about this size (one head, 256 query rows at 4096 keys in
# float32): small enough to stay in the shared cache between the products and the softmax passes, large
# enough for efficient products (each block packs all of its head's K and V again). Measured on one core:
# 0.5 MiB blocks cost 7% more time than 2 MiB, 16 MiB 5% more; on two, 9 rounds of each step's attention
# shapes, each size in turn (round 4): 4 MiB against 2 MiB, SDXL 8.31 s against 8.43 (AVX2) and 5.33
# against 5.49 (AVX-512); SD 1.x 1.54 against 1.53 s and 1.12 against 1.17.
ATTENTION_BLOCK_BYTES = 4 * 2**20
# Attention with at most this many bytes of scores in all runs on the calling thread alone: the pool's
# hand-offs would cost more than the second core saves.
ATTENTION_SERIAL_BYTES = 2 * 2**20
# Attention multiplies q by a contiguous copy of K^T (made once per call) where there are at least
# KEYS_CONTIGUOUS_MIN keys: OpenBLAS's product with a transposed view of K is slower there. Measured on one
# core (thread CPU time, medians of 11-15 alternating rounds, loaded machine): the product of 128 query rows
# and 4096 keys, d = 40, 0.76 ns per score against 1.04 through the view with the Haswell (AVX2) kernels,
# 0.65 against 0.71 with SkylakeX (AVX-512); the whole op at (1, 8, 4096, 40) 0.96x and 0.85x; at 1024
# keys, d = 64, no difference (1.00x, 1.05x); at 4096 keys the VAE's (1, 1, 4096, 512) 0.98x and 0.97x,
# SDXL's (2, 10, 4096, 64) 1.02x and 1.00x. The bytes are the same.
KEYS_CONTIGUOUS = True
KEYS_CONTIGUOUS_MIN = 2048
# Attention skips the softmax's max subtraction in a row whose max lies within
# [SHIFT_FREE_LOW, SHIFT_FREE_HIGH] (see scaled_dot_product_attention): exp(s) <= e^60 (about 1.1e26)
# cannot overflow float32 (largest number 3.4e38), nor can a row sum over fewer than 10^12 keys; the
# largest term of the row is at least e^-30, far above the underflow threshold; and a score that
# underflows (s < -87 in float32) weighs less than e^-57 (1.7e-25) against its row's largest term, so
# leaving it out cannot change a float32 or float64 sum. SD's attention maxima lie far inside.
SHIFT_FREE_LOW, SHIFT_FREE_HIGH = -30.0, 60.0
# A block whose rows all have |q_i| max_j |k_j| <= SHIFT_FREE_BOUND (after the scale) skips the pass
# that finds the row maxima too: each row's max then lies within +-29, inside the window with room for
# rounding, so the row comes out exactly as if its max had been found.
SHIFT_FREE_BOUND = 29.0
# NumPy's float32 exp built for AVX2 (its X86_V3 target) leaves its SIMD loop for every vector holding a
# value whose exp is subnormal (x in about [-103.9, -87.3]; its baseline SSE build is slow below -103.9,
# where exp is 0: 4.1 ns per value against 1.7 elsewhere): on a 2 MiB block of scores with such values it
# takes 2.2-2.6 ns per value instead of 0.55-0.66 (tools/bench_exp.py; its AVX-512 build, 0.31 ns, has no
# such path), and it is slower at exactly -87 too (0.74 ns against 0.53 at -86). Attention therefore clamps
# the exponents of a float32 block at EXP_LOW first where NumPy's exp is slow on such values
# (_exp_underflow_is_slow: measured once, at first use) and the block does hold such values: a block with a
# mask, or without one unless |q_i| max_j |k_j| <= EXP_LOW_BOUND for all its rows (then s_ij - max_j s_ij >=
# -2 |q_i| max_j |k_j| >= EXP_LOW), looks at the smallest score of every EXP_LOW_SAMPLE-th row and clamps if
# min_j s_ij - c_i < EXP_LOW in one of them, c_i its shift (a sample: the decision only costs or saves time,
# the clamp never changes a result). The clamp is np.maximum against a row of EXP_LOW values (_exp_low_row),
# 0.10 ns per value: against a scalar NumPy's maximum runs no SIMD loop (0.43 ns, measured on the same
# block). The clamp changes no result: e^-86 is 4.4e-38, and a row's largest term is at least e^-30 (1e-13),
# so a weight that small is below half a float32 unit of every sum it enters (a test checks the bytes).
EXP_LOW = -86.0
EXP_LOW_BOUND = 43.0
EXP_LOW_SAMPLE = 8
EXP_CLAMP = None  # None: decided on first use (_exp_underflow_is_slow); True / False force it
# _exp_underflow_is_slow calls exp slow where its values with subnormal results take more than this many
# times as long as values with normal results (measured: the AVX2 build 3.8-4.2x, the SSE build 2.4x for
# zero results, the AVX-512 build 1.0x).
EXP_SLOW_RATIO = 2.0
_EXP_LOW_ROWS = {}  # (length, dtype, EXP_LOW) -> a read-only row of EXP_LOW values


def _exp_low_row(n: int, dtype):
    """A read-only row of n EXP_LOW values in `dtype` (made once per length: attention has a few)."""
    key = (n, np.dtype(dtype), EXP_LOW)
    row = _EXP_LOW_ROWS.get(key)
    if row is None:
        row = np.full(n, EXP_LOW, dtype=dtype)
        row.flags.writeable = False
        _EXP_LOW_ROWS[key] = row
    return row


def _exp_underflow_is_slow(size: int = 16384, repeats: int = 5) -> bool:
    """True where NumPy's float32 exp is much slower on values whose exp underflows than on the others,
    measured here: `repeats` alternating timings of exp on `size` values in [-30, 0], in [-100, -88]
    (subnormal results) and in [-200, -110] (zero), by the thread's own CPU clock (other processes barely
    disturb it); slow when the fastest time of either low range exceeds EXP_SLOW_RATIO times the fastest
    in [-30, 0]. About 1 ms once per process; a wrong answer (a very busy core) costs only time."""
    import time
    ranges = {"normal": (-30.0, 0.0), "subnormal": (-100.0, -88.0), "zero": (-200.0, -110.0)}
    values = {name: np.linspace(lo, hi, size, dtype=np.float32) for name, (lo, hi) in ranges.items()}
    out = np.empty(size, dtype=np.float32)
    best = dict.fromkeys(ranges, math.inf)
    for _ in range(repeats):
        for name, x in values.items():
            t = time.thread_time_ns()
            np.exp(x, out=out)
            best[name] = min(best[name], time.thread_time_ns() - t)
    return max(best["subnormal"], best["zero"]) > EXP_SLOW_RATIO * max(best["normal"], 1)


# A large product is cut into at least this many blocks (an even number), so that a mid-sized product (the
# U-Net's 16x16 and 8x8 levels) keeps every core busy, and a thread slowed by another process on its core
# holds back only a small share of it (the others take the remaining blocks; see threads.parallel_map).
PRODUCT_MIN_BLOCKS = 2


def _even_blocks(size: int, step: int, align: int = 16) -> int:
    """The block length for cutting `size` rows (or columns) into an even number of blocks of at most
    about `step`, each a multiple of `align`: PRODUCT_MIN_BLOCKS or more. It depends on the sizes
    only, never on the thread count, so the bytes of a result do not either."""
    blocks = max(PRODUCT_MIN_BLOCKS, -(-size // step))
    blocks += blocks % 2
    return max(align, -(-(-(-size // blocks)) // align) * align)


def _matmul(a, b, bias=None):
    """a @ b (+ bias, added to every row) for 2-D a (M, K) and b (K, N), or a (K, N) times batched b
    (..., K, N'), on one BLAS thread per product.

    A large product is cut into blocks of PRODUCT_BLOCK_ROWS rows of a (or columns of b) that run on
    the thread pool, each adding its part of the bias while it is in cache: a multi-threaded BLAS call
    pays for waking and joining its helper threads, which on a busy machine costs up to half of a
    second core. The blocks depend on the sizes only, and BLAS always runs single-threaded here, so the
    result never depends on the number of threads, nor on what other threads are doing.
    """
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = math.prod(b.shape[:-2]) if b.ndim > 2 else 1
    step = PRODUCT_BLOCK_ROWS
    with single_threaded_blas():
        if small_product(batch * m, n, k) or a.ndim != 2 or b.ndim > 3:
            out = np.matmul(a, b)
            if bias is not None:
                out += bias
            return out
        if b.ndim == 2 and m >= 2 * step:                               # blocks of rows of a
            rows = _even_blocks(m, step)
            out = np.empty((m, n), dtype=np.result_type(a, b))

            def row_block(i):
                np.matmul(a[i:i + rows], b, out=out[i:i + rows])
                if bias is not None:
                    out[i:i + rows] += bias

            parallel_map(row_block, range(0, m, rows))
            return out
        b3 = b.reshape((1,) + b.shape) if b.ndim == 2 else b             # (batch, K, N)
        out = np.empty((b3.shape[0], m, n), dtype=np.result_type(a, b))
        cols = _even_blocks(n, step)                                     # blocks of columns of b

        def column_block(job):
            i, j = job
            gemm_into(a, b3[i, :, j:j + cols], out[i, :, j:j + cols])
            if bias is not None:
                out[i, :, j:j + cols] += bias[j:j + cols]

        parallel_map(column_block, [(i, j) for i in range(b3.shape[0]) for j in range(0, n, cols)])
        return out if b.ndim == 3 else out[0]


def _sums(a, subscripts, b=None):
    """Sums over the trailing axes by einsum ("ij->i": sum_j a[i, j]; "ij,ij->i": sum_j a[i, j] b[i, j]):
    about three times faster than np.sum here. Each row's sum is independent of the other rows."""
    return np.einsum(subscripts, a) if b is None else np.einsum(subscripts, a, b)


# --------------------------------------------------------------------------------------------------
# Convolution

def conv2d(x, weight, bias, stride, pads):
    """ops.conv2d on the host. stride: (s_h, s_w); pads: (top, bottom, left, right).

    An unpadded 1x1 stride-1 conv is one product over the channels; a 3x3 stride-1 conv with many
    channels and pixels runs by Winograd's F(2x2, 3x3) (`winograd.conv3x3`, 2.25 times fewer
    multiply-adds); a conv of a small image, at any stride, is one im2col product (`_conv2d_small`);
    another stride-1 conv is one in-place BLAS product per tap (`_conv2d_taps`); other strides gather
    each tap's pixels first (im2col, `_conv2d_gathered`).
    """
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    sh, sw = stride
    top, bottom, left, right = pads
    if kh == kw == 1 and sh == sw == 1 and top == bottom == left == right == 0:
        y = _matmul(weight.reshape(c_out, c), x.reshape(n, c, h * w))  # (N, C_out, H*W)
        if bias is not None:
            y += bias.reshape(1, c_out, 1)
        return y.reshape(n, c_out, h, w)
    hp, wp = h + top + bottom, w + left + right
    if sh == sw == 1 and kh == kw == 3 and _winograd_pays(n, c, c_out, hp - 2, wp - 2, x.dtype):
        return winograd.conv3x3(x, weight, bias, pads)
    if _small_image(n, c, (hp - kh) // sh + 1, (wp - kw) // sw + 1, kh * kw, x.dtype.itemsize):
        return _conv2d_small(x, weight, bias, stride, pads)
    flat = _pad_flat(x, top, bottom, left, right, kw - 1)
    if sh == sw == 1:
        return _conv2d_taps(flat, weight, bias, hp, wp)
    return _conv2d_gathered(flat, weight, bias, hp, wp, sh, sw)


def _pad_flat(x, top, bottom, left, right, tail):
    """The zero-padded image, each channel flattened row by row (rows of length wp), `tail` zeros after
    it: (N, C, hp*wp + tail) with flat[n, c, (top + i)*wp + left + j] = x[n, c, i, j]. Only the border
    is zeroed, and the channels are filled in blocks on the thread pool."""
    n, c, h, w = x.shape
    hp, wp = h + top + bottom, w + left + right
    flat = np.empty((n * c, hp * wp + tail), dtype=x.dtype)
    src = x.reshape(n * c, h, w)

    def fill(i, j):
        img = flat[i:j, : hp * wp].reshape(j - i, hp, wp)
        img[:, :top] = 0
        img[:, top + h:] = 0
        img[:, top:top + h, :left] = 0
        img[:, top:top + h, left + w:] = 0
        img[:, top:top + h, left:left + w] = src[i:j]
        flat[i:j, hp * wp:] = 0

    in_blocks(n * c, (hp * wp + tail) * x.dtype.itemsize, fill, CONV_BAND_BYTES)
    return flat.reshape(n, c, hp * wp + tail)


def _conv2d_taps(flat, weight, bias, hp, wp):
    """Stride-1 conv: one BLAS product per kernel tap, accumulated in place.

    Output pixel (i, j) with tap (u, v) reads flat[(i + u)*wp + (j + v)] = flat[i*wp + j + (u*wp + v)]:
    for a fixed tap, the inputs of output rows r0..r1-1 (computed at all wp columns; the last kw - 1
    of each row wrap around and are dropped) are one contiguous window of `flat`, starting at
    (r0 + u)*wp + v. So, for one image n and one band of rows,

        y (C_out, rows*wp) = sum_{u, v} w[:, :, u, v] (C_out, C_in) @ flat[n, :, window(u, v)] (C_in, rows*wp)

    Each term is `gemm_into(..., accumulate=True)`: BLAS reads the window where it lies and adds the
    product into y, so there is neither a copy of the input nor a temporary per tap. A band is about
    CONV_BAND_BYTES of output; the bands run on the thread pool, each product on one core.
    The taps are summed in the same order (u, then v) in every band, whatever the thread count.
    """
    n, c = flat.shape[:2]
    c_out, _, kh, kw = weight.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    taps = np.ascontiguousarray(weight.transpose(2, 3, 0, 1))  # taps[u, v] = w[:, :, u, v], (C_out, C_in)
    rows = max(1, min(ho, CONV_BAND_BYTES // max(1, c_out * wp * flat.dtype.itemsize)))
    out = np.empty((n, c_out, ho, wo), dtype=flat.dtype)

    def band(job):
        i, r0 = job
        r1 = min(ho, r0 + rows)
        length = (r1 - r0) * wp
        y = np.empty((c_out, length), dtype=flat.dtype)
        for u in range(kh):
            for v in range(kw):
                start = (r0 + u) * wp + v
                gemm_into(taps[u, v], flat[i, :, start:start + length], y, accumulate=u > 0 or v > 0)
        y = y.reshape(c_out, r1 - r0, wp)[:, :, :wo]  # drop the kw - 1 wrapped columns
        if bias is None:
            out[i, :, r0:r1] = y
        else:
            np.add(y, bias.reshape(c_out, 1, 1), out=out[i, :, r0:r1])

    jobs = [(i, r0) for i in range(n) for r0 in range(0, ho, rows)]
    if not gemm_available(flat.dtype):  # float16: numpy.matmul inside gemm_into, not worth threads
        for job in jobs:
            band(job)
    elif small_product(c_out, n * ho * wp, c * kh * kw):  # the whole conv is small: no hand-offs
        with single_threaded_blas():
            for job in jobs:
                band(job)
    else:
        parallel_map(band, jobs)  # each product on one BLAS thread
    return out


def _winograd_pays(n, c_in, c_out, ho, wo, dtype) -> bool:
    """True when a 3x3 stride-1 conv runs faster by F(2x2, 3x3) (see WINOGRAD_CHANNELS)."""
    return (WINOGRAD and min(c_in, c_out) >= WINOGRAD_CHANNELS and n * ho * wo >= WINOGRAD_PIXELS
            and gemm_available(dtype))


def _small_image(n, c, ho, wo, taps, itemsize) -> bool:
    """True when a conv is better done as one im2col product: few output pixels (the per-tap products,
    or the per-image products of the strided path, would then be thin, and BLAS would pack the whole
    weight for each of them), and an im2col matrix of bounded size."""
    return taps > 1 and n * ho * wo <= SMALL_IMAGE_COLUMNS and c * taps * n * ho * wo * itemsize <= CONV_CHUNK_BYTES


def _conv2d_small(x, weight, bias, stride, pads):
    """Conv of a small image as one product, with the columns ordered (c, u, v) so that the weight is
    used as it lies, (C_out, C_in kH kW), without a copy:

        cols[(c, u, v), (n, i, j)] = x_pad[n, c, s_h i + u, s_w j + v]
        y (C_out, N Ho Wo) = w.reshape(C_out, C_in kH kW) @ cols,   out[n, o, i, j] = y[o, (n, i, j)] + b[o]

    The padded image and the columns are built in blocks of channels on the thread pool; the product
    runs in blocks of output channels (_matmul). (The per-image products of _conv2d_gathered would pack
    the whole weight once per image and block of columns: SD 1.x's 1280-channel stride-2 conv at 16x16,
    batch 2, took 160 ms that way, against about 20 ms here.)
    """
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    sh, sw = stride
    top, bottom, left, right = pads
    hp, wp = h + top + bottom, w + left + right
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    src = x.transpose(1, 0, 2, 3)  # (C, N, H, W), a view

    def fill(i, j):
        padded = np.zeros((j - i, n, hp, wp), dtype=x.dtype)
        padded[:, :, top:top + h, left:left + w] = src[i:j]
        for u in range(kh):
            for v in range(kw):
                cols[i:j, u, v] = padded[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw]

    in_blocks(c, kh * kw * n * ho * wo * x.dtype.itemsize, fill, CONV_BAND_BYTES)
    y = _matmul(weight.reshape(c_out, c * kh * kw), cols.reshape(c * kh * kw, n * ho * wo))
    y = y.reshape(c_out, n, ho, wo).transpose(1, 0, 2, 3)  # (N, C_out, Ho, Wo), a view
    if bias is None:
        return np.ascontiguousarray(y)
    out = np.empty((n, c_out, ho, wo), dtype=x.dtype)
    np.add(y, bias.reshape(1, c_out, 1, 1), out=out)
    return out


def _conv2d_gathered(flat, weight, bias, hp, wp, sh, sw):
    """Strided conv by im2col: gather each tap's strided pixels, then one matrix product.

    cols[n, (u, v, c), (i, j)] = x_pad[n, c, s_h*i + u, s_w*j + v];   y[n] = W (C_out, kH*kW*C_in) @ cols[n]
    with W[o, (u, v, c)] = w[o, c, u, v]. For stride 2 cols is kH*kW/4 times the input's size.
    """
    n, c = flat.shape[:2]
    c_out, _, kh, kw = weight.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    padded = flat[:, :, : hp * wp].reshape(n, c, hp, wp)
    w_mat = weight.transpose(0, 2, 3, 1).reshape(c_out, kh * kw * c)
    out = np.empty((n, c_out, ho, wo), dtype=flat.dtype)
    band = max(1, min(ho, CONV_CHUNK_BYTES // max(1, n * kh * kw * c * wo * flat.dtype.itemsize)))
    for r0 in range(0, ho, band):
        r1 = min(ho, r0 + band)
        cols = np.empty((n, kh, kw, c, r1 - r0, wo), dtype=flat.dtype)
        for u in range(kh):
            for v in range(kw):
                i0 = sh * r0 + u
                cols[:, u, v] = padded[:, :, i0: i0 + sh * (r1 - r0 - 1) + 1: sh, v: v + sw * (wo - 1) + 1: sw]
        y = _matmul(w_mat, cols.reshape(n, kh * kw * c, (r1 - r0) * wo))  # (N, C_out, rows*wo)
        y = y.reshape(n, c_out, r1 - r0, wo)
        if bias is None:
            out[:, :, r0:r1] = y
        else:
            np.add(y, bias.reshape(1, c_out, 1, 1), out=out[:, :, r0:r1])
    return out


# --------------------------------------------------------------------------------------------------
# Normalisation

def group_norm(x, num_groups, weight, bias, eps):
    """ops.group_norm, per (sample, group) row in cached blocks: mean, centre in place, variance of
    the centred values (two passes), scale by gamma / sqrt(var + eps), add beta."""
    n, c = x.shape[:2]
    cg = c // num_groups
    rows = x.reshape(n * num_groups, cg, -1)  # one row per (sample, group): (N*G, C/G, positions)
    out = np.empty(rows.shape, dtype=x.dtype)
    gamma = None if weight is None else np.broadcast_to(weight.reshape(1, num_groups, cg),
                                                        (n, num_groups, cg)).reshape(-1, cg, 1)
    beta = None if bias is None else np.broadcast_to(bias.reshape(1, num_groups, cg),
                                                     (n, num_groups, cg)).reshape(-1, cg, 1)
    size = cg * rows.shape[2]  # values per group

    def work(i, j):
        xb, ob = rows[i:j], out[i:j]
        mean = _sums(xb, "ijk->i").reshape(-1, 1, 1) / size            # mu_g, (rows, 1, 1)
        np.subtract(xb, mean, out=ob)                                    # x - mu_g
        var = _sums(ob, "ijk,ijk->i", ob).reshape(-1, 1, 1) / size      # var_g = mean((x - mu_g)^2)
        rstd = 1.0 / np.sqrt(var + eps)
        ob *= rstd if gamma is None else rstd * gamma[i:j]              # * gamma[c] / sqrt(var_g + eps)
        if beta is not None:
            ob += beta[i:j]                                              # + beta[c]

    in_blocks(rows.shape[0], rows[0].size * x.dtype.itemsize, work, HOST_BLOCK_BYTES)
    return out.reshape(x.shape)


def layer_norm(x, weight, bias, eps):
    """ops.layer_norm over the last axis, in cached blocks of rows."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # (rows, D)
    out = np.empty(rows.shape, dtype=x.dtype)

    def work(i, j):
        xb, ob = rows[i:j], out[i:j]
        np.subtract(xb, (_sums(xb, "ij->i") / d).reshape(-1, 1), out=ob)   # x - mean(x)
        var = _sums(ob, "ij,ij->i", ob).reshape(-1, 1) / d                  # mean((x - mean)^2)
        ob *= 1.0 / np.sqrt(var + eps)
        if weight is not None:
            ob *= weight
        if bias is not None:
            ob += bias

    in_blocks(rows.shape[0], d * x.dtype.itemsize, work, HOST_BLOCK_BYTES)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Linear layers and activations

def linear(x, weight, bias):
    """ops.linear: y = x W^T + b, a small product on one BLAS thread."""
    y = _matmul(x.reshape(-1, x.shape[-1]), weight.T, bias)  # (rows, D_out)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def _elementwise(x, compute):
    """out = f(x) elementwise, where compute(xb, ob) writes f(xb) into ob, one cached block at a time."""
    flat = x.reshape(-1)  # a view when x is contiguous
    out = np.empty(flat.shape, dtype=x.dtype)
    in_blocks(flat.size, x.dtype.itemsize, lambda i, j: compute(flat[i:j], out[i:j]), HOST_BLOCK_BYTES)
    return out.reshape(x.shape)


def _silu_into(x, out):
    np.negative(x, out=out)       # -x
    np.exp(out, out=out)          # exp(-x)
    out += 1.0                    # 1 + exp(-x)
    np.divide(x, out, out=out)    # x / (1 + exp(-x))


def silu(x):
    """ops.silu: x / (1 + exp(-x)), in place on cached blocks."""
    return _elementwise(x, _silu_into)


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Abramowitz & Stegun, Handbook of Mathematical Functions (1964), formula 7.1.26: for z >= 0
#   1 - erf(z) = (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2),  t = 1 / (1 + p z),
# with an absolute error <= 1.5e-7, about one float32 rounding step near 1 (torch's vectorised CPU
# erf uses the same formula).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)  # a1 .. a5
_AS_K = math.sqrt(2.0) / _AS_P
_AS_HALF_A = tuple(a / 2 for a in _AS_A)
_ZEROS = {}  # dtype -> a read-only array of zeros, grown as longer rows are asked for


def _zero_row(n: int, dtype):
    """A read-only row of n zeros (a view of one array per dtype): NumPy's maximum against a row runs its
    SIMD loop, against the scalar 0 it does not (0.06 against 0.44 ns per value, AVX2)."""
    dtype = np.dtype(dtype)
    zeros = _ZEROS.get(dtype)
    if zeros is None or zeros.size < n:
        zeros = np.zeros(max(n, 2 * (0 if zeros is None else zeros.size)), dtype=dtype)
        zeros.flags.writeable = False
        _ZEROS[dtype] = zeros
    return zeros[:n]


def _gelu_as_into(x, out):
    """Exact-form gelu for float32/float16, erf by formula 7.1.26 above.

    erf is odd, so x erf(x/sqrt(2)) = |x| erf(|x|/sqrt(2)), and with erf = 1 - r(t) exp(-x^2/2),
        gelu(x) = x/2 (1 + erf(x/sqrt(2))) = (x + |x|)/2 - |x| (r(t)/2) exp(-x^2/2)
                = max(x, 0) - |x| r'(t) exp(-x^2/2),
    r'(t) = r(t)/2 = (a1/2) t + ... + (a5/2) t^5, t = 1 / (1 + p |x|/sqrt(2)) = k / (k + |x|) with
    k = sqrt(2)/p. 19 fast elementwise passes over a cached block (NumPy's reciprocal is about
    twice as slow as a division of a scalar by an array, so t is one division), instead of SciPy's
    erf, which costs 12-16 ns of CPU time per element.
    """
    a = np.abs(x)                                    # |x|
    t = a + _AS_K
    np.divide(_AS_K, t, out=t)                       # t = k / (k + |x|) = 1 / (1 + p |x|/sqrt(2))
    np.multiply(t, _AS_HALF_A[4], out=out)           # r'(t) by Horner: ((((b5 t + b4) t + b3) t + b2) t + b1) t
    for coefficient in _AS_HALF_A[3::-1]:
        out += coefficient
        out *= t
    np.multiply(a, -0.5, out=t)
    t *= a
    np.exp(t, out=t)                                 # exp(-x^2/2)
    out *= t
    out *= a                                         # |x| r'(t) exp(-x^2/2) = |x| (1 - erf(|x|/sqrt(2))) / 2
    np.maximum(x, _zero_row(x.shape[-1], x.dtype), out=t)  # max(x, 0) = (x + |x|) / 2
    np.subtract(t, out, out=out)


def _gelu_into(x, out, approximate):
    if approximate == "none" and x.dtype.itemsize < 8:
        _gelu_as_into(x, out)
        return
    if approximate == "none":
        from scipy.special import erf
        np.multiply(x, _SQRT_HALF, out=out)   # x / sqrt(2)
        erf(out, out=out)                     # erf(x / sqrt(2)), exact
    else:
        np.multiply(x, x, out=out)            # x^2
        out *= 0.044715
        out += 1.0
        out *= x                              # x + 0.044715 x^3
        out *= _SQRT_2_OVER_PI
        np.tanh(out, out=out)                 # tanh(sqrt(2/pi) (x + 0.044715 x^3))
    out += 1.0
    out *= x
    out *= 0.5                                # x/2 * (1 + ...)


def gelu(x, approximate):
    """ops.gelu in place on cached blocks; float32/float16 "none" by the erf polynomial above."""
    return _elementwise(x, lambda xb, ob: _gelu_into(xb, ob, approximate))


def _quick_gelu_into(x, out):
    np.multiply(x, -1.702, out=out)   # -1.702 x
    np.exp(out, out=out)
    out += 1.0
    np.divide(x, out, out=out)        # x / (1 + exp(-1.702 x))


def quick_gelu(x):
    """ops.quick_gelu: x / (1 + exp(-1.702 x)), in place on cached blocks."""
    return _elementwise(x, _quick_gelu_into)


def geglu(x, weight, bias, approximate):
    """ops.geglu: [h, g] = x W^T + b, h * gelu(g), in tiles that never leave the cache.

    The projection is never written out whole: each tile of GEGLU_ROWS rows of x and GEGLU_COLUMNS
    columns of each half computes h = x W_h^T + b_h and g = x W_g^T + b_g for its columns (two products
    on one BLAS thread), gates them while they are in cache and writes only h * gelu(g). The tiles run on
    the thread pool; they depend on the sizes only.
    """
    d_in = x.shape[-1]
    half = weight.shape[0] // 2
    rows = x.reshape(-1, d_in)
    m = rows.shape[0]
    dtype = np.result_type(x, weight)
    out = np.empty((m, half), dtype=dtype)
    if out.size == 0:
        return out.reshape(x.shape[:-1] + (half,))
    if small_product(m, 2 * half, d_in):
        tile_rows, tile_cols = m, half                      # one tile
    else:
        tile_rows, tile_cols = _even_blocks(m, GEGLU_ROWS), GEGLU_COLUMNS
    w_h, w_g = weight[:half], weight[half:]

    def tile(job):
        i, j = job
        xr = rows[i:i + tile_rows]
        nr, nc = xr.shape[0], min(half, j + tile_cols) - j
        h = np.empty((nr, nc), dtype=dtype)
        g = np.empty((nr, nc), dtype=dtype)
        gemm_into(xr, w_h[j:j + nc], h, b_transposed=True)  # x W_h^T, these columns
        gemm_into(xr, w_g[j:j + nc], g, b_transposed=True)  # x W_g^T
        if bias is not None:
            h += bias[j:j + nc]
            g += bias[half + j:half + j + nc]
        step = max(1, HOST_BLOCK_BYTES // (2 * nc * dtype.itemsize))
        for s in range(0, nr, step):                        # the gate, a cached block of rows at a time
            ob = out[i + s:i + min(nr, s + step), j:j + nc]
            _gelu_into(g[s:s + step], ob, approximate)     # gelu(g)
            ob *= h[s:s + step]                             # h * gelu(g)

    with single_threaded_blas():
        parallel_map(tile, [(i, j) for i in range(0, m, tile_rows) for j in range(0, half, tile_cols)])
    return out.reshape(x.shape[:-1] + (half,))


def softmax(x):
    """ops.softmax over the last axis, in place on cached blocks of rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty(rows.shape, dtype=x.dtype)

    def work(i, j):
        ob = out[i:j]
        np.subtract(rows[i:j], np.max(rows[i:j], axis=-1, keepdims=True), out=ob)  # x - max(x)
        np.exp(ob, out=ob)
        ob /= np.sum(ob, axis=-1, keepdims=True)

    if x.shape[-1]:
        in_blocks(rows.shape[0], x.shape[-1] * x.dtype.itemsize, work, HOST_BLOCK_BYTES)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Attention

def scaled_dot_product_attention(q, k, v, mask, is_causal, scale, budget):
    """ops.scaled_dot_product_attention on the host: mask is None or a float array broadcast to
    (..., Lq, Lk); scale a float; budget the most bytes of scores held at once.

    Three exact rearrangements save time:
    - the scale is folded into q (Lq*d multiplications instead of Lq*Lk);
    - the softmax denominator is applied to the output rows after P V (Lq*d_v divisions instead of
      Lq*Lk);
    - softmax(s)_j = exp(s_j - c) / sum_k exp(s_k - c) holds for any shift c. The reference shifts by
      the row's max, so that exp cannot overflow. A row whose max lies within
      [SHIFT_FREE_LOW, SHIFT_FREE_HIGH] takes c = 0 instead: exp(s) can then neither overflow nor lose
      a term that matters, and the block saves its pass of subtractions. Each row decides for itself,
      so its result never depends on the other rows; a row whose unshifted P V overflows (|v| near the
      dtype's largest number) is done again shifted. Without a mask, a block whose rows all have
      |q_i| max_j |k_j| <= SHIFT_FREE_BOUND (so |s_ij| <= 29) skips the pass finding the maxima too.
    Each block is one head and a few query rows (ATTENTION_BLOCK_BYTES of scores, so the block stays in
    cache); the blocks run on the thread pool, each product on one BLAS thread.
    """
    lead = q.shape[:-2]
    lq = q.shape[-2]
    lk, dv = v.shape[-2:]
    scale = np.asarray(scale, dtype=q.dtype)
    # The output lies in memory as (..., Lq, H, d_v), H the last lead axis (the heads), and is returned as
    # the view (..., H, Lq, d_v): merge_heads, which follows attention in every model, is then a view too,
    # not a single-threaded copy of the whole output. The values are the same.
    if lead:
        out = np.swapaxes(np.empty(lead[:-1] + (lq, lead[-1], dv), dtype=q.dtype), -3, -2)
    else:
        out = np.empty((lq, dv), dtype=q.dtype)
    if out.size == 0:
        return out
    # float16 always shifts (its largest number is 65504), and so does a single key (shifted, its
    # weight is exactly 1 and the output exactly v, as in the reference)
    may_skip = q.dtype.itemsize >= 4 and lk >= 2
    may_bound = may_skip and mask is None
    global EXP_CLAMP
    if EXP_CLAMP is None:
        EXP_CLAMP = _exp_underflow_is_slow()
    clamp_exp = EXP_CLAMP and q.dtype == np.float32
    rows = max(1, min(lq, min(budget, ATTENTION_BLOCK_BYTES) // max(1, lk * q.dtype.itemsize)))
    heads = list(np.ndindex(*lead))
    items = [(g, i, min(lq, i + rows)) for g in heads for i in range(0, lq, rows)]
    small = len(items) * rows * lk * q.dtype.itemsize <= ATTENTION_SERIAL_BYTES  # run serially: no hand-offs

    kt = np.swapaxes(k, -1, -2)                                    # K^T, (..., d, Lk)
    keys_contiguous = KEYS_CONTIGUOUS and lk >= KEYS_CONTIGUOUS_MIN
    if keys_contiguous:
        kt = np.empty(kt.shape, dtype=kt.dtype)                    # a copy: Lk d per head, against Lq Lk scores
    k_norm = np.empty(lead, dtype=np.float64) if may_bound else None

    def prepare(g):
        """Per head: the contiguous copy of K^T, and max_j |k_j| for the bound below."""
        if keys_contiguous:
            kt[g] = np.swapaxes(k[g], -1, -2)
        if may_bound:
            k_norm[g] = math.sqrt(float(np.max(_sums(k[g], "ij,ij->i", k[g]))))

    def scores(g, rows):
        """(Q * scale) K^T + mask for the query rows `rows` (a slice or an index array) of head g, and q * scale."""
        qs = q[g][rows] * scale                                    # the scale folded into q
        s = np.matmul(qs, kt[g])                                   # (rows, Lk)
        if mask is not None:
            s += mask[g][rows]
        if is_causal:
            s[np.arange(lk).reshape(1, -1) > np.arange(lq)[rows].reshape(-1, 1)] = -np.inf
        return s, qs

    def weighted_values(s, v_g, o, clamp):
        """o = softmax(s) V from shifted (or unshifted) scores s, which it overwrites."""
        if clamp:
            np.maximum(s, _exp_low_row(s.shape[-1], s.dtype), out=s)  # no subnormal exp (see EXP_LOW)
        np.exp(s, out=s)                                           # P up to its row sums
        np.matmul(s, v_g, out=o)                                   # P V, (rows, d_v)
        o /= _sums(s, "ij->i").reshape(-1, 1)                      # / sum_j P_ij

    def block(item):
        g, i, j = item                                             # head index g, query rows i..j-1
        s, qs = scores(g, slice(i, j))
        # |s_ij| <= |q_i| |k_j| (Cauchy-Schwarz): a row whose bound is at most SHIFT_FREE_BOUND has its
        # max inside the window, so it needs no max to be found
        bound = math.sqrt(float(np.max(_sums(qs, "ij,ij->i", qs)))) * k_norm[g] if may_bound else math.inf
        clamp = False
        if bound <= SHIFT_FREE_BOUND:
            shift = np.zeros(j - i, dtype=bool)                    # every row bounded: no max pass
        else:
            m = np.max(s, axis=-1, keepdims=True)                  # the row maxima
            shift = (~((m >= SHIFT_FREE_LOW) & (m <= SHIFT_FREE_HIGH))).ravel() if may_skip else None
            if clamp_exp and bound > EXP_LOW_BOUND:                # may a shifted score fall below EXP_LOW?
                c = m[::EXP_LOW_SAMPLE, 0]                         # the sampled rows' shifts
                if shift is not None:
                    c = np.where(shift[::EXP_LOW_SAMPLE], c, 0)
                clamp = bool(np.any(np.min(s[::EXP_LOW_SAMPLE], axis=-1) - c < EXP_LOW))
        o = out[g][i:j]
        if shift is None or shift.all():
            s -= m                                                 # the reference's shift (NaN, -inf maxima too)
            weighted_values(s, v[g], o, clamp)
            return
        if shift.any():
            rows = np.flatnonzero(shift)
            s[rows] -= m[rows]
        with np.errstate(over="ignore", invalid="ignore"):         # an overflow here is redone below
            weighted_values(s, v[g], o, clamp)
        redo = np.flatnonzero(~shift & ~np.isfinite(o).all(axis=1))  # unshifted rows that overflowed
        if redo.size:
            s = scores(g, i + redo)[0]
            s -= np.max(s, axis=-1, keepdims=True)
            o_redo = np.empty((redo.size, dv), dtype=o.dtype)
            weighted_values(s, v[g], o_redo, clamp)
            o[redo] = o_redo

    with single_threaded_blas():
        if small:
            for g in heads if keys_contiguous or may_bound else ():
                prepare(g)
            for item in items:
                block(item)
        else:
            if keys_contiguous or may_bound:
                parallel_map(prepare, heads)
            parallel_map(block, items)
    return out


# --------------------------------------------------------------------------------------------------
# Resampling

def upsample_nearest2x(x):
    """ops.upsample_nearest2x: each pixel into its 2x2 square, by broadcasting, in blocks of channels."""
    n, c, h, w = x.shape
    src = x.reshape(n * c, h, 1, w, 1)
    y = np.empty((n * c, h, 2, w, 2), dtype=x.dtype)

    def work(i, j):
        y[i:j] = src[i:j]

    in_blocks(n * c, 4 * h * w * x.dtype.itemsize, work, HOST_BLOCK_BYTES)
    return y.reshape(n, c, 2 * h, 2 * w)
