"""Benchmark: decode a (1, 4, 64, 64) latent to a 512x512 image with the SD 1.x VAE, refldm vs diffusers.

Both run on the CPU, float32, with the same random weights (diffusers builds them; refldm loads the
saved folder) and the same number of threads. Each side runs in its own subprocess, so the peak memory
of one does not hide in the other's: peak resident memory is read from /proc/self/status (VmHWM),
reset after loading the model (``/proc/self/clear_refs``), so "decode peak" is the most memory the
process held during one decode. The runs alternate (torch, refldm, torch, refldm, ...) so that load
from other processes on the machine falls on both alike; the median of each side is reported, and
the two outputs are compared (relative error max|a - b| / max|b|).

    python tools/bench_vae.py                      # SD 1.x VAE, 64x64 latent, 3 rounds
    python tools/bench_vae.py --latent 32 --rounds 1
    python tools/bench_vae.py --model path/to/vae  # real weights instead of random ones
    python tools/bench_vae.py --write-docs         # also update "## VAE decode" in docs/performance.md
    python tools/bench_vae.py --profile            # refldm only: time per op (cProfile)
    python tools/bench_vae.py --coretype SkylakeX  # refldm with OpenBLAS's AVX-512 kernels (see below)

OpenBLAS (NumPy's BLAS) picks its matrix kernels from the CPU it detects at load time; on CPUs it
does not recognise (virtual machines reporting a generic "AMD EPYC", for one) it falls back to its
AVX2 "Haswell" kernels even when the CPU has AVX-512, which halves the speed of every matrix product.
``--coretype`` sets OPENBLAS_CORETYPE for the refldm process (never set a type the CPU cannot run:
SkylakeX needs avx512f/bw/dq/vl/cd in /proc/cpuinfo). The kernel in use is reported when threadpoolctl
is installed.

Needs torch and diffusers (the crosscheck extra); refldm itself never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout: import this refldm
SD1_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
               norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_random_vae(folder: str, seed: int = 0) -> None:
    """Build diffusers' SD 1.x VAE with random weights (every parameter re-drawn) and save it."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**SD1_VAE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    model.save_pretrained(folder)


def worker(side: str, folder: str, latent: int, repeat: int, out: str | None, threads: int) -> dict:
    """Load the VAE on one side, decode `repeat` times; return times and memory."""
    import numpy as np

    z = np.random.default_rng(1).standard_normal((1, 4, latent, latent)).astype(np.float32)
    if side == "torch":
        import torch
        from diffusers import AutoencoderKL

        torch.set_num_threads(threads)
        model = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
        zt = torch.from_numpy(z)

        def decode():
            with torch.no_grad():
                return model.decode(zt).sample.numpy()
    else:
        from refldm.models.vae import AutoencoderKL

        model = AutoencoderKL.from_pretrained(folder, dtype="float32")

        def decode():
            return model.decode(z)

    rss_loaded = _status("VmRSS")
    blas = _blas_kernel()
    reset = _reset_peak()
    times, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        y = decode()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = _status("VmHWM")
    if out:
        np.save(out, np.asarray(y))
    return {"side": side, "times": times, "cpu": cpu, "rss_loaded": rss_loaded, "peak": peak, "peak_reset": reset,
            "blas": blas}


def _blas_kernel() -> str:
    """The BLAS library and kernel NumPy uses here: OpenBLAS's version and core name, asked through the
    library NumPy loaded (as bench_all does), or threadpoolctl's report where that is installed."""
    from bench_all import _openblas_from_numpy
    found = _openblas_from_numpy()
    if found != "unknown":
        return f"OpenBLAS {found} kernels"
    try:
        import threadpoolctl
    except ImportError:
        return "unknown"
    for info in threadpoolctl.threadpool_info():
        if info.get("user_api") == "blas":
            return f"{info.get('internal_api')} {info.get('version')} ({info.get('architecture')} kernels)"
    return "unknown"


def profile(folder: str, latent: int) -> None:
    import cProfile
    import pstats

    import numpy as np

    from refldm.models.vae import AutoencoderKL

    model = AutoencoderKL.from_pretrained(folder, dtype="float32")
    z = np.random.default_rng(1).standard_normal((1, 4, latent, latent)).astype(np.float32)
    prof = cProfile.Profile()
    prof.runcall(model.decode, z)
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def _run(side, folder, latent, repeat, out, threads, coretype=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if coretype and side == "refldm":
        env["OPENBLAS_CORETYPE"] = coretype
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model", folder,
           "--latent", str(latent), "--repeat", str(repeat), "--threads", str(threads)]
    if out:
        cmd += ["--out", out]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{side} worker failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mb(n):
    return f"{n / 2**20:,.0f} MiB"


