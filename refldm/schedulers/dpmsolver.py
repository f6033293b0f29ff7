"""DPM-Solver++ (multistep) and its SDE variant (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver
for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095), and the original DPM-Solver in noise
prediction (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10
Steps", arXiv:2206.00927) with its SDE variant (algorithm_type "dpmsolver" / "sde-dpmsolver").

Notation: x_t = alpha_t x_0 + sigma_t eps with alpha_t = 1 / sqrt(1 + s^2), sigma_t = s alpha_t for the
Karras sigma s; lambda_t = log(alpha_t / sigma_t) = -log s is the half log-SNR, h = lambda_t - lambda_s > 0.
In flow mode (use_flow_sigmas, for rectified-flow models such as SD3: x_t = (1 - t) x_0 + t e) the grid is the
shifted flow time t and alpha_t = 1 - t, sigma_t = t; a "flow_prediction" model's v gives x_0 = x_t - t v, and the
same exponential integrators run on that x_0.
The solvers integrate the data-prediction ODE exactly in its linear part (exponential integrators) and
approximate x_0(lambda) by a polynomial through the last model outputs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import (BaseConfig, SchedulerMixin, SigmaAddNoise, check_choice, check_custom_timesteps, dynamic_threshold,
                   noise_like)
from .prediction import eps_from_x0, predict_eps, predict_x0


def alpha_sigma(s: float):
    """(alpha_t, sigma_t) for Karras sigma s: alpha = 1 / sqrt(s^2 + 1), sigma = s alpha."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def flow_alpha_sigma(t: float):
    """(alpha_t, sigma_t) = (1 - t, t) on the rectified-flow path x_t = (1 - t) x_0 + t e."""
    return 1 - t, t


def _lambda(alpha: float, sigma: float) -> float:
    """lambda = log alpha - log sigma (+inf at sigma = 0, the final step to the data)."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def step_length(lam_t: float, lam_s: float) -> float:
    """h = lambda_t - lambda_s, the step's length in lambda. A last step from sigma_min to a final sigma_min
    (final_sigmas_type="sigma_min" after a grid that ends on sigma_min: Karras, Lu, EDM) has h = 0 in exact
    arithmetic, but the grid's rounding (the Karras formula evaluated at its end, float32 tables) can leave sigma_t
    a hair above sigma_s, so h a hair below 0, where the SDE noise scale sqrt(1 - e^{-2h}) is undefined (diffusers
    then gives NaN, or a finite x where its float32 logs of the two sigmas happen to round to one value). Such an h
    is 0: the step leaves x unchanged. A sigma that really rises is an error."""
    h = lam_t - lam_s
    if h >= 0:
        return h
    if h < -1e-5:
        raise ValueError(f"a solver step would raise the noise level (lambda {lam_s!r} -> {lam_t!r}); the sigmas "
                         "must decrease")
    return 0.0


def multistep_order(solver_order: int, lower_order_nums: int, last: bool, second_last: bool) -> int:
    """The order of a multistep update (DPM-Solver, DEIS, EDM DPM-Solver): solver_order, lowered at the start while
    fewer earlier outputs are stored (lower_order_nums of them: orders 1, 2, ... warm up), and to 1 / 2 at the
    last / second-to-last step when the config asks (lower_order_final, euler_at_final, a final sigma of 0)."""
    if solver_order == 1 or lower_order_nums < 1 or last:
        return 1
    if solver_order == 2 or lower_order_nums < 2 or second_last:
        return 2
    return 3


def dpmpp_first_order(x, x0, alpha_t, sigma_t, sigma_s, h, noise=None):
    """DPM-Solver++(1), the first-order solver, which is DDIM (Lu et al. 2022, sec. 4):
        x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x_0
    SDE-DPM-Solver++(1) (the SDE solver of Lu et al. 2022, with noise z):
        x_t = sigma_t / sigma_s e^{-h} x_s + alpha_t (1 - e^{-2h}) x_0 + sigma_t sqrt(1 - e^{-2h}) z
    """
    if noise is None:
        return (sigma_t / sigma_s) * x - (alpha_t * (math.exp(-h) - 1.0)) * x0
    return ((sigma_t / sigma_s * math.exp(-h)) * x + (alpha_t * (1 - math.exp(-2.0 * h))) * x0
            + (sigma_t * math.sqrt(1.0 - math.exp(-2 * h))) * noise)


def dpmpp_second_order(x, m0, m1, alpha_t, sigma_t, sigma_s0, h, h_0, solver_type, noise=None):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): with r0 = h_0 / h, D0 = m0 (newest x_0),
    D1 = (m0 - m1) / r0,
      midpoint: x_t = sigma_t/sigma_s0 x - alpha_t (e^{-h} - 1) D0 - 1/2 alpha_t (e^{-h} - 1) D1
      heun:     x_t = sigma_t/sigma_s0 x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1)/h + 1) D1
    and the SDE versions (k-diffusion's sample_dpmpp_2m_sde) with e^{-2h} and noise sigma_t sqrt(1 - e^{-2h}) z.
    """
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    em, em2 = math.exp(-h), math.exp(-2.0 * h)
    if noise is None:
        if solver_type == "midpoint":
            return ((sigma_t / sigma_s0) * x - (alpha_t * (em - 1.0)) * d0 - (0.5 * (alpha_t * (em - 1.0))) * d1)
        return ((sigma_t / sigma_s0) * x - (alpha_t * (em - 1.0)) * d0 + (alpha_t * ((em - 1.0) / h + 1.0)) * d1)
    out = (sigma_t / sigma_s0 * em) * x + (alpha_t * (1 - em2)) * d0
    if solver_type == "midpoint":
        out = out + (0.5 * (alpha_t * (1 - em2))) * d1
    else:
        out = out + (alpha_t * ((1.0 - em2) / (-2.0 * h) + 1.0)) * d1
    return out + (sigma_t * math.sqrt(1.0 - em2)) * noise


