"""Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Lipman et al. 2022, "Flow Matching for Generative
Modeling"), sampled with Euler's method as Stable Diffusion 3 does (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", sec. 2-3); diffusers' ``FlowMatchEulerDiscreteScheduler``.

The forward process is a straight line from the data x_0 to the noise e ~ N(0, I):

    x_t = (1 - t) x_0 + t e,        t in [0, 1] (diffusers calls t "sigma"; the model sees 1000 t),

so its velocity dx_t/dt = v = e - x_0 does not depend on t. The model is trained to predict v. Sampling
integrates dx/dt = v(x, t) from t = 1 (pure noise) down to t = 0 with Euler steps

    x_{t'} = x_t + (t' - t) v(x_t, t)        (t' < t),

which is exact when the learned paths are straight: one step lands on x_0 = x_t - t v.

The time shift. Higher resolutions keep more signal at a given t, so SD3 spends its steps at larger t:
a uniform grid u in (0, 1] is mapped by

    t = s u / (1 + (s - 1) u)                (Esser et al. 2024, eq. 23; SD3 uses s = 3),

or, with ``use_dynamic_shifting`` (FLUX), by t = e^mu / (e^mu + (1/u - 1)) ("exponential", i.e. s = e^mu) or
t = mu / (mu + (1/u - 1)) ("linear", s = mu), mu chosen per image from its token count (`calculate_shift`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from refldm import backend

from . import schedule
from .base import ConfigMapping, SchedulerMixin, broadcast_coefficient, check_choice, noise_like, timesteps_as_host


def time_shift(s, t):
    """t' = s t / (1 + (s - 1) t): the shift of a timestep t in [0, 1] by s (s > 1 moves steps toward t = 1)."""
    return s * t / (1 + (s - 1) * t)


def time_shift_exponential(mu: float, t, power: float = 1.0):
    """t' = e^mu / (e^mu + (1/t - 1)^power): with power 1, `time_shift` with s = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** power)


def time_shift_linear(mu: float, t, power: float = 1.0):
    """t' = mu / (mu + (1/t - 1)^power): with power 1, `time_shift` with s = mu."""
    return mu / (mu + (1 / t - 1) ** power)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15):
    """mu for dynamic shifting, linear in the number of image tokens: mu = base_shift at base_seq_len,
    max_shift at max_seq_len (as diffusers' pipelines compute it)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_euler_step(sample, velocity, t, t_next):
    """x_{t'} = x_t + (t' - t) v."""
    return sample + (t_next - t) * velocity


@dataclasses.dataclass
class FlowMatchEulerConfig(ConfigMapping):
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    table_dtype: str = "float64"  # refldm's own key: "float32" rounds the tables where diffusers does

    def __post_init__(self):
        check_choice("time_shift_type", self.time_shift_type, ("exponential", "linear"))
        check_choice("table_dtype", self.table_dtype, schedule.TABLE_DTYPES)
        schedule.check_one_sigma_grid(self)
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r} must be > 0")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal={self.shift_terminal!r} must be in [0, 1)")


class FlowMatchBase(SchedulerMixin):
    """What the flow-matching schedulers share: the training grid t_i = i / N shifted, table rounding,
    the forward process (`scale_noise`) and the step bookkeeping."""

    init_noise_sigma = 1.0  # x_1 = e: the start is the noise itself

    def _build_tables(self):
        """The training grid t = N/N, (N-1)/N, ..., 1/N shifted by `shift` (diffusers' __init__, float32 there)."""
        c = self.config
        n = c.num_train_timesteps
        sigmas = self._table(numpy.linspace(1, n, n)[::-1]) / self._table(n)
        if not getattr(c, "use_dynamic_shifting", False):
            sigmas = time_shift(float(c.shift), sigmas)
        self.sigmas = sigmas
        self.timesteps = sigmas * self._table(n)
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self._shift = float(c.shift)

    def _table(self, values):
        return numpy.asarray(values, dtype=self.config.table_dtype)

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float):
        """Use `shift` from the next set_timesteps on (diffusers' set_shift)."""
        self._shift = float(shift)

    def scale_model_input(self, sample, timestep=None):
        """The model takes x_t as it is (no input scaling in flow matching)."""
        return sample

    def _check_timestep(self, timestep):
        if isinstance(timestep, (int, numpy.integer)) or (hasattr(timestep, "dtype") and timestep.dtype.kind in "iu"):
            raise ValueError(f"{type(self).__name__}.step: got the integer timestep {timestep!r}; pass one of "
                             "scheduler.timesteps (an index from enumerate() is not a timestep)")

    def scale_noise(self, sample, timestep, noise):
        """The forward process at `timestep`: x_t = t e + (1 - t) x_0 (img2img starts here)."""
        t = timesteps_as_host(timestep)
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in t]
        elif self._step_index is not None:
            indices = [self._step_index] * len(t)
        else:
            indices = [self._begin_index] * len(t)
        sigma = numpy.asarray(self.sigmas)[indices]
        return broadcast_coefficient(sigma, sample) * noise + broadcast_coefficient(1.0 - sigma, sample) * sample

    def add_noise(self, original_samples, noise, timesteps):
        """`scale_noise` under the name and argument order the shared img2img helper uses."""
        return self.scale_noise(original_samples, timesteps, noise)


