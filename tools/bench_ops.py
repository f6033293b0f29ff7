"""Time refldm's ops against torch (CPU) on the shapes Stable Diffusion 1.x uses at 512x512.

    python tools/bench_ops.py                     # every case, 7 interleaved runs each
    python tools/bench_ops.py --cases conv3x3 attention --runs 11
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench_ops.py   # OpenBLAS picks its own kernel
    python tools/bench_ops.py --threads 1         # one thread each, timed by the thread's CPU clock

Not a test: the figures depend on the machine. Each case runs refldm and torch alternately (one
warm-up each, then `--runs` pairs), so a change in load hits both; the table gives both medians and
the median of the per-pair ratios refldm / torch. The header names the CPU, the BLAS library and
the kernel it runs (via threadpoolctl when installed), and the thread counts.

--threads 1 runs both on one thread (torch.set_num_threads(1); refldm's pool and the BLAS held to
one thread) and times with the thread's CPU clock (time.thread_time), which a busy machine barely
disturbs: a fair per-core comparison when a quiet machine is not to be had. Results go to stdout
as a Markdown table for docs/performance.md; --json FILE also writes them as JSON.
Needs torch (pip install 'refldm[crosscheck]').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm import accel  # noqa: E402
from refldm.core import functional  # noqa: E402  (the ops as the models call them)


def machine() -> dict:
    """What ran the benchmark: CPU, cores, library versions, BLAS kernel and threads."""
    info = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    info["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["refldm_threads"] = accel.num_threads()
    info["blas_threads_controllable"] = accel.blas_threads_controllable()
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                              "OMP_NUM_THREADS", "REFLDM_NUM_THREADS") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                               "threading_layer")} for p in threadpool_info()
                        if p.get("user_api") == "blas"]
    except ImportError:
        info["blas"] = "threadpoolctl not installed (pip install threadpoolctl to name the kernel)"
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def cases(torch, dtype=np.float32):
    """name -> (description, refldm callable, torch callable); inputs built once, shared by both."""
    F = torch.nn.functional
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def both(*arrays):
        return arrays, tuple(torch.from_numpy(a) for a in arrays)

    out = {}
    (x, w, b), (tx, tw, tb) = both(arr(2, 320, 64, 64), arr(320, 320, 3, 3, scale=0.02), arr(320))
    out["conv3x3"] = ("conv2d 3x3, N=2, 320->320, 64x64, pad 1",
                      lambda: functional.conv2d(x, w, b, padding=1), lambda: F.conv2d(tx, tw, tb, padding=1))
    (w1,), (tw1,) = both(arr(320, 320, 1, 1, scale=0.05))
    out["conv1x1"] = ("conv2d 1x1, N=2, 320->320, 64x64",
                      lambda: functional.conv2d(x, w1, b), lambda: F.conv2d(tx, tw1, tb))
    (xs, ws, bs), (txs, tws, tbs) = both(arr(2, 320, 64, 64), arr(320, 320, 3, 3, scale=0.02), arr(320))
    out["conv3x3_s2"] = ("conv2d 3x3 stride 2, N=2, 320->320, 64x64 -> 32x32, pad 1",
                         lambda: functional.conv2d(xs, ws, bs, stride=2, padding=1),
                         lambda: F.conv2d(txs, tws, tbs, stride=2, padding=1))
    (q, k, v), (tq, tk, tv) = both(arr(2, 8, 4096, 40), arr(2, 8, 4096, 40), arr(2, 8, 4096, 40))
    out["attention"] = ("attention, B=2, 8 heads, 4096 queries and keys, head size 40",
                        lambda: functional.scaled_dot_product_attention(q, k, v),
                        lambda: F.scaled_dot_product_attention(tq, tk, tv))
    (kc, vc), (tkc, tvc) = both(arr(2, 8, 77, 40), arr(2, 8, 77, 40))
    out["cross_attention"] = ("cross-attention, B=2, 8 heads, 4096 queries, 77 keys, head size 40",
                              lambda: functional.scaled_dot_product_attention(q, kc, vc),
                              lambda: F.scaled_dot_product_attention(tq, tkc, tvc))
    (g, gb), (tg, tgb) = both(arr(320), arr(320))
    out["group_norm"] = ("group_norm, 32 groups, (2, 320, 64, 64)",
                         lambda: functional.group_norm(x, 32, g, gb, eps=1e-5),
                         lambda: F.group_norm(tx, 32, tg, tgb, eps=1e-5))
    (x2, g2, b2), (tx2, tg2, tb2) = both(arr(2, 1280, 16, 16), arr(1280), arr(1280))
    out["group_norm_1280"] = ("group_norm, 32 groups, (2, 1280, 16, 16)",
                              lambda: functional.group_norm(x2, 32, g2, b2), lambda: F.group_norm(tx2, 32, tg2, tb2))
    (t,), (tt,) = both(arr(2, 4096, 320))
    out["layer_norm"] = ("layer_norm, (2, 4096, 320)",
                         lambda: functional.layer_norm(t, g, gb), lambda: F.layer_norm(tt, (320,), tg, tgb))
    out["silu"] = ("silu, (2, 320, 64, 64)", lambda: functional.silu(x), lambda: F.silu(tx))
    (h,), (th,) = both(arr(2, 4096, 1280))
    out["gelu"] = ("gelu (erf), (2, 4096, 1280)", lambda: functional.gelu(h), lambda: F.gelu(th))
    out["gelu_tanh"] = ("gelu (tanh), (2, 4096, 1280)", lambda: functional.gelu(h, approximate="tanh"),
                        lambda: F.gelu(th, approximate="tanh"))
    (wg, bg), (twg, tbg) = both(arr(2560, 320, scale=0.05), arr(2560))

    def torch_geglu():
        hh, gg = F.linear(tt, twg, tbg).chunk(2, dim=-1)
        return hh * F.gelu(gg)

    out["geglu"] = ("geglu, x (2, 4096, 320), W (2560, 320) (the U-Net feed-forward's first layer)",
                    lambda: functional.geglu(t, wg, bg), torch_geglu)
    out["softmax"] = ("softmax over the last axis, (2, 4096, 1280)", lambda: functional.softmax(h),
                      lambda: F.softmax(th, dim=-1))
    out["upsample"] = ("upsample_nearest2x, (2, 1280, 16, 16)", lambda: functional.upsample_nearest2x(x2),
                       lambda: F.interpolate(tx2, scale_factor=2.0, mode="nearest"))
    return out


def run_case(ours, theirs, runs: int, clock=time.perf_counter):
    """One warm-up each, then `runs` alternating pairs; returns the times (s) and per-pair ratios."""
    ours()
    theirs()
    t_ours, t_theirs = [], []
    for _ in range(runs):
        start = clock()
        theirs()
        t_theirs.append(clock() - start)
        start = clock()
        ours()
        t_ours.append(clock() - start)
    ratios = [a / b for a, b in zip(t_ours, t_theirs)]
    return t_ours, t_theirs, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--runs", type=int, default=7, help="timed pairs per case (default 7)")
    parser.add_argument("--threads", type=int, help="threads for both (default: torch's and refldm's own)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench_ops.py needs torch: pip install 'refldm[crosscheck]'")
    clock = time.perf_counter
    blas_limit = None
    if args.threads:
        torch.set_num_threads(args.threads)
        accel.set_num_threads(args.threads)
        if args.threads == 1:
            blas_limit = accel.single_threaded_blas()
            blas_limit.__enter__()
            clock = time.thread_time
    info = machine()
    info["clock"] = clock.__name__
    print("machine:", json.dumps(info, indent=1))
    table = cases(torch)
    names = args.cases or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    results = []
    print("\n| case | refldm (ms) | torch (ms) | refldm / torch |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for name in names:
            desc, ours, theirs = table[name]
            t_ours, t_theirs, ratios = run_case(ours, theirs, args.runs, clock)
            row = {"case": name, "what": desc, "refldm_ms": 1e3 * statistics.median(t_ours),
                   "torch_ms": 1e3 * statistics.median(t_theirs), "ratio": statistics.median(ratios),
                   "runs": args.runs}
            results.append(row)
            print(f"| {desc} | {row['refldm_ms']:.1f} | {row['torch_ms']:.1f} | {row['ratio']:.2f} |",
                  flush=True)
    if blas_limit is not None:
        blas_limit.__exit__(None, None, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
