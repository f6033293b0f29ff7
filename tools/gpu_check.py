"""The GPU check: refldm on CuPy against torch on CUDA, agreement and speed, in one run (tools/gpu_check.sh).

Run it through tools/gpu_check.sh, which finds the GPU, installs carried wheels and keeps the log:

    tools/gpu_check.sh                                 # an NVIDIA GPU and CuPy: the whole check, SD 1.x sizes
    tools/gpu_check.sh --wheels DIR                    # first install DIR's wheels into a temporary target
    tools/gpu_check.sh --fake --quick --out DIR        # the same steps on the CPU, fake device, tiny models

What it does, in order, writing `gpu_check.json` (the figures) and logs into the output folder after
every step, so that a run cut short still leaves what it measured:

1. environment: Python, NumPy, CuPy (CUDA runtime, device, memory), torch (CUDA), refldm's commit;
2. models: a random-weight SD 1.x pipeline (U-Net, VAE, CLIP text encoder, tokenizer with CLIP's
   real BPE, DDIM) built in torch on the device and saved with diffusers' save_pretrained; refldm loads
   the folder in float32 and in float16 (with the backend on the device: cupy, or fakegpu);
3. agreement, per dtype: the VAE decode, a U-Net call, the CLIP text encoder and a short txt2img
   (the same starting latents), max|refldm - torch| / max|torch|, against float32 <= 1e-4 and
   float16 <= 1e-2;
4. timings, per dtype: a 3x3 conv (2, 320, 64, 64), attention (2, 8, 4096, 40), a U-Net step (2, 4, 64, 64),
   the VAE decode to 512x512 and to 1024x1024, a 25-step 512x512 txt2img; each timed by CUDA events
   (CuPy's for refldm, torch's for torch), one warm-up excluded, median of 5. The warm-up also
   measures peak GPU memory: refldm's from CuPy's memory pool (its used bytes after every allocation,
   through an allocator hook), torch's from torch.cuda.max_memory_allocated; each with the bytes in
   use before the call (the weights), so the rise is the call's own;
5. the test suite with REFLDM_BACKEND=cupy (fakegpu with --fake), in whatever time is left of the
   budget: interrupted (SIGINT, so pytest prints its summary) when the budget runs out, and the counts
   of what ran are recorded.

Before step 2 it prints an estimate of each step's duration (from the step's FLOPs and assumed device
rates, see `estimate`), and it keeps to --budget seconds (default 480, 8 minutes): each timed case
measures its warm-up and runs fewer than 5 repeats (recorded) when 5 would overrun, and a step that
cannot start in time is skipped with the reason in the JSON.

With --fake the device is refldm's fake GPU (refldm/testing/fakedevice.py), torch runs on the CPU,
times come from time.perf_counter, refldm's peak memory from tracemalloc (NumPy reports its buffers
to it) and torch's is not measured; --quick uses tiny models and 2 repeats. That mode exists so that
the script is known to work end to end before a GPU is ever lent (tests/test_gpu_check.py runs it).

Needs torch, diffusers and transformers (the crosscheck extra) besides refldm; CuPy from the gpu extra.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CLIP_BPE = os.path.join(ROOT, "tests", "data", "clip-bpe", "bpe_simple_vocab_16e6.txt.gz")
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
PROMPT = "a photo of an astronaut riding a horse on mars"

# The SD 1.x parts (runwayml/stable-diffusion-v1-5's configs, the keys that shape the networks).
SD_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
              norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# The tiny parts of tests/test_pipeline.py: the same structure, a few thousand times fewer weights.
TINY_UNET = dict(sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 32),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                norm_num_groups=8, sample_size=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)

# The sizes of each case: "sd" for the GPU, "tiny" for --quick (and the fake device).
SIZES = {
    "sd": dict(unet=SD_UNET, vae=SD_VAE, text=SD_TEXT, factor=8, latent=64, latent_big=128,
               conv=(2, 320, 64, 64), attention=(2, 8, 4096, 40), steps=25, agree_steps=4, repeats=5),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, factor=4, latent=8, latent_big=16,
                 conv=(2, 32, 16, 16), attention=(2, 2, 256, 16), steps=3, agree_steps=2, repeats=2),
}


# -- the output: one JSON, rewritten after every step -------------------------------------------------------------

class Report:
    def __init__(self, out_dir: str, data: dict):
        self.path = os.path.join(out_dir, "gpu_check.json")
        self.data = data
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self):
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def log(*parts):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}]", *parts, flush=True)


# -- the device: CuPy + torch CUDA, or the fake device + torch on the CPU --------------------------------------

class Device:
    """Timing and memory for one side (refldm or torch) on the device under test."""

    def __init__(self, fake: bool):
        import torch
        self.fake = fake
        self.torch = torch
        self.backend = "fakegpu" if fake else "cupy"
        self.tdev = torch.device("cpu" if fake else "cuda")
        if not fake:
            import cupy
            self.cupy = cupy
            # the same arithmetic on both sides: no TF32 in torch's float32 (CuPy uses none by default)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def sync(self):
        if not self.fake:
            self.cupy.cuda.Device().synchronize()
            self.torch.cuda.synchronize()

    def time_once(self, side: str, fn) -> float:
        """Milliseconds of one call of fn, by CUDA events on the side's own stream (perf_counter on the CPU)."""
        if self.fake:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        if side == "refldm":
            start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(self.cupy.cuda.get_elapsed_time(start, end))
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def peak_memory(self, side: str, fn) -> tuple:
        """(bytes in use before, peak bytes in use during) one call of fn; (None, None) where not measurable."""
        if side == "refldm":
            if self.fake:
                import tracemalloc
                tracemalloc.start()
                try:
                    before = tracemalloc.get_traced_memory()[0]
                    fn()
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                return before, peak
            cupy = self.cupy
            pool = cupy.get_default_memory_pool()
            self.sync()
            before = pool.used_bytes()
            top = [before]

            def malloc(size):  # CuPy's pool, noting its used bytes after each allocation
                mem = pool.malloc(size)
                top[0] = max(top[0], pool.used_bytes())
                return mem

            cupy.cuda.set_allocator(malloc)
            try:
                fn()
                self.sync()
            finally:
                cupy.cuda.set_allocator(pool.malloc)
            return before, top[0]
        if self.fake:
            fn()
            return None, None
        torch = self.torch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()

    def free_cached(self):
        import gc
        gc.collect()
        if not self.fake:
            self.cupy.get_default_memory_pool().free_all_blocks()
            self.torch.cuda.empty_cache()


