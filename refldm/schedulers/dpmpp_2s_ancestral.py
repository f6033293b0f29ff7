"""DPM++ 2S a: the second-order singlestep DPM-Solver++ with ancestral noise, as k-diffusion's
``sample_dpmpp_2s_ancestral`` and the web UIs' "DPM++ 2S a" (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv:2211.01095, Algorithm 1 "DPM-Solver++(2S)" with r = 1/2; the
ancestral split of Ho et al. 2020 eq. 7 in sigma form). diffusers has no such scheduler.

Each step sigma -> sigma_next first splits sigma_next into a deterministic target and fresh noise (base.
ancestral_split: sigma_down^2 + sigma_up^2 = sigma_next^2), then, in lambda = -log sigma with h = lambda_down - lambda
and the midpoint lambda_s = lambda + h/2 (sigma_s = exp(-lambda_s) = sqrt(sigma sigma_down)), takes two model calls:

    u      = (sigma_s / sigma) x - expm1(-h/2) x_0(x, sigma)               (DPM-Solver++(1) to the midpoint)
    x_next = (sigma_down / sigma) x - expm1(-h) x_0(u, sigma_s) + s_noise sigma_up z

When sigma_down = 0 (the last step, to sigma = 0) it is one Euler step, x + (sigma_down - sigma) (x - x_0) / sigma,
with no noise. ``timesteps`` lists each step's two model calls (2n - 1 entries for n steps).
"""

from __future__ import annotations

import math

from .base import ancestral_split
from .ksampler import KSamplerScheduler, KSigmaGridConfig, lam, sigma_of, step_sigmas


def dpmpp_first_order(sample, x0, sigma, sigma_to):
    """x_to = (sigma_to / sigma) x - expm1(-(lambda_to - lambda)) x_0: the first-order DPM-Solver++ step, exact for a
    constant x_0 (Lu et al. 2022, "DPM-Solver++", eq. 9 with k = 1; the same as DDIM with eta = 0)."""
    return (sigma_to / sigma) * sample - math.expm1(-(lam(sigma_to) - lam(sigma))) * x0


class DPMPP2SAncestralScheduler(KSamplerScheduler):
    """"DPM++ 2S a" ("DPM++ 2S a Karras" with use_karras_sigmas=True); eta and s_noise as k-diffusion's arguments."""

    Config = KSigmaGridConfig
    order = 2  # model calls per step (the last step, to sigma = 0, has one)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        """n steps along the config's sigmas (or custom `sigmas`, n + 1 values): two model calls per step, at sigma_i
        and at the log-midpoint of sigma_i and its sigma_down; one where sigma_down = 0."""
        sigmas = step_sigmas(self, num_inference_steps, sigmas)
        self.num_inference_steps = len(sigmas) - 1
        call_sigmas, call_stages, self.sigmas_down, self.sigmas_up = [], [], [], []
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sigma_down, sigma_up = ancestral_split(float(sigma), float(sigma_next), self.config.eta)
            self.sigmas_down.append(sigma_down)
            self.sigmas_up.append(sigma_up)
            call_sigmas.append(sigma)
            call_stages.append(0)
            if sigma_down > 0:
                lam_s = lam(sigma) + (lam(sigma_down) - lam(sigma)) / 2
                call_sigmas.append(sigma_of(lam_s))
                call_stages.append(1)
        self._plan(call_sigmas, call_stages, sigmas)
        self._step_of_call = (self.call_stages == 0).cumsum() - 1  # the step each model call belongs to
        self.sample = None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """First call of a step: the DPM-Solver++(1) half-step to the midpoint u (stores x); second call: the full
        step with x_0(u) plus noise (module docstring). A step with sigma_down = 0 is one Euler call."""
        k = self._locate_step(timestep)
        i = int(self._step_of_call[k])
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        sigma_down, sigma_up = self.sigmas_down[i], self.sigmas_up[i]
        x0 = self._x0(model_output, sample)
        if self.call_stages[k] == 0 and sigma_down == 0:  # Euler to sigma_down = 0
            prev_sample = sample + (sample - x0) / sigma * (sigma_down - sigma)
            if sigma_next > 0:
                prev_sample = prev_sample + self._noise(sample, generator, sigma, sigma_next) * (
                    self.config.s_noise * sigma_up)
        elif self.call_stages[k] == 0:  # to the midpoint
            self.sample = sample
            prev_sample = dpmpp_first_order(sample, x0, sigma, float(self.call_sigmas[k + 1]))
        else:  # the full step from the stored x with the midpoint's x_0
            x = self.sample
            self.sample = None
            prev_sample = dpmpp_first_order(x, x0, sigma, sigma_down)
            if sigma_next > 0:
                prev_sample = prev_sample + self._noise(x, generator, sigma, sigma_next) * (
                    self.config.s_noise * sigma_up)
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
