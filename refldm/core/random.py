"""Seed-compatible noise: the numbers ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``
gives, computed without torch.

A diffusers image is fixed by its seed because every random number comes from torch's CPU generator.
refldm reproduces that stream, so the same seed gives the same starting latent, bit for bit:

    from refldm.core.random import Generator, randn
    x = randn((1, 4, 64, 64), seed=42)          # == torch.randn(..., generator=torch.Generator().manual_seed(42))
    g = Generator(42)                            # a continuing stream, like one torch.Generator:
    a, b = g.randn((3,)), g.randn((2, 8))        # == two successive torch.randn calls on that generator

How torch does it (aten/src/ATen/core/DistributionsHelper.h, TransformationHelper.h,
native/cpu/DistributionTemplates.h, native/cpu/avx_mathfun.h):

1. **Bits.** The generator is MT19937 seeded with ``init_genrand(seed & 0xffffffff)``; each draw is one
   tempered 32-bit word. A double uniform takes two words ``(a, b)`` and keeps the low 53 bits of
   ``a << 32 | b``; a float uniform keeps the low 24 bits of one word. ``u = bits * 2**-digits`` in [0, 1).
2. **Fewer than 16 values** (any dtype): one value at a time, Box-Muller in double precision,
   ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``, returns ``r cos(theta)`` and *keeps*
   ``r sin(theta)`` in the generator for the next scalar draw (``next_double_normal_sample``).
3. **16 values or more**: fill the whole tensor with uniforms first, then turn every block of 16 into
   normals with Box-Muller on pairs (j, j + 8): ``u1 = 1 - d[j]``, ``u2 = d[j + 8]``,
   ``d[j] = r cos(theta)``, ``d[j + 8] = r sin(theta)``. When the size is not a multiple of 16, the last
   16 values are drawn again (16 fresh uniforms) and recomputed. float64 uses libm's log/cos/sin;
   float32 on x86 CPUs with AVX2 (every recent one; torch's AVX512 build uses the same code) uses the
   single-precision polynomials of ``avx_mathfun.h`` (Cephes) with fused multiply-adds where the
   compiler fuses them. float16 uses the float32 path per block of 16 and rounds.

``kernel="avx2"`` reproduces (3) for float32 as torch on x86; ``kernel="scalar"`` reproduces torch on
CPUs without AVX2 (ARM, or ``ATEN_CPU_CAPABILITY=default``), calling the C library's ``logf/cosf/sinf``.
``kernel="auto"`` picks what torch on this machine picks. ``Generator(seed, mode="numpy")`` is the plain
NumPy generator instead (not torch-compatible, and no C library).

**The GPU stream.** ``Generator(seed, mode="cuda")`` / ``randn(shape, seed=s, mode="cuda")`` gives the
numbers of ``torch.randn(shape, device="cuda")`` after ``torch.manual_seed(s)``: NVIDIA's Philox 4x32-10
counter-based generator with curand's Box-Muller, computed on the host exactly as AUTOMATIC1111's "NV"
random source does (its ``modules/rng_philox.py``; stable-diffusion.cpp's ``--rng cuda`` is a port of it).
See :func:`philox4x32_10` and :func:`philox_randn` for the algorithm, its sources and its size limit.

Everything here runs on the host and returns NumPy arrays; move them with ``refldm.backend.asarray``.
"""

from __future__ import annotations

import math
import os
import platform

import numpy

from refldm import backend
from refldm.accel.libm import libm_float32

__all__ = ["Generator", "randn", "rand", "default_kernel", "philox4x32_10", "philox_randn", "MODES"]

DEFAULT_SEED = 67280421310721  # torch.Generator().initial_seed() of a fresh generator
_F32 = numpy.float32


# ---------------------------------------------------------------------------------------------------
# Which float32 kernel torch uses on this machine
# ---------------------------------------------------------------------------------------------------

