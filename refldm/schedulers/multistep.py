"""What the exponential-integrator solvers share (DPM-Solver multistep and singlestep, DEIS, UniPC, EDM DPM-Solver):
the variance-preserving notation, the history of converted model outputs with its lower-order start, and the
conversion of the model's output into what the solver extrapolates.

Notation (Lu et al. 2022, "DPM-Solver", arXiv:2206.00927, sec. 3.1): x_t = alpha_t x_0 + sigma_t eps with, for the
Karras sigma s = sqrt((1 - abar) / abar),

    alpha_t = 1 / sqrt(1 + s^2),   sigma_t = s alpha_t,   lambda_t = log(alpha_t / sigma_t) = -log s,

lambda being the half log-SNR; a step from s to t has length h = lambda_t - lambda_s > 0.

History and lower-order start. A multistep solver of order k extrapolates the converted model output (x_0 or eps)
through its last k values m_0 (newest), m_1, ..., m_{k-1}, one per earlier step. ``model_outputs`` holds them oldest
first, None where no step has stored one yet; ``lower_order_nums`` counts the steps taken, up to k. So the first
steps run at orders 1, 2, ... ("warm-up"), and with ``lower_order_final`` the last ones drop back to 1 and 2
(``multistep_order``). set_timesteps empties the history (``_reset_history``).
"""

from __future__ import annotations

import math

import numpy

from . import schedule
from .base import SchedulerMixin, SigmaAddNoise, dynamic_threshold
from .prediction import eps_from_x0, predict_eps, predict_x0


def alpha_sigma(s: float):
    """(alpha_t, sigma_t) for Karras sigma s: alpha = 1 / sqrt(s^2 + 1), sigma = s alpha."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def half_log_snr(alpha: float, sigma: float) -> float:
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


class MultistepHistory:
    """The history of converted model outputs (module docstring) and the conversion itself. Needs a config with
    solver_order, prediction_type and the thresholding keys, and ``sigmas`` by step index."""

    predicts_data = True     # the solver extrapolates x_0 (data prediction); False: eps (noise prediction)
    thresholds_noise = True  # with thresholding, a noise-prediction solver's eps is recomputed from the thresholded x_0
    noise_from_data = False  # eps always computed from x_0, as diffusers' DEIS does (its rounding)

    def _reset_history(self):
        """No stored output yet: the next steps warm up from order 1."""
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _remember(self, converted):
        """Store this step's converted output as m_0, dropping the oldest."""
        self.model_outputs = self.model_outputs[1:] + [converted]

    def _count_step(self):
        """One more step taken (counted up to solver_order): the next step may use one more stored output."""
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1

    def _order(self, i: int, n: int) -> int:
        """The order of step i of n (multistep_order): warming up at the start; with lower_order_final and fewer than
        15 steps, 2 and 1 at the last two steps; 1 at the last step with euler_at_final or a final sigma of 0."""
        c = self.config
        final = c.lower_order_final and n < 15
        last = i == n - 1 and (getattr(c, "euler_at_final", False) or final
                               or getattr(c, "final_sigmas_type", None) == "zero")
        return multistep_order(c.solver_order, self.lower_order_nums, last, i == n - 2 and final)

    def _alpha_sigma_at(self, index):
        """(alpha_t, sigma_t) at step `index` of ``sigmas``."""
        return alpha_sigma(self._scalar(self.sigmas[index]))

    def _thresholded(self, x0):
        """x_0, dynamically thresholded when the config asks (thresholding=True; base.dynamic_threshold)."""
        c = self.config
        return dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else x0

    def convert_model_output(self, model_output, sample):
        """What the solver extrapolates, from the model's prediction at this step's sigma (prediction.py):

        - a data-prediction solver (DPM-Solver++, UniPC's default): x_0, dynamically thresholded if asked;
        - a noise-prediction solver (DPM-Solver, UniPC with predict_x0=False): eps; with thresholding,
          eps = (x - alpha_t x_0') / sigma_t from the thresholded x_0' of that eps (UniPC: eps as predicted,
          as diffusers);
        - DEIS: eps = (x - alpha_t x_0') / sigma_t from the (thresholded if asked) x_0 prediction, always."""
        alpha, sigma = self._alpha_sigma_at(self._step_index)
        c = self.config
        if self.predicts_data or self.noise_from_data:
            x0 = self._thresholded(predict_x0(c.prediction_type, model_output, sample, alpha, sigma))
            return x0 if self.predicts_data else eps_from_x0(sample, x0, alpha, sigma)
        eps = predict_eps(c.prediction_type, model_output, sample, alpha, sigma)
        if c.thresholding and self.thresholds_noise:
            x0 = self._thresholded(predict_x0("epsilon", eps, sample, alpha, sigma))
            eps = eps_from_x0(sample, x0, alpha, sigma)
        return eps


class MultistepScheduler(MultistepHistory, SigmaAddNoise, SchedulerMixin):
    """The base of the variance-preserving solvers indexed by training timestep (DPM-Solver multistep and
    singlestep, DEIS, UniPC): the tables alpha_t, sigma_t, lambda_t by training timestep, the model input unscaled
    (init_noise_sigma = 1), and, before set_timesteps, every training timestep with its sigma (as diffusers)."""

    variance_preserving = True
    output_fields = ("prev_sample",)
    init_noise_sigma = 1.0
    ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24  # diffusers' stand-in for abar_T = 0 (rescale_betas_zero_snr)

    def _build_tables(self):
        super()._build_tables()
        if getattr(self.config, "rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = self.ZERO_SNR_LAST_ALPHA_CUMPROD
        self.alpha_t = numpy.sqrt(self.alphas_cumprod)
        self.sigma_t = numpy.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = numpy.log(self.alpha_t) - numpy.log(self.sigma_t)
        self.sigmas_table = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = self.sigmas_table
        T = self.config.num_train_timesteps
        self.timesteps = numpy.linspace(0, T - 1, T)[::-1]
        self._reset_history()

    def scale_model_input(self, sample, *args, **kwargs):
        return sample
