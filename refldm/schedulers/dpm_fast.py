"""DPM fast: DPM-Solver with a fixed budget of model calls, as k-diffusion's ``sample_dpm_fast`` and the web UIs'
"DPM fast" (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps", arXiv:2206.00927: the DPM-Solver-1/2/3 steps of sec. 3.3 and the "DPM-Solver-fast" order sequence of
sec. 3.4). diffusers has no such scheduler.

The solver works on the noise prediction eps = (x - x_0(x, sigma)) / sigma, in lambda = -log sigma. With a budget
of N model calls it takes m = floor(N / 3) + 1 steps evenly spaced in lambda from sigma_max to sigma_min, each of
order 3, except the last ones, chosen so the orders add up to N:

    N = 3k:      orders 3, ..., 3, 2, 1   (m - 2 threes)
    otherwise:   orders 3, ..., 3, N mod 3   (m - 1 threes)

A step of order k calls the model k times (the DPM-Solver-k step below); ``timesteps`` lists all N calls. As in
the web UIs the range is the model's: sigma_max and sigma_min of its training sigmas (A1111 passes those; the
number of steps is the number of model calls N). The result is x at sigma_min, not at 0, as k-diffusion returns it.

With eta > 0, each step aims at the ancestral sigma_down of its end point (base.ancestral_split, clamped to
sigma_min) and adds s_noise sigma_up z with sigma_up = sqrt(sigma_next^2 - sigma_down^2).
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from .base import ancestral_split
from .ksampler import KSamplerConfig, KSamplerScheduler, lam, sigma_of


def dpm_solver_1(x, eps, lam_s, lam_t):
    """x_t = x_s - sigma_t (e^h - 1) eps(x_s, s),  h = lambda_t - lambda_s: DPM-Solver-1 (Lu et al. 2022,
    "DPM-Solver", eq. 3.7; the same as DDIM)."""
    h = lam_t - lam_s
    return x - (sigma_of(lam_t) * math.expm1(h)) * eps


def dpm_solver_2(x, eps, eps_1, lam_s, lam_t, r1):
    """x_t = x_s - sigma_t (e^h - 1) eps - sigma_t / (2 r1) (e^h - 1) (eps_1 - eps): DPM-Solver-2 (Lu et al. 2022,
    "DPM-Solver", Algorithm 1 with a general r1), eps_1 the model at u_1 = dpm_solver_1(x, eps, lambda_s,
    lambda_s + r1 h)."""
    h = lam_t - lam_s
    sigma_t = sigma_of(lam_t)
    return x - (sigma_t * math.expm1(h)) * eps - (sigma_t / (2 * r1) * math.expm1(h)) * (eps_1 - eps)


def dpm_solver_3_second_point(x, eps, eps_1, lam_s, lam_t, r1, r2):
    """u_2 = x_s - sigma_s2 (e^{r2 h} - 1) eps - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps_1 - eps), at
    lambda_s2 = lambda_s + r2 h: the second intermediate point of DPM-Solver-3 (Lu et al. 2022, "DPM-Solver",
    Algorithm 2)."""
    h = lam_t - lam_s
    sigma_s2 = sigma_of(lam_s + r2 * h)
    phi = math.expm1(r2 * h)
    return x - (sigma_s2 * phi) * eps - (sigma_s2 * (r2 / r1) * (phi / (r2 * h) - 1)) * (eps_1 - eps)


def dpm_solver_3(x, eps, eps_2, lam_s, lam_t, r2):
    """x_t = x_s - sigma_t (e^h - 1) eps - sigma_t / r2 ((e^h - 1) / h - 1) (eps_2 - eps): DPM-Solver-3 (Lu et al.
    2022, "DPM-Solver", Algorithm 2, r1 = 1/3, r2 = 2/3), eps_2 the model at u_2 (dpm_solver_3_second_point)."""
    h = lam_t - lam_s
    sigma_t = sigma_of(lam_t)
    return x - (sigma_t * math.expm1(h)) * eps - (sigma_t / r2 * (math.expm1(h) / h - 1)) * (eps_2 - eps)


# the fractions r of the step h where a DPM-Solver-k step calls the model after its start (k = 1, 2, 3)
STAGES = {1: (), 2: (1 / 2,), 3: (1 / 3, 2 / 3)}


def fast_orders(nfe: int):
    """The orders of DPM-Solver-fast's steps for a budget of nfe model calls (module docstring); they add up to nfe."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def singlestep_stage(x, eps_list, lam_s, lam_t, order, r):
    """One stage of a DPM-Solver-k step from x at lambda_s to lambda_t, given the model's eps at the calls so far
    (`eps_list`): the next point where the model is called, or, after the last call, x at lambda_t.
    `r` are the fractions of the intermediate calls (STAGES[order], or (1/3,) for the DPM-Solver-2 of DPM adaptive)."""
    calls = len(eps_list)
    if order == 1:
        return dpm_solver_1(x, eps_list[0], lam_s, lam_t)
    if calls == 1:  # to the first intermediate point
        return dpm_solver_1(x, eps_list[0], lam_s, lam_s + r[0] * (lam_t - lam_s))
    if order == 2:
        return dpm_solver_2(x, eps_list[0], eps_list[1], lam_s, lam_t, r[0])
    if calls == 2:
        return dpm_solver_3_second_point(x, eps_list[0], eps_list[1], lam_s, lam_t, r[0], r[1])
    return dpm_solver_3(x, eps_list[0], eps_list[2], lam_s, lam_t, r[1])


