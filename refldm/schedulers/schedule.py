"""The noise schedule, shared by every scheduler: betas -> alphas_cumprod -> sigmas, and the timesteps.

The forward process of DDPM (Ho et al. 2020, eq. 4) adds Gaussian noise in T = num_train_timesteps steps:

    q(x_t | x_0) = N(x_t; sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s<=t} (1 - beta_s)

Samplers that think in the variance-exploding form x = x_0 + sigma * eps (Karras et al. 2022) use

    sigma_t = sqrt((1 - abar_t) / abar_t),     so  x_t / sqrt(abar_t) = x_0 + sigma_t * eps.

Everything here is host NumPy float64 (small tables, built once). diffusers builds its betas in
float32; refldm builds them in float64 (see docs/schedulers.md for what that changes: ~1e-7 relative).
"""

from __future__ import annotations

import math

import numpy

__all__ = [
    "betas_for", "linear_betas", "scaled_linear_betas", "squaredcos_cap_v2_betas", "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas", "sigmas_from_alphas_cumprod", "karras_sigmas", "sigma_to_t",
    "spaced_timesteps", "spaced_timesteps_skip_last", "interpolate_sigmas",
]


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int):
    """beta_t evenly spaced from beta_start to beta_end (DDPM, Ho et al. 2020, sec. 4)."""
    return numpy.linspace(beta_start, beta_end, num_train_timesteps, dtype=numpy.float64)


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int):
    """sqrt(beta_t) evenly spaced, then squared: the schedule Stable Diffusion was trained with."""
    return numpy.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=numpy.float64) ** 2


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999):
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008,
    beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta)."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    return numpy.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], numpy.float64)


def rescale_zero_terminal_snr(betas):
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(abar) so that sqrt(abar_T) = 0 while
    sqrt(abar_0) is unchanged, then recover betas from the new abar."""
    sqrt_abar = numpy.sqrt(numpy.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = numpy.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_for(config):
    """The betas a scheduler config asks for (trained_betas, or beta_schedule from beta_start/beta_end)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = numpy.asarray(config.trained_betas, dtype=numpy.float64)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas has {betas.size} values but num_train_timesteps={n}")
    elif config.beta_schedule == "linear":
        betas = linear_betas(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(config.beta_start, config.beta_end, n)
    else:  # "squaredcos_cap_v2" (the config dataclasses accept nothing else)
        betas = squaredcos_cap_v2_betas(n)
    if getattr(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas):
    """abar_t = prod_{s<=t} (1 - beta_s)  (Ho et al. 2020, notation above eq. 4)."""
    return numpy.cumprod(1.0 - betas)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / sqrt(abar_t) = x_0 + sigma_t eps."""
    return numpy.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0):
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1
    (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5)."""
    ramp = numpy.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas, log_sigmas):
    """The (fractional) training timestep whose sigma is each of `sigmas`: linear interpolation of t in
    log sigma between the two neighbouring training timesteps (clamped to the table's range)."""
    sigmas = numpy.asarray(sigmas, numpy.float64)
    log_sigma = numpy.log(numpy.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (T, n)
    low = numpy.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = numpy.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def interpolate_sigmas(timesteps, sigmas_table):
    """sigma at (possibly fractional) timesteps, linear in t between training timesteps."""
    return numpy.interp(timesteps, numpy.arange(len(sigmas_table)), sigmas_table)


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0, *, exact: bool = False):
    """n inference timesteps, descending, as float64 (diffusers' three spacings; Lin et al. 2023, Table 2).

    - "linspace": n points evenly from 0 to T-1 (rounded to integers unless `exact`);
    - "leading":  0, T//n, 2 T//n, ... (n of them) plus steps_offset: never reaches T-1;
    - "trailing": T-1, T-1 - T/n, ... (rounded): always starts at T-1.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        t = numpy.linspace(0, T - 1, n)
        t = t if exact else t.round()
        return t[::-1].copy()
    if spacing == "leading":
        return (numpy.arange(0, n) * (T // n)).round()[::-1].astype(numpy.float64) + steps_offset
    if spacing == "trailing":
        return numpy.round(numpy.arange(T, 0, -T / n)).astype(numpy.float64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")


def spaced_timesteps_skip_last(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0,
                               last_timestep: int | None = None):
    """The multistep solvers' variant (DPM-Solver, UniPC): n + 1 points spaced as above, dropping the
    smallest, so the last step lands between two grid points instead of on t = 0; integers, descending."""
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        t = numpy.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (numpy.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = numpy.arange(last, 0, -T / n).round() - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not one of 'linspace', 'leading', 'trailing'")
    return t.astype(numpy.int64).astype(numpy.float64)
