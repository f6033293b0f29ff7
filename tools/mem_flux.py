"""Peak memory and time of one FLUX.1-dev transformer step, with and without weights_dtype="stored".

Issue 27, item 4. Random weights of the full-size FLUX.1-dev transformer (19 double + 38 single blocks, 24 heads
of 128, guidance embedding: 11,901,408,320 parameters) are written in bfloat16 to a safetensors file in a
temporary folder (23.8 GB; streamed tensor by tensor, never all in memory), then each case runs in its own
subprocess (clean peaks):

    stored    FluxTransformer2DModel.from_pretrained(folder, weights_dtype="stored")   bf16 mapped, per-layer float32
    float32   FluxTransformer2DModel.from_pretrained(folder)                           all float32 (47.6 GB)

and reports, for one transformer call at --size (512: 1,024 image tokens; 1024: 4,096) with 512 T5 tokens,
batch 1: the RSS after loading, the peak RSS (VmHWM) of the call, the peak of its anonymous part (RssAnon,
sampled every 20 ms), the anonymous / file-backed split of the resident set at the end (RssAnon / RssFile: the
mapped file's pages are clean and the kernel drops them under pressure, the anonymous ones it cannot),
and the wall time.

    python tools/mem_flux.py --scale 8 --layers 2 --size 256       # a small model: checks the tool in seconds
    python tools/mem_flux.py --size 512 --mode stored              # full size, the low-memory case only
    python tools/mem_flux.py --size 512 1024                       # full size, both cases (needs > 48 GB for float32)

--scale divides the number of heads (head size 128 and the RoPE axes stay); --layers divides both block counts.
The tool refuses a case whose estimated need exceeds MemAvailable (float32: 4 bytes per
parameter) unless --force. Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false)
FLUX_DEV = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19,
                num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
T5_TOKENS = 512
GB = 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20 * 2 ** 30 / GB
    return float("nan")


def config(scale: int, layers: int) -> dict:
    cfg = dict(FLUX_DEV)
    cfg["num_attention_heads"] = max(1, FLUX_DEV["num_attention_heads"] // scale)
    cfg["num_layers"] = max(1, FLUX_DEV["num_layers"] // layers)
    cfg["num_single_layers"] = max(1, FLUX_DEV["num_single_layers"] // layers)
    return cfg


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def write_random_bf16(folder: str, cfg: dict, seed: int = 0) -> int:
    """config.json and diffusion_pytorch_model.safetensors of random bfloat16 weights (matrices N(0, 1/fan_in),
    norm scales N(1, 0.1^2), the rest N(0, 0.1^2)), written one tensor at a time. Returns the parameter count."""
    from refldm.models.flux_transformer import FluxTransformer2DModel
    model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    params = [(key, tuple(v.shape)) for key, _, _, v in model.params()]
    header, offset = {}, 0
    for key, shape in params:
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in params:
            w = rng.standard_normal(shape, dtype=np.float32)
            if len(shape) >= 2:
                w *= np.float32(1 / math.sqrt(math.prod(shape[1:])))
            elif "norm" in key and key.endswith("weight"):
                w *= np.float32(0.1)
                w += np.float32(1)
            else:
                w *= np.float32(0.1)
            f.write(to_bf16_bits(w).tobytes())
            del w
    return sum(math.prod(s) for _, s in params)


def run_case(folder: str, mode: str, size: int) -> dict:
    """In this process: load, one transformer call at size x size pixels, the figures."""
    from refldm.models.flux_transformer import FluxTransformer2DModel, latent_image_ids
    t0 = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(folder, weights_dtype="stored" if mode == "stored" else None)
    load_s = time.perf_counter() - t0
    rss_loaded = _status_kb("VmRSS") * 1024
    cfg = model.config
    side = size // 16                                               # packed tokens per side (VAE 8x, packing 2x)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, side * side, cfg.in_channels), dtype=np.float32)
    c = rng.standard_normal((1, T5_TOKENS, cfg.joint_attention_dim), dtype=np.float32)
    y = rng.standard_normal((1, cfg.pooled_projection_dim), dtype=np.float32)
    peak_anon = [_status_kb("RssAnon")]
    done = threading.Event()

    def sample_anon():  # VmHWM counts the mapped file's pages too; the anonymous peak is sampled (every 20 ms)
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))

    sampler = threading.Thread(target=sample_anon, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = model(x, c, y, np.array([1.0], np.float32), latent_image_ids(side, side), np.zeros((T5_TOKENS, 3)),
                guidance=np.array([3.5], np.float32))
    step_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    assert np.all(np.isfinite(out))
    return {"mode": mode, "size": size, "image_tokens": side * side, "parameters": model.num_parameters(),
            "load_s": round(load_s, 2), "step_s": round(step_s, 2), "rss_after_load_gb": round(rss_loaded / GB, 3),
            "peak_rss_gb": round(_status_kb("VmHWM") * 1024 / GB, 3),
            "peak_rss_anon_gb": round(peak_anon[0] * 1024 / GB, 3),
            "rss_anon_end_gb": round(_status_kb("RssAnon") * 1024 / GB, 3),
            "rss_file_end_gb": round(_status_kb("RssFile") * 1024 / GB, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[512])
    p.add_argument("--mode", choices=["stored", "float32", "both"], default="both")
    p.add_argument("--scale", type=int, default=1, help="divide the number of heads by this")
    p.add_argument("--layers", type=int, default=1, help="divide both block counts by this")
    p.add_argument("--dir", default=None, help="where to write the weights (default: a temporary folder)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--case", nargs=3, metavar=("FOLDER", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], int(args.case[2]))))
        return 0
    cfg = config(args.scale, args.layers)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        t0 = time.perf_counter()
        n = write_random_bf16(folder, cfg)
        print(json.dumps({"wrote_parameters": n, "file_gb": round(n * 2 / GB, 2),
                          "write_s": round(time.perf_counter() - t0, 1),
                          "mem_available_gb": round(mem_available_gb(), 1),
                          "cpus": os.cpu_count()}), flush=True)
        for size in args.size:
            for mode in (["stored", "float32"] if args.mode == "both" else [args.mode]):
                need = (4 * n if mode == "float32" else 0) / GB
                if need > mem_available_gb() and not args.force:
                    print(json.dumps({"mode": mode, "size": size, "skipped": f"needs about {need:.1f} GB for the "
                                      f"float32 weights; MemAvailable is {mem_available_gb():.1f} GB (--force)"}))
                    continue
                out = subprocess.run([sys.executable, __file__, "--case", folder, mode, str(size)],
                                     capture_output=True, text=True)
                print(out.stdout.strip() or json.dumps({"mode": mode, "size": size, "failed": out.stderr[-500:]}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
