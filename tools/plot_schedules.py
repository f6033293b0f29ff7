"""Plot the noise schedules and inference grids of refldm.schedulers into docs/img/ (for docs/schedulers.md).

    pip install matplotlib          # a tools-only dependency
    python tools/plot_schedules.py  # writes docs/img/schedules_*.png
"""

from __future__ import annotations

import os
import sys

import matplotlib
import numpy

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from refldm import schedulers as rs
from refldm.schedulers import schedule

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "img")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def plot_forward_process():
    """abar_t and log-SNR for the three beta schedules and the zero-terminal-SNR rescaling."""
    T = 1000
    tables = {
        "linear (1e-4 .. 0.02, DDPM)": schedule.linear_betas(1e-4, 0.02, T),
        "scaled_linear (0.00085 .. 0.012, SD)": schedule.scaled_linear_betas(0.00085, 0.012, T),
        "squaredcos_cap_v2 (cosine)": schedule.squaredcos_cap_v2_betas(T),
        "scaled_linear, rescaled to zero terminal SNR": schedule.rescale_zero_terminal_snr(
            schedule.scaled_linear_betas(0.00085, 0.012, T)),
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    t = numpy.arange(T)
    for label, betas in tables.items():
        abar = schedule.alphas_cumprod_from_betas(betas)
        ax1.plot(t, abar, label=label)
        with numpy.errstate(divide="ignore"):
            ax2.plot(t, numpy.log(abar / (1 - abar)), label=label)
    ax1.set(xlabel="training timestep t", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$")
    ax2.set(xlabel="training timestep t", ylabel=r"$\log(\bar\alpha_t / (1-\bar\alpha_t))$",
            title="log signal-to-noise ratio")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "schedules_forward.png"), dpi=110)
    plt.close(fig)


def plot_inference_grids():
    """Timesteps for the three spacings, and the sigmas of Euler, Euler+Karras and DPM-Solver for 20 steps."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for spacing, marker in (("linspace", "o"), ("leading", "s"), ("trailing", "^")):
        scheduler = rs.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        scheduler.set_timesteps(10)
        ax1.plot(range(10), scheduler.timesteps, marker=marker, label=f'"{spacing}"')
    ax1.set(xlabel="step i", ylabel="timestep t_i", title="10 inference timesteps (T = 1000)")
    ax1.legend()
    runs = {
        "Euler (linspace)": rs.EulerDiscreteScheduler(**SD),
        "Euler, use_karras_sigmas": rs.EulerDiscreteScheduler(**SD, use_karras_sigmas=True),
        "DPM-Solver++ (n+1 grid, last dropped)": rs.DPMSolverMultistepScheduler(**SD),
    }
    for label, scheduler in runs.items():
        scheduler.set_timesteps(20)
        ax2.semilogy(range(20), scheduler.sigmas[:-1], marker=".", label=label)
    ax2.set(xlabel="step i", ylabel=r"$\sigma_i$ (log scale)", title=r"20-step $\sigma$ grids, SD schedule")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "schedules_grids.png"), dpi=110)
    plt.close(fig)


def main():
    os.makedirs(OUT, exist_ok=True)
    plot_forward_process()
    plot_inference_grids()
    print("wrote docs/img/schedules_forward.png, docs/img/schedules_grids.png")


if __name__ == "__main__":
    main()
