"""A port of the Stable Diffusion VAE decoder in plain NumPy, checked against a refldm conformance bundle.

This file is the worked example of docs/porting.md. It imports nothing from refldm: it reads the bundle's
manifest.json and safetensors files itself, as a port in any language would, runs its own decoder on the
inputs of the bundle's ``vae.decode`` group, and writes what it computed as a folder of .npy files named as
the bundle's cases. Then ``refldm verify`` scores it.

    refldm vectors --tiny sd15 --out tiny-sd15
    python docs/examples/port_vae_decoder.py tiny-sd15 mine/            # the port, correct
    refldm verify tiny-sd15 mine/ --precision float64                   # exit 0
    python docs/examples/port_vae_decoder.py tiny-sd15 bad/ --bug        # the attention forgets 1/sqrt(C)
    refldm verify tiny-sd15 bad/ --precision float64                    # exit 1: first failing ...to_out.0
"""

from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}


def read_safetensors(path) -> dict:
    """{name: array}: an 8-byte little-endian header length, a JSON header, then the raw tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


# ---- the decoder: every function records its output under the diffusers module name --------------------


class Port:
    def __init__(self, weights: dict, config: dict, bug: bool = False):
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.groups = config["norm_num_groups"]
        self.levels = len(config["block_out_channels"])
        self.layers = config["layers_per_block"] + 1  # the decoder has one ResNet more per block
        self.bug = bug
        self.out = {}

    def rec(self, name, x):
        self.out[name] = x
        return x

    def conv(self, name, x, padding=1):
        """2-D convolution, stride 1: y[o] = sum_{c,i,j} W[o, c, i, j] x_pad[c, . + i, . + j] + b[o]."""
        w, b = self.w[name + ".weight"], self.w[name + ".bias"]
        k = w.shape[2]
        xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        n, c, h, wd = x.shape
        cols = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(k) for j in range(k)], axis=2)  # N,C,k*k,H,W
        y = np.einsum("ocq,ncqhw->nohw", w.reshape(w.shape[0], c, k * k), cols)
        return self.rec(name, y + b[None, :, None, None])

    def group_norm(self, name, x, eps=1e-6):
        """(x - mean) / sqrt(var + eps) * gamma + beta, statistics over each group of channels and all pixels."""
        n, c, h, w = x.shape
        g = x.reshape(n, self.groups, -1)
        g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
        y = g.reshape(n, c, h, w) * self.w[name + ".weight"][None, :, None, None] + self.w[name + ".bias"][None, :, None, None]
        return self.rec(name, y)

    def linear(self, name, x):
        return self.rec(name, x @ self.w[name + ".weight"].T + self.w[name + ".bias"])

    @staticmethod
    def silu(x):
        return x / (1 + np.exp(-x))

    def resnet(self, name, x):
        h = self.conv(name + ".conv1", self.silu(self.group_norm(name + ".norm1", x)))
        h = self.conv(name + ".conv2", self.silu(self.group_norm(name + ".norm2", h)))
        if name + ".conv_shortcut.weight" in self.w:
            x = self.conv(name + ".conv_shortcut", x, padding=0)
        return self.rec(name, x + h)

    def attention(self, name, x):
        n, c, h, w = x.shape
        t = self.group_norm(name + ".group_norm", x).reshape(n, c, h * w).transpose(0, 2, 1)  # (N, HW, C)
        q, k, v = (self.linear(f"{name}.{p}", t) for p in ("to_q", "to_k", "to_v"))
        logits = q @ k.transpose(0, 2, 1)
        if not self.bug:
            logits = logits / np.sqrt(c)  # the planted bug forgets this line
        p = np.exp(logits - logits.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True)) @ v
        out = self.linear(name + ".to_out.0", a).transpose(0, 2, 1).reshape(n, c, h, w)
        return self.rec(name, x + out)

    def decode(self, z):
        x = self.conv("post_quant_conv", z, padding=0)
        x = self.conv("decoder.conv_in", x)
        x = self.resnet("decoder.mid_block.resnets.0", x)
        x = self.attention("decoder.mid_block.attentions.0", x)
        x = self.rec("decoder.mid_block", self.resnet("decoder.mid_block.resnets.1", x))
        for i in range(self.levels):
            for j in range(self.layers):
                x = self.resnet(f"decoder.up_blocks.{i}.resnets.{j}", x)
            if i < self.levels - 1:
                x = x.repeat(2, axis=2).repeat(2, axis=3)  # nearest 2x
                x = self.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", x)
                x = self.rec(f"decoder.up_blocks.{i}.upsamplers.0", x)
            x = self.rec(f"decoder.up_blocks.{i}", x)
        x = self.silu(self.group_norm("decoder.conv_norm_out", x))
        return self.rec("decoder", self.conv("decoder.conv_out", x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("out", help="folder for the candidate .npy files")
    ap.add_argument("--bug", action="store_true", help="plant the bug: attention without 1/sqrt(C)")
    args = ap.parse_args(argv)
    manifest = json.load(open(os.path.join(args.bundle, "manifest.json"), encoding="utf-8"))
    group = next(g for g in manifest["groups"] if g["id"] == "vae.decode")
    tensors = read_safetensors(os.path.join(args.bundle, manifest["files"]["vae"]))
    latents = tensors[group["inputs"]["latents"]]
    vae = os.path.join(args.bundle, manifest["weights"]["diffusers"], "vae")
    config = json.load(open(os.path.join(vae, "config.json"), encoding="utf-8"))
    port = Port(read_safetensors(os.path.join(vae, "diffusion_pytorch_model.safetensors")), config, bug=args.bug)
    port.decode(latents)
    for layer, value in port.out.items():
        path = os.path.join(args.out, "vae.decode", layer + ".npy")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, value)
    print(f"wrote {len(port.out)} outputs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
