"""Euler in the EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 2 without the Heun correction, with the preconditioning of Table 1), as diffusers'
EDMEulerScheduler: for models trained on x = x_0 + sigma eps directly (no beta schedule, no training timesteps).

The model sees the preconditioned input and noise level and its output is mixed with x into the denoised estimate
(Table 1, sigma_data the data's standard deviation):

    c_in = 1 / sqrt(sigma^2 + sigma_data^2),   c_noise = log(sigma) / 4            (the model's x and "timestep")
    x_0 = c_skip x + c_out F,   c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
                                c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)   (+ epsilon, - v_prediction)

and the step is Euler on dx/dsigma = (x - x_0) / sigma: x_next = x + (sigma_next - sigma_hat) (x - x_0) / sigma_hat,
where sigma_hat = sigma (1 + gamma) after optional "churn" noise, as in EulerDiscreteScheduler.

The sigmas come from a ramp u in [0, 1] (n evenly spaced points): Karras's sigma(u) = (sigma_max^(1/rho) +
u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (eq. 5), or, for sigma_schedule="exponential", n points evenly
spaced in log sigma from sigma_max to sigma_min (diffusers uses only the ramp's length there). ``timesteps`` are
c_noise of those sigmas.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import ConfigMapping, SchedulerMixin, SigmaAddNoise, check_choice, churn


@dataclasses.dataclass
class EDMEulerConfig(ConfigMapping):
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    final_sigmas_type: str = "zero"
    table_dtype: str = "float64"  # refldm's own key: "float32" rounds sigmas and timesteps as diffusers does

    def __post_init__(self):
        check_choice("sigma_schedule", self.sigma_schedule, ("karras", "exponential"))
        check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice("table_dtype", self.table_dtype, schedule.TABLE_DTYPES)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}: need 0 < sigma_min < "
                             "sigma_max")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 1")


def edm_precondition(sigma, sigma_data, prediction_type):
    """(c_in, c_skip, c_out) of Karras et al. 2022, Table 1 (c_out negated for v_prediction, as diffusers)."""
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_in, c_skip, (c_out if prediction_type == "epsilon" else -c_out)


class EDMEulerScheduler(SigmaAddNoise, SchedulerMixin):
    """diffusers' EDMEulerScheduler."""

    Config = EDMEulerConfig

    def _build_tables(self):
        """As diffusers: usable before set_timesteps, on the ramp i / T, i = 0..T (T + 1 sigmas)."""
        T = self.config.num_train_timesteps
        self._set_ramp(numpy.arange(T + 1, dtype=numpy.float64) / T)
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self):
        """sqrt(sigma_max^2 + 1), as diffusers (a Python float)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def sigmas_from_ramp(self, ramp):
        """Karras sigmas at the ramp points (float64), or exponential ones (torch's float32 linspace with float32
        tables, as diffusers' default dtype gives), before rounding to the table dtype."""
        c = self.config
        if c.sigma_schedule == "karras":
            lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return (hi + ramp * (lo - hi)) ** c.rho
        log_sigmas = schedule.linspace(math.log(c.sigma_min), math.log(c.sigma_max), len(ramp), c.table_dtype)
        return numpy.exp(log_sigmas)[::-1]

    def _set_ramp(self, ramp):
        sigmas = self._table(self.sigmas_from_ramp(ramp))  # (n,)
        self.timesteps = self.precondition_noise(sigmas)  # (n,)
        last = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = numpy.concatenate([sigmas, self._table([last])])  # (n + 1,)
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        """n sigmas from the ramp linspace(0, 1, n); or, as diffusers' `sigmas` argument, custom ramp values in
        [0, 1] (for sigma_schedule="exponential" only their number counts, as in diffusers)."""
        where = type(self).__name__ + ".set_timesteps"
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError(f"{where}: pass exactly one of num_inference_steps, sigmas (a ramp in [0, 1])")
        if sigmas is not None:
            ramp = numpy.asarray(sigmas, dtype=numpy.float64).reshape(-1)
            if ramp.size == 0 or not numpy.all((ramp >= 0) & (ramp <= 1)):
                raise ValueError(f"{where}: sigmas is a ramp here (diffusers' meaning): values in [0, 1], got "
                                 f"{ramp.tolist()}")
        else:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 1:
                raise ValueError(f"{where}: num_inference_steps={n!r} must be an integer >= 1")
            ramp = numpy.linspace(0, 1, int(n))
        self.num_inference_steps = len(ramp)
        self._set_ramp(ramp)

    def precondition_noise(self, sigma):
        """c_noise = log(sigma) / 4: the model's "timestep"."""
        return 0.25 * numpy.log(sigma)

    def precondition_inputs(self, sample, sigma):
        return sample * edm_precondition(sigma, self.config.sigma_data, self.config.prediction_type)[0]

    def precondition_outputs(self, sample, model_output, sigma):
        """x_0 = c_skip x + c_out F."""
        _, c_skip, c_out = edm_precondition(sigma, self.config.sigma_data, self.config.prediction_type)
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample, timestep):
        """c_in x."""
        self._locate_step(timestep)
        return self.precondition_inputs(sample, self._scalar(self.sigmas[self._step_index]))

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, pred_original_sample=None):
        """Euler step to sigma_next from sigma_hat (module docstring); `pred_original_sample` replaces x_0."""
        self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[self._step_index])
        sigma_next = self._scalar(self.sigmas[self._step_index + 1])
        sample, sigma_hat = churn(sample, sigma, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator,
                                  model_output)
        x0 = pred_original_sample
        if x0 is None:
            x0 = self.precondition_outputs(sample, model_output, sigma_hat)
        prev_sample = sample + (sample - x0) / sigma_hat * (sigma_next - sigma_hat)
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