# -- the models ------------------------------------------------------------------------------------------------

def clip_bpe():
    """CLIP's real merges (tests/data/clip-bpe) and the vocabulary they imply (49,408 tokens)."""
    from refldm.models.tokenizer import clip_vocab
    lines = gzip.open(CLIP_BPE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    return merges, clip_vocab(merges)


def randomise(torch, model, seed: int):
    """Random weights where they are: matrices and kernels N(0, 1/fan_in), norm scales N(1, 0.1^2), the rest
    N(0, 0.1^2) (tools/bench_unet.py's recipe), drawn on the model's device."""
    gen = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gen is None:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def build_torch_pipeline(size: dict, device, folder: str, seed: int = 0):
    """A diffusers StableDiffusionPipeline of random weights on the device, saved (float32) into `folder`."""
    torch = device.torch
    import diffusers
    import transformers
    merges, vocab = clip_bpe()
    tok_dir = os.path.join(folder, "_tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**size["unet"])
        vae = diffusers.AutoencoderKL(**size["vae"])
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(vocab), bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
            pad_token_id=len(vocab) - 1, **size["text"]))
    parts = []
    for i, model in enumerate((unet, vae, text)):
        model = model.to_empty(device=device.tdev)
        for name, buf in model.named_buffers():  # buffers (CLIP's position ids) were left empty on "meta"
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1], device=device.tdev).expand_as(buf))
        parts.append(randomise(torch, model, seed * 10 + i))
    unet, vae, text = parts
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    # the tokenizer folder in CLIP's own format (vocab.json + merges.txt), which both libraries read
    out = os.path.join(folder, "tokenizer")
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    for name in os.listdir(tok_dir):
        os.replace(os.path.join(tok_dir, name), os.path.join(out, name))
    os.rmdir(tok_dir)
    return pipe


# -- the duration estimate ------------------------------------------------------------------------------------------

# Assumed sustained rates on an H100 (TFLOP/s): refldm's ops are single CuPy kernels and cuBLAS products
# without fusion, torch's are cuDNN/cuBLAS with fused attention. Deliberately cautious.
RATES = {"refldm": {"float32": 8.0, "float16": 20.0}, "torch": {"float32": 25.0, "float16": 150.0}}
UNET_STEP_TFLOP = 1.607      # SD 1.x U-Net at (2, 4, 64, 64), docs/performance.md
VAE_DECODE_TFLOP = 1.24      # SD 1.x VAE decode to 512x512 (tools/bench_vae.py's count); 1024x1024 about 4.7x


