"""Euler and Euler ancestral samplers in sigma (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"; k-diffusion's ``sample_euler`` and ``sample_euler_ancestral``).

In the variance-exploding view x = x_0 + sigma eps (x is the latent divided by sqrt(abar)), the probability-flow
ODE is dx/dsigma = (x - x_0(x, sigma)) / sigma  (Karras et al. 2022, sec. 2, with sigma(t) = t).
"""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import (BaseConfig, SigmaGridKeys, SigmaScheduler, ancestral_split, check_choice, check_custom_sigmas,
                   check_custom_timesteps, churn, noise_like)
from .prediction import x0_from_sigma_prediction


def euler_step(sample, x0, sigma, sigma_next):
    """x_next = x + (sigma_next - sigma) d,  d = (x - x_0) / sigma   (Karras et al. 2022, Algorithm 2, lines 5-8
    without the second-order correction)."""
    derivative = (sample - x0) / sigma
    return sample + derivative * (sigma_next - sigma)


@dataclasses.dataclass
class EulerConfig(SigmaGridKeys, BaseConfig):
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice("interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        schedule.check_one_sigma_grid(self)


class EulerDiscreteScheduler(SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (optionally with Karras, exponential or beta sigmas, log-linear
    interpolation, custom timesteps or sigmas, and "churn" noise)."""

    Config = EulerConfig
    UNSUPPORTED = {"timestep_type": "discrete"}

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """n timesteps spaced as config.timestep_spacing with sigma interpolated linearly in t ("linear") or n + 1
        sigmas evenly in log sigma from sigma_max to sigma_min ("log_linear"; as diffusers, the last step then
        ends at sigma_min); or the config's sigma grid; or custom `timesteps` (descending, fractional allowed) or
        custom `sigmas` (n + 1 values including the final one), as diffusers accepts them."""
        c = self.config
        where = type(self).__name__ + ".set_timesteps"
        if sum(v is not None for v in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError(f"{where}: pass exactly one of num_inference_steps, timesteps, sigmas")
        grid_keys = [k for k in schedule.SIGMA_GRIDS if getattr(c, k)]
        if timesteps is not None and grid_keys:
            raise ValueError(f"{where}: custom timesteps cannot be used with {grid_keys[0]}=True")
        if sigmas is not None:
            sigmas = self._table(check_custom_sigmas(where, sigmas))
            self.num_inference_steps = len(sigmas) - 1
            timesteps = schedule.sigma_to_t(sigmas[:-1], numpy.log(self.sigmas_table))
            self._set_schedule(timesteps, sigmas)
            return
        if timesteps is not None:
            timesteps = self._table(check_custom_timesteps(where, timesteps, c.num_train_timesteps, integer=False))
            n = len(timesteps)
        else:
            n = self._check_steps(num_inference_steps)
            timesteps, _ = self._spaced(n)
        self.num_inference_steps = n
        if c.interpolation_type == "log_linear":
            log_max, log_min = numpy.log(self.sigmas_table[-1]), numpy.log(self.sigmas_table[0])
            sigmas = numpy.exp(schedule.linspace(log_max, log_min, n + 1, c.table_dtype))
        else:
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
        if grid is not None:
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self._set_schedule(timesteps, numpy.concatenate([sigmas, [last]]))

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """Euler step; with s_churn > 0 first raise sigma to sigma_hat = sigma (1 + gamma) by adding noise
        (Karras et al. 2022, Algorithm 2, lines 4-6)."""
        self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[self._step_index])
        sigma_next = self._scalar(self.sigmas[self._step_index + 1])
        sample, sigma_hat = churn(sample, sigma, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator,
                                  model_output)
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


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: Euler to sigma_down, then fresh noise of size sigma_up."""

    Config = EulerAncestralConfig

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        timesteps, sigmas = self._spaced(n)
        self._set_schedule(timesteps, numpy.concatenate([sigmas, [0.0]]))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_next = x + (sigma_down - sigma) d + sigma_up z (noise is drawn at every step, as diffusers does)."""
        self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[self._step_index])
        sigma_to = self._scalar(self.sigmas[self._step_index + 1])
        x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_to)
        prev_sample = euler_step(sample, x0, sigma, sigma_down)
        prev_sample = prev_sample + noise_like(model_output, generator) * sigma_up
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
