"""What every scheduler shares: config parsing, the output object, moving step scalars to the sample's device,
and the bookkeeping of which step we are on. The math lives in the per-family modules.

Config keys. A scheduler is built from a diffusers ``scheduler_config.json``. Each class declares a dataclass
of the keys it implements (with diffusers' defaults for that class) and ``UNSUPPORTED``: keys diffusers has for
this class that refldm implements only at their default. Two ways in, as in diffusers:

- ``Scheduler(**keys)`` takes only this class's keys: any other key is an error naming the key and its value
  (diffusers' constructor refuses it too), so a key passed on purpose never goes unused.
- ``Scheduler.from_config(config)`` (and ``from_pretrained``) takes a whole config: keys that belong to *other*
  diffusers schedulers are kept, unused, and passed on by the next ``from_config`` (diffusers' "hidden" config),
  so the usual swaps work and a chain of swaps comes back to the keys it started from:

      EulerDiscreteScheduler.from_config(pndm.config)      # skip_prk_steps etc. mean nothing to Euler
      DEIS.from_config(dpm_single.config)                  # final_sigmas_type rides along to the next class

  Keys left at their default are not passed on (diffusers' ``_use_default_values``): the next class uses its
  own default. Keyword overrides (``from_config(config, key=value)``) are explicit, hence this class's keys.

Any other key, or an unsupported value, is an error naming the key.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os

import numpy

from refldm import backend
from refldm.core import random as refldm_random
from refldm.checkpoints.config import ConfigError, parse_config, short

from . import schedule

# Every __init__ argument of the diffusers schedulers (diffusers 0.42; tests/test_schedulers_bad_input.py checks
# it). A key here that a class does not declare is one diffusers would ignore for that class: from_config carries
# it along unused (and passes it on), the constructor refuses it.
DIFFUSERS_SCHEDULER_KEYS = frozenset("""
algorithm_type alpha_cum_end alpha_cum_start base_image_seq_len base_shift beta_end beta_schedule beta_start
block_length clip_denoised clip_sample clip_sample_range correct_steps corrector_k corrector_order
corrector_selection corrector_selection_tau corrector_steps disable_corrector dynamic_thresholding_ratio
editing_threshold entropy_bound eps eta euler_at_final final_sigmas_type final_step_size_scale flow_shift gamma
gamma_cum_end gamma_cum_start interpolation_type invert_sigmas lambda_min_clipped lower_order_final
mask_token_id masking_schedule max_image_seq_len max_shift minimal_topk n_grid noise_mode noise_sampler_seed
num_inference_steps num_policy_substeps num_train_timesteps num_vec_classes original_inference_steps predict_x0 prediction_type
predictor_order rescale_betas_zero_snr rho s s_churn s_max s_min s_noise sample_max_value sampling_eps
scale_factors scaler schedule_mode scheduler_type set_alpha_to_one shift shift_terminal sigma_data sigma_max
sigma_min sigma_schedule skip_prk_steps snr snr_shift_scale solver_order solver_p solver_type stage_range stages
steps_offset stochastic_sampling t_lim_ode t_lim_ode_below t_max t_min tail_step_multiplier tail_steps
tau_func threshold thresholding time_shift_type timestep_scaling timestep_spacing timestep_type trained_betas
tsr_k tsr_sigma upscale_mode use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas
use_karras_sigmas use_lu_lambdas variance_type
""".split())

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


class ConfigMapping(collections.abc.Mapping):
    """A scheduler's config read as diffusers reads its FrozenDict: ``config["num_train_timesteps"]``,
    ``dict(config)``, ``{**config}``, keys / items / len / iteration, as well as ``config.num_train_timesteps``.
    The keys are the scheduler class's config keys (those it implements, then those it holds at diffusers'
    default); item assignment and deletion are refused, as by a FrozenDict (build a new scheduler with
    ``from_config(config, key=value)`` instead)."""

    def _mapping_keys(self) -> tuple:
        keys = getattr(self, "_keys", None)  # set by the scheduler that parsed this config (SchedulerMixin._parse)
        return keys if keys is not None else tuple(f.name for f in dataclasses.fields(self))

    def __getitem__(self, key):
        if key not in self._mapping_keys():
            raise KeyError(key)
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        return self._fixed[key]  # a key the class holds at diffusers' default (UNSUPPORTED)

    def __iter__(self):
        return iter(self._mapping_keys())

    def __len__(self) -> int:
        return len(self._mapping_keys())

    def __contains__(self, key) -> bool:
        return key in self._mapping_keys()

    def __setitem__(self, key, value):
        raise TypeError(f"{type(self).__name__} is read-only: cannot set config[{key!r}] (build a new scheduler "
                        f"with from_config(scheduler.config, {key}=...))")

    def __delitem__(self, key):
        raise TypeError(f"{type(self).__name__} is read-only: cannot delete config[{key!r}]")


@dataclasses.dataclass
class BaseConfig(ConfigMapping):
    """Keys every scheduler has (defaults of most diffusers schedulers; classes override them)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    table_dtype: str = "float64"  # refldm's own key: "float32" builds the tables (and step scalars) as diffusers

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __post_init__(self):
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, self.PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        check_choice("table_dtype", self.table_dtype, schedule.TABLE_DTYPES)
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} values but "
                             f"num_train_timesteps={self.num_train_timesteps}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset={self.steps_offset!r} must be an integer >= 0")


