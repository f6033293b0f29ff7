"""DDPM: ancestral sampling of the reverse Markov chain (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")."""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import (AlphaScheduler, BaseConfig, ThresholdingKeys, check_choice, check_custom_timesteps, clip,
                   dynamic_threshold, noise_like)
from .prediction import predict_x0


def ddpm_posterior(x0, sample, abar_t, abar_prev):
    """Mean and variance of q(x_prev | x_t, x_0)  (Ho et al. 2020, eqs. 6-7), with the step's own
    alpha_t = abar_t / abar_prev and beta_t = 1 - alpha_t (so skipped timesteps work too):

        mean = sqrt(abar_prev) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
        var  = (1 - abar_prev) / (1 - abar_t) beta_t          ("fixed_small", beta-tilde)
    """
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    mean = (abar_prev**0.5 * beta_t / (1 - abar_t)) * x0 + (alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)) * sample
    variance = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    return mean, variance, beta_t


@dataclasses.dataclass
class DDPMConfig(ThresholdingKeys, BaseConfig):
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, ("fixed_small", "fixed_small_log", "fixed_large"))


class DDPMScheduler(AlphaScheduler):
    """diffusers' DDPMScheduler: x_prev ~ q(x_prev | x_t, x_0 = model's estimate)."""

    Config = DDPMConfig

    custom_timesteps = False  # set_timesteps(timesteps=...) sets it

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """The n timesteps to visit (descending), spaced as config.timestep_spacing; or explicit `timesteps`."""
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("DDPMScheduler.set_timesteps: pass num_inference_steps or timesteps, not both")
            timesteps = check_custom_timesteps("DDPMScheduler.set_timesteps", timesteps,
                                               self.config.num_train_timesteps)
            self.custom_timesteps = True
            self.num_inference_steps = len(timesteps)
            self.timesteps = timesteps
            return
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        self.custom_timesteps = False
        c = self.config
        self.timesteps = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset
                                                   ).astype(numpy.int64)

    def previous_timestep(self, timestep):
        """The next timestep in the schedule (-1 after the last), or t - 1 before set_timesteps."""
        t = int(timestep)
        if self.custom_timesteps or self.num_inference_steps:
            index = int(numpy.nonzero(self.timesteps == t)[0][0])
            return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])
        return t - 1

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One ancestral step x_t -> x_prev; adds noise except at t = 0."""
        c = self.config
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        abar_t = self._scalar(self.alphas_cumprod[t])
        abar_prev = self._scalar(self.alphas_cumprod[prev_t] if prev_t >= 0 else 1.0)
        x0 = predict_x0(c.prediction_type, model_output, sample, abar_t**0.5, (1 - abar_t) ** 0.5)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = clip(x0, c.clip_sample_range)
        prev_sample, variance, beta_t = ddpm_posterior(x0, sample, abar_t, abar_prev)
        if t > 0:
            noise = noise_like(model_output, generator)
            if c.variance_type == "fixed_small":
                std = variance**0.5
            elif c.variance_type == "fixed_small_log":
                std = math.exp(0.5 * math.log(variance))
            else:  # "fixed_large": the forward variance beta_t (Ho et al. 2020, sec. 3.2)
                std = beta_t**0.5
            prev_sample = prev_sample + std * noise
        return self._output(return_dict, prev_sample, x0)
