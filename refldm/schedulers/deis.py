"""DEIS, the diffusion exponential integrator sampler (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with
Exponential Integrator", arXiv:2204.13902, sec. 4: rho-AB-DEIS with the polynomial in log rho), as diffusers'
DEISMultistepScheduler (algorithm_type="deis", solver_type="logrho").

Notation as in dpmsolver.py: x_t = alpha_t x_0 + sigma_t eps, alpha = 1/sqrt(1 + s^2), sigma_t = s alpha, and
rho = sigma_t / alpha_t (= the Karras sigma s). In rho the probability-flow ODE is exact in its linear part:

    d(x / alpha) / d rho = eps(x, rho),   so   x_t / alpha_t = x_s / alpha_s + integral_{rho_s}^{rho_t} eps d rho.

DEIS extrapolates eps by the Lagrange polynomial through the last k model outputs m_0 (newest), m_1, ..., taken as
a polynomial in log rho, and integrates it exactly:

    x_t = alpha_t (x_s / alpha_s + sum_j c_j m_j),   c_j = integral_{rho_s}^{rho_t} l_j(log rho) d rho,

with l_j the Lagrange basis polynomial of node j. Order 1 is DDIM, x_t = alpha_t/alpha_s x - sigma_t (e^h - 1) m_0
(h = lambda_t - lambda_s); for order 2 and 3 the antiderivatives of rho l_j(log rho) are `_antiderivative_2/3`.
Like DPM-Solver multistep, the first steps use lower orders, and with lower_order_final (fewer than 15 steps)
so do the last.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import BaseConfig, SigmaGridKeys, ThresholdingKeys, check_choice
from .multistep import MultistepScheduler, alpha_sigma, half_log_snr


def _antiderivative_2(t, b, c):
    """F(t) = t (log t - log c - 1) / (log b - log c): an antiderivative of the linear Lagrange basis polynomial in
    log rho that is 1 at rho = b and 0 at rho = c, integrated over rho."""
    return t * (-numpy.log(c) + numpy.log(t) - 1) / (numpy.log(b) - numpy.log(c))


def _antiderivative_3(t, b, c, d):
    """The same for the quadratic basis polynomial in log rho that is 1 at b and 0 at c and d."""
    lt, lc, ld = numpy.log(t), numpy.log(c), numpy.log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((numpy.log(b) - lc) * (numpy.log(b) - ld))


def deis_update(x, ms, alphas, sigmas):
    """One DEIS step of order len(ms) (module docstring). ms = converted outputs (eps), newest first; alphas /
    sigmas = (alpha, sigma) at (t, s0, s1, ...), s0 the newest output's point (where x is)."""
    alpha_t, sigma_t, alpha_s0, sigma_s0 = alphas[0], sigmas[0], alphas[1], sigmas[1]
    if len(ms) == 1:
        h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s0, sigma_s0)
        return (alpha_t / alpha_s0) * x - (sigma_t * (math.exp(h) - 1.0)) * ms[0]
    rho = [s / a for a, s in zip(alphas, sigmas)]  # (rho_t, rho_s0, rho_s1, ...)
    rho_t, nodes = rho[0], rho[1:]
    coefficients = []
    for j in range(len(ms)):
        others = nodes[:j] + nodes[j + 1:]  # the nodes where basis polynomial j vanishes, in diffusers' order
        if len(ms) == 2:
            F = lambda t: _antiderivative_2(t, nodes[j], *others)  # noqa: E731
        else:
            others = (nodes + nodes)[j + 1:j + 3]  # diffusers' cyclic order: (s0; s1, s2), (s1; s2, s0), (s2; s0, s1)
            F = lambda t: _antiderivative_3(t, nodes[j], *others)  # noqa: E731
        coefficients.append(type(alpha_t)(F(rho_t) - F(nodes[0])))  # float, or float32 with float32 tables
    out = x / alpha_s0
    for c, m in zip(coefficients, ms):
        out = out + c * m
    return alpha_t * out


@dataclasses.dataclass
class DEISConfig(SigmaGridKeys, ThresholdingKeys, BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ("deis",))
        check_choice("solver_type", self.solver_type, ("logrho",))
        schedule.check_one_sigma_grid(self)


class DEISMultistepScheduler(MultistepScheduler):
    """diffusers' DEISMultistepScheduler (ComfyUI's "deis")."""

    Config = DEISConfig
    UNSUPPORTED = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
                   "time_shift_type": "exponential"}
    RENAMED = {"algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},  # as diffusers does
               "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}}
    predicts_data = False
    noise_from_data = True  # eps from the (thresholded) x_0 prediction, as diffusers' DEIS

    def set_timesteps(self, num_inference_steps, device=None):
        """n integer timesteps (n + 1 spaced points, the smallest dropped), or the config's sigma grid mapped back to
        timesteps; the last sigma is sigma_min (a grid's last step is of length zero, as in diffusers)."""
        c = self.config
        n = self._check_steps(num_inference_steps)
        timesteps = schedule.spaced_timesteps_skip_last(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)
        grid = schedule.sigma_grid(c, float(self.sigmas_table[0]), float(self.sigmas_table[-1]), n)
        if grid is not None:  # Karras timesteps rounded, exponential / beta truncated (as diffusers)
            timesteps = schedule.sigma_to_t(grid, numpy.log(self.sigmas_table))
            timesteps = timesteps.round() if c.use_karras_sigmas else timesteps
            sigmas = numpy.concatenate([grid, grid[-1:]])
        else:
            sigmas = numpy.concatenate([schedule.interpolate_sigmas(timesteps, self.sigmas_table),
                                        self.sigmas_table[:1]])
        self.sigmas = self._table(sigmas)  # (n + 1,)
        self.timesteps = numpy.asarray(timesteps).astype(numpy.int64)  # (n,)
        self.num_inference_steps = n
        self._reset_history()
        self._reset_step_index()

    def step(self, model_output, timestep, sample, return_dict=True):
        self._need_timesteps()
        c = self.config
        i, n = self._locate_step(timestep), len(self.timesteps)
        order = self._order(i, n)
        self._remember(self.convert_model_output(model_output, sample))
        alphas, sigmas = zip(*(alpha_sigma(self._scalar(self.sigmas[j])) for j in range(i + 1, i - order, -1)))
        prev_sample = deis_update(sample, self.model_outputs[::-1][:order], alphas, sigmas)
        self._count_step()
        self._step_index += 1
        return self._output(return_dict, prev_sample)
