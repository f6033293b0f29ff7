"""``refldm cost`` and ``refldm vae-report``: why latent diffusion runs on latents, with numbers.

    refldm cost                              # the built-in model, 512x512, 25 steps, batch 2
    refldm cost path/to/sd15 -H 512 -W 512 --json
    refldm cost path/to/unet/config.json --measure
    refldm vae-report photo.png -m path/to/vae -o report.png

``cost`` counts one U-Net step on the latent and on pixels (refldm/analysis/cost.py); ``vae-report`` encodes and
decodes images and measures what survived (refldm/analysis/vae_report.py). docs/why-latent.md reads both.
"""

from __future__ import annotations

import json
import time

_DTYPE_BYTES = {"float16": 2, "float32": 4}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cost", help="FLOPs and activation memory of a denoising step: latent vs pixels",
        description="Count, from the U-Net's config, the multiply-adds (2 FLOPs each, whole batch) and the "
                    "activation memory of one denoising step on the latent, next to the same U-Net run on "
                    "the RGB pixels (conv_in/conv_out adapted to 3 channels), with the loop's total and one "
                    "VAE encode/decode.")
    p.add_argument("model", nargs="?", default=None,
                   help="pipeline folder (unet/ and vae/), U-Net folder, or U-Net config.json; default: the "
                        "built-in model")
    p.add_argument("-H", "--height", type=int, default=512, help="image height in pixels (default 512)")
    p.add_argument("-W", "--width", type=int, default=512, help="image width in pixels (default 512)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (default 2: the classifier-free-"
                   "guidance pair of one image)")
    p.add_argument("--tokens", type=int, default=None,
                   help="text tokens per prompt (default 77, CLIP; 333 for SD3: 77 CLIP + 256 T5)")
    p.add_argument("--dtype", default="float16", choices=sorted(_DTYPE_BYTES),
                   help="bytes per activation value (default float16, as SD runs on GPUs)")
    p.add_argument("--blocks", action="store_true", help="also print the FLOPs of every top-level block")
    p.add_argument("--measure", action="store_true", help="also time one refldm step (random weights) on "
                   "the latent and on pixels at a small size, to compare the count with the time")
    p.add_argument("--measure-size", type=int, default=64, help="image side for --measure (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run_cost)

    p = subparsers.add_parser(
        "vae-report", help="what a VAE keeps and loses: PSNR, SSIM, frequency bands, edges",
        description="Encode each image with the VAE (the posterior mean: deterministic), decode it, and "
                    "measure what survived: PSNR on 8-bit RGB, SSIM, the energy kept per radial frequency "
                    "band, edge preservation, and the worst region. Writes a picture with -o. Large images "
                    "run whole, or tile by tile with --tiling.")
    p.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...), each measured at its own size; "
                   "grayscale and RGBA are converted to RGB, sizes not divisible by the VAE's factor are padded "
                   "(both said in a note)")
    p.add_argument("--probes", action="store_true", help="also run the built-in test images (thin lines, "
                   "text, zone plate, checkerboards, flat colours, gradient, noise; refldm/analysis/probe_images.py)")
    p.add_argument("--probe-size", type=int, default=128, help="side of the probe images (default 128)")
    p.add_argument("-m", "--model", default=None, help="VAE folder or pipeline folder with vae/ (default: "
                   "the built-in model's VAE)")
    p.add_argument("-o", "--output", default=None, help="report picture (PNG): input, reconstruction, "
                   "amplified error and band curve, one row per image")
    p.add_argument("--bands", type=int, default=8, help="radial frequency bands (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.add_argument("--tiling", action="store_true", help="encode and decode tile by tile (vae.enable_tiling(), "
                   "as diffusers): bounded memory for large images; tile borders are cross-faded")
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    p.set_defaults(func=run_vae_report)


# ---------------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------------

MAX_MEASURE_SIZE = 2048


def cost_figures(model=None, height=512, width=512, steps=25, batch=2, tokens=None, dtype="float16") -> dict:
    """Everything ``refldm cost`` prints, as a dict (the --json object)."""
    from refldm.analysis import cost

    sd3, flux = cost.find_sd3_configs(model), cost.find_flux_configs(model)
    tokens = (333 if sd3 else 512 if flux else 77) if tokens is None else tokens
    for name, v in (("height", height), ("width", width), ("steps", steps), ("batch", batch),
                    ("tokens", tokens)):
        if v < 1:
            raise ValueError(f"cost: --{name} must be positive, got {v}")
    if sd3 or flux:
        return _sd3_figures(sd3 or flux, height, width, steps, batch, tokens, dtype, flux=bool(flux))
    unet_cfg, vae_cfg, where = cost.find_configs(model)
    shape = cost.UNetShape.from_config(unet_cfg, where=where)
    vae_note = "the model's vae/config.json"
    if vae_cfg is None:
        vae_cfg, vae_note = cost.SD_VAE_CONFIG, "no vae/ next to the U-Net: SD's VAE shape assumed"
    vae = cost.VAEShape.from_config(vae_cfg)
    f = vae.factor
    if height % f or width % f:
        raise ValueError(f"cost: image size {height}x{width} is not a multiple of the VAE's factor {f} "
                         f"(e.g. {max(f, height // f * f)}x{max(f, width // f * f)})")
    h, w = height // f, width // f
    latent = cost.count_unet(shape, h, w, batch, tokens)
    pixel = cost.count_unet(shape.on_pixels(vae.in_channels), height, width, batch, tokens)
    enc, dec = cost.count_vae(vae, height, width, batch=1)
    nbytes = _DTYPE_BYTES[dtype]
    out = {
        "model": where, "vae": vae_note, "height": height, "width": width, "steps": steps, "batch": batch,
        "text_tokens": tokens, "dtype": dtype, "vae_factor": f,
        "latent_shape": [batch, shape.in_channels, h, w], "pixel_shape": [batch, vae.in_channels, height, width],
        "latent_values": shape.in_channels * h * w, "pixel_values": vae.in_channels * height * width,
    }
    for name, c in (("latent", latent), ("pixel", pixel)):
        out[f"{name}_step_flops"] = c.flops
        out[f"{name}_step_flops_by_kind"] = c.flops_by_kind()
        out[f"{name}_step_norm_flops"] = c.norm_flops
        out[f"{name}_step_activation_bytes"] = c.peak_values * nbytes
        out[f"{name}_step_activation_bytes_chunked"] = c.peak_chunked_values * nbytes
        out[f"{name}_step_written_bytes"] = c.written_values * nbytes
        out[f"{name}_largest_attention_scores_bytes"] = c.largest_scores * nbytes
        out[f"{name}_loop_flops"] = steps * c.flops
    out["pixel_over_latent_flops"] = pixel.flops / latent.flops
    out["vae_encode_flops"] = enc.flops
    out["vae_decode_flops"] = dec.flops
    out["latent_total_flops"] = steps * latent.flops + dec.flops
    out["latent_step_flops_by_block"] = latent.flops_by_block()
    out["pixel_step_flops_by_block"] = pixel.flops_by_block()
    return out


def _sd3_figures(found, height, width, steps, batch, tokens, dtype, flux=False) -> dict:
    """cost_figures for an SD3 / SD3.5 folder: the MMDiT (`count_sd3`) on the 16-channel latent, and the same
    transformer with 2 x 2 patches on the pixels, in the U-Net figures' keys. flux: a FLUX.1 folder
    (`count_flux`: 2 x 2 packing of the latent's 16 channels into 64, of the pixels' 3 into 12)."""
    from refldm.analysis import cost

    config, vae_cfg, where = found
    vae = cost.VAEShape.from_config(vae_cfg)
    f, p = vae.factor, 2 if flux else config.get("patch_size", 2)
    if height % (f * p) or width % (f * p):
        raise ValueError(f"cost: image size {height}x{width} is not a multiple of {f * p} (the VAE's factor {f} x "
                         f"{'the 2 x 2 packing' if flux else 'patch_size'} {p})")
    h, w = height // f, width // f
    if flux:
        channels = vae.latent_channels
        latent = cost.count_flux(config, h, w, batch, tokens)
        pixel = cost.count_flux({**config, "in_channels": 4 * vae.in_channels, "out_channels": 4 * vae.in_channels},
                                height, width, batch, tokens)
    else:
        channels = config.get("in_channels", 16)
        latent = cost.count_sd3(config, h, w, batch, tokens)
        pixel = cost.count_sd3({**config, "in_channels": vae.in_channels, "out_channels": vae.in_channels},
                               height, width, batch, tokens)
    enc, dec = cost.count_vae(vae, height, width, batch=1)
    nbytes = _DTYPE_BYTES[dtype]
    out = {"model": where, "vae": "the model's vae/config.json", "height": height, "width": width, "steps": steps,
           "batch": batch, "text_tokens": tokens, "dtype": dtype, "vae_factor": f,
           "denoiser": "FLUX transformer" if flux else "MMDiT",
           "latent_shape": [batch, channels, h, w], "pixel_shape": [batch, vae.in_channels, height, width],
           "latent_values": channels * h * w, "pixel_values": vae.in_channels * height * width}
    for name, c in (("latent", latent), ("pixel", pixel)):
        out[f"{name}_step_flops"] = c.flops
        out[f"{name}_step_flops_by_kind"] = c.flops_by_kind()
        out[f"{name}_step_norm_flops"] = c.norm_flops
        out[f"{name}_step_activation_bytes"] = c.peak_values * nbytes
        out[f"{name}_step_activation_bytes_chunked"] = c.peak_chunked_values * nbytes
        out[f"{name}_step_written_bytes"] = c.written_values * nbytes
        out[f"{name}_largest_attention_scores_bytes"] = c.largest_scores * nbytes
        out[f"{name}_loop_flops"] = steps * c.flops
        out[f"{name}_step_flops_by_block"] = c.flops_by_block()
    out["pixel_over_latent_flops"] = pixel.flops / latent.flops
    out["vae_encode_flops"] = enc.flops
    out["vae_decode_flops"] = dec.flops
    out["latent_total_flops"] = steps * latent.flops + dec.flops
    return out


def _si(n: float, unit: str = "FLOP") -> str:
    for prefix, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g} {prefix}{unit}"
    return f"{n:.4g} {unit}"


