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


# -- the whole pipeline: FLUX.1-dev's four networks, written with fast random bfloat16 bits ------------------------

T5_XXL = dict(_class_name="T5EncoderModel", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
              num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
FLUX_VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=16,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu",
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True)
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}


POOL = 1 << 24  # random uint16 values drawn once and reused, shifted, for every tensor (speed: 33 GB to write)


def bf16_pattern(shape, key: str):
    """(mask, bits) making random uint16 r into bfloat16 (r & mask) | bits: sign and the 7 fraction bits random,
    the exponent fixed so that |w| lies in [s, 2s) with s = 2^floor(log2(1/sqrt(fan_in))) for matrices, 2^-5
    for biases, 2^-1 for embedding tables; norm scales 1 + f/128."""
    if ("norm" in key or "layer_norm" in key) and key.endswith("weight"):
        return np.uint16(0x007F), np.uint16(0x3F80)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        e = -1 if ("embed" in key or "shared" in key) else math.floor(math.log2(1 / math.sqrt(fan_in)))
    else:
        e = -5
    return np.uint16(0x807F), np.uint16((127 + e) << 7)


def write_model_bf16(model, path: str, seed: int) -> int:
    """One safetensors file of random bfloat16 tensors for every key of a refldm model, streamed in chunks of a
    pool of random bits (never a whole tensor in memory)."""
    params = [(key, tuple(v.shape)) for key, _, _, v in model.params()]
    header, offset = {}, 0
    for key, shape in params:
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 1 << 16, size=2 * POOL, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in params:
            mask, bits = bf16_pattern(shape, key)
            left = math.prod(shape)
            while left:
                k = min(left, POOL)
                start = int(rng.integers(0, POOL))
                f.write(((pool[start:start + k] & mask) | bits).tobytes())
                left -= k
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):  # the written pages leave the page cache (a shared machine)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return sum(math.prod(s) for _, s in params)


def write_pipeline(folder: str, scale: int = 1, layers: int = 1) -> dict:
    """A FLUX.1-dev diffusers folder of random bfloat16 weights (full size at scale = layers = 1: transformer
    11.9 B, T5-XXL encoder 4.76 B, CLIP-L 123 M, VAE 84 M parameters). Tokenizers: refldm's embedded CLIP
    tokenizer and a small unigram T5 tokenizer (tests/test_flux_pipeline.py); their ids fit both vocabularies."""
    import shutil
    sys.path.insert(0, os.path.join(ROOT, "tests", ".."))
    from refldm.models.clip import CLIPTextModel
    from refldm.models.flux_transformer import FluxTransformer2DModel
    from refldm.models.t5 import T5EncoderModel
    from refldm.models.vae import AutoencoderKL
    from tests.test_flux_pipeline import write_t5_tokenizer
    t5 = dict(T5_XXL)
    if scale > 1 or layers > 1:
        t5.update(d_model=4096 // scale, d_ff=10240 // scale, num_heads=max(1, 64 // scale),
                  num_layers=max(1, 24 // layers))
    clip = dict(CLIP_L, _class_name="CLIPTextModel")
    parts = {"transformer": (FluxTransformer2DModel, dict(config(scale, layers), joint_attention_dim=t5["d_model"]),
                             "diffusion_pytorch_model"),
             "text_encoder_2": (T5EncoderModel, t5, "model"), "text_encoder": (CLIPTextModel, clip, "model"),
             "vae": (AutoencoderKL, FLUX_VAE, "diffusion_pytorch_model")}
    counts = {}
    for i, (part, (cls, cfg, stem)) in enumerate(parts.items()):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        with open(os.path.join(folder, part, "config.json"), "w") as f:
            json.dump(cfg, f)
        model = cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
        counts[part] = write_model_bf16(model, os.path.join(folder, part, stem + ".safetensors"), seed=i)
        del model
    shutil.copytree(os.path.join(ROOT, "refldm", "default_model", "tokenizer"), os.path.join(folder, "tokenizer"),
                    dirs_exist_ok=True)
    write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(FLUX_SCHEDULER, f)
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return counts


def run_pipeline(folder: str, size: int, steps: int = 1) -> dict:
    """In this process: FluxPipeline.from_pretrained(folder, weights_dtype="stored"), one generation of `steps`
    steps at size x size (512 T5 tokens, guidance 3.5); the stage times, the peak RSS (VmHWM: the mapped files'
    pages included) and the peak of the anonymous part (RssAnon, sampled every 20 ms), per stage too."""
    from refldm.pipelines.flux import FluxPipeline
    stage = ["load"]
    peaks = {}
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            rss, anon = _status_kb("VmRSS"), _status_kb("RssAnon")
            p = peaks.setdefault(stage[0], [0, 0])
            p[0], p[1] = max(p[0], rss), max(p[1], anon)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(folder, weights_dtype="stored")
    load_s = time.perf_counter() - t0
    stage[0] = "generate"
    t0 = time.perf_counter()
    out = pipe("a photograph of a red fox in the snow", height=size, width=size, num_inference_steps=steps,
               guidance_scale=3.5, seed=1, max_sequence_length=T5_TOKENS, progress=False)
    total_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    pixels = np.asarray(out.images[0])
    return {"size": size, "steps": steps, "load_s": round(load_s, 1), "generate_s": round(total_s, 1),
            "timings_s": {k: round(v, 1) for k, v in out.timings.items()},
            "peak_rss_gb": round(_status_kb("VmHWM") * 1024 / GB, 3),
            "peaks_gb": {k: {"rss": round(v[0] * 1024 / GB, 3), "anon": round(v[1] * 1024 / GB, 3)}
                         for k, v in peaks.items()},
            "image_std": round(float(pixels.std()), 2), "load_average": [round(v, 2) for v in os.getloadavg()]}


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
    p.add_argument("--pipeline", metavar="FOLDER", default=None,
                   help="the whole generation: write a random bf16 FLUX.1-dev folder here (unless it holds one), "
                        "then run FluxPipeline with weights_dtype='stored' at each --size, one step (--steps)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="--pipeline: keep the folder afterwards")
    p.add_argument("--pipeline-case", nargs=3, metavar=("FOLDER", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], int(args.case[2]))))
        return 0
    if args.pipeline_case:
        f, size, steps = args.pipeline_case
        print(json.dumps(run_pipeline(f, int(size), int(steps))))
        return 0
    if args.pipeline:
        return main_pipeline(args)
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


def main_pipeline(args) -> int:
    import shutil
    folder = args.pipeline
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        t0 = time.perf_counter()
        counts = write_pipeline(folder, args.scale, args.layers)
        print(json.dumps({"wrote_parameters": counts, "gb": round(2 * sum(counts.values()) / GB, 2),
                          "write_s": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"mem_available_gb": round(mem_available_gb(), 1), "cpus": os.cpu_count(),
                      "load_average": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    for size in args.size:
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--pipeline-case", folder, str(size), str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        rss = [line for line in out.stderr.splitlines() if "Maximum resident set size" in line or "Elapsed" in line]
        print(out.stdout.strip() or json.dumps({"size": size, "failed": out.stderr[-1500:]}), flush=True)
        print(json.dumps({"size": size, "time_v": [r.strip() for r in rss]}), flush=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
