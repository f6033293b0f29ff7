"""Benchmark one MMDiT step of Stable Diffusion 3: refldm (speed layer on, and the reference path) against
diffusers' SD3Transformer2DModel (PyTorch) on the CPU, in the same run.

The case is SD3-medium's at 1024x1024: latents (2, 16, 128, 128) -> patches of 2 -> 4096 image tokens, 333
text tokens (77 CLIP + 256 T5) of 4096, pooled text (2, 2048), batch 2 (the guidance pair), float32, random
weights (24 joint blocks of width 1536: 2,028,328,000 parameters, 8.1 GB in float32).

Each side runs in its own worker process, one after another (two copies of the weights would not fit beside
the other jobs of a small machine): torch, refldm (speed layer), refldm's reference ops (REFLDM_ACCEL=0), and
again for --rounds rounds, so a machine whose speed drifts affects every side alike. Every worker draws the
same weights from the same seed (NumPy's PCG64 in the key order of refldm's model: N(0, 1/fan_in) for
matrices, 1 + 0.1 N for norm scales, 0.1 N for the rest); torch's model holds them without a copy
(torch.from_numpy, load_state_dict(assign=True)). Before the timed call each side warms up on a small latent.
The outputs are compared with torch's (relative error max|a - b| / max|b|).

    nice -n 10 python tools/bench_sd3.py                     # full size, one round (~25 GB-minutes: rarely)
    python tools/bench_sd3.py --scale 8 --rounds 3           # 1/8 of the width (heads), same token counts
    python tools/bench_sd3.py --scale 4 --layers 4 --profile # and where refldm's time goes, per op
    python tools/bench_sd3.py --sides torch,refldm           # leave the reference path out

FLOPs are counted by refldm.analysis.cost.count_sd3 (the count torch's FlopCounterMode gives, tests/test_cost.py),
so GFLOP/s is that count over each run's wall time. Peak memory is each worker's peak resident set (VmHWM),
weights included. On a shared machine the wall time is inflated by other jobs: the load average is printed
with every round. Needs the crosscheck extra (torch, diffusers). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SIDES = ("torch", "refldm", "reference")


def sd3_config(scale: int = 1, layers: int | None = None) -> dict:
    """SD3-medium's transformer config with the heads (so the width), the text width and the pooled width
    divided by `scale`, and `layers` joint blocks (default 24); the token counts stay."""
    cfg = dict(SD3_MEDIUM)
    heads = max(1, 24 // scale)
    cfg.update(num_attention_heads=heads, caption_projection_dim=heads * 64,
               joint_attention_dim=max(8, 4096 // scale), pooled_projection_dim=max(8, 2048 // scale))
    if layers:
        cfg["num_layers"] = layers
    return cfg


def random_weights(model, seed: int) -> dict:
    """{key: float32 array} for every key of the refldm `model`, in its declaration order (module docstring)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, _, _, value in model.params():
        shape = tuple(value.shape)
        if len(shape) >= 2:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(float(np.prod(shape[1:]))))
        elif "norm" in key and key.endswith("weight"):
            w = 1 + np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)
        else:
            w = np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)
        out[key] = w
    return out


