"""PNDM / PLMS: pseudo linear multistep sampling (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds"). Stable Diffusion v1's default scheduler (with skip_prk_steps=True)."""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import AlphaScheduler, BaseConfig
from .prediction import eps_from_v


def pndm_transfer(sample, eps, abar_t, abar_prev):
    """The transfer part phi(x_t, eps, t, t - delta) of PNDM (Liu et al. 2022, sec. 3.2), a DDIM step written as

        x_prev = sqrt(abar_prev / abar_t) x_t
                 - (abar_prev - abar_t) eps / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))
    """
    denominator = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
    return (abar_prev / abar_t) ** 0.5 * sample - ((abar_prev - abar_t) / denominator) * eps


def plms_eps(ets):
    """The linear multistep combination of past noise predictions (Liu et al. 2022, the PLMS method of sec. 3.3;
    Adams-Bashforth of order len(ets)): eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 with e_0 the newest."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


@dataclasses.dataclass
class PNDMConfig(BaseConfig):
    timestep_spacing: str = "leading"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    PREDICTION_TYPES = ("epsilon", "v_prediction")


class PNDMScheduler(AlphaScheduler):
    """diffusers' PNDMScheduler: 3 Runge-Kutta warm-up steps (12 model calls) then PLMS, or with
    skip_prk_steps=True a Heun-like warm-up (the second timestep repeated) then PLMS."""

    Config = PNDMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.pndm_order = 4
        self._reset()
        self.timesteps = None

    def _reset(self):
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def set_timesteps(self, num_inference_steps, device=None):
        """Ascending grid as config.timestep_spacing, then the PRK (or skip-PRK) and PLMS timesteps (descending)."""
        n = self._check_steps(num_inference_steps)
        c = self.config
        if not c.skip_prk_steps and n < self.pndm_order:
            raise ValueError(f"PNDMScheduler.set_timesteps: num_inference_steps={n} is too few for the Runge-Kutta "
                             f"warm-up (needs >= {self.pndm_order}); use skip_prk_steps=True (PLMS)")
        self.num_inference_steps = n
        grid = schedule.spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, n, c.steps_offset)[::-1]
        grid = grid.astype(numpy.int64)
        if c.skip_prk_steps:
            self.prk_timesteps = numpy.array([], dtype=numpy.int64)
            self.plms_timesteps = numpy.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
        else:
            half = c.num_train_timesteps // n // 2
            prk = numpy.array(grid[-self.pndm_order:]).repeat(2) + numpy.tile(numpy.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = grid[:-3][::-1].copy()
        self.timesteps = numpy.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(numpy.int64)
        self._reset()

    def _prev_sample(self, sample, timestep, prev_timestep, model_output):
        abar_t = self._scalar(self.alphas_cumprod[timestep])
        abar_prev = self._scalar(self.alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":
            model_output = eps_from_v(sample, model_output, abar_t**0.5, (1 - abar_t) ** 0.5)
        return pndm_transfer(sample, model_output, abar_t, abar_prev)

    def step(self, model_output, timestep, sample, return_dict=True):
        self._need_timesteps()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(self, model_output, timestep, sample, return_dict=True):
        """Runge-Kutta warm-up (Liu et al. 2022, the PRK method): four evaluations per step, weights 1/6, 1/3, 1/3, 1/6."""
        self._need_timesteps()
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = int(timestep) - (0 if self.counter % 2 else half)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return self._output(return_dict, prev_sample)

    def step_plms(self, model_output, timestep, sample, return_dict=True):
        """Pseudo linear multistep step (Liu et al. 2022, PLMS) on the transfer phi."""
        self._need_timesteps()
        c = self.config
        if not c.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: PLMS steps need the Runge-Kutta warm-up first "
                             "(run every timestep of scheduler.timesteps in order)")
        step = c.num_train_timesteps // self.num_inference_steps
        timestep = int(timestep)
        prev_timestep = timestep - step
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # second call of the skip-PRK warm-up: average with the first, redo the first step
            prev_timestep = timestep
            timestep = timestep + step
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        else:
            model_output = plms_eps(self.ets)
        prev_sample = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return self._output(return_dict, prev_sample)

    output_fields = ("prev_sample",)