def _bytes(n: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{int(n)} B"


def run_cost(args) -> int:
    fig = cost_figures(args.model, args.height, args.width, args.steps, args.batch, args.tokens, args.dtype)
    if args.measure:
        if fig.get("denoiser") == "FLUX transformer":
            raise ValueError(f"cost --measure: timing the {fig['denoiser']} is not implemented yet; the count above "
                             "does not need it")
        measure = measure_mmdit_step if fig.get("denoiser") == "MMDiT" else measure_step
        fig["measure"] = measure(args.model, args.measure_size, args.batch, fig["text_tokens"])
    if args.json:
        print(json.dumps(fig, indent=1))
        return 0
    lat, pix = fig["latent_shape"], fig["pixel_shape"]
    print(f"refldm cost: {fig.get('denoiser', 'U-Net')} of {fig['model']}, {fig['height']}x{fig['width']} image, "
          f"batch {fig['batch']}, "
          f"{fig['text_tokens']} text tokens, activations in {fig['dtype']}")
    rows = [
        ("", f"latent {lat[1]}x{lat[2]}x{lat[3]}", f"pixels {pix[1]}x{pix[2]}x{pix[3]}", "pixels/latent"),
        ("values per image", f"{fig['latent_values']:,}", f"{fig['pixel_values']:,}",
         f"{fig['pixel_values'] / fig['latent_values']:.3g}x"),
    ]

    def row(label, key, fmt):
        a, b = fig[f"latent_{key}"], fig[f"pixel_{key}"]
        rows.append((label, fmt(a), fmt(b), f"{b / a:.4g}x" if a else "-"))

    row("FLOPs per step", "step_flops", _si)
    for kind, label in (("conv", "  convolutions"), ("linear", "  linear layers"),
                        ("attention", "  attention products")):
        a, b = fig["latent_step_flops_by_kind"][kind], fig["pixel_step_flops_by_kind"][kind]
        rows.append((label, _si(a), _si(b), f"{b / a:.4g}x" if a else "-"))
    row("  norms (not in the total)", "step_norm_flops", _si)
    row(f"FLOPs, {fig['steps']} steps", "loop_flops", _si)
    row("activations, peak live", "step_activation_bytes", _bytes)
    row("  with chunked attention", "step_activation_bytes_chunked", _bytes)
    row("  largest score matrix", "largest_attention_scores_bytes", _bytes)
    row("  written per step", "step_written_bytes", _bytes)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(s.ljust(widths[0]) if i == 0 else s.rjust(widths[i]) for i, s in enumerate(r)))
    if args.blocks:
        print("FLOPs per block (latent / pixels):")
        latent, pixel = fig["latent_step_flops_by_block"], fig["pixel_step_flops_by_block"]
        for name in latent:
            print(f"  {name:<18} {_si(latent[name]):>14} {_si(pixel[name]):>14}")
    print(f"VAE ({fig['vae']}), one image: encode {_si(fig['vae_encode_flops'])}, "
          f"decode {_si(fig['vae_decode_flops'])}")
    print(f"latent loop + one decode: {_si(fig['latent_total_flops'])}; pixel loop: "
          f"{_si(fig['pixel_loop_flops'])} ({fig['pixel_loop_flops'] / fig['latent_total_flops']:.3g}x)")
    print("FLOPs = 2 x multiply-adds of convolutions, linear layers and the attention products Q K^T and "
          "P V (torch.utils.flop_counter's count); peak live = skips held + a layer's input and output "
          "+ its full attention score matrix (docs/why-latent.md)")
    if "measure" in fig:
        _print_measure(fig["measure"])
    return 0


