"""Shared bits of the training scripts: the model configurations, image <-> tensor conversion, logging."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: F401  (re-exported: `from common import data`)

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting for each other make torch
# five times slower; passive waiting must be chosen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ------------------------------------------------------------------------------------------------
# The architectures: exactly Stable Diffusion's classes, scaled down.

# AutoencoderKL: 64x64x3 -> 8x8x4 (four blocks, three 2x downsamplings), like SD's 512 -> 64.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 64, 64],
    layers_per_block=1,
    norm_num_groups=8,
    act_fn="silu",
)

# CLIPTextModel: a 2-layer, 64-wide causal transformer over at most 32 tokens.
MAX_TOKENS = 32
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=64,
)

# UNet2DConditionModel on 8x8x4 latents: 8x8 -> 4x4 -> 2x2, cross-attention at 8x8 and 4x4 and in
# the middle block, SD 1.x style ("attention_head_dim" is the number of heads there).
UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[64, 128, 128],
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    norm_num_groups=8,
)

# The noise schedule: SD's (scaled_linear betas from 0.00085 to 0.012 over 1000 steps); the U-Net
# predicts v, as SD 2.x's 768-v models do (see train_unet.py for why).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
    clip_sample=False, set_alpha_to_one=False,
)


def to_tensor(images_uint8):
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 torch tensor in [-1, 1]."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x):
    """(N, 3, H, W) torch tensor in [-1, 1] -> (N, H, W, 3) uint8 NumPy array."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to("cpu").numpy().astype(np.uint8)


def psnr(a_uint8, b_uint8) -> np.ndarray:
    """Per-image PSNR in dB between uint8 images: 10 log10(255^2 / MSE)."""
    d = a_uint8.astype(np.float64) - b_uint8.astype(np.float64)
    mse = (d * d).reshape(len(d), -1).mean(axis=1)
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


class Log:
    """Print a line and append it to a log file, with the elapsed wall-clock time."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def __call__(self, msg: str):
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def setup_torch(seed: int, threads: int):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")




def save_checkpoint(path, models: dict, optimizer, meta: dict):
    """A checkpoint without pickle: every tensor into one safetensors file (model weights under
    "<name>.<key>", optimizer state under "opt.<param index>.<name>"), the rest as JSON metadata.
    Written to a temporary name and renamed, so a crash never leaves a half-written checkpoint."""
    from safetensors.torch import save_file
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, m in models.items()
               for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"opt.{idx}.{k}"] = v.detach().reshape(-1) if v.ndim == 0 else v.detach().contiguous()
    md = {"meta": json.dumps(meta), "param_groups": json.dumps(opt["param_groups"])}
    tmp = str(path) + ".tmp"
    save_file(tensors, tmp, metadata=md)
    os.replace(tmp, path)


def load_checkpoint(path, models: dict, optimizer) -> dict:
    """Inverse of save_checkpoint; returns the metadata dict."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        md = f.metadata()
    for name, m in models.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.reshape(()) if key == "step" else v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
    return json.loads(md["meta"])


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warmup for `warmup` steps, then cosine decay from `peak` to `final_frac * peak`."""
    import math
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def parse_cycles(text: str):
    """"1500:5e-4,4000:5e-4" -> [(1500, 5e-4), (4000, 5e-4)]: cosine cycles (warm restarts) that
    follow the first one."""
    cycles = []
    for part in filter(None, text.split(",")):
        steps, lr = part.split(":")
        cycles.append((int(steps), float(lr)))
    return cycles


def lr_with_restarts(step: int, first: tuple, restarts: list, restart_warmup: int = 50) -> float:
    """The learning rate at `step` of a schedule made of cosine cycles (SGDR-style warm restarts).

    first = (steps, peak, warmup) is the first cycle; each (steps, peak) of `restarts` follows it with
    a `restart_warmup`-step warmup. A run can thus be extended by appending a cycle: the steps already
    taken keep the learning rates they had."""
    steps, peak, warmup = first
    if step < steps:
        return lr_at(step, steps, peak, warmup)
    step -= steps
    for steps, peak in restarts:
        if step < steps:
            return lr_at(step, steps, peak, restart_warmup)
        step -= steps
    return lr_at(steps, steps, peak, restart_warmup)  # past the end: the last cycle's final rate