def case_flops(size_name: str, size: dict) -> dict:
    """TFLOP of each timed case (2 per multiply-add); the tiny sizes scale by their widths."""
    if size_name != "sd":
        return {k: 1e-4 for k in ("conv3x3", "attention", "unet_step", "vae_decode_512", "vae_decode_1024",
                                  "txt2img_25")}
    n, c, h, w = size["conv"]
    b, heads, length, d = size["attention"]
    return {"conv3x3": 2 * n * c * c * 9 * h * w / 1e12,
            "attention": 4 * b * heads * length * length * d / 1e12,
            "unet_step": UNET_STEP_TFLOP,
            "vae_decode_512": VAE_DECODE_TFLOP,
            "vae_decode_1024": 4.7 * VAE_DECODE_TFLOP,
            "txt2img_25": size["steps"] * UNET_STEP_TFLOP + VAE_DECODE_TFLOP}


def estimate(size_name: str, size: dict, dtypes, fake: bool) -> dict:
    """Seconds per step, before anything runs (the suite takes what is left)."""
    if fake or size_name != "sd":
        return {"environment": 5, "models": 10, "agreement": 5 * len(dtypes), "timings": 5 * len(dtypes)}
    flops = case_flops(size_name, size)
    runs = 1 + size["repeats"]
    timings = sum(runs * flops[c] / RATES[side][dt] + 1.0
                  for c in flops for side in RATES for dt in dtypes)
    # models: build and randomise on the device (fast), save 4.3 GB (~20 s), refldm loads it once per dtype
    return {"environment": 10, "models": 30 + 15 * len(dtypes), "agreement": 15 * len(dtypes),
            "timings": round(timings)}


# -- the steps -------------------------------------------------------------------------------------------------