def measure_step(model, size: int, batch: int, tokens: int) -> dict:
    """Time one refldm U-Net call (random weights, float32, on the active backend) on the latent of a
    size x size image and on its pixels; report the counted FLOPs and seconds of each."""
    import numpy as np

    from refldm import backend
    from refldm.analysis import cost
    from refldm.models.unet import UNet2DConditionModel

    unet_cfg, vae_cfg, where = cost.find_configs(model)
    vae = cost.VAEShape.from_config(vae_cfg or cost.SD_VAE_CONFIG)
    f = vae.factor
    if size < f or size % f:
        raise ValueError(f"cost: --measure-size {size} is not a positive multiple of the VAE's factor {f}")
    if size > MAX_MEASURE_SIZE:
        raise ValueError(f"cost: --measure-size {size} is over {MAX_MEASURE_SIZE} (one step at that size takes "
                         "minutes and GBs on a CPU; the counted figures need no --measure)")
    shape = cost.UNetShape.from_config(unet_cfg, where=where)
    if shape.addition_embed_type is not None:
        raise ValueError(f"cost --measure: {where} has addition_embed_type={shape.addition_embed_type!r} "
                         "(SDXL); timing it is not implemented yet, the count above does not need it")
    rng = np.random.default_rng(0)
    out = {"size": size, "batch": batch, "dtype": "float32", "backend": backend.name()}
    for name, channels, side in (("latent", shape.in_channels, size // f), ("pixel", vae.in_channels, size)):
        cfg = {k: v for k, v in unet_cfg.items()}
        cfg["in_channels"] = cfg["out_channels"] = channels
        try:
            net = UNet2DConditionModel.from_config(cfg, where=where)
        except ValueError as e:
            raise ValueError(f"cost --measure: refldm cannot build this U-Net ({e})") from None
        state = {key: (rng.standard_normal(value.shape) * 0.02).astype(np.float32)
                 for key, _, _, value in net.params()}
        net.load_state_dict(state, dtype="float32", source="random weights")
        cross = net.config.cross_attention_dim[0]
        x = backend.asarray(rng.standard_normal((batch, channels, side, side)).astype(np.float32))
        c = backend.asarray(rng.standard_normal((batch, tokens, cross)).astype(np.float32))
        net(x, 500.0, c)                                            # warm-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            backend.to_numpy(net(x, 500.0, c))
            times.append(time.perf_counter() - t0)
        flops = cost.count_unet(cfg, side, side, batch, tokens).flops
        out[name] = {"shape": [batch, channels, side, side], "flops": flops, "seconds": min(times),
                     "gflops_per_second": flops / min(times) / 1e9}
    out["time_ratio"] = out["pixel"]["seconds"] / out["latent"]["seconds"]
    out["flops_ratio"] = out["pixel"]["flops"] / out["latent"]["flops"]
    return out


def measure_mmdit_step(model, size: int, batch: int, tokens: int) -> dict:
    """`measure_step` for an SD3 / SD3.5 folder: one refldm SD3Transformer2DModel call (random weights, float32)
    on the 16-channel latent of a size x size image and, with in_channels = 3, on its pixels (the position table
    widened to the pixel grid where it is smaller: it changes no FLOP); the counted FLOPs (`count_sd3`) and the
    seconds of each (best of 2, after a warm-up)."""
    import numpy as np

    from refldm import backend
    from refldm.analysis import cost
    from refldm.models.sd3_transformer import SD3Transformer2DModel

    config, vae_cfg, where = cost.find_sd3_configs(model)
    vae = cost.VAEShape.from_config(vae_cfg)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    f, p = vae.factor, config.get("patch_size", 2)
    if size < f * p or size % (f * p):
        raise ValueError(f"cost: --measure-size {size} is not a positive multiple of {f * p} (the VAE's factor {f} "
                         f"x patch_size {p})")
    if size > MAX_MEASURE_SIZE:
        raise ValueError(f"cost: --measure-size {size} is over {MAX_MEASURE_SIZE} (one step at that size takes "
                         "minutes and GBs on a CPU; the counted figures need no --measure)")
    rng = np.random.default_rng(0)
    out = {"size": size, "batch": batch, "dtype": "float32", "backend": backend.name()}
    for name, channels, side in (("latent", config.get("in_channels", 16), size // f), ("pixel", vae.in_channels, size)):
        cfg = dict(config, in_channels=channels, out_channels=channels)
        cfg["pos_embed_max_size"] = max(int(cfg.get("pos_embed_max_size", 96)), side // p)
        net = SD3Transformer2DModel.from_config(cfg, where=where)
        state = {key: (rng.standard_normal(value.shape) * 0.02).astype(np.float32)
                 for key, _, _, value in net.params()}
        net.load_state_dict(state, dtype="float32", source="random weights")
        c = net.config
        x = backend.asarray(rng.standard_normal((batch, channels, side, side)).astype(np.float32))
        ctx = backend.asarray(rng.standard_normal((batch, tokens, c.joint_attention_dim)).astype(np.float32))
        y = backend.asarray(rng.standard_normal((batch, c.pooled_projection_dim)).astype(np.float32))
        net(x, ctx, y, 500.0)                                       # warm-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            backend.to_numpy(net(x, ctx, y, 500.0))
            times.append(time.perf_counter() - t0)
        flops = cost.count_sd3(cfg, side, side, batch, tokens).flops
        out[name] = {"shape": [batch, channels, side, side], "flops": flops, "seconds": min(times),
                     "gflops_per_second": flops / min(times) / 1e9}
        del net, state
    out["time_ratio"] = out["pixel"]["seconds"] / out["latent"]["seconds"]
    out["flops_ratio"] = out["pixel"]["flops"] / out["latent"]["flops"]
    return out


def _print_measure(m) -> None:
    print(f"measured (refldm, random weights, float32, {m['backend']}, best of 2, {m['size']}x{m['size']} "
          f"image, batch {m['batch']}):")
    for name in ("latent", "pixel"):
        r = m[name]
        print(f"  {name:<6} {'x'.join(map(str, r['shape'])):<14} {_si(r['flops']):>12} "
              f"{r['seconds'] * 1e3:9.1f} ms  {r['gflops_per_second']:.3g} GFLOP/s")
    print(f"  pixels/latent: {m['flops_ratio']:.3g}x the FLOPs, {m['time_ratio']:.3g}x the time (small "
          "sizes pay fixed per-layer costs, so the time ratio trails the FLOP ratio)")


# ---------------------------------------------------------------------------------------------------
# vae-report
# ---------------------------------------------------------------------------------------------------

def run_vae_report(args) -> int:
    from refldm.analysis import vae_report

    return vae_report.run(args)
