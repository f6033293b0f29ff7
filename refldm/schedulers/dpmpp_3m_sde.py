"""DPM++ 3M SDE: the third-order multistep DPM-Solver++ for the diffusion SDE, as k-diffusion's
``sample_dpmpp_3m_sde`` and the web UIs' "DPM++ 3M SDE" (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095: the
data-prediction exponential integrator, sec. 4, its multistep form, sec. 4.2, and its SDE variant SDE-DPM-Solver++,
appendix; the third-order multistep extension is k-diffusion's). diffusers has no such scheduler (its
DPMSolverMultistepScheduler has the SDE variant up to second order only).

One model call per step sigma -> sigma_next, D_i = x_0(x_i, sigma_i); in lambda = -log sigma, h = lambda_next - lambda,
and with eta the share of noise, h_eta = (1 + eta) h:

    x_next = e^{-h_eta} x + (1 - e^{-h_eta}) D_i + phi_2 d_1 - phi_3 d_2 + s_noise sigma_next sqrt(1 - e^{-2 eta h}) z

    phi_2 = (e^{-h_eta} - 1) / h_eta + 1,   phi_3 = phi_2 / h_eta - 1/2

with the divided differences of the last three D (r_0 = h_{i-1} / h, r_1 = h_{i-2} / h, the earlier steps' h):

    d1_0 = (D_i - D_{i-1}) / r_0,  d1_1 = (D_{i-1} - D_{i-2}) / r_1,
    d_1 = d1_0 + (d1_0 - d1_1) r_0 / (r_0 + r_1),   d_2 = (d1_0 - d1_1) / (r_0 + r_1)

The first step uses no difference (d_1 = d_2 = 0), the second one (d_1 = (D_i - D_{i-1}) / r_0, d_2 = 0). The step
to sigma_next = 0 returns D_i. eta = 0 is the ODE solver DPM-Solver++(3M).

Noise: k-diffusion draws z from a Brownian tree (torchsde) over [sigma_min, sigma_max]; the steps' intervals do not
overlap, so its z are independent standard normals, one per step. refldm draws that same distribution from
refldm.core.random (the `generator` of step, deterministic for a seed); the numbers of torchsde's tree are not
reproduced. A ``noise_sampler(sigma, sigma_next)`` set after set_timesteps replaces it (k-diffusion's argument).
"""

from __future__ import annotations

import math

from .ksampler import KSamplerScheduler, KSigmaGridConfig, lam, step_sigmas


def dpmpp_3m_sde_update(sample, denoised, history, h, eta):
    """The deterministic part of the step (module docstring; k-diffusion's sample_dpmpp_3m_sde):

        e^{-h_eta} x + (1 - e^{-h_eta}) D_i + phi_2 d_1 - phi_3 d_2

    `history` = [(D_{i-1}, h_{i-1}), (D_{i-2}, h_{i-2})] as far as they exist (d_2 = 0 with one, d_1 = d_2 = 0 with
    none)."""
    h_eta = h * (eta + 1)
    x = math.exp(-h_eta) * sample + (-math.expm1(-h_eta)) * denoised
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if len(history) == 2:
        (denoised_1, h_1), (denoised_2, h_2) = history
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        x = x + phi_2 * d1 - phi_3 * d2
    elif len(history) == 1:
        (denoised_1, h_1), = history
        x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
    return x


class DPMPP3MSDEScheduler(KSamplerScheduler):
    """"DPM++ 3M SDE" ("DPM++ 3M SDE Karras" with use_karras_sigmas=True); eta and s_noise as k-diffusion's."""

    Config = KSigmaGridConfig

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        """n steps along the config's sigmas (or custom `sigmas`, n + 1 values), one model call each."""
        sigmas = step_sigmas(self, num_inference_steps, sigmas)
        self.num_inference_steps = len(sigmas) - 1
        self._plan(sigmas[:-1], [0] * (len(sigmas) - 1), sigmas)
        self.history = []  # [(D, h)] of the last two steps, newest first

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One step of the module docstring; the multistep history restarts with set_timesteps."""
        i = self._locate_step(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        denoised = self._x0(model_output, sample)
        if sigma_next == 0:
            prev_sample = denoised
            h = self.history[0][1] if self.history else None  # k-diffusion keeps the last h here (unused after)
        else:
            h = lam(sigma_next) - lam(sigma)
            prev_sample = dpmpp_3m_sde_update(sample, denoised, self.history, h, self.config.eta)
            if self.config.eta:
                scale = sigma_next * (-math.expm1(-2 * h * self.config.eta)) ** 0.5 * self.config.s_noise
                prev_sample = prev_sample + self._noise(sample, generator, sigma, sigma_next) * scale
        self.history = [(denoised, h)] + self.history[:1]
        self._step_index += 1
        return self._output(return_dict, prev_sample, denoised)