def inputs(cfg: dict, latent: int, tokens: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg["in_channels"], latent, latent), dtype=np.float32)
    c = rng.standard_normal((batch, tokens, cfg["joint_attention_dim"]), dtype=np.float32)
    y = rng.standard_normal((batch, cfg["pooled_projection_dim"]), dtype=np.float32)
    t = np.full(batch, 500.0, dtype=np.float32)
    return x, c, y, t


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(side: str, cfg: dict, latent: int, tokens: int, batch: int, threads: int, out_path: str,
           profile: bool) -> dict:
    """One side in this process: the weights, a warm-up on a small latent, one timed step; its output saved."""
    from refldm import accel
    from refldm.models.sd3_transformer import SD3Transformer2DModel
    accel.set_num_threads(threads)
    ours = SD3Transformer2DModel.from_config(cfg)
    t0 = time.perf_counter()
    state = random_weights(ours, seed=0)
    build = time.perf_counter() - t0
    x, c, y, t = inputs(cfg, latent, tokens, batch)
    small = inputs(cfg, 2 * cfg["patch_size"], 8, batch)
    if side == "torch":
        import diffusers
        import torch
        torch.set_num_threads(threads)
        with torch.device("meta"):
            model = diffusers.SD3Transformer2DModel(**cfg)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True, assign=True)
        model.eval()
        del state

        def run(args):
            with torch.no_grad():
                return model(torch.from_numpy(args[0]), torch.from_numpy(args[1]), torch.from_numpy(args[2]),
                             torch.from_numpy(args[3])).sample.numpy()
        timer = None
    else:
        ours.load_state_dict(state, dtype="float32", source="random weights")
        del state

        def run(args):
            return np.asarray(ours(*args))
        timer = None
        if profile:
            from tools.bench_unet import OpTimer
            timer = OpTimer()
    run(small)                                                   # warm-up (kernels, thread pools)
    if timer is not None:
        timer.__enter__()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run((x, c, y, t))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if timer is not None:
        timer.__exit__(None, None, None)
        timer.report(cpu, 1)
    np.save(out_path, out)
    return {"side": side, "wall": wall, "cpu": cpu, "build": build, "peak_rss_mb": _peak_rss_mb(),
            "accel": accel.is_enabled(), "threads": threads, "load_average": os.getloadavg()[0]}


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=1, help="divide the heads (width), text and pooled widths by this")
    p.add_argument("--layers", type=int, default=None, help="joint blocks (default 24, SD3-medium's)")
    p.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024x1024 images)")
    p.add_argument("--tokens", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="rounds of torch, refldm, reference (one process each)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"which of {', '.join(SIDES)}, in this order")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--profile", action="store_true", help="print refldm's time per op (in its worker)")
    p.add_argument("--force", action="store_true", help="run even when MemAvailable looks too small")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = sd3_config(args.scale, args.layers)
    if args.worker:
        r = worker(args.worker, cfg, args.latent, args.tokens, args.batch, args.threads, args.out, args.profile)
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    from refldm.analysis.cost import count_sd3
    from refldm.models.sd3_transformer import SD3Transformer2DModel
    n = SD3Transformer2DModel.from_config(cfg).num_parameters(include_buffers=True)
    flops = count_sd3(cfg, args.latent, args.latent, batch=args.batch, text_tokens=args.tokens).flops
    need = n * 4 / 2**30 * 1.25 + 2.0       # the weights and about a quarter more for activations, plus Python
    image_tokens = (args.latent // cfg["patch_size"]) ** 2
    print(f"SD3 MMDiT step, float32: {cfg['num_layers']} joint blocks, width {cfg['caption_projection_dim']}, "
          f"{n:,} parameters ({n * 4 / 2**30:.1f} GiB); latents ({args.batch}, 16, {args.latent}, {args.latent}) "
          f"-> {image_tokens} image tokens + {args.tokens} text tokens; {flops / 1e12:.2f} TFLOP per step; "
          f"{args.threads} threads; MemAvailable {mem_available_gb():.1f} GiB (need about {need:.1f}); load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    if mem_available_gb() < need and not args.force:
        print(f"bench_sd3: not enough free memory for one side ({mem_available_gb():.1f} GiB < {need:.1f}); "
              "use --scale, or --force", file=sys.stderr)
        return 2
    sides = args.sides.split(",")
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise SystemExit(f"bench_sd3: unknown side {bad[0]!r}; choose from {', '.join(SIDES)}")
    results = {s: [] for s in sides}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            line = []
            for side in sides:
                path = os.path.join(tmp, f"{side}.npy")
                env = dict(os.environ)
                env["REFLDM_ACCEL"] = "0" if side == "reference" else env.get("REFLDM_ACCEL", "1")
                argv_w = [sys.executable, os.path.abspath(__file__), "--worker", side, "--out", path,
                          "--scale", str(args.scale), "--latent", str(args.latent), "--tokens", str(args.tokens),
                          "--batch", str(args.batch), "--threads", str(args.threads)]
                if args.layers:
                    argv_w += ["--layers", str(args.layers)]
                if args.profile and side == "refldm" and r == 0:
                    argv_w.append("--profile")
                run = subprocess.run(argv_w, capture_output=True, text=True, cwd=ROOT, env=env)
                found = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
                if run.returncode or not found:
                    tail = (run.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"round {r + 1}: {side} failed: {tail}", flush=True)
                    continue
                prof = [x for x in run.stdout.splitlines() if not x.startswith("RESULT ")]
                if prof:
                    print("\n".join(prof), flush=True)
                res = json.loads(found[0][7:])
                results[side].append(res)
                if r == 0:
                    outputs[side] = np.load(path)
                line.append(f"{side} {res['wall']:.2f} s (CPU {res['cpu']:.1f} s, peak RSS "
                            f"{res['peak_rss_mb'] / 1024:.1f} GiB, load {res['load_average']:.1f})")
            print(f"round {r + 1}: " + "; ".join(line), flush=True)
    if "torch" in outputs:
        ref = outputs["torch"]
        for side, out in outputs.items():
            if side != "torch":
                err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
                print(f"{side} vs torch: relative error {err:.2e}")
    print("\n| implementation | median step (s) | fastest (s) | GFLOP/s (median) | CPU-s (median) | peak RSS (GiB) | "
          "rounds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    for side, rs in results.items():
        if not rs:
            continue
        walls = [x["wall"] for x in rs]
        med[side] = statistics.median(walls)
        print(f"| {'refldm, reference ops (REFLDM_ACCEL=0)' if side == 'reference' else side} | {med[side]:.2f} | "
              f"{min(walls):.2f} | {flops / med[side] / 1e9:.0f} | {statistics.median(x['cpu'] for x in rs):.1f} | "
              f"{max(x['peak_rss_mb'] for x in rs) / 1024:.1f} | {len(rs)} |")
    if "torch" in med:
        for side in ("refldm", "reference"):
            if side in med:
                per = [a["wall"] / b["wall"] for a, b in zip(results[side], results["torch"])]
                print(f"\n{side} / torch: {med[side] / med['torch']:.2f}x (median against median; per round "
                      f"{', '.join(f'{x:.2f}' for x in per)})")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
