"""TCD: strategic stochastic sampling for a trajectory consistency distilled model (Zheng, He, Zhao, Wen, Wang, Chen,
Wu & Luo 2024, "Trajectory Consistency Distillation", arXiv:2402.19159, sec. 4.4 and Algorithm 4), as diffusers'
TCDScheduler.

The model predicts eps (or x_0 / v) at timestep t; from the x_0 and eps estimates TCD jumps to an intermediate
timestep s = floor((1 - eta) t_prev) with the DDIM formula, then forward-diffuses to the next timestep t_prev with
fresh noise (gamma = eta controls the stochasticity: eta = 0 is deterministic, DDIM-like jumps to t_prev itself):

    x_s    = sqrt(abar_s) x_0 + sqrt(1 - abar_s) eps                          ("pred_noised_sample")
    x_prev = sqrt(abar_prev / abar_s) x_s + sqrt(1 - abar_prev / abar_s) z     (no noise at the last step)

The timesteps are those of LCM: n indices taken evenly from the distillation grid k - 1, 2k - 1, ..., k = T //
original_inference_steps (or from every training timestep when set_timesteps gets original_inference_steps).
As in diffusers, clip_sample and thresholding play no part in the step (refused here when switched on) and
timestep_spacing / timestep_scaling are accepted and unused.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from . import schedule
from .base import AlphaScheduler, BaseConfig, SchedulerOutput, check_custom_timesteps, noise_like
from .prediction import predict_eps, predict_x0


@dataclasses.dataclass
class TCDSchedulerOutput(SchedulerOutput):
    """prev_sample and pred_noised_sample (x_s above), as diffusers' TCDSchedulerOutput."""

    pred_noised_sample: object = None


@dataclasses.dataclass
class TCDConfig(BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"  # accepted but unused (TCD has its own grid), as in diffusers
    original_inference_steps: int = 50
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0  # accepted but unused, as in diffusers' TCD
    clip_sample_range: float = 1.0  # (unused: clip_sample is refused)
    dynamic_thresholding_ratio: float = 0.995  # (unused: thresholding is refused)
    sample_max_value: float = 1.0
    rescale_betas_zero_snr: bool = False


class TCDScheduler(AlphaScheduler):
    """diffusers' TCDScheduler (ComfyUI's "tcd")."""

    Config = TCDConfig
    UNSUPPORTED = {"clip_sample": False, "thresholding": False}  # diffusers' TCD step ignores both

    custom_timesteps = False  # set_timesteps(timesteps=...) sets it

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        """n timesteps taken evenly (by index) from the distillation grid, restricted to its first
        original_steps * strength points (img2img); or custom descending integer `timesteps` (their first
        (1 - strength) part dropped, as diffusers)."""
        c = self.config
        where = "TCDScheduler.set_timesteps"
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{where}: pass exactly one of num_inference_steps, timesteps")
        original = c.original_inference_steps if original_inference_steps is None else original_inference_steps
        if original_inference_steps is None:
            if original > c.num_train_timesteps:
                raise ValueError(f"{where}: original_inference_steps={original} is larger than "
                                 f"num_train_timesteps={c.num_train_timesteps}")
            k = c.num_train_timesteps // original
            origin = numpy.arange(1, int(original * strength) + 1) * k - 1
        else:  # as diffusers: every training timestep
            origin = numpy.arange(0, int(c.num_train_timesteps * strength))
        if timesteps is not None:
            t = check_custom_timesteps(where, timesteps, c.num_train_timesteps)
            self.num_inference_steps = len(t)
            self.custom_timesteps = True
            init = min(int(len(t) * strength), len(t))
            self.timesteps = t[max(len(t) - init, 0):]
        else:
            n = self._check_steps(num_inference_steps)
            self.timesteps = schedule.consistency_timesteps(where, origin, n, original, strength)
            self.num_inference_steps = n
        self._reset_step_index()

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        """x_s from the x_0 / eps estimates, then re-noised to the next timestep (module docstring)."""
        self._need_timesteps()
        if not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta={eta!r} must be in [0, 1]")
        i = self._locate_step(timestep)
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        # s = floor((1 - eta) t_prev); diffusers multiplies in torch's default dtype (float32 unless made float64)
        scaled = numpy.float32(1 - eta) * numpy.float32(prev_t) if self.config.table_dtype == "float32" \
            else (1 - eta) * prev_t
        s = int(math.floor(scaled))
        abar_t = self._scalar(self.alphas_cumprod[t])
        abar_prev = self._scalar(self.alphas_cumprod[prev_t])
        abar_s = self._scalar(self.alphas_cumprod[s])
        a, sig = abar_t**0.5, (1 - abar_t) ** 0.5
        pt = self.config.prediction_type
        x0 = predict_x0(pt, model_output, sample, a, sig)
        eps = model_output if pt == "epsilon" else predict_eps(pt, model_output, sample, a, sig)
        pred_noised = abar_s**0.5 * x0 + (1 - abar_s) ** 0.5 * eps
        if eta > 0 and i != self.num_inference_steps - 1:
            noise = noise_like(pred_noised, generator)
            prev_sample = (abar_prev / abar_s) ** 0.5 * pred_noised + (1 - abar_prev / abar_s) ** 0.5 * noise
        else:
            prev_sample = pred_noised
        self._step_index += 1
        out = TCDSchedulerOutput(prev_sample, pred_noised_sample=pred_noised,
                                 _fields=("prev_sample", "pred_noised_sample"))
        return out if return_dict else out.to_tuple()
