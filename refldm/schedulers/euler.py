"""Euler and Euler ancestral samplers in sigma (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"; k-diffusion's ``sample_euler`` and ``sample_euler_ancestral``).

In the variance-exploding view x = x_0 + sigma eps (x is the latent divided by sqrt(abar)), the probability-flow
ODE is dx/dsigma = (x - x_0(x, sigma)) / sigma  (Karras et al. 2022, sec. 2, with sigma(t) = t).
"""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import BaseConfig, SchedulerMixin, SigmaAddNoise, check_choice, noise_like


def x0_from_sigma_prediction(prediction_type, model_output, sample, sigma):
    """x_0 from the model output at noise level sigma, with x = x_0 + sigma eps:

    epsilon:       x_0 = x - sigma eps
    v_prediction:  x_0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)   (Salimans & Ho 2022, with
                   a = 1/sqrt(sigma^2+1), s = sigma a, and the model input x a)
    sample:        x_0 = model output
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def euler_step(sample, x0, sigma, sigma_next):
    """x_next = x + (sigma_next - sigma) d,  d = (x - x_0) / sigma   (Karras et al. 2022, Algorithm 2, lines 5-8
    without the second-order correction)."""
    derivative = (sample - x0) / sigma
    return sample + derivative * (sigma_next - sigma)


def ancestral_sigmas(sigma_from, sigma_to):
    """Split the step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise sigma_up:
    sigma_up = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2), sigma_down = sqrt(sigma_to^2 - sigma_up^2),
    so sigma_down^2 + sigma_up^2 = sigma_to^2 (ancestral sampling, Ho et al. 2020 eq. 7 in sigma form;
    k-diffusion's get_ancestral_step with eta = 1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = max(sigma_to**2 - sigma_up**2, 0.0) ** 0.5  # = sigma_to^2 / sigma_from >= 0; clamp rounding
    return sigma_down, sigma_up


class _SigmaScheduler(SigmaAddNoise, SchedulerMixin):
    """Shared by the sigma-indexed samplers: the sigma table, input scaling, init_noise_sigma."""

    ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for abar_T = 0 so sigma_T stays finite

    def _build_tables(self):
        super()._build_tables()
        if getattr(self.config, "rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = self.ZERO_SNR_LAST_ALPHA_CUMPROD
        self.sigmas_table = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # by training timestep
        self.sigmas = numpy.concatenate([self.sigmas_table[::-1], [0.0]])
        self.timesteps = numpy.linspace(0, self.config.num_train_timesteps - 1, self.config.num_train_timesteps)[::-1]

    @property
    def init_noise_sigma(self) -> float:
        """sigma_max ("linspace"/"trailing"), or sqrt(sigma_max^2 + 1) for "leading" (which misses t = T-1)."""
        s = float(numpy.max(self.sigmas))
        return s if self.config.timestep_spacing in ("linspace", "trailing") else (s**2 + 1) ** 0.5

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): back from x_0 + sigma eps to the model's input scale sqrt(abar) x."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self._step_index])
        return sample / (sigma**2 + 1) ** 0.5

    def _spaced(self, n):
        c = self.config
        timesteps = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset,
                                              exact=True)
        return timesteps, schedule.interpolate_sigmas(timesteps, self.sigmas_table)


@dataclasses.dataclass
class EulerConfig(BaseConfig):
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (optionally with Karras sigmas and "churn" noise)."""

    Config = EulerConfig
    UNSUPPORTED = {"interpolation_type": "linear", "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "timestep_type": "discrete"}

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        c = self.config
        timesteps, sigmas = self._spaced(n)
        if c.use_karras_sigmas:
            lo = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            hi = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = schedule.karras_sigmas(lo, hi, n)
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = numpy.concatenate([sigmas, [last]])
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """Euler step; with s_churn > 0 first raise sigma to sigma_hat = sigma (1 + gamma) by adding noise
        (Karras et al. 2022, Algorithm 2, lines 4-6)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self._step_index])
        sigma_next = float(self.sigmas[self._step_index + 1])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = noise_like(model_output, generator)
            sample = sample + (noise * s_noise) * (sigma_hat**2 - sigma**2) ** 0.5
        if self.config.prediction_type == "v_prediction":  # diffusers uses sigma, not sigma_hat, here
            x0 = x0_from_sigma_prediction("v_prediction", model_output, sample, sigma)
        else:
            x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma_hat)
        prev_sample = euler_step(sample, x0, sigma_hat, sigma_next)
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)


@dataclasses.dataclass
class EulerAncestralConfig(BaseConfig):
    rescale_betas_zero_snr: bool = False
    PREDICTION_TYPES = ("epsilon", "v_prediction")


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: Euler to sigma_down, then fresh noise of size sigma_up."""

    Config = EulerAncestralConfig

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas = self._spaced(n)
        self.sigmas = numpy.concatenate([sigmas, [0.0]])
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_next = x + (sigma_down - sigma) d + sigma_up z (noise is drawn at every step, as diffusers does)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self._step_index])
        sigma_to = float(self.sigmas[self._step_index + 1])
        x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_to)
        prev_sample = euler_step(sample, x0, sigma, sigma_down)
        prev_sample = prev_sample + noise_like(model_output, generator) * sigma_up
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