def default_kernel() -> str:
    """"avx2" where torch's CPU dispatch picks its AVX2/AVX512 kernels (x86 with AVX2 + FMA), else "scalar".

    Honours ``ATEN_CPU_CAPABILITY`` as torch does ("default" forces the scalar kernel).
    """
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cap == "default":
        return "scalar"
    if cap in ("avx2", "avx512"):
        return "avx2"
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "scalar"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx2" if {"avx2", "fma"} <= flags else "scalar"
    except OSError:
        pass
    return "avx2"  # x86 without /proc/cpuinfo (macOS, Windows): every x86 CPU of the last decade has AVX2


# ---------------------------------------------------------------------------------------------------
# MT19937, seeded as torch seeds it
# ---------------------------------------------------------------------------------------------------

def _mt19937(seed: int) -> numpy.random.MT19937:
    """NumPy's MT19937 bit generator set to torch's state after ``manual_seed(seed)``.

    init_genrand: s[0] = seed mod 2^32, s[j] = 1812433253 * (s[j-1] xor (s[j-1] >> 30)) + j  (mod 2^32).
    """
    state = numpy.empty(624, dtype=numpy.uint32)
    s = seed & 0xFFFFFFFF
    state[0] = s
    for j in range(1, 624):
        s = (1812433253 * (s ^ (s >> 30)) + j) & 0xFFFFFFFF
        state[j] = s
    bits = numpy.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": state, "pos": 624}}  # pos 624: twist first
    return bits


# ---------------------------------------------------------------------------------------------------
# float32 Box-Muller kernels for blocks of 16
# ---------------------------------------------------------------------------------------------------

def _fma32(a, b, c):
    """float32 fused multiply-add a*b + c with one rounding, exactly.

    a*b is exact in float64 (24 + 24 bits); the sum is rounded to odd in float64 (TwoSum error term), and
    rounding that to float32 is then the correctly rounded fused result.
    """
    p = numpy.asarray(a, numpy.float64) * numpy.asarray(b, numpy.float64)
    c = numpy.asarray(c, numpy.float64)
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)  # p + c == s + err exactly
    inexact_even = (err != 0) & ((s.view(numpy.int64) & 1) == 0)
    s = numpy.where(inexact_even, numpy.nextafter(s, numpy.where(err > 0, numpy.inf, -numpy.inf)), s)
    return s.astype(_F32)


_LOG_P = [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1]


def _log_avx(x):
    """log(x) for float32 x > 0 as ``log256_ps`` of avx_mathfun.h (Cephes logf), fused where GCC fuses."""
    x = numpy.maximum(x, numpy.array(0x00800000, numpy.int32).view(_F32))
    bits = x.view(numpy.int32)
    exponent = (bits.view(numpy.uint32) >> 23).astype(numpy.int32) - 127
    x = ((bits & numpy.int32(~0x7F800000)) | numpy.array(0.5, _F32).view(numpy.int32)).view(_F32)  # [0.5, 1)
    e = exponent.astype(_F32) + _F32(1)
    small = x < _F32(0.707106781186547524)
    tmp = numpy.where(small, x, _F32(0))
    x = x - _F32(1)
    e = e - numpy.where(small, _F32(1), _F32(0))
    x = x + tmp
    z = x * x
    y = numpy.full_like(x, _F32(_LOG_P[0]))
    for p in _LOG_P[1:]:
        y = _fma32(y, x, _F32(p))
    y = y * x
    y = _fma32(y, z, e * _F32(-2.12194440e-4))
    y = y - z * _F32(0.5)
    x = x + y
    return _fma32(e, _F32(0.693359375), x)


def _sincos_avx(x):
    """(sin x, cos x) for float32 x >= 0 as ``sincos256_ps`` of avx_mathfun.h (Cephes sinf/cosf)."""
    y = x * _F32(1.27323954473516)  # 4 / pi
    j = y.astype(numpy.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(_F32)
    sin_sign = (j & 4) << 29
    cos_sign = (~(j - 2) & 4) << 29
    first_poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):  # x - j * pi/4, extended
        x = _fma32(y, _F32(dp), x)
    z = x * x
    c = _fma32(_F32(2.443315711809948e-5), z, _F32(-1.388731625493765e-3))
    c = _fma32(c, z, _F32(4.166664568298827e-2))
    c = c * z
    c = _fma32(c, z, -(z * _F32(0.5)))
    c = c + _F32(1)  # cos on [-pi/4, pi/4]
    s = _fma32(_F32(-1.9515295891e-4), z, _F32(8.3321608736e-3))
    s = _fma32(s, z, _F32(-1.6666654611e-1))
    s = s * z
    s = _fma32(s, x, x)  # sin on [-pi/4, pi/4]
    sin_part = numpy.where(first_poly, s, _F32(0)) + numpy.where(first_poly, _F32(0), c)
    cos_part = numpy.where(first_poly, c, _F32(0)) + numpy.where(first_poly, _F32(0), s)
    sin_out = (sin_part.view(numpy.int32) ^ sin_sign).view(_F32)
    cos_out = (cos_part.view(numpy.int32) ^ cos_sign).view(_F32)
    return sin_out, cos_out


