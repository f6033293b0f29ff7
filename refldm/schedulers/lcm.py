"""LCM: multistep sampling with a latent consistency model (Luo, Tan, Huang, Li & Zhao 2023, "Latent Consistency
Models", multistep latent consistency sampling; consistency-model parameterisation of Song, Dhariwal, Chen & Sutskever 2023)."""

from __future__ import annotations

import dataclasses

import numpy

from . import schedule
from .base import AlphaScheduler, BaseConfig, ThresholdingKeys, clip, dynamic_threshold, noise_like
from .prediction import predict_x0


def consistency_scalings(timestep, timestep_scaling=10.0, sigma_data=0.5):
    """c_skip = sigma_data^2 / (t'^2 + sigma_data^2), c_out = t' / sqrt(t'^2 + sigma_data^2), t' = t * scaling
    (Song et al. 2023, "Consistency Models", sec. 3 parameterisation with sigma_data = 0.5, and LCM's timestep scaling), so that
    f(x, t) = c_skip x + c_out x_0(x, t) and f(x, 0) = x."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@dataclasses.dataclass
class LCMConfig(ThresholdingKeys, BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"  # accepted but unused: LCM has its own grid, as in diffusers
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False


class LCMScheduler(AlphaScheduler):
    """diffusers' LCMScheduler: denoise with the consistency function, then re-noise to the next timestep."""

    Config = LCMConfig
    output_fields = ("prev_sample", "denoised")

    def set_timesteps(self, num_inference_steps, device=None, original_inference_steps=None, strength=1.0):
        """n timesteps taken evenly (by index) from the distillation grid k-1, 2k-1, ..., k = T // original_steps,
        restricted to its first original_steps * strength points (img2img)."""
        n = self._check_steps(num_inference_steps)
        c = self.config
        original = c.original_inference_steps if original_inference_steps is None else original_inference_steps
        if original > c.num_train_timesteps:
            raise ValueError(f"LCMScheduler.set_timesteps: original_inference_steps={original} is larger than "
                             f"num_train_timesteps={c.num_train_timesteps}")
        k = c.num_train_timesteps // original
        origin = numpy.asarray(list(range(1, int(original * strength) + 1))) * k - 1
        self.timesteps = schedule.consistency_timesteps("LCMScheduler.set_timesteps", origin, n, original, strength)
        self.num_inference_steps = n
        self._reset_step_index()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """denoised = c_skip x + c_out x_0; then x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z,
        except at the last step, which returns denoised (Luo et al. 2023, multistep sampling)."""
        self._need_timesteps()
        self._locate_step(timestep)
        c = self.config
        t = int(timestep)
        next_index = self._step_index + 1
        prev_t = int(self.timesteps[next_index]) if next_index < len(self.timesteps) else t
        abar_t = self._scalar(self.alphas_cumprod[t])
        abar_prev = self._scalar(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = consistency_scalings(t, c.timestep_scaling)
        x0 = predict_x0(c.prediction_type, model_output, sample, abar_t**0.5, (1 - abar_t) ** 0.5)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = clip(x0, c.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if self._step_index != self.num_inference_steps - 1:
            noise = noise_like(denoised, generator)
            prev_sample = abar_prev**0.5 * denoised + (1 - abar_prev) ** 0.5 * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        return self._output(return_dict, prev_sample, denoised=denoised)
