"""Peak memory of a whole SDXL text-to-image generation, 1024x1024, float32, with and without the tiled VAE.

The case of issue 14, item 9: `refldm.StableDiffusionXLPipeline` with the full-size SDXL base parts, random
float32 weights built in NumPy (nothing is read from or written to disk):

    U-Net (SDXL_BASE of tools/bench_sdxl.py)                      2,567,463,684 parameters  10.27 GB
    text_encoder:   CLIPTextModel, CLIP ViT-L/14 text                123,060,480             0.49 GB
    text_encoder_2: CLIPTextModelWithProjection, OpenCLIP bigG       694,659,840             2.78 GB
    vae:            AutoencoderKL, SDXL's (scaling_factor 0.13025)    83,653,863             0.33 GB
                                                                   3,468,837,867 in all     13.88 GB (12.92 GiB)

one prompt, guidance 5.0 (so the U-Net runs at batch 2: the [uncond; cond] pair; with no negative prompt
SDXL's unconditional embeddings are zeros, so each text encoder runs once, at batch 1), Euler, and the
VAE decode of the (1, 4, 128, 128) latents to the 1024x1024 image, once decoding the whole image and
once with `pipe.vae.enable_tiling()`. Each case runs in its own subprocess (clean peaks) and reports:

- peak RSS (the process's VmHWM) over the whole generation, and its rise over the RSS once the weights
  are loaded (activations and workspace);
- per phase (text encoders, which also covers the time ids and the starting noise; denoising loop;
  VAE decode, with the conversion to uint8): its wall time and its own peak. The phases are marked
  without changing the pipeline: the peak (VmHWM) is reset through /proc/self/clear_refs at the
  U-Net's first call (the end of the text encoding) and around `pipe.decode_latents`.

Tiling and SDXL: the tile side is the VAE config's `sample_size`, which is 1024 for SDXL's VAE (as in
diffusers), so at 1024x1024 the image is one tile and `enable_tiling()` alone changes nothing. The tiled
case therefore uses --tile (default 512 pixels: 64-latent tiles, 3x3 of them at 1024x1024; in diffusers,
``vae.tile_sample_min_size = 512; vae.tile_latent_min_size = 64``); `--tile 1024` measures SDXL's own setting.

    python tools/mem_sdxl.py                            # full size: both cases, each building the 13.9 GB of weights
    python tools/mem_sdxl.py --tiling on                # only the tiled case
    python tools/mem_sdxl.py --scale 8 --size 256 --tile 128   # 1/8-width parts: checks the tool in seconds

Memory does not depend on the number of steps (every step allocates and frees the same arrays), so
--steps defaults to 1; time does (one full-size U-Net call at batch 2 takes about 2 minutes on 2 cores).
The tool refuses to start when /proc/meminfo's MemAvailable is below --min-free-gb (default 18) at
full size, unless --force. Never part of the tests.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tools.bench_sdxl import mem_available_gb, scaled_config  # noqa: E402
from tools.bench_unet import PeakMemory, _status_kb  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0: text_encoder/, text_encoder_2/, vae/ and scheduler/ configs
# (the keys the forward pass reads)
SDXL_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", projection_dim=768, eos_token_id=2)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           hidden_act="gelu", projection_dim=1280, eos_token_id=2)
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      use_karras_sigmas=False, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
                      skip_prk_steps=True)
PARAMETERS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
              "vae": 83_653_863}
CLIP_BPE = os.path.join(ROOT, "tests", "data", "clip-bpe", "bpe_simple_vocab_16e6.txt.gz")
PROMPT = "a photo of an astronaut riding a horse on mars"
MIB = 2 ** 20


# -- the model: configs, random weights, tokenizers -------------------------------------------------------------

def _heads(width: int) -> int:
    """64-channel heads where they fit, and a count that divides the width."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def configs(scale: int) -> dict:
    """{part: config dict}: SDXL base, every width divided by `scale` (depths kept), as bench_sdxl's scaled_config."""
    text = dict(SDXL_TEXT_ENCODER)
    text_2 = dict(SDXL_TEXT_ENCODER_2)
    vae = dict(SDXL_VAE)
    if scale > 1:
        for cfg in (text, text_2):
            cfg["hidden_size"] //= scale
            cfg["intermediate_size"] //= scale
            cfg["projection_dim"] //= scale
            cfg["num_attention_heads"] = _heads(cfg["hidden_size"])
        vae["block_out_channels"] = [c // scale for c in SDXL_VAE["block_out_channels"]]
        vae["norm_num_groups"] = max(1, 32 // scale)
    unet = scaled_config(scale)
    # the U-Net reads the two encoders' hidden states side by side, and the pooled embedding of encoder 2
    unet["cross_attention_dim"] = text["hidden_size"] + text_2["hidden_size"]
    unet["projection_class_embeddings_input_dim"] = text_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    return {"unet": unet, "text_encoder": text, "text_encoder_2": text_2, "vae": vae}


def random_weights(model, rng) -> dict:
    """{key: float32 array} for every declared tensor: matrices and kernels N(0, 1/fan_in) (so activations
    stay of order 1 through the depth), norm scales N(1, 0.1^2), biases and the rest N(0, 0.1^2).
    Generated in float32 and scaled in place: no float64 temporaries."""
    state = {}
    for key, _, _, value in model.params():
        shape = tuple(value.shape)
        w = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2:
            w *= np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
        elif "norm" in key and key.endswith("weight"):
            w *= np.float32(0.1)
            w += np.float32(1.0)
        else:
            w *= np.float32(0.1)
        state[key] = w
    return state


def clip_tokenizer(pad_token: str):
    """refldm's CLIPTokenizer with CLIP's real BPE (tests/data/clip-bpe): vocabulary 49,408 as in SDXL's."""
    from refldm.models.tokenizer import CLIPTokenizer, clip_vocab
    lines = gzip.open(CLIP_BPE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = clip_vocab(merges)
    return CLIPTokenizer({t: i for i, t in enumerate(vocab)}, merges, pad_token=pad_token, source=CLIP_BPE)


def build_pipeline(scale: int, seed: int):
    """A StableDiffusionXLPipeline of random float32 weights; tokenizer_2 pads with "!" as SDXL's does."""
    from refldm.models.clip import CLIPTextModel, CLIPTextModelWithProjection
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline

    cfgs = configs(scale)
    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection, "vae": AutoencoderKL}
    models = {}
    for i, (part, cls) in enumerate(classes.items()):
        model = cls.from_config(cfgs[part], where=f"SDXL {part} config")
        if scale == 1 and model.num_parameters() != PARAMETERS[part]:
            raise SystemExit(f"mem_sdxl: the {part} has {model.num_parameters():,} parameters, expected "
                             f"{PARAMETERS[part]:,} (SDXL base)")
        models[part] = model.load_state_dict(random_weights(model, np.random.default_rng(seed + i)),
                                             dtype="float32", source=f"random {part}")
    return StableDiffusionXLPipeline(models["vae"], models["text_encoder"], models["text_encoder_2"],
                                     clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), models["unet"],
                                     SDXL_SCHEDULER, cfgs, name=f"SDXL base (random, 1/{scale} width)")


# -- phases ------------------------------------------------------------------------------------------------------

class Phases:
    """Consecutive phases of one run, each its wall time and its own peak RSS (tools/bench_unet's PeakMemory:
    VmHWM reset through /proc/self/clear_refs as the phase starts)."""

    def __init__(self):
        self.rows = []  # (name, seconds, peak RSS in bytes)
        self.name = None

    def start(self, name: str):
        if self.name is not None:
            self.end()
        self.name, self.t0 = name, time.perf_counter()
        self.mem = PeakMemory().__enter__()

    def end(self):
        self.mem.__exit__(None, None, None)
        peak = self.mem.before * 1024 + self.mem.peak  # RSS at the start + the rise: the phase's VmHWM
        self.rows.append((self.name, time.perf_counter() - self.t0, peak))
        self.name = None


class FirstCall:
    """A model that calls `hook()` once, just before its first call; everything else is the model's."""

    def __init__(self, model, hook):
        self._model, self._hook = model, hook

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return self._model(*args, **kwargs)


def run_case(args, tiling: bool) -> dict:
    """Build the pipeline, generate one image, return the measurements (in this process)."""
    t0 = time.perf_counter()
    pipe = build_pipeline(args.scale, args.seed)
    gc.collect()
    build_s = time.perf_counter() - t0
    weights = sum(int(a.nbytes) for part in ("unet", "text_encoder", "text_encoder_2", "vae")
                  for a in getattr(pipe, part).state_dict().values())
    rss_loaded = _status_kb("VmRSS") * 1024
    hwm_build = _status_kb("VmHWM") * 1024
    if tiling:
        pipe.vae.config.sample_size = args.tile  # the tile side (diffusers: vae.tile_sample_min_size)
        pipe.vae.enable_tiling()

    phases = Phases()
    pipe.unet = FirstCall(pipe.unet, lambda: phases.start("denoising loop"))
    decode = pipe.decode_latents

    def timed_decode(latents):
        phases.start("VAE decode")
        pixels = decode(latents)
        phases.start("to PIL image")
        return pixels

    pipe.decode_latents = timed_decode
    phases.start("text encoders")
    out = pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=5.0,
               seed=args.seed, progress=False)
    phases.end()
    image = np.asarray(out.images[0])
    return {"tiling": tiling, "tile": args.tile if tiling else None, "size": args.size, "scale": args.scale,
            "steps": args.steps, "weights_bytes": weights, "rss_loaded": rss_loaded, "hwm_build": hwm_build,
            "build_s": build_s, "phases": phases.rows, "image": [list(image.shape), float(image.std())],
            "pipeline_timings": out.timings}


