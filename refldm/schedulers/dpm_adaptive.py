"""DPM adaptive: DPM-Solver with adaptive step size, as k-diffusion's ``sample_dpm_adaptive`` and the web UIs'
"DPM adaptive" (Lu et al. 2022, "DPM-Solver", arXiv:2206.00927, sec. 3.4 and appendix: DPM-Solver-12 and
DPM-Solver-23; the step size control is a PID controller as in Söderlind 2003, "Digital filters in adaptive
time-stepping"). diffusers has no such scheduler.

Adaptive means the solver chooses its own steps. Each trial step from lambda_s to lambda_t = lambda_s + h (lambda =
-log sigma, from sigma_max to sigma_min of the model) computes two solutions of different order from the same model
calls (an embedded pair): DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3 for order 3 (three calls), DPM-Solver-1 and
DPM-Solver-2 for order 2 (two calls). Their difference estimates the error of the lower one:

    delta = max(atol, rtol max(|x_low|, |x_prev|))      (per element; x_prev the x_low of the last accepted step)
    E = ||(x_low - x_high) / delta||_2 / sqrt(size)     (E <= 1: within the tolerances)

The PID controller turns E into a new step h <- h f, f = 1 + atan(g - 1) (a limiter), g = e_0^b1 e_1^b2 e_2^b3 with
e = 1 / (E + 1e-8) of this and the last two accepted trials, b1 = (p + i + d) / k, b2 = -(p + 2d) / k, b3 = d / k
(k = the order, 1.5 with eta > 0; k-diffusion's defaults p = 0, i = 1, d = 0: the classic controller h E^(-1/k)).
The trial is accepted when f >= accept_safety (0.81): x <- x_high (plus noise when eta > 0), lambda_s <- lambda_t;
otherwise it is repeated from the same x with the smaller h. Steps are tried until lambda_s is within 1e-5 of
lambda(sigma_min). As k-diffusion, every trial, repeated or not, starts with a fresh model call at (x, lambda_s).

So the number of model calls depends on the model: ``set_timesteps`` plans the first trial only (its
num_inference_steps is not used, as in A1111), and each trial's last ``step`` appends the next trial's model calls to
``timesteps`` (a Python list that grows while ``refldm.pipelines.sampling.sample`` iterates over it). ``info`` counts steps,
nfe, n_accept and n_reject as k-diffusion's return_info; ``trials`` lists each trial's lambda_s, lambda_t, error,
next h and whether it was accepted. The result is x at sigma_min. img2img is not implemented.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from refldm import backend

from . import schedule
from .dpm_fast import singlestep_stage
from .base import ancestral_split
from .ksampler import KSamplerConfig, KSamplerScheduler, check_number, lam, sigma_of


class PIDStepSizeController:
    """h <- h (1 + atan(g - 1)), g = e_0^b1 e_1^b2 e_2^b3, e = 1 / (E + eps) (module docstring; k-diffusion's
    PIDStepSizeController). propose_step(E) updates h and says whether the trial is accepted."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []  # inverse errors of this trial and the last two accepted ones

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def embedded_error(x_low, x_high, x_prev, rtol, atol):
    """E = ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(size): the error estimate of the
    embedded pair, in units of the tolerance (module docstring)."""
    xp = backend.array_namespace(x_low)
    delta = xp.maximum(rtol * xp.maximum(xp.abs(x_low), xp.abs(x_prev)), atol)
    q = (x_low - x_high) / delta
    return float(backend.to_numpy(xp.sqrt(xp.sum(q * q)))) / x_low.size**0.5


@dataclasses.dataclass
class DPMAdaptiveConfig(KSamplerConfig):
    """k-diffusion's sample_dpm_adaptive arguments and defaults."""

    eta: float = 0.0
    order: int = 3             # 3: DPM-Solver-23, 2: DPM-Solver-12
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05       # the first trial step in lambda
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order not in (2, 3):
            raise ValueError(f"order={self.order!r} must be 2 (DPM-Solver-12) or 3 (DPM-Solver-23)")
        check_number("rtol", self.rtol, low=0)
        check_number("atol", self.atol, low=0)
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol=0 and atol=0: at least one tolerance must be > 0")
        check_number("h_init", self.h_init, low=0, low_open=True)
        for name in ("pcoeff", "icoeff", "dcoeff"):
            check_number(name, getattr(self, name))
        check_number("accept_safety", self.accept_safety, low=0, low_open=True)


