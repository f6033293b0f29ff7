"""Plot how float32 (and float16) rounding error grows through the U-Net, against a float64 golden trace.

    pip install matplotlib   # for this tool only; refldm does not need it
    python tools/plot_error_growth.py -o docs/img/unet_error_growth.png
    python tools/plot_error_growth.py --model path/to/sd/unet -o growth.png   # your own checkpoint

Without --model it builds (with diffusers) a U-Net of Stable Diffusion 1.5's layout — the same blocks,
layers and attention heads, cross-attention on 768-wide text — at a fifth of its width, with random
weights of unit-variance scale (N(0, 1/fan_in), norm scales near 1), and saves it to a temporary folder.
It then runs, on one set of inputs (a 32x32 latent, 77 random text tokens, t = 500):

    refldm float64   the golden trace                     (refldm trace --dtype float64)
    refldm float32   measured against it                  (refldm trace --inputs golden)
    diffusers float32, PyTorch's CPU kernels              (tools/trace_diffusers.py)
    refldm float16   (with --float16)

and plots each layer's relative error max|a - b| / max|b| against the golden trace, in execution order.
The printed summaries are the ones quoted in docs/crosscheck.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refldm.crosscheck import trace
from refldm.crosscheck.compare import compare


def build_unet(folder, width: int = 64, seed: int = 0):
    """SD 1.5's U-Net layout at block widths (w, 2w, 4w, 4w), random unit-scale weights, saved to `folder`."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(folder)
    return folder


def region(name: str) -> str:
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        if name.startswith(prefix):
            return prefix
    return "other"


def is_block_output(name: str) -> bool:
    """conv_in, down_blocks.N, mid_block, up_blocks.N, conv_out: the U-Net's top-level stages."""
    parts = name.split(".")
    top_level = len(parts) == 2 and parts[0] in ("down_blocks", "up_blocks")
    return name in ("conv_in", "mid_block", "conv_out") or top_level


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    reference = results[0][1]
    names = [r.name for r in reference.rows]
    spans = {}
    for i, n in enumerate(names):
        reg = region(n)
        lo, hi = spans.get(reg, (i, i))
        spans[reg] = (min(lo, i), max(hi, i))
    shades = {"down_blocks": "#e8f0fb", "mid_block": "#fbeee0", "up_blocks": "#e9f6ea"}
    for reg, (lo, hi) in spans.items():
        if reg in shades:
            ax.axvspan(lo - 0.5, hi + 0.5, color=shades[reg], zorder=0)
            ax.text((lo + hi) / 2, 1.0, reg, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=9, color="#555")
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    for (label, cmp), colour in zip(results, colours):
        x = np.arange(len(cmp.rows))
        y = np.array([max(r.rel, 1e-20) for r in cmp.rows])
        ax.semilogy(x, y, ".-", lw=0.6, ms=2.5, color=colour, label=label)
        if colour == colours[0]:  # the block outputs of the first curve: how the error builds up
            blocks = [r for r in cmp.rows if is_block_output(r.name)]
            ax.semilogy([r.index for r in blocks], [max(r.rel, 1e-20) for r in blocks], "o-", ms=5, lw=1.6,
                        color="#ff7f0e", label=f"{label}: block outputs", zorder=5)
            for r in (blocks[0], blocks[-1]):
                ax.annotate(f"{r.name} {r.rel:.1e}", (r.index, r.rel), xytext=(-4, 40) if r is blocks[-1] else (6, -13),
                            textcoords="offset points", fontsize=7.5, ha="right" if r is blocks[-1] else "left",
                            color="#b35900", zorder=6, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
        worst = cmp.worst
        ax.annotate(f"worst: {worst.name}", (worst.index, worst.rel), xytext=(0, 4 + 9 * colours.index(colour)),
                    textcoords="offset points", fontsize=7, color=colour, ha="center")
    eps32 = np.finfo(np.float32).eps
    ax.axhline(eps32, color="#999", lw=0.8, ls="--")
    ax.text(len(names) * 0.55, eps32, "float32 unit roundoff (eps)", va="bottom", ha="left", fontsize=8, color="#777")
    ax.set_xlim(-1, len(names))
    ax.set_xlabel(f"layer, in execution order ({len(names)} recorded module outputs)")
    ax.set_ylabel("max|a - b| / max|b|  (b: float64 golden)")
    ax.set_title(title, fontsize=10, pad=16)
    ax.set_ylim(bottom=min(eps32 / 2, ax.get_ylim()[0]))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a UNet (or pipeline) folder; default: build SD 1.5's layout at 1/5 width")
    p.add_argument("--width", type=int, default=64, help="first block width of the built U-Net (SD: 320)")
    p.add_argument("--size", type=int, default=32, help="latent height and width (default 32: 256 px images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers float32 curve")
    p.add_argument("--float16", action="store_true", help="add refldm's float16 curve (slow on NumPy)")
    p.add_argument("--keep", help="also write the trace files into this folder")
    p.add_argument("-o", "--output", default="docs/img/unet_error_growth.png")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_unet(os.path.join(tmp, "unet"), args.width, args.seed)
        golden = trace.trace_part(folder, "unet", dtype="float64", seed=args.seed, height=args.size,
                                  width=args.size, timestep=500.0)
        runs = [("refldm float32", trace.trace_part(folder, "unet", dtype="float32", inputs=golden.inputs))]
        if not args.no_diffusers:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import trace_diffusers

            runs.append(("diffusers float32 (PyTorch CPU)", trace_diffusers.trace_like(golden, folder=folder,
                                                                                       dtype="float32")))
        if args.float16:
            runs.append(("refldm float16", trace.trace_part(folder, "unet", dtype="float16", inputs=golden.inputs)))
        results = []
        for label, t in runs:
            cmp = compare(t, golden, rtol=1e-4)
            cmp.name_a, cmp.name_b = label, "refldm float64"
            print(f"--- {label}\n{cmp.summary()}\n")
            results.append((label, cmp))
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                trace.save_trace(os.path.join(args.keep, label.split(" (")[0].replace(" ", "_") + ".safetensors"), t)
        if args.keep:
            trace.save_trace(os.path.join(args.keep, "golden_float64.safetensors"), golden)
        what = args.model or f"SD 1.5 U-Net layout at width {args.width} (random unit-scale weights)"
        plot(results, args.output, f"Relative error per layer against a float64 golden trace: {what}, "
             f"latent {args.size}x{args.size}, t=500")
    return 0


if __name__ == "__main__":
    sys.exit(main())
