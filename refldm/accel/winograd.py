"""3x3 stride-1 convolution by Winograd's minimal filtering algorithm F(2x2, 3x3), for the host.

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks" (sec. 4): each 2x2 block of
output pixels is computed from the 4x4 block of input pixels around it as

    Y = A^T [ sum_c (G g_oc G^T) * (B^T d_c B) ] A          (* elementwise, over 4x4 arrays)

    B^T = [[1,  0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],          [1/2, 1/2, 1/2],           [0, 1, -1, -1]]
           [0, -1,  1,  0],          [1/2, -1/2, 1/2],
           [0,  1,  0, -1]]          [0,    0,   1]]

which is exactly the direct sum y[i, j] = sum_{c, u, v} w[o, c, u, v] x_pad[c, i + u, j + v] (the
transforms are exact identities; only the rounding differs). Written with U[k] = (G g G^T)[k] and
V[k] = (B^T d B)[k] for each of the 16 positions k of the 4x4 array, the sum over channels is 16
matrix products

    M[k] (C_out, tiles) = U[k] (C_out, C_in) @ V[k] (C_in, tiles)

with 16 multiply-adds per tile and channel pair instead of the direct form's 36: 2.25 times fewer.
The transforms are additions and halvings, a few passes over the input, the weights and the output.

Worth it where there are enough tiles for the products to dominate (the transform of the weights is
one product over all C_out x C_in channel pairs per call): 512 output pixels over the batch and 128
channels (kernels.WINOGRAD_PIXELS, WINOGRAD_CHANNELS); smaller images use one im2col product instead
(see kernels._conv2d_small). tests/test_accel.py proves it equal to ops.conv2d.

(F(4x4, 3x3) was tried too: about 10% faster again at 32x32 and 64x64, but ten times less accurate in
float32, see docs/ops.md.)
"""

from __future__ import annotations

import numpy as np

from refldm.accel.blas import gemm_into
from refldm.accel.threads import num_threads, parallel_map

__all__ = ["conv3x3", "weight_transform", "BAND_COLUMNS", "WEIGHT_BLOCK", "WEIGHT_BYTES"]

# Tiles per band: one band of tile rows of one image is transformed, multiplied (16 products of
# BAND_COLUMNS columns) and transformed back on one thread; the bands run on the thread pool.
BAND_COLUMNS = 512
# The transformed weight U (16 C_out C_in values) is held at most this many bytes at a time: a larger
# one is done in blocks of output channels, each of which transforms the input again.
WEIGHT_BYTES = 64 * 2**20
# The image goes channels last this many channels at a time: NumPy's copy of a whole transposed
# (C, H, W) -> (H, W, C) view strides through memory; in blocks of 32 channels it runs 1.7-2.4 times
# faster (320 to 1280 channels, AVX2). With M computed channels first (below) it was the last
# transposition: the two changes together took 10% off SDXL's 3x3 convs (7.2 s against 8.1 s a step).
TRANSPOSE_CHANNELS = 32


# kron(G, G): row 4 a + b, column 3 i + j holds G[a, i] G[b, j]; its entries are 0, +-1/4, +-1/2 and 1.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = np.kron(_G, _G)  # (16, 9)
# Channel pairs per block of the weight transform (a block per task on the thread pool).
WEIGHT_BLOCK = 2**16


def weight_transform(weight):
    """U[a, b] = (G g G^T)[a, b] = sum_{i, j} G[a, i] G[b, j] g[i, j] for every (output, input) channel
    pair, as one product over all pairs: U (16, C_out C_in) = kron(G, G) (16, 9) @ g^T (9, C_out C_in).
    Returns (16, C_out, C_in), U[4 a + b] one (C_out, C_in) matrix."""
    c_out, c_in = weight.shape[:2]
    pairs = c_out * c_in
    g = np.ascontiguousarray(weight).reshape(pairs, 9)        # one row of 9 taps per channel pair
    gg = _GG.astype(weight.dtype)
    u = np.empty((16, pairs), dtype=weight.dtype)
    parallel_map(lambda j: gemm_into(gg, g[j:j + WEIGHT_BLOCK], u[:, j:j + WEIGHT_BLOCK], b_transposed=True),
                 range(0, pairs, WEIGHT_BLOCK))
    return u.reshape(16, c_out, c_in)


def _input_transform(d, th, tw):
    """V[a, b] = (B^T d B)[a, b] for every 4x4 input tile (stride 2) of d (2 th + 2, 2 tw + 2, C),
    channels last (so that every pass runs along rows of C contiguous values): (4, 4, th, tw, C)."""
    c = d.shape[2]
    r = [d[i:i + 2 * th:2] for i in range(4)]                  # row i of every tile: (th, W, C)
    t = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])   # B^T d, over rows
    v = np.empty((4, 4, th, tw, c), dtype=d.dtype)
    for a in range(4):
        col = [t[a][:, j:j + 2 * tw:2] for j in range(4)]      # column j of every tile: (th, tw, C)
        np.subtract(col[0], col[2], out=v[a, 0])               # (B^T d B)[a, 0]
        np.add(col[1], col[2], out=v[a, 1])
        np.subtract(col[2], col[1], out=v[a, 2])
        np.subtract(col[1], col[3], out=v[a, 3])
    return v