class DPMAdaptiveScheduler(KSamplerScheduler):
    """"DPM adaptive" (module docstring): the model calls are decided as the sampling goes."""

    Config = DPMAdaptiveConfig

    def set_timesteps(self, num_inference_steps, device=None):
        """Start over: the first trial step from sigma_max (num_inference_steps is checked but not used)."""
        c = self.config
        self.num_inference_steps = self._check_steps(num_inference_steps)
        sigma_min, sigma_max = float(self.sigmas_table[0]), float(self.sigmas_table.max())
        self.sigmas = numpy.array([sigma_max, sigma_min])
        self.lam_s, self.lam_end = lam(sigma_max), lam(sigma_min)
        self.pid = PIDStepSizeController(abs(c.h_init), c.pcoeff, c.icoeff, c.dcoeff, 1.5 if c.eta else c.order,
                                         c.accept_safety)
        self.info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        self.trials = []  # per trial: lambda_s, lambda_t, error E, the next h, accepted
        self.timesteps, self.call_sigmas, self.call_stages = [], [], []
        self.sample, self.x_prev, self.eps = None, None, []
        self._reset_step_index()
        self._plan_trial()

    def _plan_trial(self):
        """Append the next trial's model calls: lambda_t = min(lambda_end, lambda_s + h) (or the ancestral target with
        eta > 0), calls at lambda_s and at the stage fractions of the step (1/3, 2/3 for order 3; 1/2 for order 2)."""
        c = self.config
        lam_t = min(self.lam_end, self.lam_s + self.pid.h)
        target, sigma_up = lam_t, 0.0
        if c.eta:
            sigma_down, _ = ancestral_split(sigma_of(self.lam_s), sigma_of(lam_t), c.eta)
            target = min(self.lam_end, lam(sigma_down))
            sigma_up = (sigma_of(lam_t) ** 2 - sigma_of(target) ** 2) ** 0.5
        self.trial = {"lam_t": lam_t, "target": target, "sigma_up": sigma_up}
        fractions = (0.0, 1 / 3, 2 / 3) if c.order == 3 else (0.0, 1 / 2)
        sigmas = [sigma_of(self.lam_s + r * (target - self.lam_s)) for r in fractions]
        timesteps = self._table(schedule.sigma_to_t(sigmas, numpy.log(self.sigmas_table)))
        self.timesteps.extend(timesteps)
        self.call_sigmas.extend(sigmas)
        self.call_stages.extend(range(len(sigmas)))

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        return super().index_for_timestep(timestep, numpy.asarray(self.timesteps))

    def set_begin_index(self, begin_index: int = 0):
        if begin_index:
            raise ValueError(f"{type(self).__name__}: img2img (strength < 1) is not implemented: its steps are chosen "
                             "as it goes")
        super().set_begin_index(begin_index)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One model call of a trial step: returns where the model is called next; after the trial's last call,
        accepts or rejects it (module docstring), returns x (moved on, or not), and plans the next trial unless
        sigma_min is reached."""
        self._locate_step(timestep)
        c = self.config
        x0 = self._x0(model_output, sample)
        if self.call_stages[self._step_index] == 0:
            self.sample, self.eps = sample, []
            if self.x_prev is None:
                self.x_prev = sample
        self.eps.append((sample - x0) / float(self.call_sigmas[self._step_index]))
        self._step_index += 1
        x, lam_s, target = self.sample, self.lam_s, self.trial["target"]
        if len(self.eps) < c.order:  # to the next model call of this trial
            r = (1 / 3, 2 / 3) if c.order == 3 else (1 / 2,)
            return self._output(return_dict, singlestep_stage(x, self.eps, lam_s, target, c.order, r), x0)
        if c.order == 3:  # the embedded pair: DPM-Solver-2 (r1 = 1/3) and DPM-Solver-3
            x_low = singlestep_stage(x, self.eps[:2], lam_s, target, 2, (1 / 3,))
            x_high = singlestep_stage(x, self.eps, lam_s, target, 3, (1 / 3, 2 / 3))
        else:  # DPM-Solver-1 and DPM-Solver-2 (r1 = 1/2)
            x_low = singlestep_stage(x, self.eps[:1], lam_s, target, 1, ())
            x_high = singlestep_stage(x, self.eps, lam_s, target, 2, (1 / 2,))
        error = embedded_error(x_low, x_high, self.x_prev, c.rtol, c.atol)
        accept = self.pid.propose_step(error)
        self.trials.append({"lam_s": lam_s, "lam_t": self.trial["lam_t"], "error": error, "h": self.pid.h,
                            "accepted": accept})
        if accept:
            self.x_prev = x_low
            x = x_high
            if c.eta:
                z = self._noise(x, generator, sigma_of(lam_s), sigma_of(self.trial["lam_t"]))
                x = x + z * (self.trial["sigma_up"] * c.s_noise)
            self.lam_s = self.trial["lam_t"]
            self.info["n_accept"] += 1
        else:
            self.info["n_reject"] += 1
        self.info["nfe"] += c.order
        self.info["steps"] += 1
        self.last_error, self.sample, self.eps = error, None, []
        if self.lam_s < self.lam_end - 1e-5:
            self._plan_trial()
        return self._output(return_dict, x, x0)
