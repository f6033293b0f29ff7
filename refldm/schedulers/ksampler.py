"""What the k-diffusion samplers without a diffusers class share (DPM++ 2S a, DPM++ 3M SDE, DPM fast, DPM adaptive):
the half log-SNR lambda, the model calls' sigmas, the noise, and the checks of the
k-diffusion arguments that refldm takes as config keys.

Each of these schedulers keeps diffusers' calling convention: ``set_timesteps`` plans the model calls, and
``timesteps`` holds one entry per model call (the training timestep of that call's sigma), so
``refldm.pipelines.sampling.sample`` and the pipelines run them as any other scheduler. A step that needs several model
calls (a singlestep solver) is cut into stages: every ``step`` call takes one model output and returns the point
where the model is called next (like DPM2 and Heun), the last stage of a step returning x at the next sigma.

Notation (k-diffusion's, Lu et al. 2022 "DPM-Solver" sec. 3.1 written for x = x_0 + sigma eps): the half log-SNR
is lambda = -log sigma (k-diffusion calls it t), a step from sigma to sigma_next has h = lambda_next - lambda > 0.

The coefficients are Python floats computed in float64 whatever ``table_dtype`` (diffusers has no such sampler to
copy the float32 rounding of); the sample keeps its own dtype.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, SigmaScheduler, check_custom_sigmas, noise_like
from .prediction import x0_from_sigma_prediction


def lam(sigma):
    """lambda = -log sigma: the half log-SNR of x = x_0 + sigma eps (Lu et al. 2022, "DPM-Solver", sec. 3.1)."""
    return -math.log(sigma)


def sigma_of(lam_value):
    """sigma = exp(-lambda), the inverse of lam."""
    return math.exp(-lam_value)


def check_number(name, value, low=None, low_open=False):
    """One clear line for a bad k-diffusion argument: a finite real number, >= low (> low if low_open); the config
    parser prefixes the scheduler's name."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float, numpy.integer, numpy.floating)) \
        or not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
    if bad:
        bound = "" if low is None else f" {'>' if low_open else '>='} {low}"
        raise ValueError(f"{name}={value!r} must be a finite number{bound}")


@dataclasses.dataclass
class KSamplerConfig(BaseConfig):
    """Stable Diffusion's betas by default (as KDPM2's); eta and s_noise are k-diffusion's arguments of that name."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    eta: float = 1.0      # scale of the ancestral / SDE noise (0: the ODE solver)
    s_noise: float = 1.0  # the noise is multiplied by this

    def __post_init__(self):
        super().__post_init__()
        check_number("eta", self.eta, low=0)
        check_number("s_noise", self.s_noise, low=0)


@dataclasses.dataclass
class KSigmaGridConfig(SigmaGridKeys, KSamplerConfig):
    """For the samplers that step along a sigma list: the sigma grids of the web UIs' schedule names."""


    def __post_init__(self):
        super().__post_init__()
        schedule.check_one_sigma_grid(self)


class KSamplerScheduler(SigmaScheduler):
    """The shared machinery. Subclasses fill, in set_timesteps:

    - ``sigmas``: the step boundaries sigma_0 > ... > sigma_n (what k-diffusion's sample_* functions take);
    - ``timesteps`` and ``call_sigmas``: one entry per model call, its training timestep and its sigma;
    - ``call_stages``: per model call, its stage within its step (0 = the first call of a step).
    """

    noise_sigmas_attr = "call_sigmas"  # add_noise (img2img, inpainting) noises to the sigma of the model call
    steps_at_init = 1  # usable before set_timesteps (a one-step plan)
    noise_sampler = None  # k-diffusion's noise_sampler argument (see _noise)

    def _plan(self, call_sigmas, call_stages, sigmas):
        """Store the model calls (sigma, stage) and the step boundaries; the timestep of each call is where the
        model's training sigmas reach that sigma (log-linear interpolation, as sigma_to_t everywhere)."""
        self.sigmas = numpy.asarray(sigmas, numpy.float64)
        self.call_sigmas = numpy.asarray(call_sigmas, numpy.float64)
        self.call_stages = numpy.asarray(call_stages, numpy.int64)
        self.timesteps = self._table(schedule.sigma_to_t(self.call_sigmas, numpy.log(self.sigmas_table)))
        self._reset_step_index()

    @property
    def init_noise_sigma(self):
        """The starting noise level: x_T = sigma_0 z (k-diffusion's x = noise * sigmas[0])."""
        return float(self.call_sigmas[0])

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) with the sigma of this model call: the model's input scale sqrt(abar) x."""
        self._locate_step(timestep)
        sigma = float(self.call_sigmas[self._step_index])
        return sample / (sigma**2 + 1) ** 0.5

    def set_begin_index(self, begin_index: int = 0):
        """img2img: start at model call `begin_index`, which must be the first call of a step."""
        begin_index = int(begin_index)
        if begin_index and (begin_index >= len(self.call_stages) or self.call_stages[begin_index] != 0):
            raise ValueError(f"{type(self).__name__}: begin_index={begin_index} is not the first model call of a "
                             "step; img2img cannot start there")
        super().set_begin_index(begin_index)

    def _x0(self, model_output, sample):
        """x_0 from the model output at this call's sigma."""
        sigma = float(self.call_sigmas[self._step_index])
        return x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)

    def _noise(self, sample, generator, sigma, sigma_next):
        """Standard normal noise for the step sigma -> sigma_next: from ``self.noise_sampler(sigma, sigma_next)`` if
        one is set (k-diffusion's noise_sampler argument; it must return an array like the sample), else drawn
        from `generator` (refldm.core.random, deterministic for a seed)."""
        if self.noise_sampler is not None:
            return self.noise_sampler(sigma, sigma_next)
        return noise_like(sample, generator)


def step_sigmas(sched, num_inference_steps=None, sigmas=None):
    """The step boundaries sigma_0 > ... > sigma_n = 0 for n steps: spaced as config.timestep_spacing (sigma
    interpolated linearly in t, as Euler) or on the config's sigma grid (Karras, exponential, beta), then 0; or
    custom `sigmas` (n + 1 values, checked), as k-diffusion's sample_* functions take them."""
    where = type(sched).__name__ + ".set_timesteps"
    if (num_inference_steps is None) == (sigmas is None):
        raise ValueError(f"{where}: pass exactly one of num_inference_steps, sigmas")
    if sigmas is not None:
        sigmas = check_custom_sigmas(where, sigmas)
        if numpy.any(numpy.diff(sigmas) >= 0) or sigmas[-2] <= 0:
            raise ValueError(f"{where}: custom sigmas must be strictly decreasing and above 0 (the last may be 0), "
                             f"got {sigmas.tolist()}")
        return sigmas
    n = sched._check_steps(num_inference_steps)
    _, spaced = sched._spaced(n)
    grid = schedule.sigma_grid(sched.config, float(spaced[-1]), float(spaced[0]), n)
    return numpy.concatenate([numpy.asarray(spaced if grid is None else grid, numpy.float64), [0.0]])
