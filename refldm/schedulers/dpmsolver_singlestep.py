"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps", arXiv:2206.00927, Algorithms 1-2; Lu et al. 2022,
"DPM-Solver++", arXiv:2211.01095, Algorithm 1), as diffusers' DPMSolverSinglestepScheduler.

Notation as in dpmsolver.py: x_t = alpha_t x_0 + sigma_t eps, alpha = 1/sqrt(1 + s^2), sigma_t = s alpha for the
Karras sigma s, lambda = log(alpha_t / sigma_t). Where the multistep solver reuses outputs of earlier *steps*, the
singlestep solver of order k spends k model calls on one step of the schedule s -> t: every call is one entry of
``timesteps``, and ``order_list`` says which order each call finishes (e.g. [1, 2, 1, 2, ...] for order 2: the
first call of a pair stores x_s and takes a first-order step to the intermediate point, the second finishes the
second-order step from x_s). With m_i the converted model outputs (x_0 for DPM-Solver++, eps for DPM-Solver) at
lambda_{s0} (newest), lambda_{s1}, lambda_{s2}, and x the sample stored at the start of the step:

    order 1 (DDIM):  x_t = sigma_t/sigma_s x - alpha_t (e^{-h} - 1) m            (++, h = lambda_t - lambda_s)
    order 2:         h = lambda_t - lambda_s1, r0 = (lambda_s0 - lambda_s1) / h, D0 = m1, D1 = (m0 - m1) / r0,
        midpoint:    x_t = sigma_t/sigma_s1 x - alpha_t (e^{-h} - 1) D0 - 1/2 alpha_t (e^{-h} - 1) D1
        heun:        x_t = sigma_t/sigma_s1 x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1)/h + 1) D1
    order 3:         h = lambda_t - lambda_s2, r0, r1 = (lambda_s0, lambda_s1 - lambda_s2) / h, D0 = m2,
                     D1_0 = (m1 - m2)/r1, D1_1 = (m0 - m2)/r0, D1 = (r0 D1_0 - r1 D1_1)/(r0 - r1),
                     D2 = 2 (D1_1 - D1_0)/(r0 - r1),
        midpoint:    x_t = sigma_t/sigma_s2 x - alpha_t (e^{-h} - 1) D0 + alpha_t ((e^{-h} - 1)/h + 1) D1_1
        heun:        ... + alpha_t ((e^{-h} - 1)/h + 1) D1 - alpha_t ((e^{-h} - 1 + h)/h^2 - 1/2) D2

DPM-Solver (noise prediction) swaps alpha and sigma and e^{-h} for e^{h} as in dpmsolver.py; SDE-DPM-Solver++
multiplies x by e^{-h}, uses (1 - e^{-2h}) and adds sigma_t sqrt(1 - e^{-2h}) z.

As diffusers: the timesteps are always spaced "linspace" (n + 1 points, the smallest dropped; this class has no
timestep_spacing / steps_offset keys in diffusers: from_config carries them along unused, the constructor refuses
them); an n not divisible by solver_order, or
final_sigmas_type="zero", makes lower_order_final true (diffusers rewrites its config for that; refldm keeps the
config and decides per set_timesteps call).
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, ThresholdingKeys, check_choice, check_custom_timesteps, noise_like
from .multistep import MultistepScheduler, alpha_sigma, half_log_snr, step_length


def order_list(steps: int, order: int, lower_order_final: bool, final_zero: bool):
    """The order each model call finishes: (1, 2, 3) repeated, shortened at the end with lower_order_final."""
    if lower_order_final:
        full, rest = divmod(steps, order)
        if order == 3:
            orders = [1, 2, 3] * (full - 1) + [1, 2] + [1] if rest == 0 else [1, 2, 3] * full + [1, 2][:rest]
        elif order == 2:
            orders = [1, 2] * (full - 1) + [1, 1] if rest == 0 else [1, 2] * full + [1]
        else:
            orders = [1] * steps
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders


