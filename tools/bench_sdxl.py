"""Benchmark one SDXL base U-Net step, refldm against diffusers (PyTorch) on the CPU, in the same run.

The case of issue 14: the SDXL base U-Net (2,567,463,684 parameters, random weights), float32, latents
(2, 4, 128, 128) (a 1024x1024 image, the classifier-free-guidance pair), text (2, 77, 2048), and the
added embedding (pooled text (2, 1280) + 6 time ids: 2816 wide). Both models share one set of weights:
refldm's arrays are views of the torch tensors' memory (10.3 GB in float32), so the run needs about
11 GB plus activations; it refuses to start when /proc/meminfo's MemAvailable is below --min-free-gb
(default 20) unless --force. Never part of the tests.

    python tools/bench_sdxl.py                       # torch, then refldm: time, GFLOP/s, peak memory
    python tools/bench_sdxl.py --profile             # and where refldm's time goes, per op
    python tools/bench_sdxl.py --rounds 3            # torch and refldm alternating, 3 steps each: medians
    python tools/bench_sdxl.py --scale 8 --latent 32 # a 1/8-width model: checks the tool in seconds

Time, CPU time, FLOPs (torch.utils.flop_counter) and peak memory above the weights are measured as in
tools/bench_unet.py (whose helpers this reuses); on a shared machine wall time is inflated by other
jobs and CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm import accel, backend  # noqa: E402
from refldm.models.unet import UNet2DConditionModel  # noqa: E402
from tools.bench_unet import OpTimer, PeakMemory, _alternate, _nothing, build_torch_unet  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults)
SDXL_BASE = dict(
    sample_size=128, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, upcast_attention=None)


def scaled_config(scale: int) -> dict:
    """SDXL base with every width divided by `scale` (heads kept at 64 channels where they fit)."""
    if scale == 1:
        return dict(SDXL_BASE)
    cfg = dict(SDXL_BASE)
    cfg["block_out_channels"] = [c // scale for c in SDXL_BASE["block_out_channels"]]
    cfg["attention_head_dim"] = [max(1, h // scale) for h in SDXL_BASE["attention_head_dim"]]
    cfg["cross_attention_dim"] = 2048 // scale
    cfg["norm_num_groups"] = max(1, 32 // scale)
    cfg["addition_time_embed_dim"] = 256 // scale
    cfg["projection_class_embeddings_input_dim"] = 1280 // scale + 6 * (256 // scale)
    return cfg


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=128, help="latent height and width (128 = 1024x1024)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1, help="divide every width by this (1 = the real SDXL)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=0,
                        help="instead of --runs: alternate one torch and one refldm step this many times and "
                             "report each side's fastest and median (a machine whose speed drifts then "
                             "affects both sides alike)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--min-free-gb", type=float, default=20.0)
    parser.add_argument("--force", action="store_true", help="run even with less memory available")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = scaled_config(args.scale)
    free = mem_available_gb()
    if args.scale == 1 and free < args.min_free_gb and not args.force:
        sys.exit(f"bench_sdxl: {free:.1f} GB available, below --min-free-gb {args.min_free_gb:g} (the SDXL U-Net "
                 "alone is 10.3 GB in float32); not started. Use --scale 8 to check the tool, or --force")

    import torch

    model = build_torch_unet(args.seed, config)
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(args.seed)
    b, lat = args.batch, args.latent
    sample = rng.standard_normal((b, 4, lat, lat)).astype(np.float32)
    context = rng.standard_normal((b, 77, config["cross_attention_dim"])).astype(np.float32)
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    text_embeds = rng.standard_normal((b, pooled_dim)).astype(np.float32)
    time_ids = np.tile(np.array([[8.0 * lat, 8.0 * lat, 0, 0, 8.0 * lat, 8.0 * lat]], np.float32), (b, 1))
    t = np.full(b, 981.0, dtype=np.float32)
    targs = (torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context))
    tadded = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    print(f"SDXL base U-Net (1/{args.scale} width, {n_params:,} parameters), float32, batch {b}, latents {lat}x{lat}, "
          f"text ({b}, 77, {config['cross_attention_dim']}); torch {torch.__version__} on "
          f"{torch.get_num_threads()} threads, refldm on {accel.num_threads()} threads, {os.cpu_count()} cores, "
          f"{free:.1f} GB available, load average {os.getloadavg()[0]:.1f}")

    from torch.utils import flop_counter
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:  # as tools/bench_unet.py
        @flop_counter.register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ref = model(*targs, added_cond_kwargs=tadded).sample.numpy()  # also torch's warm-up
    flops = counter.get_total_flops()
    print(f"FLOPs per step (torch.utils.flop_counter): {flops / 1e12:.3f} TFLOP")

    results = {}
    if args.rounds:
        _alternate(args, model, targs, (sample, t, context), ref, flops, torch_kwargs={"added_cond_kwargs": tadded},
                   kwargs={"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}})
        return
    if not args.skip_torch:
        times, cpus = [], []
        for _ in range(args.runs):
            with PeakMemory() as mem, torch.no_grad():
                t0, c0 = time.perf_counter(), time.process_time()
                model(*targs, added_cond_kwargs=tadded)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
        results["torch"] = (min(times), min(cpus), mem.peak)

    unet = UNet2DConditionModel.from_config(dict(model.config))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # views: no second copy
    unet.load_state_dict(state, dtype="float32", source="torch model")
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    times, cpus = [], []
    with OpTimer() if args.profile else _nothing() as timer:
        for _ in range(args.runs):
            with PeakMemory() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                out = unet(sample, t, context, added_cond_kwargs=added)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
    results["refldm"] = (min(times), min(cpus), mem.peak)
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(f"refldm vs torch: relative error {err:.2e}")

    print("\n| implementation | time per step (s) | CPU time, all threads (s) | peak memory above weights (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for name, (sec, cpu, peak) in results.items():
        print(f"| {name} | {sec:.2f} | {cpu:.2f} | {peak / 2**20:.0f} |")
    if "torch" in results:
        print(f"\nrefldm / torch: {results['refldm'][0] / results['torch'][0]:.2f}x in time, "
              f"{results['refldm'][1] / results['torch'][1]:.2f}x in CPU time")
    if args.profile:
        timer.report(sum(cpus), args.runs, sum(times))


if __name__ == "__main__":
    main()
