"""Peak memory while loading a model: refldm's U-Net from a safetensors folder, measured by /usr/bin/time -v.

The case of issue 32, item 2: loading must not hold a second full copy of the weights, so the peak
resident set of the loading process should stay within the loaded weights + 10%. For each family
(SD 1.x: 859,520,964 parameters; SDXL base: 2,567,463,684) the tool writes random weights in the
stored dtype into a temporary diffusers-style folder (config.json + diffusion_pytorch_model.safetensors,
written tensor by tensor, never the whole state at once), then runs, each in a fresh process under
`/usr/bin/time -v`:

- a baseline: Python, NumPy and refldm imported and the model built from its config, no weights
  (what any process pays before the first weight is read);
- the load: ``UNet2DConditionModel.from_pretrained(folder, dtype=...)``, every weight touched
  afterwards (a sum over each array), so that a lazily mapped page counts too.

It prints "Maximum resident set size" of each, the bytes of the loaded weights, and the ratio
peak / weights (target: <= 1.10); --json writes the rows. --code DIR measures another copy of refldm
(e.g. an older commit from `git archive`), for a before/after comparison on the same files.

    python tools/mem_load.py                                   # SD 1.x, stored float32, loaded float32
    python tools/mem_load.py --family sdxl --stored float16 --dtype float16
    python tools/mem_load.py --family sd1 --stored float16 --dtype float32     # converted while read
    python tools/mem_load.py --scale 8                          # 1/8-width models: checks the tool in seconds

The weights file is written to --tmp (default: the system's temporary folder) and removed at the end;
the full SDXL U-Net needs 5.1 GB of disk in float16 and 10.3 GB in float32, and the load as much memory:
the tool refuses to start when MemAvailable is below the loaded weights + 3 GB, unless --force.
Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.bench_sdxl import mem_available_gb, scaled_config  # noqa: E402

SD1 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
NAMES = {"float32": "F32", "float16": "F16", "float64": "F64"}


def unet_config(family: str, scale: int) -> dict:
    if family == "sdxl":
        return scaled_config(scale)
    cfg = dict(SD1)
    if scale > 1:
        cfg.update(block_out_channels=[c // scale for c in (320, 640, 1280, 1280)], cross_attention_dim=768 // scale,
                   norm_num_groups=max(1, 32 // scale), attention_head_dim=max(1, 8 // scale))
    return cfg


def write_random_folder(folder: str, config: dict, stored: str, seed: int = 0) -> int:
    """config.json and random weights in dtype `stored`, one tensor at a time; returns the file's size."""
    from refldm.models.unet import UNet2DConditionModel
    model = UNet2DConditionModel.from_config(config, where="mem_load config")
    shapes = {key: tuple(value.shape) for key, _, _, value in model.params()}
    dt = np.dtype(stored)
    header, offset = {}, 0
    for key in sorted(shapes):
        n = math.prod(shapes[key]) * dt.itemsize
        header[key] = {"dtype": NAMES[stored], "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, _class_name="UNet2DConditionModel"), f)
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(shapes):
            shape = shapes[key]
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(1.0 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.1)
            f.write(w.astype(dt, copy=False).tobytes())
            del w
    return os.path.getsize(path)


CHILD = r"""
import sys, time
sys.path.insert(0, {code!r})
import numpy as np
from refldm.models.unet import UNet2DConditionModel
folder, dtype, mode = {folder!r}, {dtype!r}, {mode!r}
t = time.perf_counter()
if mode == "baseline":
    import json
    model = UNet2DConditionModel.from_config(json.load(open(folder + "/config.json")), where="config")
    print("weights_bytes 0")
else:
    model = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
    state = model.state_dict()
    total = 0.0
    for v in state.values():
        total += float(np.sum(v, dtype=np.float64))   # touch every page
    print("weights_bytes", sum(int(v.nbytes) for v in state.values()))
    print("checksum", total)
print("seconds", time.perf_counter() - t)
"""


def measure(code: str, folder: str, dtype: str, mode: str) -> dict:
    """Run the child under /usr/bin/time -v; its max RSS (bytes), the weights it loaded and its time."""
    script = CHILD.format(code=code, folder=folder, dtype=dtype, mode=mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLDM_")}
    run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script], capture_output=True, text=True,
                         env=env)
    if run.returncode != 0:
        raise SystemExit(f"mem_load: the {mode} child failed:\n{run.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) * 1024
    values = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    return {"max_rss_bytes": rss, "weights_bytes": int(values["weights_bytes"]), "seconds": float(values["seconds"]),
            "elapsed": re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    p.add_argument("--stored", choices=sorted(NAMES), default="float32", help="dtype of the file")
    p.add_argument("--dtype", choices=sorted(NAMES), default="float32", help="dtype loaded")
    p.add_argument("--scale", type=int, default=1, help="divide every width by this (1 = full size)")
    p.add_argument("--code", action="append", help="a refldm checkout to measure (default: this one); "
                                                   "give it more than once to measure each on the same file")
    p.add_argument("--tmp", default=None, help="folder for the temporary weights file")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    cfg = unet_config(args.family, args.scale)
    from refldm.models.unet import UNet2DConditionModel
    params = UNet2DConditionModel.from_config(cfg, where="config").num_parameters()
    need_gb = params * np.dtype(args.dtype).itemsize / 2**30 + 3
    if mem_available_gb() < need_gb and not args.force:
        raise SystemExit(f"mem_load: MemAvailable {mem_available_gb():.1f} GiB is below the {need_gb:.1f} GiB "
                         "this load needs; free memory or pass --force")
    codes = args.code or [ROOT]
    with tempfile.TemporaryDirectory(prefix="mem_load_", dir=args.tmp) as tmp:
        size = write_random_folder(tmp, cfg, args.stored)
        for code in codes:
            report(args, cfg, params, size, code, measure(code, tmp, args.dtype, "baseline"),
                   measure(code, tmp, args.dtype, "load"))
    return 0


def report(args, cfg, params, size, code, base, load):
    w = load["weights_bytes"]
    row = {"family": args.family, "scale": args.scale, "parameters": params, "stored": args.stored,
           "dtype": args.dtype, "file_bytes": size, "weights_bytes": w, "baseline_rss_bytes": base["max_rss_bytes"],
           "load_rss_bytes": load["max_rss_bytes"], "ratio": load["max_rss_bytes"] / w,
           "above_weights_bytes": load["max_rss_bytes"] - w, "load_seconds": load["seconds"], "code": code,
           "python": platform.python_version(), "numpy": np.__version__}
    mib = 2 ** 20
    print(f"{args.family} U-Net (1/{args.scale} width, {params:,} parameters), stored {args.stored}, loaded "
          f"{args.dtype}: weights {w / mib:,.0f} MiB; peak RSS {load['max_rss_bytes'] / mib:,.0f} MiB = "
          f"{row['ratio']:.3f} x weights (target <= 1.10); baseline process {base['max_rss_bytes'] / mib:,.0f} MiB; "
          f"load {load['seconds']:.1f} s; code {code}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
