"""UniPC: a unified predictor-corrector multistep solver (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867).

Same notation as DPM-Solver (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t), h = lambda_t - lambda_s0).
The predictor UniP-p extrapolates from the last p model outputs; the corrector UniC-p, run at the start of
the next step, re-solves the previous step including the new model output (no extra model call).
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, ThresholdingKeys, check_choice
from .multistep import MultistepScheduler, half_log_snr


def unipc_coefficients(rks, hh, order, solver_type):
    """R and b of the UniPC linear system (Zhao et al. 2023, sec. 3, with B(h) = h ("bh1") or
    e^h - 1 ("bh2")): R_ij = r_j^(i-1), b_i = phi_{i+1}(hh) i! / B(h), with phi the exponential-integrator
    functions phi_1(h) = (e^h - 1)/h, phi_{k+1}(h) = (phi_k(h) - 1/k!)/h, here accumulated as h phi."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append(numpy.asarray(rks, numpy.float64) ** (i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return numpy.stack(R), numpy.array(b), h_phi_1, b_h


def _combine(weights, arrays):
    """sum_k w_k a_k for host weights and device arrays."""
    out = 0
    for w, a in zip(weights, arrays):
        out = out + float(w) * a
    return out


@dataclasses.dataclass
class UniPCConfig(SigmaGridKeys, ThresholdingKeys, BaseConfig):
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: list = dataclasses.field(default_factory=list)
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int) or self.solver_order < 1:
            raise ValueError(f"solver_order={self.solver_order!r} must be an integer >= 1")
        check_choice("solver_type", self.solver_type, ("bh1", "bh2"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        schedule.check_one_sigma_grid(self)


class UniPCMultistepScheduler(MultistepScheduler):
    """diffusers' UniPCMultistepScheduler (UniPC-bh2 with data prediction by default)."""

    Config = UniPCConfig
    UNSUPPORTED = {"solver_p": None, "use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
                   "time_shift_type": "exponential", "shift_terminal": None}
    RENAMED = {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}  # as diffusers does
    thresholds_noise = False  # diffusers thresholds only x_0 here

    def __init__(self, **config):
        super().__init__(**config)
        self.predict_x0 = self.config.predict_x0
        self.disable_corrector = list(self.config.disable_corrector)

    @property
    def predicts_data(self):
        """x_0 with predict_x0=True (the default), else eps (multistep.convert_model_output)."""
        return self.predict_x0

    def _reset_history(self):
        """The outputs and their timesteps, and the predictor's last sample and order that the corrector redoes."""
        super()._reset_history()
        self.timestep_list = [None] * self.config.solver_order
        self.last_sample = None
        self.this_order = None

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        c = self.config
        timesteps = schedule.spaced_timesteps_skip_last(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        grid = schedule.sigma_grid(c, float(self.sigmas_table[0]), float(self.sigmas_table[-1]), n)
        if grid is not None:  # Karras timesteps are rounded, exponential and beta ones truncated, as in diffusers
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
            timesteps = timesteps.round() if c.use_karras_sigmas else timesteps
            last = float(sigmas[-1]) if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
            last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = self._table(numpy.concatenate([sigmas, [last]]))
        self.timesteps = timesteps.astype(numpy.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset_history()
        self._reset_step_index()

    def _base(self, x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1):
        """The first-order (DDIM / DPM-Solver-1) part of both predictor and corrector."""
        if self.predict_x0:
            return (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
        return (alpha_t / alpha_s0) * x - (sigma_t * h_phi_1) * m0

    def _differences(self, index_t, index_s0, order, first_offset):
        """rk = (lambda_si - lambda_s0) / h and D1_k = (m_k - m0) / rk for the older model outputs."""
        alpha_t, sigma_t = self._alpha_sigma_at(index_t)
        alpha_s0, sigma_s0 = self._alpha_sigma_at(index_s0)
        lam_s0 = half_log_snr(alpha_s0, sigma_s0)
        h = half_log_snr(alpha_t, sigma_t) - lam_s0
        m0 = self.model_outputs[-1]
        rks, d1s = [], []
        for i in range(1, order):
            alpha_si, sigma_si = self._alpha_sigma_at(self._step_index - (i + first_offset))
            rk = (half_log_snr(alpha_si, sigma_si) - lam_s0) / h
            rks.append(rk)
            d1s.append((self.model_outputs[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        hh = -h if self.predict_x0 else h
        return (alpha_t, sigma_t, alpha_s0, sigma_s0), rks, d1s, hh, m0

    def predictor_update(self, sample, order):
        """UniP-p, the predictor (Zhao et al. 2023, sec. 3.2): x_t = base - alpha_t B(h) sum_k rho_k D1_k (x_0 form),
        with rho = 1/2 for order 2 and the solution of the (order-1) system above it."""
        (alpha_t, sigma_t, alpha_s0, sigma_s0), rks, d1s, hh, m0 = self._differences(
            self._step_index + 1, self._step_index, order, 0)
        R, b, h_phi_1, b_h = unipc_coefficients(rks, hh, order, self.config.solver_type)
        x_t = self._base(sample, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        if d1s:
            rhos_p = [0.5] if order == 2 else numpy.linalg.solve(R[:-1, :-1], b[:-1])
            pred_res = _combine(rhos_p, d1s)
            x_t = x_t - ((alpha_t if self.predict_x0 else sigma_t) * b_h) * pred_res
        return x_t

    def corrector_update(self, this_model_output, last_sample, order):
        """UniC-p, the corrector (Zhao et al. 2023, sec. 3.1): redo the step from last_sample with the new model output
        m_t included, D1_t = m_t - m0, rho from the full system (rho = 1/2 for order 1)."""
        (alpha_t, sigma_t, alpha_s0, sigma_s0), rks, d1s, hh, m0 = self._differences(
            self._step_index, self._step_index - 1, order, 1)
        R, b, h_phi_1, b_h = unipc_coefficients(rks, hh, order, self.config.solver_type)
        rhos_c = [0.5] if order == 1 else numpy.linalg.solve(R, b)
        x_t = self._base(last_sample, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        corr_res = _combine(rhos_c[:-1], d1s) if d1s else 0
        d1_t = this_model_output - m0
        return x_t - ((alpha_t if self.predict_x0 else sigma_t) * b_h) * (corr_res + float(rhos_c[-1]) * d1_t)

    def step(self, model_output, timestep, sample, return_dict=True):
        self._need_timesteps()
        self._locate_step(timestep)
        c = self.config
        use_corrector = (self._step_index > 0 and self._step_index - 1 not in self.disable_corrector
                         and self.last_sample is not None)
        converted = self.convert_model_output(model_output, sample)
        if use_corrector and self.sigmas[self._step_index] != self.sigmas[self._step_index - 1]:
            sample = self.corrector_update(converted, self.last_sample, self.this_order)
        self._remember(converted)
        self.timestep_list = self.timestep_list[1:] + [timestep]
        order = min(c.solver_order, len(self.timesteps) - self._step_index) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        if self.sigmas[self._step_index + 1] == self.sigmas[self._step_index]:
            prev_sample = sample  # a zero-length step (Karras sigmas ending on sigma_min twice) leaves x unchanged
        else:
            prev_sample = self.predictor_update(sample, self.this_order)
        self._count_step()
        self._step_index += 1
        return self._output(return_dict, prev_sample)