@dataclasses.dataclass
class SigmaGridKeys:
    """The keys of the web UIs' schedule names (schedule.sigma_grid): Karras, exponential or beta sigmas, at most one
    on (each config checks it with schedule.check_one_sigma_grid)."""

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False


@dataclasses.dataclass
class ThresholdingKeys:
    """Dynamic thresholding of the x_0 prediction (dynamic_threshold below)."""

    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


def passed_on(config) -> dict:
    """A scheduler's config as diffusers' from_config hands it to the next class: the keys that were given (not
    those left at their default), with their values, plus the keys carried along unused. A Config built by hand
    (not by a scheduler) passes on every field."""
    given = getattr(config, "_given", None)
    if given is None:
        return dataclasses.asdict(config)
    return {**getattr(config, "_carried", {}), **{k: getattr(config, k) for k in given}}


def check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported (choose one of {', '.join(map(repr, choices))})")


@dataclasses.dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (x at the next, less noisy timestep) and, where diffusers gives it,
    ``pred_original_sample`` (the model's estimate of x_0) or, for LCM, ``denoised``."""

    prev_sample: object
    pred_original_sample: object = None
    denoised: object = None
    _fields: tuple = dataclasses.field(default=("prev_sample", "pred_original_sample"), repr=False)

    def to_tuple(self):
        return tuple(getattr(self, f) for f in self._fields)

    def __getitem__(self, i):
        return self.to_tuple()[i]


class SchedulerMixin:
    """Construction from a config, and the small helpers the schedulers share."""

    Config = BaseConfig
    UNSUPPORTED: dict = {}  # key -> the only value refldm accepts (diffusers' default)
    RENAMED: dict = {}  # key -> {diffusers' deprecated value: the value diffusers maps it to}
    NOT_KEYS: tuple = ()  # fields of the shared Config that diffusers' class lacks (kept at default, never read)
    order = 1
    output_fields = ("prev_sample", "pred_original_sample")
    # diffusers makes some schedulers usable before set_timesteps: their constructor plans a schedule of this many
    # steps ("num_train_timesteps": one per training timestep). None: the tables _build_tables leaves stand.
    steps_at_init: int | str | None = None

    def __init__(self, **config):
        self.config = self._parse(config)
        self.num_inference_steps = None
        self._reset_step_index()
        self._build_tables()
        if self.steps_at_init is not None:
            n = self.steps_at_init
            self.set_timesteps(self.config.num_train_timesteps if n == "num_train_timesteps" else n)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def config_keys(cls):
        """The keys this class takes: its config fields (less NOT_KEYS) and the UNSUPPORTED ones."""
        return ({f.name for f in dataclasses.fields(cls.Config)} - set(cls.NOT_KEYS)) | set(cls.UNSUPPORTED)

    @classmethod
    def _parse(cls, config: dict):
        """This class's keys -> its Config; the keys given (not left at default) are remembered for from_config."""
        config = dict(config)
        for key, mapping in cls.RENAMED.items():
            if isinstance(config.get(key), str) and config[key] in mapping:
                config[key] = mapping[config[key]]
        keys = cls.config_keys()
        for key, value in config.items():
            if key not in keys and not key.startswith("_"):
                why = ("a key of other diffusers schedulers; from_config carries such keys along unused"
                       if key in DIFFUSERS_SCHEDULER_KEYS else "refldm does not implement it")
                raise ConfigError(f"{cls.__name__}: unknown config key {key!r} (value {short(value)}): {why}")
        parsed = parse_config(cls.Config, config, fixed=cls.UNSUPPORTED, where=cls.__name__)
        parsed._given = frozenset(k for k in config if k in keys and k not in cls.UNSUPPORTED)
        parsed._carried = {k: v for k, v in config.items() if k in cls.UNSUPPORTED}  # at their only value
        fields = [f.name for f in dataclasses.fields(cls.Config) if f.name not in cls.NOT_KEYS]
        parsed._keys = tuple(fields + sorted(k for k in cls.UNSUPPORTED if k not in fields))  # the mapping's keys
        parsed._fixed = dict(cls.UNSUPPORTED)
        return parsed

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a diffusers scheduler config (a dict, or another scheduler's ``.config``): this class's keys
        are used, other diffusers schedulers' keys are carried along unused (see the module docstring)."""
        if dataclasses.is_dataclass(config):
            config = passed_on(config)
        elif not isinstance(config, dict):
            raise ConfigError(f"{cls.__name__}.from_config: expected a dict, got {type(config).__name__}")
        keys = cls.config_keys()
        hidden = {k: v for k, v in config.items()
                  if k not in keys and k in DIFFUSERS_SCHEDULER_KEYS and k not in overrides}
        scheduler = cls(**{**{k: v for k, v in config.items() if k not in hidden}, **overrides})
        scheduler.config._carried = {**scheduler.config._carried, **hidden}
        return scheduler

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, **overrides):
        """Build from ``folder/scheduler_config.json`` (or ``folder/subfolder/...``, e.g. subfolder="scheduler")."""
        folder = os.path.join(folder, subfolder) if subfolder else folder
        path = os.path.join(folder, "scheduler_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no scheduler_config.json in {folder}")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_config(config, **overrides)

    def _build_tables(self):
        """betas, alphas, alphas_cumprod (host float64) from the config."""
        self.betas = schedule.betas_for(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedule.alphas_cumprod_from_betas(self.betas)

    def __len__(self):
        return self.config.num_train_timesteps

    # -- table precision ---------------------------------------------------------------------------
    def _scalar(self, value):
        """A table entry as a scalar for the step's arithmetic: a Python float with float64 tables (a float32
        sample then stays float32), a NumPy float32 with float32 tables, so that every coefficient rounds in
        float32 as diffusers' 0-d float32 tensors do."""
        return numpy.float32(value) if self.config.table_dtype == "float32" else float(value)

    def _table(self, values):
        """An inference table (sigmas, fractional timesteps) in config.table_dtype; diffusers rounds its to float32."""
        return numpy.asarray(values, dtype=self.config.table_dtype)

    # -- inference steps ---------------------------------------------------------------------------
    def _check_steps(self, num_inference_steps, num_train_timesteps=None):
        """The step count, checked; `num_train_timesteps` (diffusers' set_timesteps argument of that name)
        may only repeat the config's, since refldm builds one table per scheduler."""
        n = num_inference_steps
        if num_train_timesteps not in (None, self.config.num_train_timesteps):
            raise ValueError(f"{type(self).__name__}.set_timesteps: num_train_timesteps={num_train_timesteps!r} "
                             f"differs from the config's {self.config.num_train_timesteps}")
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 1:
            raise ValueError(f"{type(self).__name__}.set_timesteps: num_inference_steps={n!r} must be an integer >= 1")
        if n > self.config.num_train_timesteps:
            raise ValueError(f"{type(self).__name__}.set_timesteps: num_inference_steps={n} is larger than "
                             f"num_train_timesteps={self.config.num_train_timesteps}")
        return int(n)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at this index of ``timesteps`` (img2img: see refldm.pipelines.sampling.img2img_timesteps)."""
        self._begin_index = int(begin_index)

    def _need_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Position of `timestep` in the schedule (the second one if it occurs twice, as diffusers)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = numpy.nonzero(schedule_timesteps == _host_scalar(timestep))[0]
        if len(hits) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {_host_scalar(timestep)} is not one of "
                             "scheduler.timesteps; pass the values of scheduler.timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    # -- where sampling stands -------------------------------------------------------------------------
    # One counter, as diffusers: _step_index is the position in ``timesteps`` of the model call being processed.
    # set_timesteps forgets it (_reset_step_index); the first scale_model_input or step after that finds it
    # (_locate_step): at begin_index when img2img set one, else where the given timestep stands in the schedule;
    # each step then counts it up by one.
    def _reset_step_index(self):
        """A new schedule: no step taken yet, no begin_index."""
        self._step_index = None
        self._begin_index = None

    def _locate_step(self, timestep):
        """The index of the current model call in ``timesteps`` (found on the first call after set_timesteps)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return self._step_index

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _output(self, return_dict, prev_sample, pred_original_sample=None, denoised=None):
        out = SchedulerOutput(prev_sample, pred_original_sample, denoised, self.output_fields)
        return out if return_dict else out.to_tuple()


# ------------------------------------------------------------------------------------------------------
# Helpers on arrays (any backend)
# ------------------------------------------------------------------------------------------------------

def _host_scalar(t):
    """A timestep given as a Python/NumPy scalar or a 0-d array of any backend -> Python number."""
    if isinstance(t, (int, float, numpy.number)):
        return t.item() if isinstance(t, numpy.number) else t
    return backend.to_numpy(t).reshape(()).item()


def to_device(host, like):
    """Move a small host array next to `like` (same namespace/device), keeping `like`'s float dtype."""
    xp = backend.array_namespace(like)
    host = numpy.asarray(host, dtype=like.dtype)
    return host if xp is numpy else xp.asarray(host)


def broadcast_coefficient(values, like):
    """Per-batch coefficients (B,) -> (B, 1, 1, ...) on `like`'s device, for x0/noise of shape (B, ...)."""
    values = numpy.asarray(values, numpy.float64).reshape(-1)
    values = values.reshape(values.shape + (1,) * (like.ndim - 1))
    return to_device(values, like)


def clip(x, limit):
    """Clamp to [-limit, limit] on x's device."""
    return backend.array_namespace(x).clip(x, -limit, limit)


def check_custom_timesteps(where, timesteps, num_train_timesteps, integer=True):
    """Custom timesteps: a non-empty, strictly decreasing list in [0, num_train_timesteps - 1] (integers unless
    `integer` is False); returned as int64 (or float64)."""
    t = numpy.asarray(timesteps, dtype=numpy.float64) if not hasattr(timesteps, "dtype") else backend.to_numpy(
        timesteps).astype(numpy.float64)
    if t.ndim != 1 or t.size == 0 or not numpy.all(numpy.isfinite(t)):
        raise ValueError(f"{where}: custom timesteps must be a non-empty 1-D list of finite numbers")
    if numpy.any(numpy.diff(t) >= 0) or t[0] > num_train_timesteps - 1 or t[-1] < 0:
        raise ValueError(f"{where}: custom timesteps must be strictly decreasing and in "
                         f"[0, {num_train_timesteps - 1}], got {t.tolist()}")
    if integer and numpy.any(t != numpy.round(t)):
        raise ValueError(f"{where}: custom timesteps must be integers here, got {t.tolist()}")
    return t.astype(numpy.int64) if integer else t


def check_custom_sigmas(where, sigmas):
    """Custom sigmas: at least two finite values >= 0, decreasing (the last is where the final step ends)."""
    s = numpy.asarray(sigmas, dtype=numpy.float64) if not hasattr(sigmas, "dtype") else backend.to_numpy(
        sigmas).astype(numpy.float64)
    if s.ndim != 1 or s.size < 2 or not numpy.all(numpy.isfinite(s)) or numpy.any(s < 0):
        raise ValueError(f"{where}: custom sigmas must be a 1-D list of at least two finite numbers >= 0")
    if numpy.any(numpy.diff(s) > 0):
        raise ValueError(f"{where}: custom sigmas must be decreasing, got {s.tolist()}")
    return s


def ancestral_split(sigma_from, sigma_to, eta=1.0):
    """Split the step sigma_from -> sigma_to of an ancestral sampler into a deterministic step to sigma_down and fresh
    noise of size sigma_up:

        sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
        sigma_down = sqrt(sigma_to^2 - sigma_up^2),

    so that sigma_down^2 + sigma_up^2 = sigma_to^2 (ancestral sampling, Ho et al. 2020 eq. 7 in sigma form; eta
    scales the noise as DDIM's eta, Song et al. 2021 eq. 16; k-diffusion's get_ancestral_step). eta = 1 gives
    sigma_down = sigma_to^2 / sigma_from; eta = 0 no noise, sigma_down = sigma_to. Returns (sigma_down, sigma_up).

    Scalars (Python floats, or NumPy float32 with float32 tables: the result keeps that precision) or NumPy arrays
    (elementwise). sigma_to^2 - sigma_up^2 >= 0 exactly; it is clamped at 0 against rounding."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if isinstance(sigma_up, numpy.ndarray):
        sigma_up = numpy.minimum(sigma_to, sigma_up)
        return numpy.maximum(sigma_to**2 - sigma_up**2, 0) ** 0.5, sigma_up
    sigma_up = min(sigma_to, sigma_up)
    return max(sigma_to**2 - sigma_up**2, 0.0) ** 0.5, sigma_up


def churn(sample, sigma, num_steps, s_churn, s_tmin, s_tmax, s_noise, generator, like):
    """Raise the noise level before an Euler step (Karras et al. 2022, Algorithm 2, lines 4-6):

        gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax (else 0),   sigma_hat = sigma (1 + gamma),
        x_hat = x + s_noise sqrt(sigma_hat^2 - sigma^2) z

    with N = num_steps and z drawn like `like` from `generator`. Returns (x_hat, sigma_hat); gamma = 0 leaves x."""
    gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = noise_like(like, generator)
        sample = sample + (noise * s_noise) * (sigma_hat**2 - sigma**2) ** 0.5
    return sample, sigma_hat


def dynamic_threshold(x0, ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language
    Understanding" (Imagen), sec. 2.3): per sample, s = the `ratio` quantile of |x_0| clamped to [1, max_value];
    x_0 <- clip(x_0, -s, s) / s. Keeps saturated values from piling up at large guidance weights."""
    xp = backend.array_namespace(x0)
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    s = xp.quantile(xp.abs(flat), ratio, axis=1, keepdims=True)  # linear interpolation, as torch.quantile
    s = xp.clip(s, 1, max_value).astype(x0.dtype)
    return (xp.clip(flat, -s, s) / s).reshape(x0.shape)


def noise_like(sample, generator=None, dtype=None):
    """Standard normal noise shaped like `sample`, drawn on the host from `generator` (torch-compatible
    refldm.core.random.Generator, a list of them, or a numpy Generator) in `dtype`, moved to sample's device."""
    dtype = sample.dtype if dtype is None else dtype
    noise = refldm_random.randn(tuple(sample.shape), generator=generator, dtype=numpy.dtype(dtype).name)
    return to_device(noise, sample)


def timesteps_as_host(timesteps):
    """img2img passes timesteps as a scalar or a (B,) array of any backend -> host 1-D array."""
    if isinstance(timesteps, (int, float, numpy.number)):
        return numpy.asarray([timesteps])
    return numpy.asarray(backend.to_numpy(timesteps)).reshape(-1)


class AlphaAddNoise:
    """add_noise for schedulers indexed by training timestep (DDPM, DDIM, PNDM, LCM)."""

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
        t = timesteps_as_host(timesteps).astype(numpy.int64)
        abar = self.alphas_cumprod[t]
        return (broadcast_coefficient(numpy.sqrt(abar), original_samples) * original_samples
                + broadcast_coefficient(numpy.sqrt(1.0 - abar), original_samples) * noise)

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0  (Salimans & Ho 2022, sec. 4): the v-prediction target."""
        t = timesteps_as_host(timesteps).astype(numpy.int64)
        abar = self.alphas_cumprod[t]
        return (broadcast_coefficient(numpy.sqrt(abar), sample) * noise
                - broadcast_coefficient(numpy.sqrt(1.0 - abar), sample) * sample)


class AlphaScheduler(AlphaAddNoise, SchedulerMixin):
    """The base of the samplers indexed by training timestep on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM,
    DDIM, PNDM, LCM, TCD): the model's input is x_t itself (init_noise_sigma = 1), abar after the last timestep is
    final_alpha_cumprod (1 with set_alpha_to_one, else abar_0; for the classes with that key), and before
    set_timesteps ``timesteps`` lists every training timestep, as diffusers."""

    init_noise_sigma = 1.0

    def _build_tables(self):
        super()._build_tables()
        if hasattr(self.config, "set_alpha_to_one"):
            self.final_alpha_cumprod = self._scalar(1.0 if self.config.set_alpha_to_one else self.alphas_cumprod[0])
        self.timesteps = numpy.arange(self.config.num_train_timesteps)[::-1].copy()

    def scale_model_input(self, sample, timestep=None):
        return sample


class SigmaAddNoise:
    """add_noise for schedulers indexed by step (the sigma-based ones)."""

    variance_preserving = False  # DPM-Solver and UniPC step on x_t itself, not on x_t / sqrt(abar)
    noise_sigmas_attr = "sigmas"  # the table of sigma by step index (the k-diffusion ports: by model call)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma eps with sigma at the step of each timestep (or at begin_index, for img2img);
        for the variance-preserving solvers x_t = alpha x_0 + sigma_t eps, alpha = 1/sqrt(sigma^2 + 1),
        sigma_t = sigma alpha (the same point, scaled by sqrt(abar))."""
        t = timesteps_as_host(timesteps)
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in t]
        elif self._step_index is not None:
            indices = [self._step_index] * len(t)
        else:
            indices = [self._begin_index] * len(t)
        sigma = numpy.asarray(getattr(self, self.noise_sigmas_attr))[indices]
        if self.variance_preserving:
            alpha = 1 / (sigma**2 + 1) ** 0.5
            return (broadcast_coefficient(alpha, original_samples) * original_samples
                    + broadcast_coefficient(sigma * alpha, original_samples) * noise)
        return original_samples + noise * broadcast_coefficient(sigma, original_samples)


