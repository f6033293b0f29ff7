"""DDIM: the non-Markovian sampler of Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"."""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import AlphaScheduler, BaseConfig, ThresholdingKeys, clip, dynamic_threshold, noise_like
from .prediction import eps_from_x0, predict_eps, predict_x0


def ddim_sigma(abar_t, abar_prev, eta):
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (Song et al. 2021,
    eq. 16); eta = 0 is deterministic DDIM, eta = 1 is DDPM's posterior variance."""
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return eta * variance**0.5


def ddim_update(x0, eps, abar_prev, sigma_t):
    """x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma_t^2) eps   (Song et al. 2021, eq. 12;
    the noise term sigma_t z is added by the caller). 1 - abar_prev - sigma_t^2 >= 0 exactly; it is clamped at 0
    where rounding makes it a hair negative (eta = 1 at zero terminal SNR)."""
    return abar_prev**0.5 * x0 + max(1 - abar_prev - sigma_t**2, 0.0) ** 0.5 * eps


@dataclasses.dataclass
class DDIMConfig(ThresholdingKeys, BaseConfig):
    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False


class DDIMScheduler(AlphaScheduler):
    """diffusers' DDIMScheduler. The step after the last timestep uses abar = 1 (set_alpha_to_one) or abar_0."""

    Config = DDIMConfig

    def set_timesteps(self, num_inference_steps, device=None):
        """The n timesteps to visit (descending), spaced as config.timestep_spacing."""
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        c = self.config
        self.timesteps = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset
                                                   ).astype(numpy.int64)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One DDIM step. The previous timestep is t - T // n, as in diffusers (whatever the spacing)."""
        self._need_timesteps()
        c = self.config
        t = int(timestep)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        abar_t = self._scalar(self.alphas_cumprod[t])
        abar_prev = self._scalar(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        a, s = abar_t**0.5, (1 - abar_t) ** 0.5
        x0 = predict_x0(c.prediction_type, model_output, sample, a, s)
        eps = predict_eps(c.prediction_type, model_output, sample, a, s)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = clip(x0, c.clip_sample_range)
        if use_clipped_model_output:
            eps = eps_from_x0(sample, x0, a, s)
        sigma_t = ddim_sigma(abar_t, abar_prev, eta)
        prev_sample = ddim_update(x0, eps, abar_prev, sigma_t)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass generator or variance_noise, not both")
            noise = noise_like(model_output, generator) if variance_noise is None else variance_noise
            prev_sample = prev_sample + sigma_t * noise
        return self._output(return_dict, prev_sample, x0)

