"""Peak RSS of a whole SD 1.x txt2img at 512x512 (2 steps), measured by /usr/bin/time -v: refldm float32 (the
default), refldm --low-memory (weights_dtype="stored": the 16-bit weights stay in the memory-mapped files, each
layer converts its weight to float32 when it runs), and diffusers float32.

The model: random full-size SD 1.x weights made by diffusers / transformers (the U-Net config of
tools/configs/sd15, SD 1.x's VAE, CLIP ViT-L/14's text encoder: 1,066,235,307 parameters), saved in float16 by
save_pretrained (2.1 GB; the published SD 1.x files are float16 too). Every case reads the same 16-bit files:

    refldm-f32   refldm txt2img -m FOLDER --steps 2 -W 512 -H 512            converted to float32 on loading
    refldm-low   refldm txt2img -m FOLDER --steps 2 -W 512 -H 512 --low-memory
    diffusers    StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype=float32), 2 steps, 512x512

each with the same prompt, seed and guidance 7.5 (the U-Net at batch 2), in its own process under
``/usr/bin/time -v`` (Maximum resident set size, Elapsed). The load average is printed before each case: the
machine is shared, so times are only indicative; memory is not affected by the load.

    python tools/mem_sd.py                        # all cases; writes the folder (once) to --folder
    python tools/mem_sd.py --cases refldm-low     # one case
    python tools/mem_sd.py --cleanup              # delete the folder afterwards

Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PROMPT = "a photograph of an astronaut riding a horse"
CASES = ("refldm-f32", "refldm-low", "diffusers")
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "prediction_type": "epsilon", "timestep_spacing": "leading"}


def write_folder(folder: str) -> None:
    """A random-weight SD 1.x folder in float16, diffusers' layout (tokenizer: refldm's embedded model's)."""
    import torch
    import diffusers
    import transformers
    torch.manual_seed(0)
    configs = os.path.join(ROOT, "tools", "configs", "sd15")
    with open(os.path.join(configs, "unet", "config.json")) as f:
        unet = diffusers.UNet2DConditionModel.from_config(json.load(f))
    with open(os.path.join(configs, "vae", "config.json")) as f:
        vae = diffusers.AutoencoderKL.from_config(json.load(f))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG))
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.to(torch.float16).save_pretrained(os.path.join(folder, name))
        del model
    shutil.copytree(os.path.join(ROOT, "refldm", "default_model", "tokenizer"), os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)


DIFFUSERS = """
import sys, torch, diffusers
torch.set_num_threads({threads})
pipe = diffusers.StableDiffusionPipeline.from_pretrained({folder!r}, torch_dtype=torch.float32, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
with torch.inference_mode():
    image = pipe({prompt!r}, num_inference_steps={steps}, height={size}, width={size}, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(1)).images[0]
image.save({out!r})
"""


def command(case: str, folder: str, args) -> list:
    out = os.path.join(args.work, f"{case}.png")
    if case == "diffusers":
        code = DIFFUSERS.format(threads=os.cpu_count(), folder=folder, prompt=PROMPT, steps=args.steps,
                                size=args.size, out=out)
        return [sys.executable, "-c", code]
    cmd = [sys.executable, "-m", "refldm", "txt2img", "-m", folder, "-p", PROMPT, "--steps", str(args.steps),
           "-W", str(args.size), "-H", str(args.size), "--seed", "1", "--cfg", "7.5", "-q", "-o", out]
    return cmd + (["--low-memory"] if case == "refldm-low" else []) + list(args.extra)


def measure(cmd: list) -> dict:
    run = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=ROOT)
    text = run.stderr
    if run.returncode:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(cmd[:6])} ...\n{text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", text).group(1))
    return {"peak_rss_mib": rss / 1024, "peak_rss_gb": rss * 1024 / 1e9, "wall_s": seconds, "user_s": user}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="/tmp/refldm-mem-sd15-f16")
    ap.add_argument("--work", default="/tmp/refldm-mem-sd-out")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further refldm txt2img flags")
    ap.add_argument("--cleanup", action="store_true", help="delete the folder at the end")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
        print(f"writing random float16 SD 1.x weights to {args.folder} ...", flush=True)
        write_folder(args.folder)
    results = {}
    for case in args.cases:
        load = os.getloadavg()
        r = measure(command(case, args.folder, args))
        r["load_average_before"] = [round(v, 2) for v in load]
        results[case] = r
        print(f"{case:11s} peak RSS {r['peak_rss_mib']:8,.0f} MiB ({r['peak_rss_gb']:.2f} GB)  "
              f"wall {r['wall_s']:7.1f} s  user {r['user_s']:7.1f} s  load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
              flush=True)
    print(json.dumps(results, indent=1))
    if args.cleanup:
        shutil.rmtree(args.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
