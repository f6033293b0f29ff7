"""Heun's method on the rectified-flow ODE dx/dt = v(x, t) (Karras et al. 2022, Algorithm 1, in the flow
variable t instead of sigma); diffusers' ``FlowMatchHeunDiscreteScheduler``. See flow_match_euler.py for the
forward process x_t = (1 - t) x_0 + t e and the time shift.

One step from t to t' costs two model calls:

    d  = v(x_t, t)                               Euler predictor:  x~ = x_t + (t' - t) d
    d' = v(x~, t')                               trapezoidal corrector:
    x_{t'} = x_t + (t' - t) (d + d') / 2

The last step (to t' = 0) is Euler's alone. As diffusers, `timesteps` lists every model call
([t_0, t_1, t_1, t_2, t_2, ...]) and step() alternates between the two halves.
"""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import ConfigMapping, check_choice, noise_like
from .flow_match_euler import FlowMatchBase, time_shift


@dataclasses.dataclass
class FlowMatchHeunConfig(ConfigMapping):
    num_train_timesteps: int = 1000
    shift: float = 1.0
    table_dtype: str = "float64"  # refldm's own key: "float32" rounds the tables where diffusers does

    def __post_init__(self):
        check_choice("table_dtype", self.table_dtype, schedule.TABLE_DTYPES)
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r} must be > 0")


class FlowMatchHeunDiscreteScheduler(FlowMatchBase):
    """diffusers' FlowMatchHeunDiscreteScheduler: Heun (predictor-corrector) steps on dx/dt = v."""

    Config = FlowMatchHeunConfig
    order = 2
    output_fields = ("prev_sample",)

    def set_timesteps(self, num_inference_steps, device=None):
        """u evenly from t_max to t_min of the training grid, shifted t = s u / (1 + (s - 1) u), then 0; every
        inner t twice (the corrector's model call sits at the end of the step)."""
        c = self.config
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        u = numpy.linspace(self.sigma_max * c.num_train_timesteps, self.sigma_min * c.num_train_timesteps, n)
        sigmas = self._table(time_shift(float(c.shift), u / c.num_train_timesteps))
        timesteps = sigmas * self._table(c.num_train_timesteps)
        self.timesteps = numpy.concatenate([timesteps[:1], numpy.repeat(timesteps[1:], 2)])
        sigmas = numpy.concatenate([sigmas, self._table([0.0])])
        self.sigmas = numpy.concatenate([sigmas[:1], numpy.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        self.prev_derivative = self.dt = self.sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self):
        return self.dt is None

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """The predictor (first call of a step) or the corrector (second call); with s_churn > 0 the first raises
        t to t_hat = t (1 + gamma) with fresh noise (Karras et al. 2022, Algorithm 2), as diffusers does.
        The derivative is written as diffusers computes it, d = (x - x_0) / t with x_0 = x - t v (= v)."""
        self._check_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        t = self._scalar(self.sigmas[i] if first else self.sigmas[i - 1])
        t_next = self._scalar(self.sigmas[i + 1] if first else self.sigmas[i])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t * (gamma + 1)
        if gamma > 0:
            noise = noise_like(model_output, generator)
            sample = sample + (noise * s_noise) * (t_hat**2 - t**2) ** 0.5
        if first:
            x0 = sample - model_output * t
            derivative = (sample - x0) / t_hat
            dt = t_next - t_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            x0 = sample - model_output * t_next
            derivative = 0.5 * (self.prev_derivative + (sample - x0) / t_next)
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = (sample + derivative * dt).astype(model_output.dtype, copy=False)
        self._step_index += 1
        return self._output(return_dict, prev_sample)
