"""Heun's second-order sampler in sigma (Karras et al. 2022, Algorithm 1; k-diffusion's ``sample_heun``)."""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, SigmaScheduler, check_custom_timesteps, clip
from .prediction import x0_from_sigma_prediction


def heun_correct(sample_start, derivative_start, sample_end, x0_end, sigma_end, dt):
    """The trapezoidal correction: x_next = x_i + dt (d_i + d'_{i+1}) / 2 with d'_{i+1} = (x' - x_0') / sigma_{i+1}
    evaluated at the Euler prediction x' (Karras et al. 2022, Algorithm 1, lines 7-8)."""
    derivative_end = (sample_end - x0_end) / sigma_end
    return sample_start + (derivative_start + derivative_end) / 2 * dt


@dataclasses.dataclass
class HeunConfig(SigmaGridKeys, BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        schedule.check_one_sigma_grid(self)


class HeunDiscreteScheduler(SigmaScheduler):
    """diffusers' HeunDiscreteScheduler: every step but the last takes two model calls, so ``timesteps`` lists
    each inner timestep twice (2n - 1 entries); the last step (to sigma = 0) is a plain Euler step."""

    Config = HeunConfig
    order = 2
    steps_at_init = "num_train_timesteps"  # as diffusers: usable before set_timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, num_train_timesteps=None, timesteps=None):
        """n timesteps spaced as config.timestep_spacing (or custom descending `timesteps`), sigma interpolated
        linearly in t, or the config's sigma grid (Karras, exponential, beta)."""
        c = self.config
        where = type(self).__name__ + ".set_timesteps"
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{where}: pass exactly one of num_inference_steps, timesteps")
        if num_train_timesteps not in (None, c.num_train_timesteps):
            raise ValueError(f"{where}: num_train_timesteps={num_train_timesteps!r} differs from the config's "
                             f"{c.num_train_timesteps}; refldm does not implement a different table here")
        grid_keys = [k for k in schedule.SIGMA_GRIDS if getattr(c, k)]
        if timesteps is not None:
            if grid_keys:
                raise ValueError(f"{where}: custom timesteps cannot be used with {grid_keys[0]}=True")
            timesteps = self._table(check_custom_timesteps(where, timesteps, c.num_train_timesteps, integer=False))
            n = len(timesteps)
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        else:
            n = self._check_steps(num_inference_steps)
            timesteps, sigmas = self._spaced(n)
        self.num_inference_steps = n
        grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
        if grid is not None:
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
        sigmas = numpy.concatenate([sigmas, [0.0]])
        self._set_schedule(numpy.concatenate([timesteps[:1], timesteps[1:].repeat(2)]),  # (2n - 1,)
                           numpy.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]]))  # (2n,)
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output, timestep, sample, return_dict=True):
        """First call of a pair: Euler predictor (stores d_i, dt, x_i); second call: trapezoidal corrector."""
        self._locate_step(timestep)
        c = self.config
        if self.state_in_first_order:
            sigma = self._scalar(self.sigmas[self._step_index])
            sigma_next = self._scalar(self.sigmas[self._step_index + 1])
            sigma_input = sigma
        else:
            sigma = self._scalar(self.sigmas[self._step_index - 1])
            sigma_next = self._scalar(self.sigmas[self._step_index])
            sigma_input = sigma_next
        x0 = x0_from_sigma_prediction(c.prediction_type, model_output, sample, sigma_input)
        if c.clip_sample:
            x0 = clip(x0, c.clip_sample_range)
        if self.state_in_first_order:
            derivative = (sample - x0) / sigma
            self.dt = sigma_next - sigma
            self.prev_derivative, self.sample = derivative, sample
            prev_sample = sample + derivative * self.dt
        else:
            prev_sample = heun_correct(self.sample, self.prev_derivative, sample, x0, sigma_next, self.dt)
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