# -- reporting ---------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    total = _meminfo_gb("MemTotal")
    from refldm import accel, backend
    return (f"{cpu}, {os.cpu_count()} cores, {total:.1f} GiB RAM, {mem_available_gb():.1f} GiB available, "
            f"load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}, NumPy {np.__version__}, "
            f"refldm on {accel.num_threads()} threads, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}")


def _meminfo_gb(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def report_case(r: dict) -> str:
    """One case as lines of text: the phase table, then the peak."""
    label = f"tiled VAE ({r['tile']}-pixel tiles)" if r["tiling"] else "whole-image VAE decode"
    base = r["rss_loaded"]
    lines = [f"\n{label}: weights {r['weights_bytes'] / 1e9:.2f} GB ({_mib(r['weights_bytes'])}); RSS once loaded "
             f"{_mib(base)} (built in {r['build_s']:.1f} s, peak while building {_mib(r['hwm_build'])})",
             "| phase | wall time | peak RSS | peak above the loaded weights |", "| --- | ---: | ---: | ---: |"]
    for name, sec, peak in r["phases"]:
        lines.append(f"| {name} | {sec:.1f} s | {_mib(peak)} | {_mib(peak - base)} |")
    name, _, peak = max(r["phases"], key=lambda row: row[2])
    total = sum(sec for _, sec, _ in r["phases"])
    lines.append(f"| **whole generation** | {total:.1f} s | **{_mib(peak)}** | **{_mib(peak - base)}** (in: {name}) |")
    return "\n".join(lines)


def summary_row(r: dict) -> str:
    phases = {name: (sec, peak) for name, sec, peak in r["phases"]}
    base = r["rss_loaded"]
    name, _, peak = max(r["phases"], key=lambda row: row[2])
    cells = [f"{phases[p][0]:.1f} s, +{phases[p][1] / MIB - base / MIB:,.0f} MiB"
             for p in ("text encoders", "denoising loop", "VAE decode")]
    label = f"tiled VAE, {r['tile']}-pixel tiles" if r["tiling"] else "whole-image decode"
    total = sum(sec for _, sec, _ in r["phases"])
    return (f"| {r['size']}x{r['size']}, {label} | {_mib(peak)} | {_mib(peak - base)} | {name} | "
            + " | ".join(cells) + f" | {total:.1f} s |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image height and width (default 1024)")
    parser.add_argument("--steps", type=int, default=1,
                        help="denoising steps (default 1: memory does not depend on the step count, time does)")
    parser.add_argument("--scale", type=int, default=1, choices=[1, 2, 4, 8, 16],
                        help="divide every width by this (1 = the real SDXL); for checking the tool")
    parser.add_argument("--tiling", choices=["off", "on", "both"], default="both")
    parser.add_argument("--tile", type=int, default=512,
                        help="tile side in pixels for the tiled case (default 512; SDXL's VAE says 1024, one "
                             "tile for a 1024x1024 image)")
    parser.add_argument("--min-free-gb", type=float, default=18.0)
    parser.add_argument("--force", action="store_true", help="run even with less memory available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", choices=["off", "on"], help=argparse.SUPPRESS)    # a subprocess: one case
    parser.add_argument("--result", help=argparse.SUPPRESS)                         # ... writes its JSON here
    args = parser.parse_args(argv)
    if args.size % 8 or args.size < 8:
        parser.error(f"--size {args.size} must be a positive multiple of 8")
    if args.tile % 8 or args.tile < 8:
        parser.error(f"--tile {args.tile} must be a positive multiple of 8")

    if args.case is not None:  # the subprocess
        result = run_case(args, tiling=args.case == "on")
        with open(args.result, "w") as f:
            json.dump(result, f)
        print(report_case(result), flush=True)
        return

    free = mem_available_gb()
    need = sum(PARAMETERS.values()) * 4 / 2 ** 30
    if args.scale == 1 and free < args.min_free_gb and not args.force:
        sys.exit(f"mem_sdxl: {free:.1f} GiB available, below --min-free-gb {args.min_free_gb:g} (the weights alone "
                 f"are {need:.1f} GiB in float32); not started. Use --scale 8 to check the tool, or --force")
    print(f"SDXL base text to image, 1/{args.scale} width, {args.size}x{args.size}, float32, {args.steps} step(s), "
          f"guidance 5.0 (U-Net batch 2), one prompt\nmachine: {machine()}", flush=True)
    cases = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.tiling]
    if "on" in cases and args.size <= args.tile:
        print(f"note: a {args.size}x{args.size} image fits in one {args.tile}-pixel tile: tiling changes nothing",
              flush=True)
    results = []
    for case in cases:  # each in its own process: a clean peak, and the first case's arrays cannot linger
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--result", path,
                   "--size", str(args.size), "--steps", str(args.steps), "--scale", str(args.scale),
                   "--tile", str(args.tile), "--seed", str(args.seed)]
            done = subprocess.run(cmd)
            if done.returncode != 0:
                killed = " (killed: out of memory?)" if done.returncode == -9 else ""
                sys.exit(f"mem_sdxl: the {case!r} case failed (exit status {done.returncode}{killed})")
            with open(path) as f:
                results.append(json.load(f))

    print("\n| case | peak RSS | peak above the loaded weights | phase of the peak | text encoders | "
          f"denoising loop ({args.steps} step{'s' if args.steps > 1 else ''}) | VAE decode | generation |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(summary_row(r))
    print(f"\n(phase cells: wall time, and the phase's peak above the loaded weights; weights "
          f"{results[0]['weights_bytes'] / 1e9:.2f} GB, RSS once loaded {_mib(results[0]['rss_loaded'])})")


if __name__ == "__main__":
    main()