def dpmpp_third_order(x, m0, m1, m2, alpha_t, sigma_t, sigma_s0, h, h_0, h_1, noise=None):
    """Multistep DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095, appendix; the order-3 multistep update of
    DPM-Solver written for the data prediction). With r0 = h_0 / h, r1 = h_1 / h and the divided differences of the
    last three x_0 predictions m0 (newest), m1, m2 in lambda,
        D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1,
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1),
    the ODE step is
        x_t = sigma_t/sigma_s0 x - alpha_t (e^{-h} - 1) m0 + alpha_t ((e^{-h} - 1)/h + 1) D1
              - alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) D2
    and the SDE step (k-diffusion's sample_dpmpp_3m_sde with eta = 1)
        x_t = sigma_t/sigma_s0 e^{-h} x + alpha_t (1 - e^{-2h}) m0 + alpha_t ((1 - e^{-2h})/(-2h) + 1) D1
              + alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 - 1/2) D2 + sigma_t sqrt(1 - e^{-2h}) z."""
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    em, em2 = math.exp(-h), math.exp(-2.0 * h)
    if noise is None:
        return ((sigma_t / sigma_s0) * x - (alpha_t * (em - 1.0)) * m0 + (alpha_t * ((em - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((em - 1.0 + h) / h**2 - 0.5)) * d2)
    return ((sigma_t / sigma_s0 * em) * x + (alpha_t * (1.0 - em2)) * m0
            + (alpha_t * ((1.0 - em2) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + (sigma_t * math.sqrt(1.0 - em2)) * noise)


def dpm_first_order(x, eps, alpha_t, sigma_t, alpha_s, h, noise=None):
    """DPM-Solver-1 in noise prediction (Lu et al. 2022, arXiv:2206.00927, eq. 3.7; = DDIM):
        x_t = alpha_t/alpha_s x - sigma_t (e^h - 1) eps
    SDE-DPM-Solver-1: x_t = alpha_t/alpha_s x - 2 sigma_t (e^h - 1) eps + sigma_t sqrt(e^{2h} - 1) z."""
    if noise is None:
        return (alpha_t / alpha_s) * x - (sigma_t * (math.exp(h) - 1.0)) * eps
    return ((alpha_t / alpha_s) * x - (2.0 * (sigma_t * (math.exp(h) - 1.0))) * eps
            + (sigma_t * math.sqrt(math.exp(2 * h) - 1.0)) * noise)


def dpm_second_order(x, m0, m1, alpha_t, sigma_t, alpha_s0, h, h_0, solver_type, noise=None):
    """Multistep DPM-Solver-2 in noise prediction (Lu et al. 2022, arXiv:2206.00927, and the multistep form of
    arXiv:2211.01095 sec. 5), D0 = m0 (newest eps), D1 = (m0 - m1) / r0, r0 = h_0 / h:
      midpoint: x_t = alpha_t/alpha_s0 x - sigma_t (e^h - 1) D0 - 1/2 sigma_t (e^h - 1) D1
      heun:     x_t = alpha_t/alpha_s0 x - sigma_t (e^h - 1) D0 - sigma_t ((e^h - 1)/h - 1) D1
    SDE: the eps terms doubled (midpoint: 2, 1; heun: 2, 2) plus sigma_t sqrt(e^{2h} - 1) z."""
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    ep = math.exp(h)
    k0 = sigma_t * (ep - 1.0)
    k1 = 0.5 * (sigma_t * (ep - 1.0)) if solver_type == "midpoint" else sigma_t * ((ep - 1.0) / h - 1.0)
    if noise is None:
        return (alpha_t / alpha_s0) * x - k0 * d0 - k1 * d1
    k1 = 2.0 * k1
    return (alpha_t / alpha_s0) * x - (2.0 * k0) * d0 - k1 * d1 + (sigma_t * math.sqrt(math.exp(2 * h) - 1.0)) * noise


def dpm_third_order(x, m0, m1, m2, alpha_t, sigma_t, alpha_s0, h, h_0, h_1):
    """Multistep DPM-Solver-3 in noise prediction, with D1, D2 as in dpmpp_third_order:
        x_t = alpha_t/alpha_s0 x - sigma_t (e^h - 1) m0 - sigma_t ((e^h - 1)/h - 1) D1
              - sigma_t ((e^h - 1 - h)/h^2 - 1/2) D2."""
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    ep = math.exp(h)
    return ((alpha_t / alpha_s0) * x - (sigma_t * (ep - 1.0)) * m0 - (sigma_t * ((ep - 1.0) / h - 1.0)) * d1
            - (sigma_t * ((ep - 1.0 - h) / h**2 - 0.5)) * d2)


@dataclasses.dataclass
class DPMSolverConfig(BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_flow_sigmas: bool = False        # the rectified-flow grid: t = shift u / (1 + (shift - 1) u)
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False   # set_timesteps(mu=...): flow_shift = e^mu
    time_shift_type: str = "exponential"

    ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, self.ALGORITHMS)
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        schedule.check_one_sigma_grid(self)
        check_choice("time_shift_type", self.time_shift_type, ("exponential", "linear"))
        if self.use_flow_sigmas:
            grids = [k for k in schedule.SIGMA_GRIDS + ("use_lu_lambdas",) if getattr(self, k)]
            if grids:
                raise ValueError(f"use_flow_sigmas=True cannot be combined with {grids[0]}=True (diffusers then "
                                 "builds the other grid on the variance-preserving sigmas)")
            if self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") \
                    or self.prediction_type not in ("flow_prediction", "sample"):
                raise ValueError("use_flow_sigmas=True is implemented for algorithm_type 'dpmsolver++' / "
                                 "'sde-dpmsolver++' with prediction_type 'flow_prediction' (or 'sample'), got "
                                 f"{self.algorithm_type!r} / {self.prediction_type!r}")
        elif self.prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (the flow grid)")
        if self.algorithm_type in ("dpmsolver", "sde-dpmsolver") and self.final_sigmas_type == "zero":
            raise ValueError(f"algorithm_type={self.algorithm_type!r} needs final_sigmas_type='sigma_min' (its "
                             "noise-prediction step divides by sigma = 0 otherwise; diffusers refuses it too)")
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' has no third-order step (solver_order=3); "
                             "diffusers returns nothing there")


class DPMSolverMultistepScheduler(SigmaAddNoise, SchedulerMixin):
    """diffusers' DPMSolverMultistepScheduler ("DPM++ 2M" with algorithm_type="dpmsolver++", "DPM++ 2M SDE"
    with "sde-dpmsolver++"; Karras sigmas with use_karras_sigmas=True)."""

    Config = DPMSolverConfig
    UNSUPPORTED = {"variance_type": None}
    RENAMED = {"solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},  # as diffusers does
               "algorithm_type": {"deis": "dpmsolver++"}}

    def __init__(self, **config):
        super().__init__(**config)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # diffusers' stand-in for abar_T = 0
        self.alpha_t = numpy.sqrt(self.alphas_cumprod)
        self.sigma_t = numpy.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = numpy.log(self.alpha_t) - numpy.log(self.sigma_t)
        self.sigmas_table = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = self.sigmas_table
        self.init_noise_sigma = 1.0
        self.timesteps = numpy.linspace(0, self.config.num_train_timesteps - 1, self.config.num_train_timesteps)[::-1]
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _alpha_sigma(self, s):
        """(alpha_t, sigma_t) at grid value s: the flow path's (1 - t, t) in flow mode, else Karras' sigma."""
        return flow_alpha_sigma(s) if self.config.use_flow_sigmas else alpha_sigma(s)

    def _set_flow_timesteps(self, n, mu):
        """diffusers' flow grid: u = 1 - linspace(1, 1/N, n + 1), t = shift u / (1 + (shift - 1) u) reversed, the
        smallest (t = 0) dropped; timesteps = int(N t) (truncated, as diffusers casts them to int64); with mu,
        shift = e^mu (use_dynamic_shifting, time_shift_type "exponential")."""
        c = self.config
        shift = c.flow_shift
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError("DPMSolverMultistepScheduler.set_timesteps: mu needs use_dynamic_shifting=True and "
                                 "time_shift_type='exponential'")
            shift = math.exp(mu)
        u = 1.0 - numpy.linspace(1, 1 / c.num_train_timesteps, n + 1)
        t = (shift * u / (1 + (shift - 1) * u))[::-1][:-1]
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = self._table(numpy.concatenate([t, [last]]))
        self.timesteps = (t * c.num_train_timesteps).astype(numpy.int64)
        self.num_inference_steps = n
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        """n timesteps spaced as config.timestep_spacing (n + 1 points, the smallest dropped), or the sigma grid
        the config asks for (Karras, exponential, beta, uniform in lambda) mapped back to rounded timesteps; or
        explicit integer `timesteps` (descending, in [0, num_train_timesteps)); or, with use_flow_sigmas, the
        shifted flow grid (`_set_flow_timesteps`; `mu` sets the shift)."""
        c = self.config
        if c.use_flow_sigmas:
            if timesteps is not None:
                raise ValueError("DPMSolverMultistepScheduler.set_timesteps: custom timesteps cannot be used with "
                                 "use_flow_sigmas=True")
            return self._set_flow_timesteps(self._check_steps(num_inference_steps), mu)
        if mu is not None:
            raise ValueError("DPMSolverMultistepScheduler.set_timesteps: mu is for use_flow_sigmas=True")
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("DPMSolverMultistepScheduler.set_timesteps: pass num_inference_steps or timesteps, "
                                 "not both")
            on = [k for k in schedule.SIGMA_GRIDS + ("use_lu_lambdas",) if getattr(c, k)]
            if on:
                raise ValueError(f"DPMSolverMultistepScheduler.set_timesteps: custom timesteps cannot be used with "
                                 f"{on[0]}=True (the config's sigma grid decides the timesteps)")
            timesteps = check_custom_timesteps(type(self).__name__ + ".set_timesteps", timesteps, c.num_train_timesteps)
            n = len(timesteps)
        else:
            n = self._check_steps(num_inference_steps)
            clipped = int(numpy.searchsorted(self.lambda_t[::-1], c.lambda_min_clipped))
            last_timestep = c.num_train_timesteps - clipped
            timesteps = schedule.spaced_timesteps_skip_last(c.timestep_spacing, c.num_train_timesteps, n,
                                                            c.steps_offset, last_timestep)
        log_sigmas = numpy.log(self.sigmas_table)
        grid = schedule.sigma_grid(c, float(self.sigmas_table[0]), float(self.sigmas_table[-1]), n)
        if c.use_lu_lambdas:
            grid = schedule.lu_sigmas(float(log_sigmas[0]), float(log_sigmas[-1]), n)
        if grid is not None:
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
            rounded = c.use_karras_sigmas or c.use_lu_lambdas  # exponential and beta grids truncate, as diffusers
            if rounded and c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(numpy.int64)
        else:
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = self._table(numpy.concatenate([sigmas, [last]]))
        self.timesteps = timesteps.astype(numpy.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def convert_model_output(self, model_output, sample):
        """What the solver works with: the data prediction x_0 for DPM-Solver++ (Lu et al. 2022, sec. 4), the
        noise prediction eps for DPM-Solver; with thresholding, x_0 dynamically thresholded first."""
        alpha, sigma = self._alpha_sigma(self._scalar(self.sigmas[self._step_index]))
        c = self.config
        if c.prediction_type == "flow_prediction":   # x_0 = x_t - t v
            x0 = sample - sigma * model_output
            return dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else x0
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = predict_x0(c.prediction_type, model_output, sample, alpha, sigma)
            return dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else x0
        eps = predict_eps(c.prediction_type, model_output, sample, alpha, sigma)
        if c.thresholding:
            x0 = dynamic_threshold(predict_x0("epsilon", eps, sample, alpha, sigma), c.dynamic_thresholding_ratio,
                                   c.sample_max_value)
            eps = eps_from_x0(sample, x0, alpha, sigma)
        return eps

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        self._need_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        order = multistep_order(c.solver_order, self.lower_order_nums,
                                last=i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                                     or c.final_sigmas_type == "zero"),
                                second_last=i == n - 2 and c.lower_order_final and n < 15)
        m = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        noise = None
        if c.algorithm_type.startswith("sde-"):  # diffusers draws this noise in float32, whatever the dtype
            noise = noise_like(model_output, generator, "float32") if variance_noise is None else variance_noise
        sig = [self._scalar(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1), (alpha_s2, sigma_s2) = map(self._alpha_sigma,
                                                                                                  sig)
        lam_t, lam_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        h = step_length(lam_t, lam_s0)
        data = c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
        if h == 0:  # a zero-length step (a grid ending on sigma_min, then sigma_min again) leaves x unchanged
            prev_sample = sample
        elif order == 1:
            if data:
                prev_sample = dpmpp_first_order(sample, m, alpha_t, sigma_t, sigma_s0, h, noise)
            else:
                prev_sample = dpm_first_order(sample, m, alpha_t, sigma_t, alpha_s0, h, noise)
        elif order == 2:
            h_0 = lam_s0 - _lambda(alpha_s1, sigma_s1)
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            if data:
                prev_sample = dpmpp_second_order(sample, m0, m1, alpha_t, sigma_t, sigma_s0, h, h_0, c.solver_type,
                                                 noise)
            else:
                prev_sample = dpm_second_order(sample, m0, m1, alpha_t, sigma_t, alpha_s0, h, h_0, c.solver_type,
                                               noise)
        else:
            lam_s1 = _lambda(alpha_s1, sigma_s1)
            h_0, h_1 = lam_s0 - lam_s1, lam_s1 - _lambda(alpha_s2, sigma_s2)
            m0, m1, m2 = self.model_outputs[::-1][:3]
            if data:
                prev_sample = dpmpp_third_order(sample, m0, m1, m2, alpha_t, sigma_t, sigma_s0, h, h_0, h_1, noise)
            else:
                prev_sample = dpm_third_order(sample, m0, m1, m2, alpha_t, sigma_t, alpha_s0, h, h_0, h_1)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(return_dict, prev_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha_t x_0 + sigma_t e at each timestep's step: (1 - t, t) in flow mode, else as SigmaAddNoise."""
        if not self.config.use_flow_sigmas:
            return super().add_noise(original_samples, noise, timesteps)
        from .base import broadcast_coefficient, timesteps_as_host
        t = timesteps_as_host(timesteps)
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in t]
        else:
            indices = [self._begin_index if self._step_index is None else self._step_index] * len(t)
        sigma = numpy.asarray(self.sigmas, numpy.float64)[indices]
        return (broadcast_coefficient(1 - sigma, original_samples) * original_samples
                + broadcast_coefficient(sigma, original_samples) * noise)

    output_fields = ("prev_sample",)
    variance_preserving = True