def environment(fake: bool) -> dict:
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "REFLDM_BACKEND": os.environ.get("REFLDM_BACKEND")}
    with contextlib.suppress(Exception):
        env["refldm_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                              text=True, timeout=10).stdout.strip()
    import torch
    env["torch"] = torch.__version__
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(Exception):
            env[name] = __import__(name).__version__
    if not fake:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        free, total = cupy.cuda.runtime.memGetInfo()
        env.update(cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=cupy.cuda.runtime.driverGetVersion(), device=props["name"].decode(),
                   device_memory_bytes=int(total), device_free_bytes=int(free),
                   torch_cuda=torch.version.cuda, torch_device=torch.cuda.get_device_name(0))
    else:
        env["device"] = "fakegpu (refldm/testing/fakedevice.py) on the CPU; torch on the CPU"
    return env


def rel_err(ours, theirs) -> float:
    """max|ours - theirs| / max|theirs|, in float64 on the host."""
    from refldm import backend
    a = np.asarray(backend.to_numpy(ours), dtype=np.float64)
    b = theirs.detach().float().cpu().numpy().astype(np.float64) if hasattr(theirs, "detach") else \
        np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: refldm {a.shape}, torch {b.shape}")
    scale = float(np.max(np.abs(b))) or 1.0
    return float(np.max(np.abs(a - b))) / scale


def inputs(size: dict, seed: int = 1) -> dict:
    """Host inputs shared by both sides (float32; cast per dtype)."""
    rng = np.random.default_rng(seed)
    lat, big = size["latent"], size["latent_big"]
    ctx = size["text"]["hidden_size"]
    b, heads, length, d = size["attention"]
    n, c, h, w = size["conv"]
    return {
        "latents": rng.standard_normal((1, 4, lat, lat), dtype=np.float32),
        "latents_big": rng.standard_normal((1, 4, big, big), dtype=np.float32),
        "unet_x": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
        "context": rng.standard_normal((2, 77, ctx), dtype=np.float32),
        "ids": rng.integers(0, 49406, size=(2, 77)),
        "conv_x": rng.standard_normal((n, c, h, w), dtype=np.float32),
        "conv_w": (rng.standard_normal((c, c, 3, 3), dtype=np.float32) / np.float32(math.sqrt(9 * c))),
        "conv_b": rng.standard_normal((c,), dtype=np.float32),
        "q": rng.standard_normal((b, heads, length, d), dtype=np.float32),
        "k": rng.standard_normal((b, heads, length, d), dtype=np.float32),
        "v": rng.standard_normal((b, heads, length, d), dtype=np.float32),
    }


class Sides:
    """refldm's pipeline on the device backend and the diffusers pipeline, in one dtype."""

    def __init__(self, device: Device, folder: str, torch_pipe, dtype: str):
        from refldm import backend
        from refldm.pipelines.sd import StableDiffusionPipeline
        torch = device.torch
        self.device, self.dtype = device, dtype
        self.tdtype = getattr(torch, dtype)
        with backend.use(device.backend):
            self.ours = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
        self.theirs = torch_pipe.to(self.tdtype)

    def host(self, a):
        """A host array onto refldm's device, in this dtype."""
        from refldm import backend
        with backend.use(self.device.backend):
            return backend.asarray(a, dtype=self.dtype)

    def tensor(self, a):
        return self.device.torch.from_numpy(np.ascontiguousarray(a)).to(self.device.tdev, self.tdtype)

    def backend(self):
        from refldm import backend
        return backend.use(self.device.backend)


def agreement(sides: Sides, size: dict, data: dict) -> list:
    """Each part and a short pipeline run, refldm against torch."""
    torch = sides.device.torch
    ours, theirs, dt = sides.ours, sides.theirs, sides.dtype
    rows = []

    def row(part, shape, fn):
        t0 = time.monotonic()
        try:
            with torch.no_grad(), sides.backend():
                err = fn()
            rows.append({"part": part, "dtype": dt, "shape": shape, "rel_err": err, "tol": TOLERANCE[dt],
                         "ok": bool(err <= TOLERANCE[dt]), "seconds": round(time.monotonic() - t0, 2)})
        except Exception as e:  # one part failing must not hide the others
            rows.append({"part": part, "dtype": dt, "shape": shape, "error": f"{type(e).__name__}: {e}",
                         "ok": False, "trace": traceback.format_exc(limit=6)})
        log(f"agreement {part} {dt}:", {k: v for k, v in rows[-1].items() if k != "trace"})

    z = data["latents"]
    row("vae_decode", list(z.shape), lambda: rel_err(ours.vae.decode(sides.host(z)),
                                                     theirs.vae.decode(sides.tensor(z)).sample))
    x, ctx = data["unet_x"], data["context"]
    row("unet", list(x.shape), lambda: rel_err(ours.unet(sides.host(x), 500.0, sides.host(ctx)),
                                               theirs.unet(sides.tensor(x), 500, sides.tensor(ctx)).sample))
    ids = data["ids"]
    row("clip_text", list(ids.shape), lambda: rel_err(
        ours.text_encoder(ids).last_hidden_state,
        theirs.text_encoder(torch.from_numpy(ids).to(sides.device.tdev)).last_hidden_state))
    steps = size["agree_steps"]
    lat = data["latents"]

    def pipeline():
        out = ours(PROMPT, height=lat.shape[2] * size["factor"], width=lat.shape[3] * size["factor"],
                   num_inference_steps=steps, guidance_scale=7.5, latents=lat, progress=False)
        ref = theirs(PROMPT, height=lat.shape[2] * size["factor"], width=lat.shape[3] * size["factor"],
                     num_inference_steps=steps, guidance_scale=7.5, latents=sides.tensor(lat),
                     output_type="latent")
        return rel_err(out.latents, ref.images)

    row(f"pipeline_txt2img_{steps}_steps_latents", list(lat.shape), pipeline)
    return rows


def timings(sides: Sides, size: dict, data: dict, report: Report, deadline: float, repeats: int) -> list:
    """Each case: warm-up (with the peak-memory measurement), then up to `repeats` timed runs per side."""
    from refldm.core import ops
    torch = sides.device.torch
    F = torch.nn.functional
    ours, theirs, dev, dt = sides.ours, sides.theirs, sides.device, sides.dtype
    side_px = size["latent"] * size["factor"]
    big_px = size["latent_big"] * size["factor"]
    with sides.backend():
        cx, cw, cb = sides.host(data["conv_x"]), sides.host(data["conv_w"]), sides.host(data["conv_b"])
        q, k, v = sides.host(data["q"]), sides.host(data["k"]), sides.host(data["v"])
        ux, uctx = sides.host(data["unet_x"]), sides.host(data["context"])
        z, zb = sides.host(data["latents"]), sides.host(data["latents_big"])
    tcx, tcw, tcb = sides.tensor(data["conv_x"]), sides.tensor(data["conv_w"]), sides.tensor(data["conv_b"])
    tq, tk, tv = sides.tensor(data["q"]), sides.tensor(data["k"]), sides.tensor(data["v"])
    tux, tuctx = sides.tensor(data["unet_x"]), sides.tensor(data["context"])
    tz, tzb = sides.tensor(data["latents"]), sides.tensor(data["latents_big"])
    steps = size["steps"]
    cases = [
        ("conv3x3", list(data["conv_x"].shape), lambda: ops.conv2d(cx, cw, cb, padding=1),
         lambda: F.conv2d(tcx, tcw, tcb, padding=1)),
        ("attention", list(data["q"].shape), lambda: ops.scaled_dot_product_attention(q, k, v),
         lambda: F.scaled_dot_product_attention(tq, tk, tv)),
        ("unet_step", list(data["unet_x"].shape), lambda: ours.unet(ux, 500.0, uctx),
         lambda: theirs.unet(tux, 500, tuctx).sample),
        (f"vae_decode_{side_px}", list(data["latents"].shape), lambda: ours.vae.decode(z),
         lambda: theirs.vae.decode(tz).sample),
        (f"vae_decode_{big_px}", list(data["latents_big"].shape), lambda: ours.vae.decode(zb),
         lambda: theirs.vae.decode(tzb).sample),
        (f"txt2img_{steps}_steps_{side_px}", [1, 3, side_px, side_px],
         lambda: ours(PROMPT, height=side_px, width=side_px, num_inference_steps=steps, seed=1, progress=False),
         lambda: theirs(PROMPT, height=side_px, width=side_px, num_inference_steps=steps, output_type="np",
                        generator=torch.Generator().manual_seed(1))),
    ]
    rows = []
    for name, shape, fn_ours, fn_theirs in cases:
        row = {"case": name, "dtype": dt, "shape": shape, "timer": "perf_counter" if dev.fake else "cuda events"}
        try:
            with torch.no_grad(), sides.backend():
                for side, fn in (("refldm", fn_ours), ("torch", fn_theirs)):
                    left = deadline - time.monotonic()
                    if left < 5:
                        raise TimeoutError(f"budget spent before the {side} side")
                    t0 = time.monotonic()
                    before, peak = dev.peak_memory(side, fn)                 # the warm-up, not timed
                    warm = time.monotonic() - t0
                    row[f"{side}_warmup_s"] = round(warm, 3)
                    row[f"{side}_bytes_before"], row[f"{side}_peak_bytes"] = before, peak
                    row[f"{side}_peak_rise_bytes"] = None if peak is None else peak - before
                    n = repeats
                    # the other side still needs about as long as this one: keep both within the budget
                    while n > 1 and (1 + 2 * n) * warm > deadline - time.monotonic() - 5:
                        n -= 1
                    runs = [dev.time_once(side, fn) for _ in range(n)]
                    row[f"{side}_runs_ms"] = [round(r, 3) for r in runs]
                    row[f"{side}_ms"] = round(statistics.median(runs), 3)
                    if n < repeats:
                        row.setdefault("note", []).append(f"{side}: {n} repeats, not {repeats} (budget)")
            row["ratio"] = round(row["refldm_ms"] / row["torch_ms"], 3) if row.get("torch_ms") else None
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        dev.free_cached()
        rows.append(row)
        log(f"timing {name} {dt}:", {k: row.get(k) for k in ("refldm_ms", "torch_ms", "ratio", "refldm_peak_rise_bytes",
                                                             "torch_peak_rise_bytes", "error")})
        report.save()
    return rows


def run_suite(args, report: Report, deadline: float) -> dict:
    """pytest with REFLDM_BACKEND set, interrupted (SIGINT: pytest still prints its summary) at the deadline."""
    suite_args = shlex.split(args.suite)
    left = deadline - time.monotonic()
    result = {"args": suite_args, "backend": args.backend, "log": "suite.log"}
    if left < 20:
        result["skipped"] = f"budget spent ({left:.0f} s left)"
        return result
    env = dict(os.environ, REFLDM_BACKEND=args.backend)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suite_args]
    log("suite:", " ".join(cmd), f"(REFLDM_BACKEND={args.backend}, at most {left - 10:.0f} s)")
    t0 = time.monotonic()
    with open(os.path.join(args.out, "suite.log"), "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=max(5.0, left - 10))
            result["timed_out"] = False
        except subprocess.TimeoutExpired:
            result["timed_out"] = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result["returncode"] = proc.returncode
    result["seconds"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "suite.log"), errors="replace") as f:
        text = f.read()
    tail = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    result["summary"] = tail[0].strip("= ")
    for word in ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected"):
        m = re.search(rf"(\d+) {word}\b", tail[0])
        result[word] = int(m.group(1)) if m else 0
    result["errors"] += result.pop("error")
    log("suite:", result["summary"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json and the logs")
    p.add_argument("--fake", action="store_true", help="the fake device on the CPU, torch on the CPU")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 repeats, a one-file suite")
    p.add_argument("--size", choices=sorted(SIZES), help="model sizes (default: sd on a GPU, tiny with --fake/--quick)")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--repeats", type=int, help="timed runs per case and side (default 5; 2 with --quick)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--suite", help="pytest arguments (default: tests, the whole suite; "
                                   "with --quick: tests/test_backend.py -k fake_device)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: agreement,timings,suite")
    p.add_argument("--estimate", action="store_true", help="print the duration estimate and stop")
    args = p.parse_args(argv)
    args.backend = "fakegpu" if args.fake else "cupy"
    size_name = args.size or ("tiny" if (args.fake or args.quick) else "sd")
    size = SIZES[size_name]
    repeats = args.repeats or (2 if args.quick else size["repeats"])
    if args.suite is None:
        args.suite = "tests/test_backend.py -k fake_device" if args.quick else "tests"
    dtypes = [d for d in args.dtypes.split(",") if d]
    skip = {s for s in args.skip.split(",") if s}
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget
    est = estimate(size_name, size, dtypes, args.fake)
    est["suite"] = max(0, round(args.budget - sum(est.values())))
    est["total"] = sum(est.values())
    log(f"mode {args.backend}, sizes {size_name}, dtypes {dtypes}, {repeats} repeats, budget {args.budget:.0f} s;"
        f" estimate (s): {est}")
    if args.estimate:
        return 0
    report = Report(args.out, {
        "tool": "tools/gpu_check.py", "format": 1, "mode": args.backend, "fake": args.fake, "quick": args.quick,
        "size": size_name, "dtypes": dtypes, "repeats": repeats, "budget_s": args.budget, "estimate_s": est,
        "tolerance": TOLERANCE, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wheels": os.environ.get("GPU_CHECK_WHEELS") or None,
        "environment": None, "agreement": [], "timings": [], "suite": None, "skipped": [], "ok": False})
    data = report.data
    data["environment"] = environment(args.fake)
    log("environment:", data["environment"])
    report.save()
    device = Device(args.fake)
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        try:
            t0 = time.monotonic()
            folder = os.path.join(tmp, "sd")
            torch_pipe = build_torch_pipeline(size, device, folder)
            data["models_s"] = round(time.monotonic() - t0, 1)
            log(f"models built and saved in {data['models_s']} s")
            host = inputs(size)
            for dt in dtypes:
                if time.monotonic() > deadline - 30:
                    data["skipped"].append(f"{dt}: budget spent before loading")
                    continue
                t0 = time.monotonic()
                sides = Sides(device, folder, torch_pipe, dt)
                data.setdefault("load_s", {})[dt] = round(time.monotonic() - t0, 1)
                if "agreement" not in skip:
                    data["agreement"] += agreement(sides, size, host)
                    report.save()
                if "timings" not in skip:
                    data["timings"] += timings(sides, size, host, report, deadline, repeats)
                    report.save()
                del sides
                device.free_cached()
        except Exception as e:  # the models could not be built or loaded: say so, and still run the suite
            failures.append(f"models: {type(e).__name__}: {e}")
            data["models_error"] = traceback.format_exc(limit=8)
            log("models failed:", data["models_error"])
    failures += [f"agreement {r['part']} {r['dtype']}" for r in data["agreement"] if not r["ok"]]
    failures += [f"timing {r['case']} {r['dtype']}: {r['error']}" for r in data["timings"] if "error" in r]
    if "suite" not in skip:
        data["suite"] = run_suite(args, report, deadline)
        suite = data["suite"]
        if suite.get("failed") or suite.get("errors") or suite.get("timed_out") or suite.get("returncode") not in (0, None):
            failures.append(f"suite: {suite.get('summary') or suite.get('skipped')}")
    data["failures"] = failures
    data["ok"] = not failures
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.save()
    log(f"done in {report.elapsed():.0f} s (estimate {est['total']} s): {'ok' if data['ok'] else 'FAILURES'}"
        + "".join(f"\n  - {f}" for f in failures))
    log(f"figures: {report.path}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
