"""DPM-Solver++ multistep in the EDM formulation, as diffusers' EDMDPMSolverMultistepScheduler: the solver of
dpmsolver.py (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095, Algorithm 2 and its SDE variant) on
x = x_0 + sigma eps, i.e. with alpha_t = 1 and sigma_t = sigma, so lambda = -log sigma and h = log(sigma_s /
sigma_t); the denoised x_0 comes from the EDM preconditioning of edm_euler.py (Karras et al. 2022, Table 1):

    x_0 = c_skip x + c_out F(c_in x, log(sigma) / 4)
    order 1:  x_t = sigma_t/sigma_s x - (e^{-h} - 1) x_0
              (SDE: x_t = sigma_t/sigma_s e^{-h} x + (1 - e^{-2h}) x_0 + sigma_t sqrt(1 - e^{-2h}) z)
    order 2, 3: the multistep corrections of dpmsolver.dpmpp_second_order / dpmpp_third_order.

Sigmas come from a ramp as in EDMEulerScheduler, except that here, as in diffusers, the ramp is torch.linspace in
its default dtype (float32 with table_dtype="float32": the Karras formula is then evaluated in float32 too).
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import ThresholdingKeys, check_choice, noise_like
from .dpmsolver import dpmpp_first_order, dpmpp_second_order, dpmpp_third_order
from .edm_euler import EDMEulerConfig, EDMEulerScheduler
from .multistep import MultistepHistory, step_length


@dataclasses.dataclass
class EDMDPMSolverConfig(ThresholdingKeys, EDMEulerConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        if self.algorithm_type == "sde-dpmsolver++" and self.solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver++' has no third-order step here (solver_order=3); "
                             "diffusers' EDM solver has none either")


class EDMDPMSolverMultistepScheduler(MultistepHistory, EDMEulerScheduler):
    """diffusers' EDMDPMSolverMultistepScheduler (e.g. Playground v2.5's scheduler)."""

    Config = EDMDPMSolverConfig
    RENAMED = {"solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},  # as diffusers does
               "algorithm_type": {"deis": "dpmsolver++"}}
    output_fields = ("prev_sample",)

    def _build_tables(self):
        """As diffusers: usable before set_timesteps, on T ramp points linspace(0, 1, T), then sigma = 0."""
        self._set_ramp(schedule.linspace(0, 1, self.config.num_train_timesteps, self.config.table_dtype), last=0)
        self.num_inference_steps = None

    def sigmas_from_ramp(self, ramp):
        c = self.config
        if c.sigma_schedule == "karras":  # in the ramp's dtype (float32 with float32 tables, as diffusers)
            lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return (hi + ramp * (lo - hi)) ** c.rho
        return super().sigmas_from_ramp(ramp)

    def _set_ramp(self, ramp, last=None):
        sigmas = self._table(self.sigmas_from_ramp(ramp))  # (n,)
        self.timesteps = self.precondition_noise(sigmas)  # (n,)
        if last is None:
            last = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0
        self.sigmas = numpy.concatenate([sigmas, self._table([last])])  # (n + 1,)
        self._reset_history()
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps=None, device=None):
        """n sigmas from the ramp linspace(0, 1, n), then sigma_min or 0 (final_sigmas_type)."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 1:
            raise ValueError(f"{type(self).__name__}.set_timesteps: num_inference_steps={n!r} must be an integer >= 1")
        self.num_inference_steps = int(n)
        self._set_ramp(schedule.linspace(0, 1, int(n), self.config.table_dtype))

    def convert_model_output(self, model_output, sample):
        """The denoised x_0 (dynamically thresholded if asked)."""
        return self._thresholded(self.precondition_outputs(sample, model_output,
                                                           self._scalar(self.sigmas[self._step_index])))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        self._need_timesteps()
        c = self.config
        i, n = self._locate_step(timestep), len(self.timesteps)
        order = self._order(i, n)
        self._remember(self.convert_model_output(model_output, sample))
        noise = noise_like(model_output, generator) if c.algorithm_type == "sde-dpmsolver++" else None
        sig = [self._scalar(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]  # sigma_t, sigma_s0, s1, s2
        lam = [math.inf if s == 0 else -math.log(s) for s in sig]  # lambda = log(1 / sigma): alpha = 1
        h = step_length(lam[0], lam[1])
        one = self._scalar(1.0)
        if h == 0:  # a zero-length step (sigma_min to final sigma_min) leaves x unchanged (multistep.step_length)
            prev_sample = sample
        elif order == 1:
            prev_sample = dpmpp_first_order(sample, self.model_outputs[-1], one, sig[0], sig[1], h, noise)
        elif order == 2:
            prev_sample = dpmpp_second_order(sample, self.model_outputs[-1], self.model_outputs[-2], one, sig[0],
                                             sig[1], h, lam[1] - lam[2], c.solver_type, noise)
        else:
            m0, m1, m2 = self.model_outputs[::-1][:3]
            prev_sample = dpmpp_third_order(sample, m0, m1, m2, one, sig[0], sig[1], h, lam[1] - lam[2],
                                            lam[2] - lam[3])
        self._count_step()
        self._step_index += 1
        return self._output(return_dict, prev_sample)