def singlestep_update(algorithm, solver_type, x, ms, alphas, sigmas, noise=None):
    """One singlestep DPM-Solver update of order len(ms) (module docstring). ms = converted model outputs, oldest
    first; alphas / sigmas = (alpha, sigma) at (t, s_{k-1}, ..., s0): the target, then the model outputs' points in
    the same order as ms; x is the sample at the oldest point."""
    k = len(ms)
    lam = [half_log_snr(a, s) for a, s in zip(alphas, sigmas)]  # lambda_t, then lambda at each output (oldest first)
    alpha_t, sigma_t, alpha_s, sigma_s = alphas[0], sigmas[0], alphas[1], sigmas[1]
    h = step_length(lam[0], lam[1])  # (c1, c2 below divide by h: evaluated only for orders 2 and 3)
    if h == 0:  # a zero-length last step (sigma_min to the final sigma_min) leaves x unchanged
        return x
    if algorithm == "dpmsolver++":
        em = math.exp(-h) - 1.0
        base, c0, half = (sigma_t / sigma_s) * x, -(alpha_t * em), -0.5 * (alpha_t * em)
        c1 = (lambda: alpha_t * (em / h + 1.0))
        c2 = (lambda: -(alpha_t * ((em + h) / h**2 - 0.5)))
    elif algorithm == "dpmsolver":
        ep = math.exp(h) - 1.0
        base, c0, half = (alpha_t / alpha_s) * x, -(sigma_t * ep), -0.5 * (sigma_t * ep)
        c1 = (lambda: -(sigma_t * (ep / h - 1.0)))
        c2 = (lambda: -(sigma_t * ((ep - h) / h**2 - 0.5)))
    else:  # sde-dpmsolver++
        em2 = 1.0 - math.exp(-2.0 * h)
        base, c0, half = (sigma_t / sigma_s * math.exp(-h)) * x, alpha_t * em2, 0.5 * (alpha_t * em2)
        c1 = (lambda: alpha_t * (em2 / (-2.0 * h) + 1.0))
        c2 = (lambda: alpha_t * ((em2 + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5))
    if k == 1:
        out = base + c0 * ms[0]
    elif k == 2:
        r0 = (lam[2] - lam[1]) / h
        d0, d1 = ms[0], (1.0 / r0) * (ms[1] - ms[0])
        out = base + c0 * d0 + (half if solver_type == "midpoint" else c1()) * d1
    else:
        r1, r0 = (lam[2] - lam[1]) / h, (lam[3] - lam[1]) / h
        d0 = ms[0]
        d1_0, d1_1 = (1.0 / r1) * (ms[1] - ms[0]), (1.0 / r0) * (ms[2] - ms[0])
        if solver_type == "midpoint":
            out = base + c0 * d0 + c1() * d1_1
        else:
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            out = base + c0 * d0 + c1() * d1 + c2() * d2
    if noise is not None:
        out = out + (sigma_t * math.sqrt(1.0 - math.exp(-2 * h))) * noise
    return out


@dataclasses.dataclass
class DPMSolverSinglestepConfig(SigmaGridKeys, ThresholdingKeys, BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        schedule.check_one_sigma_grid(self)
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise ValueError("algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min' (its noise-prediction "
                             "step divides by sigma = 0 otherwise; diffusers refuses it too)")
        if self.algorithm_type == "dpmsolver" and self.thresholding:
            raise ValueError("thresholding=True with algorithm_type='dpmsolver' is not implemented (diffusers' "
                             "singlestep code indexes its tables with a missing timestep there)")


class DPMSolverSinglestepScheduler(MultistepScheduler):
    """diffusers' DPMSolverSinglestepScheduler (the web UIs have no name for it; k-diffusion's
    sample_dpmpp_2s_ancestral is a different, ancestral, singlestep method)."""

    Config = DPMSolverSinglestepConfig
    UNSUPPORTED = {"variance_type": None, "use_flow_sigmas": False, "flow_shift": 1.0,
                   "use_dynamic_shifting": False, "time_shift_type": "exponential"}
    RENAMED = {"solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},  # as diffusers does
               "algorithm_type": {"deis": "dpmsolver++"}}
    NOT_KEYS = ("timestep_spacing", "steps_offset")  # always "linspace", as diffusers

    def __init__(self, **config):
        super().__init__(**config)
        self.order_list = order_list(self.config.num_train_timesteps, self.config.solver_order,
                                     self.config.lower_order_final, self.config.final_sigmas_type == "zero")

    @property
    def predicts_data(self):
        """DPM-Solver++ extrapolates x_0, DPM-Solver eps (multistep.convert_model_output)."""
        return self.config.algorithm_type != "dpmsolver"

    def _reset_history(self):
        """No stored output and no step started: the sample x of the step's start is kept in ``sample``."""
        self.model_outputs = [None] * self.config.solver_order
        self.sample = None

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """n integer timesteps, linspace over [0, T - 1 - clipped] with n + 1 points and the smallest dropped, or
        the config's sigma grid mapped back to timesteps; or explicit integer `timesteps` (descending)."""
        c = self.config
        where = type(self).__name__ + ".set_timesteps"
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{where}: pass exactly one of num_inference_steps, timesteps")
        if timesteps is not None:
            on = [k for k in schedule.SIGMA_GRIDS if getattr(c, k)]
            if on:
                raise ValueError(f"{where}: custom timesteps cannot be used with {on[0]}=True")
            timesteps = check_custom_timesteps(where, timesteps, c.num_train_timesteps)
            n = len(timesteps)
        else:
            n = self._check_steps(num_inference_steps)
            clipped = int(numpy.searchsorted(self.lambda_t[::-1], c.lambda_min_clipped))
            timesteps = schedule.spaced_timesteps_skip_last("linspace", c.num_train_timesteps, n, 0,
                                                            c.num_train_timesteps - clipped)
        log_sigmas = numpy.log(self.sigmas_table)
        grid = schedule.sigma_grid(c, float(self.sigmas_table[0]), float(self.sigmas_table[-1]), n)
        if grid is not None:  # Karras timesteps rounded, exponential / beta truncated (as diffusers)
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
            timesteps = timesteps.round() if c.use_karras_sigmas else timesteps
        else:
            sigmas = schedule.interpolate_sigmas(timesteps, self.sigmas_table)
        last = float(self.sigmas_table[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = self._table(numpy.concatenate([sigmas, [last]]))  # (n + 1,)
        self.timesteps = numpy.asarray(timesteps).astype(numpy.int64)  # (n,)
        self.num_inference_steps = n
        self._reset_history()
        lower_order_final = c.lower_order_final or n % c.solver_order != 0 or c.final_sigmas_type == "zero"
        self.order_list = order_list(n, c.solver_order, lower_order_final, c.final_sigmas_type == "zero")
        self._reset_step_index()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """Store the converted output; at a first-order call also store x (the start of the step); then the update
        of this call's order from the stored x (module docstring)."""
        self._need_timesteps()
        c = self.config
        i = self._locate_step(timestep)
        self._remember(self.convert_model_output(model_output, sample))
        noise = noise_like(model_output, generator) if c.algorithm_type == "sde-dpmsolver++" else None
        order = self.order_list[i]
        while self.model_outputs[-order] is None:  # fewer outputs stored yet (the start, or img2img)
            order -= 1
        if order == 1:
            self.sample = sample
        points = [i + 1] + [i - j for j in range(order - 1, -1, -1)]  # target, then the outputs' points, oldest first
        alphas, sigmas = zip(*(alpha_sigma(self._scalar(self.sigmas[j])) for j in points))
        prev_sample = singlestep_update(c.algorithm_type, c.solver_type, self.sample, self.model_outputs[-order:],
                                        alphas, sigmas, noise)
        self._step_index += 1
        return self._output(return_dict, prev_sample)
