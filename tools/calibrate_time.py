"""Calibrate the CLI's time estimate (refldm/cli/common.py check_resources): run generations, compare the wall
time with the estimate t = flops / (EFFICIENCY * matmul speed) (refldm/analysis/cost.py estimate_seconds).

    python tools/calibrate_time.py            # the built-in model, and a random-weight tiny SD (needs diffusers)

Prints, per run: the FLOPs counted, the machine's measured matmul speed, the wall time of the pipeline call,
the efficiency it implies (flops / (time * speed)), and the estimate's error with the EFFICIENCY in use.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from refldm.about import DEFAULT_MODEL  # noqa: E402
from refldm.analysis.cost import EFFICIENCY, estimate_pipeline, estimate_seconds, steps_run  # noqa: E402
from refldm.cli.resources import matmul_throughput  # noqa: E402
from refldm.pipelines.sd import StableDiffusionPipeline  # noqa: E402


def measure(pipe, label, size, steps, cfg, strength=None):
    import numpy as np
    from PIL import Image
    before = matmul_throughput()
    run = steps_run(steps, strength)
    flops = estimate_pipeline(pipe, 1, size, size, run, cfg)["flops"]
    kwargs = {}
    if strength is not None:
        kwargs = dict(image=Image.fromarray(np.full((size, size, 3), 128, np.uint8)), strength=strength)
    else:
        kwargs = dict(height=size, width=size)
    start = time.perf_counter()
    pipe("a red circle", num_inference_steps=steps, guidance_scale=cfg, seed=1, progress=False, **kwargs)
    wall = time.perf_counter() - start
    speed = (before * matmul_throughput()) ** 0.5  # the machine's speed around the run (a shared machine varies)
    est = estimate_seconds(flops, speed)
    print(f"{label:10s} {size:4d}px {run:3d}/{steps} steps  {flops / 1e9:9.2f} GFLOP  matmul {speed / 1e9:6.1f} GFLOP/s  "
          f"wall {wall:7.2f} s  efficiency {flops / (wall * speed):.3f}  estimate {est:7.2f} s "
          f"(error {100 * (est - wall) / wall:+.0f}%, EFFICIENCY={EFFICIENCY})", flush=True)


def main():
    builtin = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    for size in (64, 128, 256):
        measure(builtin, "built-in", size, 25, 3.0)
    measure(builtin, "built-in", 64, 25, 3.0, strength=0.7)
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from tests.test_pipeline import build_tiny_sd
    except ImportError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_sd(os.path.join(tmp, "tiny"), kind="sd1", seed=0, conventional=True)
        tiny = StableDiffusionPipeline.from_pretrained(folder)
        for size in (64, 128, 256):
            measure(tiny, "tiny SD", size, 10, 7.5)


if __name__ == "__main__":
    main()
