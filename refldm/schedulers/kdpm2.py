"""DPM2: the second-order DPM-Solver step in sigma, as k-diffusion's ``sample_dpm_2`` and the web UIs' "DPM2"
(Lu et al. 2022, "DPM-Solver", Algorithm 1 with order 2, written for x = x_0 + sigma eps as in Karras et al. 2022).

Each step sigma -> sigma_next takes two model calls: an Euler half-step to the midpoint in log sigma,
sigma_mid = exp((log sigma + log sigma_next) / 2) = sqrt(sigma sigma_next), and a full step from x with the
derivative there:

    d = (x - x_0(x, sigma)) / sigma,            x_mid = x + (sigma_mid - sigma) d
    d_mid = (x_mid - x_0(x_mid, sigma_mid)) / sigma_mid,   x_next = x + (sigma_next - sigma) d_mid

As in diffusers' KDPM2DiscreteScheduler, ``timesteps`` interleaves each step's timestep with its midpoint's
(2n - 1 entries), and the last step, to sigma = 0 (midpoint 0), is a plain Euler step.
"""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, SigmaScheduler, TwoCallStep
from .prediction import x0_from_sigma_prediction


@dataclasses.dataclass
class KDPM2Config(SigmaGridKeys, BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers: "sample" not implemented

    def __post_init__(self):
        super().__post_init__()
        schedule.check_one_sigma_grid(self)


def log_midpoints(sigmas):
    """sigma_mid_i = exp(lerp(log sigma_i, log sigma_{i-1}, 1/2)) = sqrt(sigma_i sigma_{i-1}) (0 where sigma_i = 0;
    entry 0, which has no predecessor, is never used), computed as torch.lerp does at weight 1/2."""
    with numpy.errstate(divide="ignore", invalid="ignore"):
        log_s = numpy.log(sigmas)
        log_prev = numpy.roll(log_s, 1)
        return numpy.exp(log_prev - (log_prev - log_s) * 0.5)


def interleave(values):
    """(v_0, v_1, ..., v_n) -> (v_0, v_1, v_1, v_2, v_2, ..., v_n, v_n, v_n): one entry per call of step (2n + 2)."""
    return numpy.concatenate([values[:1], values[1:].repeat(2), values[-1:]])


def spaced_sigmas(sched, n: int):
    """DPM2's (and DPM2 a's) n timesteps and n + 1 sigmas (the last 0), and log of the training sigmas:
    spaced as the config says, or on its sigma grid (Karras timesteps rounded, as diffusers does for
    DPM2; exponential / beta not)."""
    c = sched.config
    timesteps, sigmas = sched._spaced(n)
    log_sigmas = numpy.log(sched.sigmas_table)
    grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
    if grid is not None:
        sigmas = grid
        timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        timesteps = timesteps.round() if c.use_karras_sigmas else timesteps
    return timesteps, sched._table(numpy.concatenate([sigmas, [0.0]])), log_sigmas


class KDPM2DiscreteScheduler(TwoCallStep, SigmaScheduler):
    """diffusers' KDPM2DiscreteScheduler ("DPM2"; "DPM2 Karras" with use_karras_sigmas=True)."""

    Config = KDPM2Config
    steps_at_init = "num_train_timesteps"  # as diffusers: usable before set_timesteps

    def set_timesteps(self, num_inference_steps, device=None, num_train_timesteps=None):
        n = self._check_steps(num_inference_steps, num_train_timesteps)
        self.num_inference_steps = n
        timesteps, sigmas, log_sigmas = spaced_sigmas(self, n)
        mids = log_midpoints(sigmas)  # (n + 1,): mids[i] between sigmas[i - 1] and sigmas[i]
        timesteps_mid = self._table(schedule.sigma_to_t(numpy.nan_to_num(mids), log_sigmas))
        timesteps = self._table(timesteps)
        self.sigmas, self.sigmas_interpol = interleave(sigmas), interleave(mids)  # (2n + 2,)
        pairs = numpy.stack([timesteps_mid[1:-1], timesteps[1:]], axis=-1).reshape(-1)  # (mid_i, t_i) for i >= 1
        self.timesteps = numpy.concatenate([timesteps[:1], pairs])  # (2n - 1,)
        self.sample = None
        self._reset_step_index()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1), with sigma the midpoint's on the second call of a step."""
        self._locate_step(timestep)
        table = self.sigmas if self.state_in_first_order else self.sigmas_interpol
        sigma = self._scalar(table[self._step_index])
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, return_dict=True):
        """First call: Euler to the log-midpoint (stores x); second call: the full step with the midpoint's
        derivative (module docstring)."""
        i = self._locate_step(timestep)
        if self.state_in_first_order:
            sigma, sigma_mid = self._scalar(self.sigmas[i]), self._scalar(self.sigmas_interpol[i + 1])
            x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)
            derivative = (sample - x0) / sigma
            dt = sigma_mid - sigma
            self.sample = sample
        else:
            sigma, sigma_mid = self._scalar(self.sigmas[i - 1]), self._scalar(self.sigmas_interpol[i])
            sigma_next = self._scalar(self.sigmas[i])
            x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma_mid)
            derivative = (sample - x0) / sigma_mid
            dt = sigma_next - sigma
            sample, self.sample = self.sample, None
        self._step_index += 1
        return self._output(return_dict, sample + derivative * dt, x0)