@dataclasses.dataclass
class DPMFastConfig(KSamplerConfig):
    eta: float = 0.0  # k-diffusion's default for sample_dpm_fast: the ODE solver


class DPMFastScheduler(KSamplerScheduler):
    """"DPM fast": num_inference_steps is the number of model calls N (module docstring)."""

    Config = DPMFastConfig

    def set_timesteps(self, num_inference_steps, device=None):
        """Plan the steps and their N = num_inference_steps model calls over the model's sigma range."""
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        sigma_min, sigma_max = float(self.sigmas_table[0]), float(self.sigmas_table.max())
        self.lam_end = lam(sigma_min)
        self.orders = fast_orders(n)
        lams = numpy.linspace(lam(sigma_max), self.lam_end, len(self.orders) + 1)  # (m + 1,) evenly in lambda
        self.lams = [float(v) for v in lams]
        self.lam_targets, self.sigmas_up = [], []
        call_sigmas, call_stages = [], []
        for order, lam_s, lam_t in zip(self.orders, self.lams[:-1], self.lams[1:]):
            target, sigma_up = lam_t, 0.0
            if self.config.eta:  # aim at sigma_down, add noise up to sigma_t
                sigma_down, _ = ancestral_split(sigma_of(lam_s), sigma_of(lam_t), self.config.eta)
                target = min(self.lam_end, lam(sigma_down))
                sigma_up = (sigma_of(lam_t) ** 2 - sigma_of(target) ** 2) ** 0.5
            self.lam_targets.append(target)
            self.sigmas_up.append(sigma_up)
            for stage, r in enumerate((0.0,) + STAGES[order]):
                call_sigmas.append(sigma_of(lam_s + r * (target - lam_s)))
                call_stages.append(stage)
        self._plan(call_sigmas, call_stages, [sigma_of(v) for v in self.lams])
        self._step_of_call = (self.call_stages == 0).cumsum() - 1
        self.sample, self.eps = None, []

    def set_begin_index(self, begin_index: int = 0):
        if begin_index:
            raise ValueError(f"{type(self).__name__}: img2img (strength < 1) is not implemented: its steps span the "
                             "model's whole sigma range")
        super().set_begin_index(begin_index)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One model call's stage of a DPM-Solver-k step (singlestep_stage): returns where the model is called next,
        or, after the step's last call, x at the step's end (plus the noise when eta > 0)."""
        k = self._locate_step(timestep)
        i = int(self._step_of_call[k])
        x0 = self._x0(model_output, sample)
        sigma_call = float(self.call_sigmas[k])
        if self.call_stages[k] == 0:
            self.sample, self.eps = sample, []
        self.eps.append((sample - x0) / sigma_call)  # eps = (x - x_0) / sigma
        order, lam_s, lam_t = self.orders[i], self.lams[i], self.lam_targets[i]
        prev_sample = singlestep_stage(self.sample, self.eps, lam_s, lam_t, order, STAGES[order])
        if len(self.eps) == order:  # the step is complete
            if self.config.eta:
                z = self._noise(sample, generator, sigma_of(lam_s), sigma_of(self.lams[i + 1]))
                prev_sample = prev_sample + z * (self.sigmas_up[i] * self.config.s_noise)
            self.sample, self.eps = None, []
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