def _box_muller16_avx(d):
    """Blocks of 16 float32 uniforms -> 16 normals, torch's AVX2 ``NormalFill16<float>``."""
    d = d.reshape(-1, 16)
    u1 = _F32(1) - d[:, :8]  # [0, 1) -> (0, 1]
    u2 = d[:, 8:]
    radius = numpy.sqrt(_F32(-2) * _log_avx(u1))
    sin_t, cos_t = _sincos_avx(_F32(2 * math.pi) * u2)
    return numpy.concatenate([radius * cos_t, radius * sin_t], axis=1).reshape(-1)


def _box_muller16_scalar(d):
    """Blocks of 16 float32 uniforms -> normals, torch's generic ``NormalFill16<float>`` (C logf/cosf/sinf).

    Without a loadable C math library it rounds float64 results instead (within 1 ulp of torch).
    """
    d = d.reshape(-1, 16)
    u1 = _F32(1) - d[:, :8]
    theta = (2 * math.pi * d[:, 8:].astype(numpy.float64)).astype(_F32)  # double product, rounded to float
    lib = libm_float32()  # the C library's logf/cosf/sinf (a ctypes binding: refldm.accel.libm)
    if lib:
        log = numpy.array([lib.logf(v) for v in u1.ravel().tolist()], _F32).reshape(u1.shape)
        cos = numpy.array([lib.cosf(v) for v in theta.ravel().tolist()], _F32).reshape(u1.shape)
        sin = numpy.array([lib.sinf(v) for v in theta.ravel().tolist()], _F32).reshape(u1.shape)
    else:  # pragma: no cover - platforms without a C math library
        log = numpy.log(u1.astype(numpy.float64)).astype(_F32)
        cos = numpy.cos(theta.astype(numpy.float64)).astype(_F32)
        sin = numpy.sin(theta.astype(numpy.float64)).astype(_F32)
    radius = numpy.sqrt(_F32(-2) * log)
    return numpy.concatenate([radius * cos, radius * sin], axis=1).reshape(-1)


def _box_muller16_f64(d):
    """Blocks of 16 float64 uniforms -> normals, ``NormalFill16<double>`` (libm log/cos/sin, as Python's math)."""
    d = d.reshape(-1, 16)
    u1 = (1.0 - d[:, :8]).ravel().tolist()
    theta = (2.0 * math.pi * d[:, 8:]).ravel().tolist()
    radius = numpy.sqrt(-2.0 * numpy.array([math.log(v) for v in u1])).reshape(-1, 8)
    cos = numpy.array([math.cos(v) for v in theta]).reshape(-1, 8)
    sin = numpy.array([math.sin(v) for v in theta]).reshape(-1, 8)
    return numpy.concatenate([radius * cos, radius * sin], axis=1).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# The GPU stream: Philox 4x32-10 and curand's Box-Muller (torch.randn on CUDA, A1111's "NV" source)
