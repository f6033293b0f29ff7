"""The noise schedule, shared by every scheduler: betas -> alphas_cumprod -> sigmas, and the timesteps.

The forward process of DDPM (Ho et al. 2020, eq. 4) adds Gaussian noise in T = num_train_timesteps steps:

    q(x_t | x_0) = N(x_t; sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s<=t} (1 - beta_s)

Samplers that think in the variance-exploding form x = x_0 + sigma * eps (Karras et al. 2022) use

    sigma_t = sqrt((1 - abar_t) / abar_t),     so  x_t / sqrt(abar_t) = x_0 + sigma_t * eps.

Everything here is host NumPy (small tables, built once), float64 by default. diffusers builds its tables
in float32; with ``table_dtype="float32"`` refldm builds them the same way, bit for bit (torch's float32
linspace, a cumprod accumulated in float64 and rounded per entry), to reproduce diffusers' own numbers. See
docs/schedulers.md for why float64 is the default and what float32 tables change.
"""

from __future__ import annotations

import math

import numpy

__all__ = [
    "betas_for", "linear_betas", "scaled_linear_betas", "squaredcos_cap_v2_betas", "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas", "linspace", "torch_linspace_float32", "TABLE_DTYPES", "sigmas_from_alphas_cumprod", "karras_sigmas", "exponential_sigmas", "beta_sigmas", "lu_sigmas", "sigma_grid",
    "check_one_sigma_grid", "sigma_to_t",
    "spaced_timesteps", "spaced_timesteps_skip_last", "interpolate_sigmas",
]


TABLE_DTYPES = ("float64", "float32")