class TwoCallStep:
    """For the samplers with two model calls per step (DPM2, DPM2 a, DPM++ SDE; diffusers' order = 2): between the
    calls, ``sample`` holds x at the step's start."""

    order = 2
    sample = None

    @property
    def state_in_first_order(self) -> bool:
        """True at the first model call of a step."""
        return self.sample is None


class SigmaScheduler(SigmaAddNoise, SchedulerMixin):
    """The base of the samplers that step in sigma on x = x_0 + sigma eps (Euler, Euler ancestral, Heun, LMS and
    the k-diffusion family): the sigma table by training timestep, input scaling, init_noise_sigma."""

    ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for abar_T = 0 so sigma_T stays finite

    def _build_tables(self):
        super()._build_tables()
        if getattr(self.config, "rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = self.ZERO_SNR_LAST_ALPHA_CUMPROD
        self.sigmas_table = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # by training timestep
        self.sigmas = numpy.concatenate([self.sigmas_table[::-1], numpy.zeros(1, self.sigmas_table.dtype)])
        self.timesteps = numpy.linspace(0, self.config.num_train_timesteps - 1, self.config.num_train_timesteps)[::-1]

    @property
    def init_noise_sigma(self):
        """sigma_max ("linspace"/"trailing"), or sqrt(sigma_max^2 + 1) for "leading" (which misses t = T-1)."""
        s = self._scalar(numpy.max(self.sigmas))
        return s if self.config.timestep_spacing in ("linspace", "trailing") else (s**2 + 1) ** 0.5

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): back from x_0 + sigma eps to the model's input scale sqrt(abar) x."""
        self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[self._step_index])
        return sample / (sigma**2 + 1) ** 0.5

    def _spaced(self, n):
        c = self.config
        timesteps = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset,
                                              exact=True)
        timesteps = self._table(timesteps)  # diffusers interpolates at float32-rounded timesteps
        return timesteps, schedule.interpolate_sigmas(timesteps, self.sigmas_table)

    def _set_schedule(self, timesteps, sigmas):
        """Store the inference schedule: timesteps (n,) and sigmas (n + 1,), in the table dtype (diffusers rounds
        both to float32), and reset the step counter."""
        self.timesteps = self._table(timesteps)
        self.sigmas = self._table(sigmas)
        self._reset_step_index()