def _check_flow_timesteps(where, timesteps, num_train_timesteps):
    t = numpy.asarray(backend.to_numpy(timesteps) if hasattr(timesteps, "dtype") else timesteps, numpy.float64)
    if t.ndim != 1 or t.size == 0 or not numpy.all(numpy.isfinite(t)):
        raise ValueError(f"{where}: custom timesteps must be a non-empty 1-D list of finite numbers")
    if numpy.any(numpy.diff(t) >= 0) or t[0] > num_train_timesteps or t[-1] < 0:
        raise ValueError(f"{where}: custom timesteps must be strictly decreasing and in "
                         f"[0, {num_train_timesteps}], got {t.tolist()}")
    return t


def _check_flow_sigmas(where, sigmas):
    s = numpy.asarray(backend.to_numpy(sigmas) if hasattr(sigmas, "dtype") else sigmas, numpy.float64)
    if s.ndim != 1 or s.size == 0 or not numpy.all(numpy.isfinite(s)) or numpy.any((s < 0) | (s > 1)):
        raise ValueError(f"{where}: custom sigmas must be a non-empty 1-D list of finite numbers in [0, 1], "
                         f"got {s.tolist()}")
    return s


class FlowMatchEulerDiscreteScheduler(FlowMatchBase):
    """diffusers' FlowMatchEulerDiscreteScheduler: Euler steps on dx/dt = v from t = 1 to 0 (module docstring),
    with the static shift, dynamic shifting (mu), a terminal stretch, Karras/exponential/beta grids in t,
    inverted sigmas, custom sigmas or timesteps, and stochastic sampling."""

    Config = FlowMatchEulerConfig

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """n values of t: u evenly from t_max to t_min of the training grid (or the custom `sigmas`, or custom
        `timesteps` / N), shifted (t = s u / (1 + (s - 1) u), or by mu), optionally stretched so the last equals
        shift_terminal, optionally respaced on a Karras / exponential / beta grid between the ends; then the
        final t = 0 (t = 1 with invert_sigmas, which also maps t -> 1 - t). Rounded to float32 where diffusers
        rounds with table_dtype="float32"."""
        c = self.config
        where = type(self).__name__ + ".set_timesteps"
        if c.use_dynamic_shifting and mu is None:
            raise ValueError(f"{where}: use_dynamic_shifting=True needs mu (see calculate_shift)")
        if sigmas is not None:
            sigmas = _check_flow_sigmas(where, sigmas)
        if timesteps is not None:
            timesteps = _check_flow_timesteps(where, timesteps, c.num_train_timesteps)
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"{where}: {len(sigmas)} sigmas but {len(timesteps)} timesteps")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError(f"{where}: pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        elif any(a is not None and len(a) != num_inference_steps for a in (sigmas, timesteps)):
            raise ValueError(f"{where}: custom sigmas/timesteps must have num_inference_steps="
                             f"{num_inference_steps} values")
        n = self._check_steps(num_inference_steps) if sigmas is None and timesteps is None else num_inference_steps
        self.num_inference_steps = n
        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = self._table(timesteps)
        if sigmas is None:
            if timesteps is None:
                timesteps = numpy.linspace(self.sigma_max * c.num_train_timesteps,
                                           self.sigma_min * c.num_train_timesteps, n)  # float64 in diffusers too
            sigmas = timesteps / c.num_train_timesteps
        else:
            sigmas = self._table(sigmas)
        if c.use_dynamic_shifting:
            shift_fn = time_shift_exponential if c.time_shift_type == "exponential" else time_shift_linear
            with numpy.errstate(divide="ignore"):  # t = 0 maps to 0
                sigmas = shift_fn(mu, sigmas, 1.0)
        else:
            sigmas = time_shift(self._shift, sigmas)
        if c.shift_terminal:
            # stretch 1 - t so that the last t equals shift_terminal (LTX-Video's rf.py)
            one_minus = 1 - sigmas
            if one_minus[-1] == 0:
                raise ValueError(f"{where}: shift_terminal={c.shift_terminal} cannot stretch a schedule that ends "
                                 "at t = 1 (one step from pure noise; diffusers gives NaN)")
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
        if grid is not None:
            sigmas = grid
        sigmas = self._table(sigmas)
        timesteps = timesteps if given_timesteps else sigmas * self._table(c.num_train_timesteps)
        if c.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * self._table(c.num_train_timesteps)
            last = 1.0
        else:
            last = 0.0
        self.sigmas = numpy.concatenate([sigmas, self._table([last])])
        self.timesteps = self._table(timesteps)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """x_{t'} = x_t + (t' - t) v. With stochastic_sampling: x_0 = x_t - t v, then a fresh e and
        x_{t'} = (1 - t') x_0 + t' e (the forward process re-run to t'). s_churn, s_tmin, s_tmax and s_noise are
        accepted and unused, as in diffusers. The result has model_output's dtype."""
        self._check_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        t = self._scalar(self.sigmas[self._step_index])
        t_next = self._scalar(self.sigmas[self._step_index + 1])
        if self.config.stochastic_sampling:
            x0 = sample - t * model_output
            noise = noise_like(sample, generator)
            prev_sample = (1.0 - t_next) * x0 + t_next * noise
        else:
            prev_sample = flow_euler_step(sample, model_output, t, t_next)
        self._step_index += 1
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        return self._output(return_dict, prev_sample)

    output_fields = ("prev_sample",)