def _output_transform_into(m, bias, out, t0, ho, wo):
    """Y = A^T M A (+ bias) for every tile of a band, channels first: m (4, 4, C_out, bt, tw); writes
    output rows 2 t0 .. 2 (t0 + bt) - 1 of out (C_out, Ho, Wo), Y[r, s] of tile (p, q) going to pixel
    (2 (t0 + p) + r, 2 q + s); a tile overhanging the image's last row or column writes only its part."""
    bt, tw = m.shape[3:]
    s = [(m[0, b] + m[1, b] + m[2, b], m[1, b] - m[2, b] - m[3, b]) for b in range(4)]  # A^T M, over rows
    y = np.empty(m.shape[2:], dtype=m.dtype)                   # (C_out, bt, tw)
    for r in range(2):
        np.add(s[0][r], s[1][r], out=y)
        y += s[2][r]                                           # Y[r, 0] = s[r, 0] + s[r, 1] + s[r, 2]
        _scatter(y, bias, out, t0, r, 0, ho, wo)
        np.subtract(s[1][r], s[2][r], out=y)
        y -= s[3][r]                                           # Y[r, 1] = s[r, 1] - s[r, 2] - s[r, 3]
        _scatter(y, bias, out, t0, r, 1, ho, wo)


def _scatter(y, bias, out, t0, r, s, ho, wo):
    """out[:, 2 (t0 + p) + r, 2 q + s] = y[:, p, q] (+ bias) for the (p, q) inside the image."""
    bt = y.shape[1]
    rows, cols = (ho - 2 * t0 - r + 1) // 2, (wo - s + 1) // 2
    dest = out[:, 2 * t0 + r: 2 * (t0 + bt): 2, s::2]          # (C_out, rows, cols), every other pixel
    src = y[:, :min(bt, rows), :cols]
    if bias is None:
        dest[...] = src
    else:
        np.add(src, bias.reshape(-1, 1, 1), out=dest)


def conv3x3(x, weight, bias, pads):
    """ops.conv2d for a 3x3 kernel, stride 1, by F(2x2, 3x3). pads: (top, bottom, left, right).

    Each image is cut into bands of tile rows (about BAND_COLUMNS tiles each); a band is padded and
    laid out channels last, transformed, multiplied by U (16 products on one BLAS thread,
    M[k] (C_out, tiles) = U[k] (C_out, C_in) @ V[k]^T (C_in, tiles), so that M comes out channels
    first, as the output lies) and transformed back straight into the output; the bands run on the
    thread pool, and where there are fewer bands than threads, so do each band's 16 products. The bands
    depend on the sizes only (the products' bytes do not depend on the thread that runs them). A
    weight whose U would take more than WEIGHT_BYTES runs in blocks of output channels.
    """
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    blocks = -(-16 * c_out * c * x.dtype.itemsize // WEIGHT_BYTES)  # U in at most WEIGHT_BYTES at once
    if blocks > 1:
        per = -(-c_out // blocks)
        parts = [conv3x3(x, weight[o:o + per], None if bias is None else bias[o:o + per], pads)
                 for o in range(0, c_out, per)]
        return np.concatenate(parts, axis=1)
    top, bottom, left, right = pads
    ho, wo = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-ho // 2), -(-wo // 2)                          # tiles down and across (the last may overhang)
    u = weight_transform(weight)
    band = max(1, min(th, BAND_COLUMNS // tw))                 # tile rows per band
    out = np.empty((n, c_out, ho, wo), dtype=x.dtype)

    def work(job):
        i, t0 = job
        bt = min(th, t0 + band) - t0
        d = np.zeros((2 * bt + 2, 2 * tw + 2, c), dtype=x.dtype)  # padded rows 2 t0 .. 2 (t0 + bt) + 1
        r0, r1 = max(0, 2 * t0 - top), min(h, 2 * (t0 + bt) + 2 - top)  # the image rows inside them
        if r1 > r0:                                            # channels last, TRANSPOSE_CHANNELS at a time
            dest, src = d[r0 + top - 2 * t0: r1 + top - 2 * t0, left:left + w], x[i, :, r0:r1]
            for c0 in range(0, c, TRANSPOSE_CHANNELS):
                dest[:, :, c0:c0 + TRANSPOSE_CHANNELS] = src[c0:c0 + TRANSPOSE_CHANNELS].transpose(1, 2, 0)
        v = _input_transform(d, bt, tw).reshape(16, bt * tw, c)
        m = np.empty((16, c_out, bt * tw), dtype=x.dtype)
        products = (lambda k: gemm_into(u[k], v[k], m[k], b_transposed=True))  # M[k] = U[k] @ V[k]^T
        if few_bands:                                          # the 16 products on the pool instead
            parallel_map(products, range(16))
        else:                                                  # (a band per thread: less memory held)
            for k in range(16):
                products(k)
        _output_transform_into(m.reshape(4, 4, c_out, bt, tw), bias, out[i], t0, ho, wo)

    jobs = [(i, t0) for i in range(n) for t0 in range(0, th, band)]
    few_bands = len(jobs) < num_threads()
    parallel_map(work, jobs)
    return out