BEGIN = "<!-- bench_vae: the table below is rewritten by `python tools/bench_vae.py --write-docs` -->"
END = "<!-- bench_vae: end -->"


def write_docs(table: str, section: str) -> None:
    """Put the new table between the markers of "## VAE decode" in docs/performance.md (the prose
    around it stays); without the markers, append the whole generated section."""
    path = os.path.join(ROOT, "docs", "performance.md")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else \
        "# Performance\n\nMeasured speed and memory of refldm against PyTorch on the CPU.\n"
    begin, end = old.find(BEGIN), old.find(END)
    if 0 <= begin < end:
        new = old[:begin] + BEGIN + "\n" + table.strip("\n") + "\n" + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + section.strip("\n") + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a VAE folder (default: random SD 1.x VAE weights made by diffusers)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 -> a 512x512 image)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (each side once per round)")
    ap.add_argument("--repeat", type=int, default=1, help="decodes per worker process")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    ap.add_argument("--profile", action="store_true", help="profile refldm's decode by function")
    ap.add_argument("--coretype", help="OPENBLAS_CORETYPE for the refldm process, e.g. SkylakeX")
    ap.add_argument("--worker", choices=["torch", "refldm"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.latent, args.repeat, args.out, args.threads)))
        return
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = os.path.join(tmp, "vae")
            make_random_vae(folder)
        if args.profile:
            profile(folder, args.latent)
            return
        results = {"torch": [], "refldm": []}
        for r in range(args.rounds):
            for side in ("torch", "refldm"):
                out = os.path.join(tmp, f"{side}.npy") if r == 0 else None
                res = _run(side, folder, args.latent, args.repeat, out, args.threads, args.coretype)
                results[side].append(res)
                print(f"round {r + 1}: {side:6s} {min(res['times']):7.2f} s (CPU {min(res['cpu']):.2f} s)   decode peak {_mb(res['peak'])}"
                      f" (after load {_mb(res['rss_loaded'])})", flush=True)
        a, b = np.load(os.path.join(tmp, "refldm.npy")), np.load(os.path.join(tmp, "torch.npy"))
        rel = float(np.abs(a - b).max() / np.abs(b).max())

    def summary(side):
        times = [min(r["times"]) for r in results[side]]
        cpu = [min(r["cpu"]) for r in results[side]]
        peak = max(r["peak"] for r in results[side])
        loaded = max(r["rss_loaded"] for r in results[side])
        return statistics.median(times), min(times), statistics.median(cpu), peak, loaded

    tt, tmin, tcpu, tpeak, tload = summary("torch")
    rt, rmin, rcpu, rpeak, rload = summary("refldm")
    import torch

    size = args.latent * 8
    intro = [
        "## VAE decode",
        "",
        f"Decoding one (1, 4, {args.latent}, {args.latent}) latent to a {size}x{size} image with the SD 1.x "
        "VAE config (83.65M parameters, random weights), float32, CPU, "
        f"{args.threads} threads, measured by [`tools/bench_vae.py`](../tools/bench_vae.py) "
        f"({args.rounds} alternating rounds, median; each side in its own process).",
        "",
    ]
    table = [
        "| | time (median) | time (best) | CPU time (median) | peak RSS during decode | RSS after loading |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| diffusers {_diffusers_version()} / torch {torch.__version__} | {tt:.2f} s | {tmin:.2f} s | {tcpu:.2f} s | "
        f"{_mb(tpeak)} | {_mb(tload)} |",
        f"| refldm (NumPy {np.__version__}, {results['refldm'][0]['blas']}) | {rt:.2f} s | {rmin:.2f} s | "
        f"{rcpu:.2f} s | {_mb(rpeak)} | {_mb(rload)} |",
        "",
        f"refldm / torch: **{rt / tt:.2f}x** in time, {rcpu / tcpu:.2f}x in CPU time (issue 32: <= 0.85x). "
        f"Outputs agree to relative error {rel:.1e}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; measured {time.strftime('%Y-%m-%d')}.",
    ]
    text = "\n".join(intro + table)
    print("\n" + text)
    if args.write_docs:
        write_docs("\n".join(table), text)


def _diffusers_version():
    import diffusers
    return diffusers.__version__


if __name__ == "__main__":
    main()
