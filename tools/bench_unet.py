"""Benchmark one U-Net step, refldm against diffusers (PyTorch) on the CPU, in the same run.

The case is Stable Diffusion's: the SD 1.x U-Net (859,520,964 parameters, random weights), float32,
64x64 latents (512x512 images), batch 2 (the classifier-free-guidance pair), 77 text tokens of 768.
Both models share one set of weights: refldm's arrays are views of the torch tensors' memory.

    python tools/bench_unet.py                  # torch, then refldm: time, GFLOP/s, peak memory
    python tools/bench_unet.py --profile        # and where refldm's time goes, per op
    python tools/bench_unet.py --skip-torch --latent 32
    python tools/bench_unet.py --rounds 4           # torch and refldm alternating, 4 times each

FLOPs are counted by torch.utils.flop_counter on the diffusers forward (matrix products, convolutions
and attention, 2 per multiply-add; elementwise work is not counted), so GFLOP/s is that count over
each run's time.
Peak memory is the rise of the process's peak resident set (VmHWM, reset before each run) over the
resident set before the run: activations and workspace, not the shared weights. On a shared machine
wall time is inflated by other jobs; CPU time (all threads, time.process_time) is the steadier measure.

Needs the crosscheck extra (torch, diffusers). Heavy: ~15 GB-seconds of a shared machine; run it rarely.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm import accel  # noqa: E402
from refldm.core import functional  # noqa: E402
from refldm.models.unet import UNet2DConditionModel  # noqa: E402

SD1 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Rise of the peak resident set during the block, in bytes (Linux: VmHWM, reset via clear_refs)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = (_status_kb("VmHWM") - self.before) * 1024 if self.ok else float("nan")
        return False


def build_torch_unet(seed: int, config: dict = SD1):
    """diffusers' U-Net for `config`, with random weights: N(0, 1/fan_in) for matrices and kernels,
    N(1, 0.1) for norm scales, N(0, 0.1) for the rest (tools/bench_sdxl.py uses it too)."""
    import torch
    import diffusers

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    return model


def _flops(name, args, kwargs, out):
    """Multiply-add FLOPs (2 per multiply-add) of one op call, from its shapes; 0 for elementwise ops."""
    if name == "conv2d":
        w = args[1]
        return 2 * out.size * w.shape[1] * w.shape[2] * w.shape[3]
    if name == "linear":
        return 2 * out.size * args[1].shape[1]
    if name == "geglu":
        return 2 * 2 * out.size * args[1].shape[1]
    if name == "scaled_dot_product_attention":
        q, k, v = args[:3]
        lead = math.prod(q.shape[:-2])
        return 2 * lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


class OpTimer:
    """CPU time and FLOPs per refldm op, counting only the outermost op call (geglu's inner linear
    counts as geglu). Each call is timed by its thread's own CPU clock (time.thread_time), which other
    processes on the machine barely disturb; it covers all of an op's work when BLAS runs on the
    calling thread, as it does inside the U-Net's batch-parallel path and with one thread. GFLOP per
    CPU-second is then an op's efficiency on one core. Each call's wall time and the process's CPU time
    (all threads, the pool's helpers included) are recorded too: their ratio is how many cores the op
    kept busy, and 2 x wall - CPU on two cores is the core time it left idle (serial parts, waiting)."""

    NAMES = ("conv2d", "group_norm", "layer_norm", "linear", "silu", "gelu", "geglu",
             "scaled_dot_product_attention", "split_heads", "merge_heads", "upsample_nearest2x",
             "timestep_embedding")

    def __init__(self):
        self.cpu = collections.Counter()
        self.wall = collections.Counter()
        self.process_cpu = collections.Counter()
        self.flops = collections.Counter()
        self.calls = collections.Counter()
        self.local = threading.local()  # .depth: nesting of op calls on this thread
        self.lock = threading.Lock()
        self.saved = []

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            depth = getattr(self.local, "depth", 0)
            if depth:
                return fn(*args, **kwargs)
            self.local.depth = 1
            c0, w0, p0 = time.thread_time(), time.perf_counter(), time.process_time()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.local.depth = 0
            cpu = time.thread_time() - c0
            with self.lock:
                self.cpu[name] += cpu
                self.wall[name] += time.perf_counter() - w0
                self.process_cpu[name] += time.process_time() - p0
                self.calls[name] += 1
                self.flops[name] += _flops(name, args, kwargs, out)
            return out
        return timed

    def __enter__(self):
        for name in self.NAMES:
            fn = getattr(functional, name)
            self.saved.append((name, fn))
            setattr(functional, name, self._wrap(name, fn))  # blocks.py and unet.py call F.<name>
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved:
            setattr(functional, name, fn)
        return False

    def report(self, cpu: float, runs: int, wall: float | None = None):
        """The table; `cpu` the process's CPU time over the runs, `wall` their wall time (adds the
        wall-clock columns and the row for the time between ops)."""
        print(f"\nrefldm per op (CPU time of the calling threads; {cpu:.2f} CPU-s of the process over "
              f"{runs} run(s)):\n")
        print("| op | calls per step | CPU-s per step | share | GFLOP per step | GFLOP per CPU-s | wall s per step "
              "| cores busy |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, sec in self.cpu.most_common():
            gf = self.flops[name] / 1e9
            eff = f"{gf / sec:.0f}" if gf and sec > 0 else ""
            busy = f"{self.process_cpu[name] / self.wall[name]:.2f}" if self.wall[name] > 0 else ""
            print(f"| {name} | {self.calls[name] // runs} | {sec / runs:.2f} | {100 * sec / cpu:.0f}% | "
                  f"{gf / runs:.0f} | {eff} | {self.wall[name] / runs:.2f} | {busy} |")
        rest = cpu - sum(self.cpu.values())
        print(f"| everything else (proj_in/out products, concatenations, residual adds, waiting, the pool's "
              f"helpers) | | {rest / runs:.2f} | {100 * rest / cpu:.0f}% | | | | |")
        if wall:
            between = wall - sum(self.wall.values())
            between_cpu = cpu - sum(self.process_cpu.values())
            print(f"| between the ops (residual adds, concatenations, reshapes: plain NumPy in the models) | | | | "
                  f"| | {between / runs:.2f} | {between_cpu / max(between, 1e-9):.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (64 = 512x512 images)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each (torch after one warm-up)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="instead of --runs: alternate one torch and one refldm step this many times and "
                             "report each side's fastest and median (a machine whose speed drifts then "
                             "affects both sides alike)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print refldm's time per op")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    model = build_torch_unet(args.seed)
    rng = np.random.default_rng(args.seed)
    sample = rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32)
    context = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)
    t = np.full(args.batch, 981.0, dtype=np.float32)
    ts, tt, tc = torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)
    print(f"SD 1.x U-Net, float32, batch {args.batch}, latents {args.latent}x{args.latent}; "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads, refldm on "
          f"{accel.num_threads()} threads (accel {'on' if accel.is_enabled() else 'off: REFLDM_ACCEL=0, reference ops'}), "
          f"{os.cpu_count()} cores, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, load average "
          f"{os.getloadavg()[0]:.1f}")

    from torch.utils import flop_counter
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        # torch 2.13's counter knows the GPU attention kernels but not the CPU one, and would leave out
        # the 0.25 TFLOP of Q K^T and P V: count it with the same formula
        @flop_counter.register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ref = model(ts, tt, tc).sample.numpy()  # also torch's warm-up
    flops = counter.get_total_flops()
    print(f"FLOPs per step (torch.utils.flop_counter): {flops / 1e12:.3f} TFLOP")

    results = {}
    if args.rounds:
        _alternate(args, model, (ts, tt, tc), (sample, t, context), ref, flops)
        return
    if not args.skip_torch:
        times, cpus = [], []
        for _ in range(args.runs):
            with PeakMemory() as mem, torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                model(ts, tt, tc)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        results["torch"] = (min(times), min(cpus), mem.peak)

    # refldm on the same weights: float32 arrays that are views of the torch tensors. NumPy has nothing
    # to warm up, so the first run is timed (a shared 2-core machine cannot afford spare 10 s runs);
    # the per-op timer costs a few microseconds per op call, so --profile times the same runs.
    unet = UNet2DConditionModel.from_config(dict(model.config))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    unet.load_state_dict(state, dtype="float32", source="torch model")
    times, cpus = [], []
    with OpTimer() if args.profile else _nothing() as timer:
        for _ in range(args.runs):
            with PeakMemory() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                out = unet(sample, t, context)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
    results["refldm"] = (min(times), min(cpus), mem.peak)
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(f"refldm vs torch: relative error {err:.2e}")

    print("\n| implementation | time per step (s) | GFLOP/s | CPU time, all threads (s) | GFLOP per CPU-s "
          "| peak memory above weights (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (sec, cpu, peak) in results.items():
        print(f"| {name} | {sec:.2f} | {flops / sec / 1e9:.0f} | {cpu:.2f} | {flops / cpu / 1e9:.0f} | "
              f"{peak / 2**20:.0f} |")
    if "torch" in results:
        print(f"\nrefldm / torch: {results['refldm'][0] / results['torch'][0]:.2f}x in time, "
              f"{results['refldm'][1] / results['torch'][1]:.2f}x in CPU time")
    if args.profile:
        timer.report(sum(cpus), args.runs, sum(times))


def _alternate(args, model, torch_inputs, inputs, ref, flops, torch_kwargs=None, kwargs=None):
    """--rounds: torch, refldm, torch, refldm, ... on the same weights; min and median per side.
    torch_kwargs / kwargs: keyword inputs of each side's step (SDXL's added conditions)."""
    import statistics

    import torch

    unet = UNet2DConditionModel.from_config(dict(model.config))
    unet.load_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype="float32",
                         source="torch model")
    times = {"torch": [], "refldm": []}
    for r in range(args.rounds):
        for name in ("torch", "refldm"):
            t0 = time.perf_counter()
            if name == "torch":
                with torch.no_grad():
                    model(*torch_inputs, **(torch_kwargs or {}))
            else:
                out = unet(*inputs, **(kwargs or {}))
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: torch {times['torch'][-1]:.2f} s, refldm {times['refldm'][-1]:.2f} s, "
              f"ratio {times['refldm'][-1] / times['torch'][-1]:.2f}, load average {os.getloadavg()[0]:.1f}",
              flush=True)
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(f"refldm vs torch: relative error {err:.2e}")
    print("\n| implementation | fastest step (s) | median step (s) | GFLOP/s (fastest) |")
    print("| --- | ---: | ---: | ---: |")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {statistics.median(ts):.2f} | {flops / min(ts) / 1e9:.0f} |")
    ratios = [b / a for a, b in zip(times["torch"], times["refldm"])]
    print(f"\nrefldm / torch: {min(times['refldm']) / min(times['torch']):.2f}x fastest against fastest, "
          f"{statistics.median(times['refldm']) / statistics.median(times['torch']):.2f}x median against "
          f"median, per round {', '.join(f'{x:.2f}' for x in ratios)}")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
