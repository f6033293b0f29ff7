"""Every model family in one table: refldm against torch (diffusers) on the CPU, denoiser step and VAE decode.

For each family (SD 1.x, SDXL base, SD3-medium, FLUX.1-dev) and each case (one U-Net or transformer step with
classifier-free guidance, batch 2 (FLUX: batch 1, its guidance is an embedding); one VAE decode of one image), a fresh process builds diffusers' model with random weights,
gives refldm the same weights (its arrays are views of torch's tensors), checks that the outputs agree,
then times the two sides alternately for --rounds rounds (one warm-up each first): wall time and CPU
time (time.process_time, all threads), both as medians over rounds, and the median of the per-round
ratios refldm / torch, the figure to quote on a machine whose speed drifts. It prints the machine (CPU
model, ISA, cores, load average), the threads, the versions and OpenBLAS's kernel (threadpoolctl where
installed, else NumPy's config), then one Markdown table, which --write puts into docs/performance.md
between the markers ``<!-- bench_all -->`` and ``<!-- /bench_all -->``.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python tools/bench_all.py --rounds 3       # OpenBLAS's own kernels
    python tools/bench_all.py --families sd1 --cases unet --rounds 5
    python tools/bench_all.py --scale 8 --rounds 1           # 1/8-width models: checks the tool in a minute
    python tools/bench_all.py --rounds 3 --write             # and the table into docs/performance.md

Cases and shapes (full size): SD 1.x U-Net (2, 4, 64, 64) with text (2, 77, 768); SD 1.x VAE decode
(1, 4, 64, 64) -> 512x512; SDXL base U-Net (2, 4, 128, 128) with text (2, 77, 2048) and the added
embeddings; SDXL VAE decode (1, 4, 128, 128) -> 1024x1024; SD3-medium MMDiT (2, 16, 128, 128) -> 4096 image
tokens + 333 text tokens (tools/bench_sd3.py's case); FLUX.1-dev transformer (1, 4096, 64) packed tokens + 512
T5 tokens, guidance 3.5; SD3's and FLUX's 16-channel VAE decode (1, 16, 128, 128) -> 1024x1024. A step whose
float32 weights do not fit is skipped (SDXL needs about 11 GB free, SD3 about 12, FLUX.1 about 60: refused
below --min-free-gb or the model's own need unless --force); --scale divides the widths (heads for the
transformers; their depth stays) and halves the latents.
Needs the crosscheck extra (torch, diffusers). Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DOC = os.path.join(ROOT, "docs", "performance.md")
MARK, END = "<!-- bench_all -->", "<!-- /bench_all -->"
FAMILIES = ("sd1", "sdxl", "sd3", "flux")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
NEED_GB = {"sdxl": 11.0, "sd3": 12.0, "flux": 60.0}  # free memory a full-size step needs (weights + work)
CASES = ("unet", "vae")


def _configs(family: str, scale: int) -> dict:
    from tools.bench_sdxl import scaled_config
    from tools.bench_unet import SD1
    from tools.bench_vae import SD1_VAE
    vae = dict(SD1_VAE)
    if family == "sd1":
        unet = dict(SD1)
        if scale > 1:
            unet.update(block_out_channels=[c // scale for c in (320, 640, 1280, 1280)],
                        cross_attention_dim=768 // scale, norm_num_groups=max(1, 32 // scale),
                        attention_head_dim=max(1, 8 // scale))
        latent, text = 64, unet["cross_attention_dim"]
    elif family == "sdxl":
        unet = scaled_config(scale)
        vae.update(scaling_factor=0.13025, sample_size=1024)
        latent, text = 128, unet["cross_attention_dim"]
    else:  # the transformers: "unet" is their denoiser; the 16-channel VAE without quant convs
        from tools.bench_sd3 import sd3_config
        if family == "sd3":
            unet = sd3_config(scale)
            vae.update(scaling_factor=1.5305, shift_factor=0.0609)
        else:
            heads = max(1, 24 // scale)
            unet = dict(FLUX_DEV, num_attention_heads=heads, joint_attention_dim=max(8, 4096 // scale),
                        pooled_projection_dim=max(8, 768 // scale))
            vae.update(scaling_factor=0.3611, shift_factor=0.1159)
        vae.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
        latent, text = 128, unet["joint_attention_dim"]
    if scale > 1:
        vae.update(block_out_channels=[c // scale for c in vae["block_out_channels"]],
                   norm_num_groups=max(1, 32 // scale))
        latent //= 2
    return {"unet": unet, "vae": vae, "latent": latent, "text": text}


def worker(family: str, case: str, scale: int, rounds: int, threads: int) -> dict:
    """In this process: build both sides, check agreement, time alternately; return the row."""
    import torch
    from refldm import accel
    torch.set_num_threads(threads)
    accel.set_num_threads(threads)
    cfg = _configs(family, scale)
    rng = np.random.default_rng(1)
    if case == "unet" and family in ("sd3", "flux"):
        import diffusers
        from tools.gpu_check import randomise
        torch.manual_seed(0)
        if family == "sd3":
            from refldm.models.sd3_transformer import SD3Transformer2DModel as Ours
            model = randomise(torch, diffusers.SD3Transformer2DModel(**cfg["unet"]), 0)
            x = rng.standard_normal((2, 16, cfg["latent"], cfg["latent"]), dtype=np.float32)
            ctx = rng.standard_normal((2, 333, cfg["text"]), dtype=np.float32)
            pooled = rng.standard_normal((2, cfg["unet"]["pooled_projection_dim"]), dtype=np.float32)
            t = np.full(2, 500.0, dtype=np.float32)
            args = (x, ctx, pooled, t)
            targs = tuple(torch.from_numpy(a) for a in args)
            kw = tkw = {}
            shape = f"({', '.join(map(str, x.shape))}) + 333 text tokens"
        else:
            from refldm.models.flux_transformer import FluxTransformer2DModel as Ours, latent_image_ids
            model = randomise(torch, diffusers.FluxTransformer2DModel(**cfg["unet"]), 0)
            n = (cfg["latent"] // 2) ** 2
            x = rng.standard_normal((1, n, 64), dtype=np.float32)
            ctx = rng.standard_normal((1, 512, cfg["text"]), dtype=np.float32)
            pooled = rng.standard_normal((1, cfg["unet"]["pooled_projection_dim"]), dtype=np.float32)
            t, g = np.full(1, 0.5, dtype=np.float32), np.full(1, 3.5, dtype=np.float32)
            img_ids, txt_ids = latent_image_ids(cfg["latent"] // 2, cfg["latent"] // 2), np.zeros((512, 3), int)
            args, kw = (x, ctx, pooled, t, img_ids, txt_ids), {"guidance": g}
            targs = tuple(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in args)
            tkw = {"guidance": torch.from_numpy(g)}
            shape = f"(1, {n}, 64) + 512 text tokens"
        ours = Ours.from_config(dict(model.config))
        ours.load_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype="float32",
                             source="torch model")
        run_ours = lambda: ours(*args, **kw)  # noqa: E731
        run_theirs = lambda: model(*targs, **tkw).sample  # noqa: E731
    elif case == "unet":
        from tools.bench_unet import build_torch_unet
        from refldm.models.unet import UNet2DConditionModel
        model = build_torch_unet(0, cfg["unet"])
        ours = UNet2DConditionModel.from_config(dict(model.config))
        ours.load_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype="float32",
                             source="torch model")
        x = rng.standard_normal((2, 4, cfg["latent"], cfg["latent"]), dtype=np.float32)
        ctx = rng.standard_normal((2, 77, cfg["text"]), dtype=np.float32)
        args, targs = (x, 500.0, ctx), (torch.from_numpy(x), 500, torch.from_numpy(ctx))
        kw, tkw = {}, {}
        if family == "sdxl":
            pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
            emb = rng.standard_normal((2, pooled), dtype=np.float32)
            ids = np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], dtype=np.float32), (2, 1))
            kw = {"added_cond_kwargs": {"text_embeds": emb, "time_ids": ids}}
            tkw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(emb), "time_ids": torch.from_numpy(ids)}}
        shape = f"({', '.join(map(str, x.shape))})"
        run_ours = lambda: ours(*args, **kw)  # noqa: E731
        run_theirs = lambda: model(*targs, **tkw).sample  # noqa: E731
    else:
        import diffusers
        from refldm.models.vae import AutoencoderKL
        torch.manual_seed(0)
        model = diffusers.AutoencoderKL(**cfg["vae"]).eval()
        from tools.gpu_check import randomise
        randomise(torch, model, 0)
        ours = AutoencoderKL.from_config(dict(model.config))
        ours.load_state_dict({k: v.detach().numpy() for k, v in model.state_dict().items()}, dtype="float32",
                             source="torch model")
        z = rng.standard_normal((1, cfg["vae"]["latent_channels"], cfg["latent"], cfg["latent"]), dtype=np.float32)
        shape = f"({', '.join(map(str, z.shape))}) -> {cfg['latent'] * 8}x{cfg['latent'] * 8}"
        run_ours = lambda: ours.decode(z)  # noqa: E731
        run_theirs = lambda: model.decode(torch.from_numpy(z)).sample  # noqa: E731
    with torch.no_grad():
        ref = run_theirs().numpy()                                  # torch's warm-up
        got = np.asarray(run_ours())                                # refldm's warm-up
        agree = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        wall = {"refldm": [], "torch": []}
        cpu = {"refldm": [], "torch": []}
        for _ in range(rounds):
            for side, fn in (("torch", run_theirs), ("refldm", run_ours)):
                t, c = time.perf_counter(), time.process_time()
                fn()
                wall[side].append(time.perf_counter() - t)
                cpu[side].append(time.process_time() - c)
    ratios = [a / b for a, b in zip(wall["refldm"], wall["torch"])]
    return {"family": family, "case": case, "scale": scale, "shape": shape, "rounds": rounds,
            "parameters": sum(int(p.numel()) for p in model.parameters()), "agreement": agree,
            "wall": wall, "cpu": cpu, "ratio_median": statistics.median(ratios), "ratios": ratios,
            "load_average": os.getloadavg()[0]}


def machine() -> dict:
    cpu, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    out = {"cpu": cpu, "isa": isa + (" + FMA" if "fma" in flags else ""), "cores": os.cpu_count(),
           "python": platform.python_version(), "numpy": np.__version__,
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    try:
        from numpy.lib.introspect import opt_func_info
        out["numpy_exp_float32"] = opt_func_info(func_name="exp$", signature="float32")["exp"]["ff"]["current"]
    except Exception:  # noqa: BLE001
        pass
    try:
        import threadpoolctl
        info = [i for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
        out["openblas"] = ", ".join(f"{i.get('version')} {i.get('architecture')}" for i in info)
    except ImportError:
        out["openblas"] = _openblas_from_numpy()
    import torch
    out["torch"] = torch.__version__
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    import diffusers
    out["diffusers"] = diffusers.__version__
    return out


def _openblas_from_numpy() -> str:
    """OpenBLAS's version and the kernel it chose (its get_corename), through the library NumPy loaded."""
    import ctypes
    from refldm.accel.blas import _loaded_openblas
    found = []
    for lib in _loaded_openblas():   # scipy-openblas (NumPy's wheels) or a plain OpenBLAS
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                core, config = (getattr(lib, f"{prefix}get_{n}{suffix}", None) for n in ("corename", "config"))
                if core is not None:
                    core.restype = ctypes.c_char_p
                    text = core().decode()
                    if config is not None:
                        config.restype = ctypes.c_char_p
                        text = config().decode().split()[1] + " " + text
                    found.append(text)
                    break
            if found:
                break
    return ", ".join(found) or "unknown"


