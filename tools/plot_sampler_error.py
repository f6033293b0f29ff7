"""How fast each sampler converges, on the built-in model: the error of its final latent against a 1000-step
reference solution of the same probability-flow ODE, as a function of the number of model evaluations (the kind of
plot in the DPM-Solver paper, Lu et al. 2022, Fig. 1/4). Also the sigma schedules side by side. For
docs/schedulers.md.

    pip install -e '.[tools]'              # matplotlib
    python tools/plot_sampler_error.py     # writes docs/img/sampler_error.png, docs/img/sigma_schedules.png

The built-in model has an 8x8 latent, but the run makes ~2000 float64 U-Net calls: about 25 minutes on a shared
2-core machine (the 1000-step reference is half of it). Run it with one BLAS thread (small matrices).

Fair comparison: every sampler starts from the same noise at the same noise level and ends at sigma = 0, so
they all approximate the same ODE solution. That is, all use "trailing" timestep spacing (the first step at
t = T - 1 whatever the step count), final sigma zero and, for DDIM/PLMS, set_alpha_to_one. The reference is
DPM-Solver++(2M) over all 1000 training timesteps. Ancestral and SDE samplers are left out: they converge to a
different (random) sample, not to the ODE's. One model evaluation = one U-Net call on the [uncond, cond] batch.
"""

from __future__ import annotations

import json
import os
import sys
import time

import matplotlib
import numpy

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from refldm import schedulers as rs
from refldm.cli.generate import DEFAULT_MODEL
from refldm.pipelines.sd import StableDiffusionPipeline
from refldm.core.random import randn
from refldm.pipelines.sampling import sample

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "img")
PROMPTS = ["a large red circle in the center on a white background",
           "a large blue square in the top left on a white background"]
GUIDANCE = 3.0
SEED = 0
# sampler name (refldm.schedulers.names) -> extra config for the fair comparison above
SAMPLERS = {
    "DDIM": {"set_alpha_to_one": True},
    "PLMS": {"set_alpha_to_one": True},
    "Euler": {},
    "Heun": {},
    "LMS": {},
    "DPM++ 2M": {},
    "DPM++ 2M Karras": {},
    "DPM++ 3M": {"solver_order": 3},
    "UniPC": {},
}
STEPS = [4, 6, 8, 12, 16, 24, 32]
COMMON = {"timestep_spacing": "trailing", "steps_offset": 0, "final_sigmas_type": "zero"}


def solve(pipe, context, noise, name, steps, extra):
    """The final latent of sampler `name` with `steps` steps, and its number of model evaluations."""
    base = name.replace("DPM++ 3M", "DPM++ 2M")
    scheduler = rs.get_scheduler(base, {**pipe.scheduler_config, **COMMON}, **extra)  # COMMON: where a class has it
    scheduler.set_timesteps(steps)
    latents = noise * float(scheduler.init_noise_sigma)
    x = sample(lambda x, t: pipe.unet(x, t, context), scheduler, latents, guidance_scale=GUIDANCE, progress=False)
    return numpy.asarray(x, numpy.float64), len(scheduler.timesteps)


def sampler_error(pipe):
    context = numpy.concatenate([pipe.encode_prompt([""] * len(PROMPTS)), pipe.encode_prompt(PROMPTS)], axis=0)
    with open(os.path.join(DEFAULT_MODEL, "unet", "config.json")) as f:
        size = json.load(f)["sample_size"]  # the latent size the model was trained at
    shape = (len(PROMPTS), pipe.unet.config.in_channels, size, size)
    noise = randn(shape, seed=SEED, dtype="float64")
    start = time.perf_counter()
    reference, _ = solve(pipe, context, noise, "DPM++ 2M", 1000, {})
    scale = float(numpy.sqrt(numpy.mean(reference**2)))
    print(f"reference: 1000 steps in {time.perf_counter() - start:.0f} s, rms {scale:.3g}")
    results = {}
    for name, extra in SAMPLERS.items():
        rows = []
        for steps in STEPS:
            x, nfe = solve(pipe, context, noise, name, steps, extra)
            rows.append((nfe, float(numpy.sqrt(numpy.mean((x - reference) ** 2))) / scale))
        results[name] = rows
        print(name, " ".join(f"{n}:{e:.2e}" for n, e in rows))
    return results


def plot_error(results, path):
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in results.items():
        nfe, err = zip(*rows)
        ax.loglog(nfe, err, marker="o", label=name, linestyle="--" if name in ("DDIM", "Euler") else "-")
    ax.set_xlabel("model evaluations (U-Net calls)")
    ax.set_ylabel("rms error of the final latent / rms of the reference")
    ax.set_title("Built-in model, guidance 3: error vs. a 1000-step reference\n"
                 "(trailing spacing, same noise, float64)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sigma_schedules(config, path, steps=20):
    """The sigma grids of one scheduler config for `steps` steps: normal (linspace), leading, trailing, Karras,
    exponential, beta, log-linear."""
    grids = {
        "linspace (normal)": {"timestep_spacing": "linspace"},
        "leading (SD 1.x)": {"timestep_spacing": "leading", "steps_offset": 1},
        "trailing (sgm_uniform)": {"timestep_spacing": "trailing"},
        "Karras": {"use_karras_sigmas": True},
        "exponential": {"use_exponential_sigmas": True},
        "beta (0.6, 0.6)": {"use_beta_sigmas": True},
        "log-linear": {"interpolation_type": "log_linear"},
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, keys in grids.items():
        scheduler = rs.EulerDiscreteScheduler.from_config({**config, **keys})
        scheduler.set_timesteps(steps)
        sigmas = numpy.asarray(scheduler.sigmas[:-1], numpy.float64)
        ax1.semilogy(numpy.arange(len(sigmas)), sigmas, marker=".", label=label)
        timesteps = numpy.asarray(scheduler.timesteps, numpy.float64)
        ax2.plot(numpy.arange(len(timesteps)), timesteps, marker=".", label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("sigma (log scale)")
    ax1.set_title(f"sigma schedules, {steps} steps, SD's scaled_linear betas", fontsize=10)
    ax2.set_xlabel("step")
    ax2.set_ylabel("timestep given to the U-Net")
    ax2.set_title("the same, as training timesteps", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    os.makedirs(OUT, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, dtype="float64")
    plot_sigma_schedules({k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")},
                         os.path.join(OUT, "sigma_schedules.png"))
    results = sampler_error(pipe)
    with open(os.path.join(OUT, "sampler_error.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot_error(results, os.path.join(OUT, "sampler_error.png"))
    print("wrote docs/img/sigma_schedules.png, docs/img/sampler_error.png (+ .json)")


if __name__ == "__main__":
    main()
