"""Per-value cost of float32 exp candidates for attention's softmax, on one core, robust to a loaded machine.

The block is attention's: 128 query rows x 4096 keys of float32 scores (2 MiB), values as after the
shift (in [-30, 0]) or shift-free (|s| <= 29). Each candidate overwrites a fresh copy of the block in
place, as the kernel does. Timing: the calling thread's own CPU clock (time.thread_time, which other
processes barely disturb), candidates alternated in every round, the median over rounds reported in ns
per value; and the error against float64 exp, as a fraction of the largest value of the block.

    python tools/bench_exp.py                                        # NumPy's own dispatch on this CPU
    NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" python tools/bench_exp.py   # as on an AVX2-only CPU
    python tools/bench_exp.py --rounds 40 --chunks 4096,16384,65536

Candidates: NumPy's exp; NumPy's exp after clamping below at -87, against a scalar (as refldm's attention
did) and against a row of -87 values (as it does now);
`exp_poly_into` below (exponent and a degree-5 polynomial in in-place passes, `--chunks` values at a
time so that the passes run in the L1/L2 cache); exp2 of x log2 e by NumPy; the same with the power of
two by ldexp. Never part of the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LOG2E = np.float32(1.4426950408889634)

# -- a float32 exp from its exponent and a polynomial, in NumPy passes (the candidate measured and left out)
#
#   e^x = 2^n e^r,   n = rint(x log2 e),   r = x - n ln 2  in [-ln2/2, ln2/2],
#
# r by Cody and Waite's two-part ln 2 (ln2_hi has 9 significant bits, so n ln2_hi is exact and x - n ln2_hi
# loses nothing), e^r by a degree-5 polynomial fitted for relative error on that interval (1.5e-7 in exact
# arithmetic), 2^n made as float32 bits: adding M = 1.5 * 2^23 + 127 to x log2 e rounds it to an integer in
# float32's last place, so the bit pattern is bits(M) + n, and shifting it left by 23 leaves (n + 127) << 23,
# the bits of 2^n. x is clamped below at -87 (2^n stays normal). About 20 in-place passes per chunk.
_EXP_LOG2E = np.float32(1.4426950408889634)
_EXP_MAGIC = np.float32(1.5 * 2**23 + 127)
_EXP_LN2_HI = np.float32(0.693359375)
_EXP_LN2_LO = np.float32(-2.12194440e-4)
_EXP_COEFFS = tuple(np.float32(c) for c in (1.0000001192092896, 0.9999996423721313, 0.49998900294303894,
                                             0.1666766256093979, 0.04191502928733826, 0.008291716687381268))
_EXP_LOW = np.float32(-87.0)
# Values per chunk: its four buffers (128 KiB) stay in the core's L2 cache through the ~20 passes.
EXP_CHUNK = 8192


def exp_poly_into(x, chunk: int = 8192) -> None:
    """x <- exp(x) in place, for a C-contiguous float32 array with x <= 88 (or NaN), by the formula
    above: some 20 in-place passes over `chunk` values at a time. Within 5e-7 of exp(x) relatively
    (tests/test_accel.py), where np.exp is within 1 ulp; below x = -87 it gives about 1.7e-38, not 0."""
    flat = x.reshape(-1)
    size = min(chunk, flat.size)
    t, r2, p = (np.empty(size, dtype=np.float32) for _ in range(3))
    ti = t.view(np.int32)
    c0, c1, c2, c3, c4, c5 = _EXP_COEFFS
    for i in range(0, flat.size, chunk):
        r = flat[i:i + chunk]
        m = r.size
        tb, nb, pb, tib = t[:m], r2[:m], p[:m], ti[:m]
        np.maximum(r, _EXP_LOW, out=r)
        np.multiply(r, _EXP_LOG2E, out=tb)
        tb += _EXP_MAGIC                      # bits(t) = bits(M) + n
        np.subtract(tb, _EXP_MAGIC, out=nb)   # n, as a float
        np.multiply(nb, _EXP_LN2_HI, out=pb)
        r -= pb                               # x - n ln2_hi (exact)
        nb *= _EXP_LN2_LO
        r -= nb                               # r = x - n ln 2
        np.multiply(r, c5, out=pb)            # e^r by Horner: (((((c5 r + c4) r + c3) r + c2) r + c1) r + c0
        pb += c4
        pb *= r
        pb += c3
        pb *= r
        pb += c2
        pb *= r
        pb += c1
        pb *= r
        pb += c0
        np.left_shift(tib, 23, out=tib)       # the bits of 2^n
        np.multiply(pb, tb, out=r)            # e^r 2^n


def clamp_exp(x):
    """np.exp after clamping below at -87: NumPy's AVX2 float32 exp leaves its SIMD loop for a vector
    holding a value whose exp underflows (below about -87.3), and so runs 4x slower on such blocks."""
    np.maximum(x, np.float32(-87.0), out=x)
    np.exp(x, out=x)


_LOW_ROW = np.full(4096, np.float32(-87.0))  # (refldm now clamps at -86: its exp is slower at exactly -87)


def clamp_row_exp(x):
    """The same clamp against a row of -87 values (what refldm's attention does now): NumPy's maximum has a
    SIMD loop for two arrays, none for an array and a scalar (0.10 against 0.43 ns per value)."""
    np.maximum(x, _LOW_ROW[:x.shape[-1]], out=x)
    np.exp(x, out=x)


def exp2_numpy(x):
    x *= LOG2E
    np.exp2(x, out=x)


def exp2_ldexp(x, chunk):
    """2^(x log2 e) = 2^f 2^n with n = rint(y), f = y - n in [-1/2, 1/2]; 2^f by NumPy's exp2, 2^n by ldexp."""
    flat = x.reshape(-1)
    n = np.empty(min(chunk, flat.size), dtype=np.float32)
    ni = np.empty(n.shape, dtype=np.int32)
    for i in range(0, flat.size, chunk):
        y = flat[i:i + chunk]
        m, mi = n[:y.size], ni[:y.size]
        y *= LOG2E
        np.rint(y, out=m)
        y -= m
        np.exp2(y, out=y)
        mi[...] = m
        np.ldexp(y, mi, out=y)


def attention(rounds: int, widths) -> None:
    """functional.scaled_dot_product_attention (the speed layer) at SD 1.x's first level, (2, 8, 4096, 40),
    one thread, thread CPU
    time: refldm with and without the clamp (kernels.EXP_CLAMP) and torch, alternating; q and k are
    N(0, w^2) for each w in `widths` (w = 1: scores of spread ~1; larger w: rows whose scores fall more
    than 87 below their max, where the clamp matters)."""
    import torch
    from refldm import accel
    from refldm.accel import kernels
    from refldm.core import functional as ops  # the ops as the models call them (through the speed layer)
    accel.set_num_threads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for w in widths:
        q, k, v = (rng.standard_normal((2, 8, 4096, 40), dtype=np.float32) for _ in range(3))
        q *= np.float32(w)
        k *= np.float32(w)
        s = (q[0, 0, :256] @ k[0, 0].T) / np.sqrt(40)
        below = float(np.mean((s - s.max(axis=-1, keepdims=True)) < -87))
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        times = {"refldm, clamp": [], "refldm, no clamp": [], "torch": []}
        outs = {}
        for _ in range(rounds):
            for name in times:
                t = time.thread_time_ns()
                if name == "torch":
                    with torch.no_grad():
                        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
                else:
                    kernels.EXP_CLAMP = name == "refldm, clamp"
                    outs[name] = ops.scaled_dot_product_attention(q, k, v)
                times[name].append((time.thread_time_ns() - t) / 1e6)
        kernels.EXP_CLAMP = None
        same = np.array_equal(outs["refldm, clamp"], outs["refldm, no clamp"])
        print(f"\nattention (2, 8, 4096, 40), q, k ~ N(0, {w}^2): {below:.1%} of the shifted scores below -87; "
              f"clamped and unclamped outputs bit-identical: {same}; ms per call, one thread (median of {rounds})")
        for name, ts in times.items():
            print(f"  {name:18s} {statistics.median(ts):8.1f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--chunks", default="8192,16384,32768,131072")
    p.add_argument("--attention", default="", help="comma-separated widths: time the attention op instead")
    args = p.parse_args(argv)
    if args.attention:
        attention(args.rounds, [float(w) for w in args.attention.split(",")])
        return
    from numpy.lib.introspect import opt_func_info
    target = opt_func_info(func_name="exp$", signature="float32")["exp"]["ff"]["current"]
    rng = np.random.default_rng(0)
    blocks = {"shifted [-30, 0]": -30 * rng.random((128, 4096), dtype=np.float32),
              "shift-free [-29, 29]": 58 * rng.random((128, 4096), dtype=np.float32) - 29,
              "shifted [-120, 0] (some values underflow)": -120 * rng.random((128, 4096), dtype=np.float32)}
    chunks = [int(c) for c in args.chunks.split(",")]
    cands = {"np.exp": lambda x: np.exp(x, out=x), "clamp at -87 (scalar), np.exp": clamp_exp,
             "clamp at -87 (a row), np.exp": clamp_row_exp}
    for c in chunks:
        cands[f"poly, {c} at a time"] = (lambda c: lambda x: exp_poly_into(x, chunk=c))(c)
    cands["np.exp2(x log2 e)"] = exp2_numpy
    cands["exp2 + ldexp, 16384 at a time"] = lambda x: exp2_ldexp(x, 16384)
    print(f"NumPy {np.__version__}, float32 exp dispatch target {target}; "
          f"NPY_DISABLE_CPU_FEATURES={os.environ.get('NPY_DISABLE_CPU_FEATURES', '')!r}; load average "
          f"{os.getloadavg()[0]:.1f}; {args.rounds} rounds, thread CPU time")
    for label, block in blocks.items():
        exact = np.exp(block.astype(np.float64))
        times = {k: [] for k in cands}
        errs = {}
        work = np.empty_like(block)
        for _ in range(args.rounds):
            for name, fn in cands.items():
                np.copyto(work, block)
                t = time.thread_time_ns()
                fn(work)
                times[name].append((time.thread_time_ns() - t) / block.size)
                errs[name] = float(np.max(np.abs(work - exact)) / np.max(np.abs(exact)))
        base = statistics.median(times["np.exp"])
        print(f"\n{label}: ns per value (median), ratio to np.exp, max error / max|exp|")
        for name in cands:
            med = statistics.median(times[name])
            print(f"  {name:34s} {med:6.3f} ns  {med / base:5.2f}x  {errs[name]:.2e}")


if __name__ == "__main__":
    main()