def table(rows: list, info: dict, threads: int) -> str:
    names = {"sd1": "SD 1.x", "sdxl": "SDXL base", "sd3": "SD3-medium", "flux": "FLUX.1-dev"}
    cases = {"unet": "U-Net step", "vae": "VAE decode"}
    step = {"sd3": "MMDiT step", "flux": "transformer step"}
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['isa']}; {threads} threads each; Python "
             f"{info['python']}, NumPy {info['numpy']} (float32 exp: {info.get('numpy_exp_float32', '?')}), OpenBLAS "
             f"{info.get('openblas')} (OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}), torch {info['torch']} "
             f"({info['torch_cpu_capability']}), diffusers {info['diffusers']}. Measured "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average during the rows in the last "
             "column (a loaded machine makes wall times noisy: compare the ratio, and the CPU times).",
             "",
             "| family | case | shape | torch wall (s) | refldm wall (s) | refldm / torch (median of rounds) | "
             "torch CPU (s) | refldm CPU (s) | CPU ratio | rounds | agreement | load average |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            what = step.get(r["family"], cases[r["case"]]) if r["case"] == "unet" else cases[r["case"]]
            lines.append(f"| {names[r['family']]} | {what} | | | | {r['error']} | | | | | | |")
            continue
        med = {k: statistics.median(v) for k, v in r["wall"].items()}
        cpu = {k: statistics.median(v) for k, v in r["cpu"].items()}
        scale = "" if r["scale"] == 1 else f" (1/{r['scale']} width)"
        what = step.get(r["family"], cases[r["case"]]) if r["case"] == "unet" else cases[r["case"]]
        lines.append(f"| {names[r['family']]}{scale} | {what} | {r['shape']} | {med['torch']:.2f} | "
                     f"{med['refldm']:.2f} | **{r['ratio_median']:.2f}x** | {cpu['torch']:.2f} | {cpu['refldm']:.2f} | "
                     f"{cpu['refldm'] / cpu['torch']:.2f}x | {r['rounds']} | {r['agreement']:.1e} | "
                     f"{r['load_average']:.1f} |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = open(DOC).read()
    block = f"{MARK}\n{text}\n{END}"
    if MARK in doc and END in doc:
        doc = doc[:doc.index(MARK)] + block + doc[doc.index(END) + len(END):]
    else:
        raise SystemExit(f"bench_all: {DOC} has no {MARK} ... {END} markers to write between")
    with open(DOC, "w") as f:
        f.write(doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--scale", type=int, default=1, help="divide every width by this (1 = full size)")
    p.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    p.add_argument("--min-free-gb", type=float, default=14.0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        family, case = args.worker.split(":")
        print("RESULT " + json.dumps(worker(family, case, args.scale, args.rounds, args.threads)), flush=True)
        return 0
    from tools.bench_sdxl import mem_available_gb
    info = machine()
    print(json.dumps(info), flush=True)
    rows = []
    for family in args.families.split(","):
        for case in args.cases.split(","):
            need = max(args.min_free_gb, NEED_GB.get(family, 0.0))
            if family in NEED_GB and case == "unet" and args.scale == 1 and not args.force \
                    and mem_available_gb() < need:
                rows.append({"family": family, "case": case, "error": f"skipped: MemAvailable "
                             f"{mem_available_gb():.1f} GiB < {need:g} GiB"})
                continue
            t = time.perf_counter()
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", f"{family}:{case}",
                                  "--rounds", str(args.rounds), "--threads", str(args.threads), "--scale",
                                  str(args.scale)], capture_output=True, text=True, cwd=ROOT)
            found = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode != 0 or not found:
                rows.append({"family": family, "case": case,
                             "error": "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:120]})
            else:
                rows.append(json.loads(found[0][7:]))
            print(f"{family} {case}: {time.perf_counter() - t:.0f} s", rows[-1].get("error", ""), flush=True)
    text = table(rows, info, args.threads)
    print(text)
    if args.write:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
