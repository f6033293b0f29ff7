"""DPM-Solver++ (multistep) and its SDE variant (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver
for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095).

Notation: x_t = alpha_t x_0 + sigma_t eps with alpha_t = 1 / sqrt(1 + s^2), sigma_t = s alpha_t for the
Karras sigma s; lambda_t = log(alpha_t / sigma_t) = -log s is the half log-SNR, h = lambda_t - lambda_s > 0.
The solvers integrate the data-prediction ODE exactly in its linear part (exponential integrators) and
approximate x_0(lambda) by a polynomial through the last model outputs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import BaseConfig, SchedulerMixin, SigmaAddNoise, check_choice, noise_like
from .prediction import x0_from_eps, x0_from_v


def alpha_sigma(s: float):
    """(alpha_t, sigma_t) for Karras sigma s: alpha = 1 / sqrt(s^2 + 1), sigma = s alpha."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def _lambda(alpha: float, sigma: float) -> float:
    """lambda = log alpha - log sigma (+inf at sigma = 0, the final step to the data)."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


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
    """Multistep DPM-Solver++(3M) (Lu et al. 2022, appendix; DPM-Solver eq. for order 3 in data prediction):
    D1, D2 are first and second divided differences of the last three x_0 predictions in lambda."""
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


@dataclasses.dataclass
class DPMSolverConfig(BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False
    dynamic_thresholding_ratio: float = 0.995  # used only with thresholding, which refldm does not implement
    sample_max_value: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


class DPMSolverMultistepScheduler(SigmaAddNoise, SchedulerMixin):
    """diffusers' DPMSolverMultistepScheduler ("DPM++ 2M" with algorithm_type="dpmsolver++", "DPM++ 2M SDE"
    with "sde-dpmsolver++"; Karras sigmas with use_karras_sigmas=True)."""

    Config = DPMSolverConfig
    UNSUPPORTED = {"thresholding": False, "variance_type": None, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                   "use_dynamic_shifting": False, "time_shift_type": "exponential"}
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

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        c = self.config
        clipped = int(numpy.searchsorted(self.lambda_t[::-1], c.lambda_min_clipped))
        last_timestep = c.num_train_timesteps - clipped
        timesteps = schedule.spaced_timesteps_skip_last(c.timestep_spacing, c.num_train_timesteps, n,
                                                        c.steps_offset, last_timestep)
        if c.use_karras_sigmas:
            sigmas = schedule.karras_sigmas(float(self.sigmas_table[0]), float(self.sigmas_table[-1]), n)
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(numpy.int64)
        else:
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = numpy.concatenate([sigmas, [last]])
        self.timesteps = timesteps.astype(numpy.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """As the base, but an unknown timestep means the last step (diffusers' behaviour here)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = numpy.nonzero(schedule_timesteps == float(timestep))[0]
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def convert_model_output(self, model_output, sample):
        """The data prediction x_0 that DPM-Solver++ works with (Lu et al. 2022, sec. 4)."""
        alpha, sigma = alpha_sigma(float(self.sigmas[self._step_index]))
        if self.config.prediction_type == "epsilon":
            return x0_from_eps(sample, model_output, alpha, sigma)
        if self.config.prediction_type == "v_prediction":
            return x0_from_v(sample, model_output, alpha, sigma)
        return model_output

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        self._need_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        lower_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                            or c.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and c.lower_order_final and n < 15
        x0 = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":  # diffusers draws this noise in float32, whatever the dtype
            noise = noise_like(model_output, generator, "float32") if variance_noise is None else variance_noise
        sig = [float(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1), (alpha_s2, sigma_s2) = map(alpha_sigma, sig)
        lam_t, lam_s0 = _lambda(alpha_t, sigma_t), _lambda(alpha_s0, sigma_s0)
        h = lam_t - lam_s0
        if h == 0:  # a zero-length step (Karras sigmas ending on sigma_min twice) leaves x unchanged
            prev_sample = sample
        elif c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = dpmpp_first_order(sample, x0, alpha_t, sigma_t, sigma_s0, h, noise)
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            h_0 = lam_s0 - _lambda(alpha_s1, sigma_s1)
            prev_sample = dpmpp_second_order(sample, self.model_outputs[-1], self.model_outputs[-2], alpha_t,
                                             sigma_t, sigma_s0, h, h_0, c.solver_type, noise)
        else:
            lam_s1 = _lambda(alpha_s1, sigma_s1)
            h_0, h_1 = lam_s0 - lam_s1, lam_s1 - _lambda(alpha_s2, sigma_s2)
            prev_sample = dpmpp_third_order(sample, *self.model_outputs[::-1][:3], alpha_t, sigma_t, sigma_s0,
                                            h, h_0, h_1, noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return self._output(return_dict, prev_sample)

    output_fields = ("prev_sample",)
    variance_preserving = True