def torch_linspace_float32(start: float, end: float, n: int):
    """n float32 points from start to end, exactly as torch.linspace(..., dtype=torch.float32) computes them on
    the CPU: step = (end - start) / (n - 1) in float32, then start + step i for the first half and
    end - step (n - 1 - i) for the second, each one fused multiply-add (one rounding to float32). numpy.linspace
    rounds the float64 points instead and differs from torch in the last bit of about a third of them."""
    f32 = numpy.float32
    start, end = f32(start), f32(end)
    step = (end - start) / f32(n - 1)
    i = numpy.arange(n)
    # a float32 product of two 24-bit mantissas is exact in float64, so float64 arithmetic + one cast = fma
    first = (numpy.float64(step) * i + numpy.float64(start)).astype(f32)
    second = (numpy.float64(-step) * (n - 1 - i) + numpy.float64(end)).astype(f32)
    return numpy.where(i < n // 2, first, second)


def linspace(start: float, end: float, n: int, dtype: str = "float64"):
    """numpy.linspace in float64, or torch's float32 linspace (what diffusers computes) for dtype="float32"."""
    if dtype == "float32":
        return torch_linspace_float32(start, end, n)
    return numpy.linspace(start, end, n)


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int, dtype: str = "float64"):
    """beta_t evenly spaced from beta_start to beta_end (DDPM, Ho et al. 2020, sec. 4)."""
    return linspace(beta_start, beta_end, num_train_timesteps, dtype)


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int, dtype: str = "float64"):
    """sqrt(beta_t) evenly spaced, then squared: the schedule Stable Diffusion was trained with."""
    return linear_betas(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype) ** 2


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
    sqrt_abar = numpy.sqrt(alphas_cumprod_from_betas(betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = sqrt_abar - last
    sqrt_abar = sqrt_abar * (first / (first - last))  # two statements: diffusers' float32 rounding order
    abar = sqrt_abar**2
    alphas = numpy.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_for(config):
    """The betas a scheduler config asks for (trained_betas, or beta_schedule from beta_start/beta_end), in
    config.table_dtype ("float64", or "float32" built as diffusers builds it)."""
    n = config.num_train_timesteps
    dtype = getattr(config, "table_dtype", "float64")
    if config.trained_betas is not None:
        betas = numpy.asarray(config.trained_betas, dtype=dtype)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas has {betas.size} values but num_train_timesteps={n}")
    elif config.beta_schedule == "linear":
        betas = linear_betas(config.beta_start, config.beta_end, n, dtype)
    elif config.beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(config.beta_start, config.beta_end, n, dtype)
    else:  # "squaredcos_cap_v2" (the config dataclasses accept nothing else); diffusers: float64, then cast
        betas = squaredcos_cap_v2_betas(n).astype(dtype)
    if getattr(config, "rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas):
    """abar_t = prod_{s<=t} (1 - beta_s)  (Ho et al. 2020, notation above eq. 4). The product is accumulated
    in float64 and each entry rounded to the betas' dtype (what torch.cumprod does with float32 on the CPU)."""
    return numpy.cumprod((1.0 - betas).astype(numpy.float64)).astype(betas.dtype)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / sqrt(abar_t) = x_0 + sigma_t eps."""
    return numpy.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0):
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1
    (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5)."""
    ramp = numpy.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int):
    """sigma_i = exp(log sigma_max + i/(n-1) (log sigma_min - log sigma_max)): evenly spaced in log sigma
    (k-diffusion's get_sigmas_exponential)."""
    return numpy.exp(numpy.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6):
    """sigma_i = sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min), F the Beta(alpha, beta) distribution function
    (Lee et al. 2024, "Beta Sampling is All You Need", alpha = beta = 0.6): more steps at both ends."""
    from scipy.stats import beta as beta_distribution

    return sigma_min + beta_distribution.ppf(1 - numpy.linspace(0, 1, n), alpha, beta) * (sigma_max - sigma_min)


def lu_sigmas(log_sigma_min: float, log_sigma_max: float, n: int):
    """exp of log sigma evenly spaced from log sigma_max to log sigma_min: uniform steps in the half log-SNR
    lambda = -log sigma, the spacing of DPM-Solver (Lu et al. 2022, sec. 3.3 "uniform logSNR")."""
    ramp = numpy.linspace(0, 1, n)
    return numpy.exp(log_sigma_max + ramp * (log_sigma_min - log_sigma_max))


SIGMA_GRIDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def check_one_sigma_grid(config, keys=SIGMA_GRIDS):
    """At most one of the sigma-grid switches may be on (diffusers refuses more than one)."""
    on = [k for k in keys if getattr(config, k, False)]
    if len(on) > 1:
        raise ValueError(f"{' and '.join(f'{k}=True' for k in on)}: use at most one of {', '.join(keys)}")


def sigma_grid(config, sigma_min: float, sigma_max: float, n: int):
    """The n sigmas of the grid the config switches on (Karras, exponential or beta), from sigma_max down to
    sigma_min (config.sigma_min / sigma_max override them where the scheduler has those keys); None if none is on."""
    lo = getattr(config, "sigma_min", None)
    hi = getattr(config, "sigma_max", None)
    lo = sigma_min if lo is None else lo
    hi = sigma_max if hi is None else hi
    if getattr(config, "use_karras_sigmas", False):
        return karras_sigmas(lo, hi, n)
    if getattr(config, "use_exponential_sigmas", False):
        return exponential_sigmas(lo, hi, n)
    if getattr(config, "use_beta_sigmas", False):
        return beta_sigmas(lo, hi, n)
    return None


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


def consistency_timesteps(where: str, origin, n: int, original: int, strength: float):
    """LCM's and TCD's n timesteps: n indices taken evenly, from the largest timestep, out of the ascending grid
    `origin` (the distillation grid k - 1, 2k - 1, ..., k = T // original, cut to its first original * strength
    points): t_i = origin[::-1][floor(i len(origin) / n)], i = 0..n-1, as diffusers' LCMScheduler."""
    if len(origin) // n < 1:
        raise ValueError(f"{where}: num_inference_steps={n} is more than original_inference_steps x "
                         f"strength = {original} x {strength}")
    if n > original:
        raise ValueError(f"{where}: num_inference_steps={n} is larger than original_inference_steps={original}")
    origin = origin[::-1].copy()
    indices = numpy.floor(numpy.linspace(0, len(origin), num=n, endpoint=False)).astype(numpy.int64)
    return origin[indices].astype(numpy.int64)
