"""LMS: a linear multistep (Adams-Bashforth) solver of the probability-flow ODE in sigma (k-diffusion's
``sample_lms``; the probability-flow ODE of Karras et al. 2022, sec. 2, written as dx/dsigma = (x - x_0(x, sigma)) / sigma)."""

from __future__ import annotations

import dataclasses

import numpy
from scipy import integrate

from . import schedule
from .base import BaseConfig, SigmaGridKeys, SigmaScheduler
from .prediction import x0_from_sigma_prediction


def lms_coefficient(sigmas, order: int, i: int, j: int) -> float:
    """Weight of the derivative from step i - j in the step sigma_i -> sigma_{i+1}: the integral over
    [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i, ..., sigma_{i-order+1} that is 1 at
    sigma_{i-j} (Adams-Bashforth on a non-uniform grid),

        c_ij = int_{sigma_i}^{sigma_{i+1}} prod_{k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}) dtau,

    integrated by Gauss-Kronrod quadrature (scipy.integrate.quad), as diffusers and k-diffusion's
    linear_multistep_coeff do: exact to rounding for these degrees (<= 3). The closed-form polynomial integral
    agrees to ~1e-14 relative but rounds differently, and where coefficients of ~1e4 cancel (sigma_max ~ 2e4 of the
    cosine schedule) that difference reaches 1e-10 of the result; quadrature keeps refldm on diffusers' rounding."""
    sigmas = [float(v) for v in sigmas]

    def basis(tau):
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return product

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


@dataclasses.dataclass
class LMSConfig(SigmaGridKeys, BaseConfig):

    def __post_init__(self):
        super().__post_init__()
        schedule.check_one_sigma_grid(self)


class LMSDiscreteScheduler(SigmaScheduler):
    """diffusers' LMSDiscreteScheduler: x_{i+1} = x_i + sum_j c_ij d_{i-j}, d = (x - x_0) / sigma, order <= 4."""

    Config = LMSConfig
    steps_at_init = "num_train_timesteps"  # as diffusers: usable before set_timesteps

    def set_timesteps(self, num_inference_steps, device=None):
        n = self._check_steps(num_inference_steps)
        self.num_inference_steps = n
        c = self.config
        timesteps, sigmas = self._spaced(n)
        grid = schedule.sigma_grid(c, float(sigmas[-1]), float(sigmas[0]), n)
        if grid is not None:  # Karras, exponential or beta sigmas
            sigmas = grid
            timesteps = schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table))
        self._set_schedule(timesteps, numpy.concatenate([sigmas, [0.0]]))
        self.derivatives = []

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        i = self._locate_step(timestep)
        sigma = self._scalar(self.sigmas[i])
        x0 = x0_from_sigma_prediction(self.config.prediction_type, model_output, sample, sigma)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(i + 1, order)
        coefficients = [lms_coefficient(self.sigmas, order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives)))
        self._step_index += 1
        return self._output(return_dict, prev_sample, x0)
