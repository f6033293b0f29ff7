"""refldm against torch with and without a busy neighbour: does refldm's wall time suffer more than torch's?

Issue 32: with other processes busy on the machine, refldm's wall time rose far more than torch's.
This tool times, in one process, a few of the U-Net's operations at SD 1.x shapes (batch 2), refldm
(2 threads: the pool) and torch (2 threads), alternating, first as the machine is, then with a busy
neighbour: a second process running float32 matrix products on --neighbour-threads threads (a BLAS
job, like the test suites and benchmarks of the issue's rounds). It prints, per case, the median
wall time of each side in both states, and the ratio refldm/torch in both; the target is that the
loaded ratio stays within 10% of the unloaded one.

    python tools/bench_load.py                         # the U-Net's cases, 7 rounds per state
    python tools/bench_load.py --min-blocks 2,4,8      # and refldm's product blocking (kernels.PRODUCT_MIN_BLOCKS)
    python tools/bench_load.py --spin 0,0.002          # and the pool's helpers looking for work 2 ms before
                                                       # they sleep (threads.SPIN_SECONDS)
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench_load.py    # OpenBLAS's own kernels

Never part of the tests. The machine's own load (load average) is printed with each state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from refldm import accel  # noqa: E402
from refldm.accel import kernels, threads  # noqa: E402
from refldm.core import functional as ops  # noqa: E402  (the ops as models call them: the speed layer)

NEIGHBOUR = r"""
import os, sys, numpy as np
a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
b = a.copy()
while True:
    a = (a @ b) * np.float32(1e-3)
"""


def cases(torch, rng):
    F = torch.nn.functional

    def pair(fn_ours, fn_theirs, *arrays):
        ts = [torch.from_numpy(a) for a in arrays]
        return (lambda: fn_ours(*arrays)), (lambda: fn_theirs(*ts))

    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    out = {}
    out["linear 512x1280 @ 1280x1280 (16x16 level)"] = pair(ops.linear, F.linear, f(2, 256, 1280),
                                                             f(1280, 1280) / 36, f(1280))
    out["linear 512x640 @ 640x640"] = pair(ops.linear, F.linear, f(2, 256, 640), f(640, 640) / 25, f(640))
    out["conv 1x1 1280->1280 at 16x16"] = pair(ops.conv2d, F.conv2d, f(2, 1280, 16, 16), f(1280, 1280, 1, 1) / 36,
                                               f(1280))
    out["linear 8192x320 @ 320x1280 (64x64 level)"] = pair(ops.linear, F.linear, f(2, 4096, 320), f(1280, 320) / 18,
                                                           f(1280))
    out["conv 3x3 640->640 at 32x32"] = pair(lambda x, w, b: ops.conv2d(x, w, b, padding=1),
                                             lambda x, w, b: F.conv2d(x, w, b, padding=1),
                                             f(2, 640, 32, 32), f(640, 640, 3, 3) / 76, f(640))
    out["conv 3x3 1280->1280 at 16x16"] = pair(lambda x, w, b: ops.conv2d(x, w, b, padding=1),
                                               lambda x, w, b: F.conv2d(x, w, b, padding=1),
                                               f(2, 1280, 16, 16), f(1280, 1280, 3, 3) / 107, f(1280))
    out["attention (2, 8, 4096, 40)"] = pair(ops.scaled_dot_product_attention, F.scaled_dot_product_attention,
                                             f(2, 8, 4096, 40), f(2, 8, 4096, 40), f(2, 8, 4096, 40))
    return out


PAUSE = 0.3  # seconds between two timed calls: torch's OpenMP threads spin for a while after a parallel
# region, and would otherwise take cores from whatever runs next in this process


def sides(blocks_list, spins):
    """refldm's variants: (label, min blocks, spin seconds)."""
    return [(f"refldm (min blocks {b}, spin {s * 1e3:g} ms)", b, s) for b in blocks_list for s in spins]


def run_state(name, table, rounds, blocks_list, spins, torch):
    """Every round runs each case's variants in a rotated order, so that no side always runs first."""
    rows = {}
    for r in range(rounds):
        for label, (ours, theirs) in table.items():
            variants = [(side, ours, (b, s)) for side, b, s in sides(blocks_list, spins)] + [("torch", theirs, None)]
            shift = r % len(variants)
            for side, fn, setting in variants[shift:] + variants[:shift]:
                if setting is not None:
                    kernels.PRODUCT_MIN_BLOCKS, threads.SPIN_SECONDS = setting
                time.sleep(PAUSE)
                with torch.no_grad():
                    t = time.perf_counter()
                    fn()
                rows.setdefault((label, side), []).append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in rows.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--neighbour-threads", type=int, default=2)
    p.add_argument("--min-blocks", default="2")
    p.add_argument("--spin", default="0", help="comma-separated threads.SPIN_SECONDS values for refldm")
    p.add_argument("--cases", default="", help="comma-separated substrings selecting the cases (default: all)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    accel.set_num_threads(args.threads)
    blocks_list = [int(b) for b in args.min_blocks.split(",")]
    spins = [float(s) for s in args.spin.split(",")]
    table = cases(torch, np.random.default_rng(0))
    if args.cases:
        table = {k: v for k, v in table.items() if any(c in k for c in args.cases.split(","))}
    for ours, theirs in table.values():  # warm up
        ours()
        with torch.no_grad():
            theirs()
    results = {}
    load = {}
    load["as is"] = os.getloadavg()[0]
    results["as is"] = run_state("as is", table, args.rounds, blocks_list, spins, torch)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.neighbour_threads), OMP_NUM_THREADS=str(args.neighbour_threads))
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)
    try:
        time.sleep(2)
        load["busy neighbour"] = os.getloadavg()[0]
        results["busy neighbour"] = run_state("busy neighbour", table, args.rounds, blocks_list, spins, torch)
    finally:
        neighbour.terminate()
        neighbour.wait()
    print(f"{args.threads} threads each, {args.rounds} alternating rounds per state, medians of wall time; "
          f"neighbour: a {args.neighbour_threads}-thread float32 matmul loop; load average at the start of each "
          f"state: {', '.join(f'{k} {v:.1f}' for k, v in load.items())}")
    print("| case | side | as is (ms) | busy neighbour (ms) | slowdown | ratio to torch, as is | ratio, busy | change |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in table:
        for side in [label for label, _, _ in sides(blocks_list, spins)] + ["torch"]:
            a, b = results["as is"][(label, side)], results["busy neighbour"][(label, side)]
            if side == "torch":
                print(f"| {label} | torch | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | | | |")
                continue
            ta, tb = results["as is"][(label, "torch")], results["busy neighbour"][(label, "torch")]
            print(f"| {label} | {side} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | {a / ta:.2f} | {b / tb:.2f} | "
                  f"{(b / tb) / (a / ta):.2f}x |")


if __name__ == "__main__":
    main()
