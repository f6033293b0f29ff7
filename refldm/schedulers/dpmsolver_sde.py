"""DPM-Solver++ SDE, the web UIs' "DPM++ SDE" (k-diffusion's ``sample_dpmpp_sde`` with eta = 1, r = 1/2; Lu et al.
2022, "DPM-Solver++", arXiv:2211.01095, the second-order singlestep solver with ancestral noise), as diffusers'
DPMSolverSDEScheduler.

Work in t = -log sigma on x = x_0 + sigma eps. A step sigma -> sigma_next (t -> t_next, h = t_next - t) takes two
model calls. Each stage goes from x at sigma to a target sigma_to (the midpoint sigma_mid = exp(-(t + h/2)) in the
first stage, sigma_next in the second) as an ancestral first-order DPM-Solver++ step:

    sigma_up = min(sigma_to, sqrt(sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2),
    x_to = (sigma_down / sigma) x - expm1(-(log sigma - log sigma_down)) x_0 + sigma_up z

with x_0 = x_0(x, sigma) in the first stage and x_0 = x_0(x_mid, sigma_mid) in the second (which restarts from x).
The last step, to sigma = 0, is an Euler step. ``timesteps`` interleaves each step's timestep with its midpoint's.

The noise z of the two stages are increments of one Brownian motion W(sigma) over [sigma_mid, sigma] and
[sigma_next, sigma], divided by the square roots of their lengths: each standard normal, correlated with
coefficient sqrt((sigma - sigma_mid) / (sigma - sigma_next)), and independent across steps. diffusers draws them
from torchsde's Brownian tree (seeded by noise_sampler_seed), whose numbers cannot be reproduced without torchsde;
refldm draws the same joint distribution exactly (BrownianIncrements) from refldm.core.random.Generator(noise_sampler_seed).
Like diffusers, a ``noise_sampler(sigma, sigma_next)`` set after set_timesteps replaces it.
"""

from __future__ import annotations

import dataclasses

import numpy

from refldm.core import random as refldm_random

from . import schedule
from .base import BaseConfig, SigmaGridKeys, SigmaScheduler, TwoCallStep, ancestral_split, to_device
from .prediction import x0_from_sigma_prediction


class BrownianIncrements:
    """z = (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next) for a Brownian motion W, for the calls a
    DPM-Solver SDE step makes: (sigma, sigma_mid) then (sigma, sigma_next) with sigma_next < sigma_mid, which extends
    the same increment (so the two z are correlated as the path requires); a call starting anywhere else begins a
    new, independent interval (the steps' intervals do not overlap)."""

    def __init__(self, like, seed=None):
        self.like = like
        self.generator = refldm_random.Generator(seed) if seed is not None else None
        self._start = self._end = None
        self._w = None

    def _normal(self):
        if self.generator is None:
            return numpy.random.default_rng().standard_normal(tuple(self.like.shape)).astype(self.like.dtype)
        return refldm_random.randn(tuple(self.like.shape), generator=self.generator,
                                   dtype=numpy.dtype(self.like.dtype).name)

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        if self._start != sigma or not sigma_next < self._end:
            self._start, self._end, self._w = sigma, sigma, 0.0
        self._w = self._w + (self._end - sigma_next) ** 0.5 * self._normal()  # independent increment below _end
        self._end = sigma_next
        return to_device(self._w / (sigma - sigma_next) ** 0.5, self.like)


@dataclasses.dataclass
class DPMSolverSDEConfig(SigmaGridKeys, BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    noise_sampler_seed: int | None = None
    PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented

    def __post_init__(self):
        super().__post_init__()
        schedule.check_one_sigma_grid(self)


class DPMSolverSDEScheduler(TwoCallStep, SigmaScheduler):
    """diffusers' DPMSolverSDEScheduler ("DPM++ SDE"; "DPM++ SDE Karras" with use_karras_sigmas=True)."""

    Config = DPMSolverSDEConfig
    steps_at_init = "num_train_timesteps"  # as diffusers: usable before set_timesteps

    def set_timesteps(self, num_inference_steps, device=None, num_train_timesteps=None):
        n = self._check_steps(num_inference_steps, num_train_timesteps)
        c = self.config
        self.num_inference_steps = n
        # diffusers keeps these timesteps in float64 (even with float32 tables) and interpolates sigma there
        timesteps = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset, exact=True)
        timesteps = numpy.asarray(timesteps, numpy.float64)
        sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        log_sigmas = numpy.log(self.sigmas_table)
        grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
        if grid is not None:
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        t = -numpy.log(sigmas)  # (n,)
        mids = numpy.exp(-(t[:-1] + numpy.diff(t) * 0.5))  # (n - 1,): exp(-(t_i + h_i / 2))
        timesteps_mid = schedule.sigma_to_t(mids, log_sigmas)
        sigmas = self._table(numpy.concatenate([sigmas, [0.0]]))  # (n + 1,)
        self.sigmas = numpy.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])  # (2n,)
        interleaved = numpy.concatenate([timesteps[:1], timesteps[1:].repeat(2)])  # (2n - 1,)
        interleaved[1::2] = timesteps_mid
        self.timesteps = interleaved
        self.sample = None
        self.mid_point_sigma = None
        self.noise_sampler = None
        self._reset_step_index()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1), with sigma the midpoint's on the second call of a step."""
        self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[self._step_index]) if self.state_in_first_order else self.mid_point_sigma
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, return_dict=True, s_noise=1.0):
        """One stage of the step (module docstring)."""
        self._locate_step(timestep)
        if self.noise_sampler is None:
            self.noise_sampler = BrownianIncrements(sample, self.config.noise_sampler_seed)
        i = self._step_index
        first = self.state_in_first_order
        sigma = self._scalar(self.sigmas[i] if first else self.sigmas[i - 1])
        sigma_next = self._scalar(self.sigmas[i + 1] if first else self.sigmas[i])
        f = type(sigma)  # float, or numpy.float32 with float32 tables: every scalar below stays in that precision
        t, t_next = f(-numpy.log(sigma)), (f(-numpy.log(sigma_next)) if sigma_next > 0 else None)
        t_mid = f(t + (t_next - t) * 0.5) if t_next is not None else None
        sigma_input = sigma if first else f(numpy.exp(-t_mid))
        x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma_input)
        if sigma_next == 0:  # the last step: Euler to sigma = 0
            prev_sample = sample + (sample - x0) / sigma * (sigma_next - sigma)
        else:
            if first:
                t_next = t_mid
            else:
                sample = self.sample
            sigma_from, sigma_to = f(numpy.exp(-t)), f(numpy.exp(-t_next))
            sigma_down, sigma_up = ancestral_split(sigma_from, sigma_to)
            t_down = f(-numpy.log(sigma_down))
            prev_sample = f(numpy.exp(-t_down) / numpy.exp(-t)) * sample - f(numpy.expm1(t - t_down)) * x0
            noise = self.noise_sampler(sigma_from, sigma_to)
            prev_sample = prev_sample + noise * s_noise * sigma_up
            if first:
                self.sample, self.mid_point_sigma = sample, sigma_to
            else:
                self.sample, self.mid_point_sigma = None, None
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
