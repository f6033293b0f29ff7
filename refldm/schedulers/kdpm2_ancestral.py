"""DPM2 ancestral: the DPM2 step of kdpm2.py aimed at sigma_down, then fresh noise of size sigma_up, as
k-diffusion's ``sample_dpm_2_ancestral`` and the web UIs' "DPM2 a" (Lu et al. 2022, "DPM-Solver", Algorithm 1 with
order 2; the ancestral split of Ho et al. 2020 eq. 7 in sigma form, base.ancestral_split).

Each step sigma -> sigma_next first splits sigma_next into a deterministic target and added noise,

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),   sigma_down = sqrt(sigma_next^2 - sigma_up^2),

then takes the DPM2 step to sigma_down through the log-midpoint sigma_mid = sqrt(sigma sigma_down), with two model
calls, and adds noise:

    d = (x - x_0(x, sigma)) / sigma,            x_mid = x + (sigma_mid - sigma) d
    d_mid = (x_mid - x_0(x_mid, sigma_mid)) / sigma_mid,   x_next = x + (sigma_down - sigma) d_mid + sigma_up z

As in diffusers' KDPM2AncestralDiscreteScheduler, ``timesteps`` interleaves each step's timestep with its midpoint's
(2n - 1 entries), and the last step, to sigma = 0 (sigma_down = sigma_mid = 0), is a plain Euler step to x_0 with
no noise.
"""

from __future__ import annotations

import numpy

from . import schedule
from .base import SigmaScheduler, TwoCallStep, ancestral_split, noise_like
from .kdpm2 import KDPM2Config, interleave, spaced_sigmas
from .prediction import x0_from_sigma_prediction


class KDPM2AncestralDiscreteScheduler(TwoCallStep, SigmaScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler ("DPM2 a"; "DPM2 a Karras" with use_karras_sigmas=True)."""

    Config = KDPM2Config  # the same keys and defaults as DPM2 in diffusers
    steps_at_init = "num_train_timesteps"  # as diffusers: usable before set_timesteps

    def set_timesteps(self, num_inference_steps, device=None, num_train_timesteps=None):
        n = self._check_steps(num_inference_steps, num_train_timesteps)
        self.num_inference_steps = n
        timesteps, sigmas, log_sigmas = spaced_sigmas(self, n)  # (n,), (n + 1,) ending in 0
        sigmas_next = numpy.concatenate([sigmas[1:], sigmas[-1:] * 0])  # (n + 1,)
        with numpy.errstate(divide="ignore", invalid="ignore"):  # entry n: sigma = 0, never used
            down, up = ancestral_split(sigmas, sigmas_next)  # elementwise: down = sigma_next^2 / sigma
            down[-1] = 0
            log_s, log_down = numpy.log(sigmas), numpy.log(down)
            mids = numpy.exp(log_down - (log_down - log_s) * 0.5)  # torch.lerp(log_s, log_down, 1/2)
        mids[-2:] = 0  # the last step (sigma_down = 0) is Euler; entry n is never used
        timesteps_mid = self._table(schedule.sigma_to_t(mids[:-2], log_sigmas))  # (n - 1,)
        timesteps = self._table(timesteps)
        self.sigmas, self.sigmas_interpol = interleave(sigmas), interleave(mids)  # (2n + 2,)
        self.sigmas_up, self.sigmas_down = interleave(up), interleave(down)
        pairs = numpy.stack([timesteps_mid, timesteps[1:]], axis=-1).reshape(-1)  # (mid_i, t_{i+1}) for i < n - 1
        self.timesteps = numpy.concatenate([timesteps[:1], pairs])  # (2n - 1,)
        self.sample = None
        self._reset_step_index()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1), with sigma the midpoint's on the second call of a step."""
        i = self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1])
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """First call: Euler to the log-midpoint (stores x); second call: the step to sigma_down with the
        midpoint's derivative, plus sigma_up z with z drawn from `generator` (module docstring)."""
        i = self._locate_step(timestep)
        if self.state_in_first_order:
            sigma, sigma_mid = self._scalar(self.sigmas[i]), self._scalar(self.sigmas_interpol[i])
            x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)
            prev_sample = sample + (sample - x0) / sigma * (sigma_mid - sigma)
            self.sample = sample
        else:
            sigma, sigma_mid = self._scalar(self.sigmas[i - 1]), self._scalar(self.sigmas_interpol[i - 1])
            sigma_up, sigma_down = self._scalar(self.sigmas_up[i - 1]), self._scalar(self.sigmas_down[i - 1])
            x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma_mid)
            derivative = (sample - x0) / sigma_mid
            prev_sample = self.sample + derivative * (sigma_down - sigma)
            prev_sample = prev_sample + noise_like(model_output, generator) * sigma_up
            self.sample = None
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