# ---------------------------------------------------------------------------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the two round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key increments (Weyl constants: golden ratio, sqrt(3) - 1)
# curand's CURAND_2POW32_INV (2^-32 exactly, as float32) and the same times 2 pi, a float64 product rounded
# to float32, as A1111 writes them: np.array([2.3283064e-10 * 6.2831855], dtype=np.float32) (bits 0x30c90fdb)
_TWO_POW32_INV = float(numpy.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(numpy.float32(2.3283064e-10 * 6.2831855))
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox 4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
    Random123 ``philox4x32_R``; curand's ``curandStatePhilox4_32_10_t``): four 32-bit words from a 128-bit
    counter and a 64-bit key.

    ``counter``: four uint32 arrays (c0, c1, c2, c3) of one shape; ``key``: (k0, k1), integers or arrays.
    One round, with hi/lo the upper/lower 32 bits of a 64-bit product:

        (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))

    with M0 = 0xD2511F53, M1 = 0xCD9E8D57. Ten rounds; between two rounds the key is bumped,
    (k0, k1) <- (k0 + 0x9E3779B9, k1 + 0xBB67AE85) mod 2^32, so round r (0..9) uses key + r W.
    Returns the four output words as uint32 arrays.
    """
    c0, c1, c2, c3 = (numpy.asarray(c, numpy.uint32) for c in counter)
    k0, k1 = (numpy.asarray(k, numpy.uint64) & numpy.uint64(_MASK32) for k in key)
    m0, m1 = numpy.uint64(PHILOX_M[0]), numpy.uint64(PHILOX_M[1])
    w0, w1 = numpy.uint64(PHILOX_W[0]), numpy.uint64(PHILOX_W[1])
    shift, mask = numpy.uint64(32), numpy.uint64(_MASK32)
    for r in range(10):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0 = c0.astype(numpy.uint64) * m0  # exact: 32 x 32 -> 64 bits
        p1 = c2.astype(numpy.uint64) * m1
        c0, c1, c2, c3 = (((p1 >> shift) ^ c1 ^ k0).astype(numpy.uint32), (p1 & mask).astype(numpy.uint32),
                          ((p0 >> shift) ^ c3 ^ k1).astype(numpy.uint32), (p0 & mask).astype(numpy.uint32))
    return c0, c1, c2, c3


def _philox_box_muller(x, y):
    """curand's ``_curand_box_muller`` on word pairs (x, y), in float64 as A1111's NumPy code computes it:

        u = x 2^-32 + 2^-33                 in (0, 1]   (never 0: the log is finite)
        v = y (2 pi 2^-32) + (2 pi 2^-33)   in (0, 2 pi]
        (first, second) = sqrt(-2 ln u) (sin v, cos v)

    with the two scale constants rounded to float32 first (their float32 values enter the float64 sums).
    Returns (first, second) in float64; each is rounded to float32 once, at the end.
    """
    u = x.astype(numpy.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(numpy.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    s = numpy.sqrt(-2.0 * numpy.log(u))
    return s * numpy.sin(v), s * numpy.cos(v)


def philox_randn(n: int, seed: int, offset: int = 0, threads: int | None = None):
    """n float32 standard normals of torch's CUDA generator, as A1111's "NV" source computes them on a CPU.

    The algorithm (torch ``aten/src/ATen/native/cuda/DistributionTemplates.h`` ``distribution_nullary_kernel``
    and ``normal_kernel``; curand ``curand_kernel.h`` ``curand_init`` / ``curand_normal4``; A1111
    ``modules/rng_philox.py``; stable-diffusion.cpp ``rng_philox.hpp``):

    - **key** = the 64-bit seed split into two words, low word first: (seed mod 2^32, seed >> 32).
    - **counter** of element i = (offset, 0, i mod 2^32, i >> 32): curand_init(seed, subsequence=i,
      offset) puts the subsequence (the CUDA thread's index) in words 2-3 and offset / 4 in words 0-1;
      torch advances its Philox offset by 4 per call, so word 0 counts the calls made on the generator.
    - **Philox 4x32-10** (:func:`philox4x32_10`) turns the counter into four words (w0, w1, w2, w3).
    - **Box-Muller** on (w0, w1): element i = sqrt(-2 ln u) sin v (:func:`_philox_box_muller`); the cos
      partner and the second pair (w2, w3) are not used.
    - the generator's offset then moves on by 1 (by ceil(n / (4 threads)) with a thread count, below).

    **The size limit.** torch launches min(n, T) CUDA threads, T = (number of SMs) x (max threads per SM),
    and gives each thread one ``curand_normal4`` (four normals) per loop turn, spread a grid stride apart:
    element t + k T (k = 0..3) takes the k-th of thread t's four values, the next turn uses counter word
    0 + 1. For n <= T every element is its own thread's first value, which is what A1111's "NV" source and
    the default here (``threads=None``) compute for any n. Beyond T the real GPU stream depends on the GPU:
    T = 40,960 on a T4 (40 SMs x 1024), 43,008 on an RTX 3060, 69,632 on an RTX 2080 Ti, 125,952 on an
    RTX 3090, 196,608 on an RTX 4090, 221,184 on an A100, 270,336 on an H100 SXM. An SD 1.x 512x512 latent
    (1 x 4 x 64 x 64 = 16,384 values) and 768x768 (36,864) are safe on every GPU; SDXL's 1024x1024
    (65,536) is safe on a 2080 Ti and above, not on a T4 or 3060. Give ``threads=T`` to reproduce what a
    given GPU drew for a larger tensor ("GPU" source); A1111's "NV" images always use ``threads=None``.

    **Precision.** The Box-Muller step runs in float64 (NumPy promotes uint32 x float32 to float64 in
    A1111's code) and is rounded to float32 once: bit for bit A1111's "NV"; within about 1e-6 relative of
    the GPU itself, whose curand computes in float32 with its fast sin/log; stable-diffusion.cpp's port
    computes in float32 too and agrees to a few float32 ulps.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"refldm.core.random: negative size {n}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"refldm.core.random: threads must be a positive thread count, got {threads}")
    key = (int(seed) & _MASK32, (int(seed) >> 32) & _MASK32)
    out = numpy.empty(n, numpy.float32)
    if n == 0:
        return out
    stride = n if threads is None else min(n, int(threads))
    turns = -(-n // (4 * stride))
    index = numpy.arange(stride, dtype=numpy.uint64)
    sub_lo = (index & numpy.uint64(_MASK32)).astype(numpy.uint32)
    sub_hi = (index >> numpy.uint64(32)).astype(numpy.uint32)
    zeros = numpy.zeros(stride, numpy.uint32)
    for turn in range(turns):
        c0 = numpy.full(stride, (int(offset) + turn) & _MASK32, numpy.uint32)
        w0, w1, w2, w3 = philox4x32_10((c0, zeros, sub_lo, sub_hi), key)
        first, second = _philox_box_muller(w0, w1)
        values = (first, second) + (_philox_box_muller(w2, w3) if stride < n else ())  # the other pair
        for k, value in enumerate(values):  # element base + k * stride takes thread t's k-th value
            start = turn * 4 * stride + k * stride
            if start >= n:
                break
            take = min(stride, n - start)
            out[start:start + take] = value[:take]
            if stride == n:  # one thread per element: only the first value is used
                break
    return out


# ---------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------

_DTYPES = {"float32": numpy.float32, "float64": numpy.float64, "float16": numpy.float16}


def _dtype_name(dtype) -> str:
    name = dtype if isinstance(dtype, str) else numpy.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"refldm.core.random: unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return name


def _shape(shape) -> tuple:
    shape = (shape,) if isinstance(shape, (int, numpy.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"refldm.core.random: negative size in shape {shape}")
    return shape


MODES = ("torch", "cuda", "numpy")


class Generator:
    """A random stream that, in ``mode="torch"``, equals a ``torch.Generator("cpu").manual_seed(seed)``.

    Successive ``randn``/``rand`` calls continue the stream exactly as successive torch calls on one
    generator do (including the cached second Box-Muller value of small draws).

    ``mode="cuda"``: the stream of torch's CUDA generator after ``manual_seed(seed)`` (Philox 4x32-10,
    :func:`philox_randn`), as AUTOMATIC1111's "NV" source computes it; each ``randn`` call moves the
    Philox offset on by one, as A1111's generator and torch's (for tensors up to 4 x ``cuda_threads``)
    do. ``cuda_threads``: the thread count T of the GPU to imitate for tensors larger than T (see
    :func:`philox_randn`); None, the default, is A1111's "NV" (and the GPU for every tensor up to its T).
    float32 and float16 (the float32 values rounded) only; ``rand`` is not provided in this mode.

    ``mode="numpy"`` is ``numpy.random.default_rng(seed)`` instead.
    """

    def __init__(self, seed: int | None = None, mode: str = "torch", kernel: str = "auto",
                 cuda_threads: int | None = None):
        if mode not in MODES:
            raise ValueError(f"refldm.core.random.Generator: unknown mode {mode!r}; choose one of "
                             f"{', '.join(repr(m) for m in MODES)}")
        if kernel not in ("auto", "avx2", "scalar"):
            raise ValueError(f"refldm.core.random.Generator: unknown kernel {kernel!r}; choose 'auto', 'avx2' or 'scalar'")
        if cuda_threads is not None and (isinstance(cuda_threads, bool) or cuda_threads < 1
                                         or not isinstance(cuda_threads, (int, numpy.integer))):
            raise ValueError(f"refldm.core.random.Generator: cuda_threads must be a positive integer (the GPU's "
                             f"SM count x max threads per SM), got {cuda_threads!r}")
        self.mode = mode
        self.kernel = default_kernel() if kernel == "auto" else kernel
        self.cuda_threads = None if cuda_threads is None else int(cuda_threads)
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    def manual_seed(self, seed: int) -> "Generator":
        """Restart the stream from `seed`, 0..2**64-1 (as ``torch.Generator.manual_seed``); returns self.
        Other integers are refused rather than wrapped: 2**64 would silently give seed 0's noise."""
        if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)):
            raise ValueError(f"refldm.core.random: seed must be an integer, got {seed!r}")
        if not 0 <= int(seed) <= 2**64 - 1:  # torch's range; wrapping would give another seed's noise silently
            raise ValueError(f"refldm.core.random: seed {int(seed)} is outside 0..2**64-1 (18446744073709551615)")
        self._seed = int(seed)
        self._next_normal = None  # torch's next_double_normal_sample
        self.offset = 0  # mode "cuda": Philox counter word 0, one per randn call
        if self.mode == "torch":
            self._bits = _mt19937(self._seed)
        elif self.mode == "numpy":
            self._rng = numpy.random.default_rng(self._seed)
        return self

    def initial_seed(self) -> int:
        return self._seed

    # -- raw uniforms -------------------------------------------------------------------------------
    def _uniform32(self, n: int):
        """n float32 uniforms: low 24 bits of one word each, times 2^-24."""
        words = self._bits.random_raw(n).astype(numpy.uint32)
        return (words & numpy.uint32(0xFFFFFF)).astype(_F32) * _F32(2.0**-24)

    def _uniform64(self, n: int):
        """n float64 uniforms: low 53 bits of (first word << 32 | second word), times 2^-53."""
        words = self._bits.random_raw(2 * n).astype(numpy.uint64).reshape(n, 2)
        value = ((words[:, 0] << numpy.uint64(32)) | words[:, 1]) & numpy.uint64((1 << 53) - 1)
        return value.astype(numpy.float64) * 2.0**-53

    def _normal_scalar(self) -> float:
        """One normal by double-precision Box-Muller, using and refilling the cached second value."""
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1, u2 = self._uniform64(2)
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)

    # -- public draws --------------------------------------------------------------------------------
    def randn(self, shape, dtype="float32"):
        """Standard normal values of `shape` (host NumPy array), as ``torch.randn(shape, generator=g)``."""
        shape, name = _shape(shape), _dtype_name(dtype)
        n = int(numpy.prod(shape, dtype=numpy.int64))
        if self.mode == "numpy":
            return self._rng.standard_normal(n).astype(_DTYPES[name]).reshape(shape)
        if self.mode == "cuda":
            if name == "float64":
                raise ValueError("refldm.core.random: mode 'cuda' makes float32 noise (as A1111's NV source); "
                                 "ask for float32 or float16")
            values = philox_randn(n, self._seed, self.offset, self.cuda_threads)
            stride = n if self.cuda_threads is None else min(n, self.cuda_threads)
            self.offset = (self.offset + max(1, -(-n // (4 * max(stride, 1))))) & _MASK32
            return values.astype(_DTYPES[name]).reshape(shape)
        if n < 16:
            values = numpy.array([self._normal_scalar() for _ in range(n)], numpy.float64)
            if name == "float16":
                values = values.astype(_F32)  # torch: double -> float -> half
            return values.astype(_DTYPES[name]).reshape(shape)
        if name == "float64":
            uniform, fill = self._uniform64, _box_muller16_f64
        else:
            uniform = self._uniform32
            fill = _box_muller16_avx if self.kernel == "avx2" else _box_muller16_scalar
        whole = n - n % 16
        if name == "float16":  # per block of 16 into a buffer: no uniforms for the tail in the first pass
            out = numpy.empty(n, _F32)
            out[:whole] = fill(uniform(whole))
        else:  # the whole tensor is filled with uniforms first, the tail is redrawn below
            out = uniform(n)
            out[:whole] = fill(out[:whole])
        if n % 16:
            out[n - 16:] = fill(uniform(16))
        return out.astype(_DTYPES[name]).reshape(shape)

    def rand(self, shape, dtype="float32"):
        """Uniform values in [0, 1) of `shape`, as ``torch.rand(shape, generator=g)``."""
        shape, name = _shape(shape), _dtype_name(dtype)
        n = int(numpy.prod(shape, dtype=numpy.int64))
        if self.mode == "numpy":
            return self._rng.random(n).astype(_DTYPES[name]).reshape(shape)
        if self.mode == "cuda":
            raise ValueError("refldm.core.random: mode 'cuda' provides randn only (the initial noise); "
                             "use mode 'torch' for uniform values")
        if name == "float64":
            return self._uniform64(n).reshape(shape)
        values = self._uniform32(n)
        if name == "float16":
            values = values.astype(numpy.float16)
            values[values == numpy.float16(1)] = 0  # torch: a value rounded up to the bound becomes the lower bound
        return values.reshape(shape)


def _draw(kind, shape, seed, generator, dtype, mode=None):
    if seed is not None and generator is not None:
        raise ValueError("refldm.core.random: pass either seed or generator, not both")
    if mode is not None and generator is not None:
        raise ValueError("refldm.core.random: pass mode with a seed only; a generator keeps its own mode")
    if generator is None:
        generator = Generator(int(numpy.random.SeedSequence().entropy % 2**63) if seed is None else seed,
                              mode="torch" if mode is None else mode)
    if isinstance(generator, (list, tuple)):  # one generator per batch element, as diffusers' randn_tensor
        shape = _shape(shape)
        if len(generator) == 1:
            return _draw(kind, shape, None, generator[0], dtype)
        if not shape or len(generator) != shape[0]:
            raise ValueError(f"refldm.core.random: {len(generator)} generators for shape {shape}; "
                             "give one generator per batch element (shape[0])")
        return numpy.concatenate([_draw(kind, (1,) + shape[1:], None, g, dtype) for g in generator], axis=0)
    if isinstance(generator, numpy.random.Generator):
        values = generator.standard_normal(_shape(shape)) if kind == "randn" else generator.random(_shape(shape))
        return values.astype(_DTYPES[_dtype_name(dtype)])
    if not isinstance(generator, Generator):
        raise ValueError(f"refldm.core.random: generator must be a refldm.core.random.Generator, a list of them or a "
                         f"numpy.random.Generator, got {type(generator).__name__}")
    return getattr(generator, kind)(shape, dtype)


def randn(shape, seed: int | None = None, generator=None, dtype="float32", mode: str | None = None):
    """Standard normal noise of `shape` as a host NumPy array.

    ``randn(shape, seed=s)`` equals ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))``;
    ``randn(shape, seed=s, mode="cuda")`` the same on torch's CUDA generator (A1111's "NV" source);
    ``generator=`` continues a :class:`Generator` (or a list of them, one per batch element, as diffusers
    allows; or a ``numpy.random.Generator`` for plain NumPy noise). Neither: a fresh, unseeded stream.
    """
    return _draw("randn", shape, seed, generator, dtype, mode)


def rand(shape, seed: int | None = None, generator=None, dtype="float32", mode: str | None = None):
    """Uniform [0, 1) values of `shape`, as ``torch.rand`` on a seeded CPU generator (see :func:`randn`)."""
    return _draw("rand", shape, seed, generator, dtype, mode)
