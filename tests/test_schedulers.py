"""Schedulers: agreement with diffusers (timesteps, sigmas, whole trajectories, img2img starts), properties of the
schedule, and refusal of bad input.

Precision of the reference. diffusers builds betas/alphas_cumprod/sigmas in float32, computes some step
coefficients in float32 (0-d float32 tables, `sample.to(torch.float32)` in Euler and DPM-Solver, int
timestep * float scaling in LCM) and rounds fractional timesteps to float32. refldm keeps float64 throughout.
So the tests compare two ways:

* against diffusers as installed, at the precision it really has: integer timesteps exactly, fractional
  timesteps and sigmas to float32 rounding (relative 1e-5: a float32 cumprod over 1000 steps);
* against diffusers made honest in float64 (`float64_reference`: inside the diffusers scheduler module,
  `torch.float32`/`np.float32` name float64 and torch's default dtype is float64, so every table and step
  coefficient is computed in float64 by diffusers' own code): timesteps exactly, sigmas and whole trajectories
  to relative 1e-10. The one exception kept at float32 is DPM-Solver's SDE noise, which diffusers always draws
  as float32 numbers; refldm draws the same float32 numbers (see refldm/schedulers/dpmsolver.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import math

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import backend
from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from refldm.core.random import Generator
from refldm.pipelines.sampling import img2img_latents, img2img_timesteps
from refldm.schedulers import schedule
from refldm.schedulers.prediction import eps_from_v, v_from_x0_eps, x0_from_eps, x0_from_v
from tests.conftest import require

NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
         "UniPCMultistepScheduler", "LCMScheduler"]
MODULES = {
    "DDPMScheduler": "scheduling_ddpm", "DDIMScheduler": "scheduling_ddim", "PNDMScheduler": "scheduling_pndm",
    "LMSDiscreteScheduler": "scheduling_lms_discrete", "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "HeunDiscreteScheduler": "scheduling_heun_discrete",
    "DPMSolverMultistepScheduler": "scheduling_dpmsolver_multistep",
    "UniPCMultistepScheduler": "scheduling_unipc_multistep", "LCMScheduler": "scheduling_lcm",
    "KDPM2DiscreteScheduler": "scheduling_k_dpm_2_discrete"}
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"}

FLOAT64_REL = 1e-10  # float64 agreement (common brief)


def rel_err(a, b):
    a, b = numpy.asarray(a, numpy.float64), numpy.asarray(b, numpy.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(a - b)) / max(numpy.max(numpy.abs(b)), 1e-300))


# ------------------------------------------------------------------------------------------------------
# diffusers, made honest in float64
# ------------------------------------------------------------------------------------------------------

class _Float64Alias:
    """A module proxy whose `float32` is float64 (everything else is the real module)."""

    def __init__(self, module, float64):
        self._module, self.float32 = module, float64

    def __getattr__(self, name):
        return getattr(self._module, name)


@contextlib.contextmanager
def float64_reference(name):
    """Inside diffusers' module for scheduler `name`: torch.float32 / np.float32 mean float64 and torch's default
    dtype is float64, so diffusers' own code builds every table and coefficient in float64. DPM-Solver's SDE
    noise stays float32 numbers (cast to float64), because that is which random numbers diffusers uses."""
    torch = require("torch")
    module = importlib.import_module("diffusers.schedulers." + MODULES[name])
    saved = {k: getattr(module, k) for k in ("torch", "np", "randn_tensor") if hasattr(module, k)}
    module.torch = _Float64Alias(torch, torch.float64)
    module.np = _Float64Alias(numpy, numpy.float64)
    if name == "DPMSolverMultistepScheduler":
        real = saved["randn_tensor"]
        module.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: real(
            shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with numpy2_tensor_protocol():
            yield
    finally:
        torch.set_default_dtype(default)
        for k, v in saved.items():
            setattr(module, k, v)


@contextlib.contextmanager
def numpy2_tensor_protocol():
    """Give torch tensors NumPy 2's array-protocol signatures while a diffusers reference runs.

    diffusers' KDPM2 (and its ancestral twin) hands torch tensors to NumPy functions: ``np.log(np.maximum(sigma,
    1e-10))`` in ``_sigma_to_t``, once per interpolated sigma, and ``np.array(tensor)`` in set_timesteps. NumPy 2 calls
    ``tensor.__array_wrap__(array, context, return_scalar)`` and ``tensor.__array__(dtype, copy=...)``; torch's
    methods take ``(array)`` and ``(dtype)`` only, so NumPy retries the old call and emits a DeprecationWarning each
    time: ~2,000 per KDPM2 construction (its constructor plans 1,000 steps), 183,720 in test_schedulers_kdpm2.py.
    Here the two methods accept NumPy 2's arguments and call torch's own with what torch takes (the copy NumPy asks
    for is made here), which is what NumPy's fallback does: the same arrays, without the warnings."""
    torch = require("torch")
    tensor = torch.Tensor
    saved = {k: tensor.__dict__[k] for k in ("__array_wrap__", "__array__") if k in tensor.__dict__}
    wrap, to_array = tensor.__array_wrap__, tensor.__array__

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return wrap(self, array)

    def __array__(self, dtype=None, copy=None):
        array = to_array(self, dtype)
        return array.copy() if copy else array

    tensor.__array_wrap__, tensor.__array__ = __array_wrap__, __array__
    try:
        yield
    finally:
        for k in ("__array_wrap__", "__array__"):
            if k in saved:
                setattr(tensor, k, saved[k])
            else:
                delattr(tensor, k)


def with_numpy2_tensor_protocol(test):
    """Decorator: run a test that drives diffusers schedulers inside numpy2_tensor_protocol()."""
    @functools.wraps(test)
    def wrapped(*args, **kwargs):
        with numpy2_tensor_protocol():
            return test(*args, **kwargs)
    return wrapped


def synthetic_model(x, t):
    """A deterministic stand-in for the U-Net: eps = 0.1 x + sin(t) (works on torch and NumPy alike)."""
    return 0.1 * x + math.sin(float(t))


def _step_kwargs(fn, extra, generator):
    kwargs = {k: v for k, v in extra.items() if k in inspect.signature(fn).parameters}
    if "generator" in inspect.signature(fn).parameters:
        kwargs["generator"] = generator
    return kwargs


def run_diffusers(name, config, steps, seed, strength=None, step_kwargs=None, dtype="float64"):
    """Trajectory of diffusers' scheduler on the synthetic model; img2img start for `strength` as its pipelines."""
    with numpy2_tensor_protocol():
        return _run_diffusers(name, config, steps, seed, strength, step_kwargs, dtype)


def _run_diffusers(name, config, steps, seed, strength, step_kwargs, dtype):
    torch = require("torch")
    diffusers = require("diffusers")
    from diffusers.utils.torch_utils import randn_tensor
    scheduler = getattr(diffusers, name).from_config(config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(numpy.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(dtype))
    timesteps = scheduler.timesteps
    if strength is None:
        x = x0 * scheduler.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        noise = randn_tensor(x0.shape, generator=generator, dtype=x0.dtype)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0])) if len(timesteps) else x0
    trajectory = [x.numpy().copy()]
    for t in timesteps:
        out = synthetic_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **_step_kwargs(scheduler.step, step_kwargs or {}, generator)).prev_sample
        trajectory.append(x.numpy().copy())
    return scheduler, timesteps, trajectory


def run_refldm(name, config, steps, seed, strength=None, step_kwargs=None, dtype="float64"):
    scheduler = getattr(rs, name).from_config(config)
    scheduler.set_timesteps(steps)
    generator = Generator(seed)
    x0 = backend.asarray(numpy.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(dtype))
    timesteps = scheduler.timesteps
    if strength is None:
        x = x0 * scheduler.init_noise_sigma
    else:
        timesteps, _ = img2img_timesteps(scheduler, steps, strength)
        x = img2img_latents(scheduler, x0, timesteps, generator=generator)
    trajectory = [backend.to_numpy(x).copy()]
    for t in timesteps:
        out = synthetic_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **_step_kwargs(scheduler.step, step_kwargs or {}, generator)).prev_sample
        trajectory.append(backend.to_numpy(x).copy())
    return scheduler, timesteps, trajectory


# ------------------------------------------------------------------------------------------------------
# Config grids (hypothesis)
# ------------------------------------------------------------------------------------------------------

def _common(draw, prediction_types=("epsilon", "v_prediction", "sample"), rescale=False):
    start, end = draw(st.sampled_from([(0.0001, 0.02), (0.00085, 0.012)]))
    config = {
        "num_train_timesteps": draw(st.sampled_from([1000, 1000, 200])),
        "beta_start": start, "beta_end": end,
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        "prediction_type": draw(st.sampled_from(prediction_types)),
        "timestep_spacing": draw(st.sampled_from(["linspace", "leading", "trailing"])),
        "steps_offset": draw(st.sampled_from([0, 1])),
    }
    if rescale:
        config["rescale_betas_zero_snr"] = draw(st.booleans())
    return config


def _thresholding(draw):
    """Dynamic thresholding (off, or on with a ratio/limit that clips some x_0 values of the synthetic model)."""
    if not draw(st.booleans()):
        return {}
    return {"thresholding": True, "dynamic_thresholding_ratio": draw(st.sampled_from([0.995, 0.87])),
            "sample_max_value": draw(st.sampled_from([1.0, 1.5, 3.0]))}


def _grid(draw):
    """At most one of the sigma grids (Karras, exponential, beta)."""
    grid = draw(st.sampled_from([None, None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]))
    return {grid: True} if grid else {}


@st.composite
def configs(draw, name):
    """A diffusers config for scheduler `name`, drawn over the options refldm implements."""
    if name == "DDPMScheduler":
        c = _common(draw, rescale=True)
        c.update(clip_sample=draw(st.booleans()),
                 variance_type=draw(st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large"])))
        c.update(_thresholding(draw))
    elif name == "DDIMScheduler":
        c = _common(draw, rescale=True)
        c.update(clip_sample=draw(st.booleans()), set_alpha_to_one=draw(st.booleans()))
        c.update(_thresholding(draw))
    elif name == "PNDMScheduler":
        c = _common(draw, ("epsilon", "v_prediction"))
        c.update(skip_prk_steps=draw(st.booleans()), set_alpha_to_one=draw(st.booleans()))
    elif name == "LMSDiscreteScheduler":
        c = _common(draw)
        c.update(_grid(draw))
    elif name == "EulerDiscreteScheduler":
        c = _common(draw, rescale=True)
        c.update(_grid(draw), final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
                 interpolation_type=draw(st.sampled_from(["linear", "linear", "log_linear"])))
    elif name == "EulerAncestralDiscreteScheduler":
        c = _common(draw, ("epsilon", "v_prediction"), rescale=True)
    elif name == "KDPM2DiscreteScheduler":
        c = _common(draw, ("epsilon", "v_prediction"))
        c.update(_grid(draw))
    elif name == "HeunDiscreteScheduler":
        c = _common(draw)
        c.update(_grid(draw), clip_sample=draw(st.booleans()))
    elif name == "DPMSolverMultistepScheduler":
        c = _common(draw, rescale=True)
        c.update(solver_order=draw(st.sampled_from([1, 2, 2, 3])),
                 algorithm_type=draw(st.sampled_from(["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"])),
                 solver_type=draw(st.sampled_from(["midpoint", "heun"])),
                 lower_order_final=draw(st.booleans()), euler_at_final=draw(st.booleans()),
                 final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])))
        grid = draw(st.sampled_from([None, None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                     "use_lu_lambdas"]))
        if grid:
            c[grid] = True
        c.update(_thresholding(draw))
        if c["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
            c["final_sigmas_type"] = "sigma_min"  # diffusers refuses "zero" for the noise-prediction solvers
        if c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3:
            c["solver_order"] = 2  # no third-order SDE-DPM-Solver in diffusers
    elif name == "UniPCMultistepScheduler":
        c = _common(draw, rescale=True)
        c.update(solver_order=draw(st.sampled_from([1, 2, 2, 3])), predict_x0=draw(st.booleans()),
                 solver_type=draw(st.sampled_from(["bh1", "bh2"])), lower_order_final=draw(st.booleans()),
                 final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])),
                 disable_corrector=draw(st.sampled_from([[], [0], [1, 2]])))
        grid = draw(st.sampled_from([None, None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]))
        if grid:
            c[grid] = True
        c.update(_thresholding(draw))
        # without lower_order_final a higher-order last step divides by h = inf (sigma = 0): NaN in diffusers too
        assume(c["lower_order_final"] or c["final_sigmas_type"] == "sigma_min")
    else:  # LCMScheduler
        c = _common(draw, rescale=True)
        c.update(clip_sample=draw(st.booleans()), set_alpha_to_one=draw(st.booleans()),
                 original_inference_steps=draw(st.sampled_from([50, 50, 20])))
        c.update(_thresholding(draw))
    if c.get("rescale_betas_zero_snr") and name in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler"):
        c["prediction_type"] = "v_prediction"  # zero terminal SNR needs v-prediction (Lin et al. 2023); eps divides by 0
    return c


def _steps(draw, name, config):
    hi = min(50, config.get("original_inference_steps", 50)) if name == "LCMScheduler" else 50
    lo = 4 if name == "PNDMScheduler" and not config.get("skip_prk_steps") else 1
    return draw(st.integers(lo, hi))


@st.composite
def cases(draw, name):
    config = draw(configs(name))
    steps = _steps(draw, name, config)
    strength = draw(st.sampled_from([None, None, None, 0.3, 0.75, 1.0]))
    step_kwargs = {}
    if name == "DDIMScheduler":
        step_kwargs["eta"] = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))
    if name == "EulerDiscreteScheduler":
        step_kwargs["s_churn"] = draw(st.sampled_from([0.0, 0.0, 1.0]))
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength, step_kwargs


# ------------------------------------------------------------------------------------------------------
# Agreement with diffusers
# ------------------------------------------------------------------------------------------------------

def expect_repeated_first_timestep(name, config, steps, seed, strength=None, step_kwargs=None, error=None):
    """The one way diffusers' reference run is known to fail on these grids, checked rather than skipped.

    diffusers' index rule (`_init_step_index` takes the *second* match of a timestep that occurs twice) skips
    a step and then runs past the end of the schedule when rounded Karras timesteps repeat the first
    timestep of the run: an IndexError on its tables, or (UniPC) its assertion that the order is positive.
    refldm keeps diffusers' rule, so it must run past the end too. This asserts that the schedule really
    does repeat its first timestep and that refldm fails there as well (IndexError or AssertionError):
    any other failure of the reference, or a refldm that quietly differs, fails the test."""
    scheduler = getattr(rs, name).from_config(config)
    scheduler.set_timesteps(steps)
    timesteps = numpy.asarray(scheduler.timesteps)
    assert numpy.count_nonzero(timesteps == timesteps[0]) > 1, \
        f"diffusers' reference run raised {error!r}, but the first timestep {timesteps[0]} occurs once"
    with pytest.raises((IndexError, AssertionError)):
        run_refldm(name, config, steps, seed, strength, step_kwargs)


def _agreement(name, case):
    config, steps, seed, strength, step_kwargs = case
    try:
        with float64_reference(name):
            ref, ref_timesteps, ref_traj = run_diffusers(name, config, steps, seed, strength, step_kwargs)
    except (AssertionError, IndexError) as error:
        # diffusers fails when rounded Karras timesteps repeat the first one (its index rule then skips a step)
        expect_repeated_first_timestep(name, config, steps, seed, strength, step_kwargs, error)
        return
    # a zero-length last step (Karras sigmas ending on sigma_min, sigma_min) divides 0/0 in diffusers' higher-order
    # formulas; refldm leaves x unchanged there (the exact solution), so such reference runs are not compared
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours, our_timesteps, our_traj = run_refldm(name, config, steps, seed, strength, step_kwargs)
    # timesteps and sigmas: exactly (timesteps) and to float64 rounding (sigmas) vs. the float64 reference
    # timesteps interpolated from sigmas (Karras) may differ in the last bit; all others are equal
    grids = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
    # (and DPM2's midpoint timesteps, mapped back from sigma_mid the same way)
    tol = 1e-12 if any(config.get(k) for k in grids) or name == "KDPM2DiscreteScheduler" else 0
    for a, b in ((ours.timesteps, ref.timesteps), (our_timesteps, ref_timesteps)):
        numpy.testing.assert_allclose(numpy.asarray(a, numpy.float64), b.numpy(), rtol=tol, atol=1000 * tol)
    if hasattr(ref, "sigmas"):
        assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=FLOAT64_REL)
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"
    return worst


def _timesteps_vs_installed(name, case):
    """refldm's float64 schedule against diffusers as installed, at the precision diffusers has: its alphas_cumprod
    is a float32 cumprod (absolute error up to ~5e-7, measured), so sigmas are compared as abar = 1/(1 + sigma^2)
    to 1e-6 absolute (sigma itself loses relative precision where 1 - abar cancels); fractional timesteps are
    float32-rounded (|dt| <= 1e-4), or interpolated in that float32 log-sigma table for Karras sigmas (|dt| <= 0.1,
    and a Karras timestep rounded to an integer may fall on the other side of .5: |dt| <= 1); Karras sigmas
    inherit the relative error of diffusers' float32 sigma_min, up to ~3e-4 (rtol 1e-3)."""
    diffusers = require("diffusers")
    config, steps, _, _, _ = case
    with numpy2_tensor_protocol():
        ref = getattr(diffusers, name).from_config(config)
        ref.set_timesteps(steps)
    ours = getattr(rs, name).from_config(config)
    ours.set_timesteps(steps)
    ref_t = ref.timesteps.numpy().astype(numpy.float64)
    our_t = numpy.asarray(ours.timesteps, numpy.float64)
    assert our_t.shape == ref_t.shape
    # a sigma grid between diffusers' float32 sigma_min and sigma_max inherits their error (1 - abar_0 cancels)
    karras = (any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                          "use_lu_lambdas")) or config.get("interpolation_type") == "log_linear")
    if karras and config.get("rescale_betas_zero_snr"):
        return  # Karras sigma_max from the rescaled float32 table: sqrt(abar) - sqrt(abar_T) cancels in float32
    if karras:  # (DPM2 rounds its float Karras timesteps: one may fall on the other side of .5)
        rounded = not ref.timesteps.dtype.is_floating_point or name == "KDPM2DiscreteScheduler"
        assert numpy.max(numpy.abs(our_t - ref_t)) <= (1.0 if rounded else 0.1)
    elif ref.timesteps.dtype.is_floating_point:
        # DPM2's midpoint timesteps are interpolated in diffusers' float32 log-sigma table, like Karras ones
        assert numpy.max(numpy.abs(our_t - ref_t)) <= (0.1 if name == "KDPM2DiscreteScheduler" else 1e-4)
    else:
        numpy.testing.assert_array_equal(our_t, ref_t)
    if hasattr(ref, "sigmas"):
        ref_sigmas = ref.sigmas.numpy().astype(numpy.float64)
        if karras:  # every Karras sigma inherits the relative error of the float32 sigma_min (1 - abar_0 cancels)
            numpy.testing.assert_allclose(ours.sigmas, ref_sigmas, rtol=1e-3, atol=0)
        else:
            assert numpy.max(numpy.abs(1 / (1 + ours.sigmas**2) - 1 / (1 + ref_sigmas**2))) <= 1e-6


EXAMPLES = {"LMSDiscreteScheduler": 50, "HeunDiscreteScheduler": 70}


def _agreement_test(name):
    @settings(max_examples=EXAMPLES.get(name, 100), deadline=None)
    @given(case=cases(name))
    def test(case):
        _agreement(name, case)
        _timesteps_vs_installed(name, case)
    test.__name__ = f"test_{name}_agrees_with_diffusers"
    return test


for _name in NAMES:
    globals()[f"test_{_name}_agrees_with_diffusers"] = _agreement_test(_name)


@pytest.mark.parametrize("name", NAMES)
def test_default_config_float32_trajectory_tracks_installed_diffusers(name):
    """refldm in float32 against diffusers as installed (float32 tables and math), 20 steps: <= 1e-4 relative.
    The differences are float32 rounding of tables built in different precisions, amplified by the sampler."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    _, _, ref_traj = run_diffusers(name, config, 20, 0, dtype="float32")
    _, _, our_traj = run_refldm(name, config, 20, 0, dtype="float32")
    assert our_traj[-1].dtype == numpy.float32
    assert rel_err(our_traj[-1], ref_traj[-1]) <= 1e-4


@pytest.mark.parametrize("name", STOCHASTIC | {"DPMSolverMultistepScheduler"})
def test_stochastic_schedulers_use_the_same_noise_as_diffusers(name):
    """Same seed, same noise: with a different seed the trajectories differ, so the noise really enters."""
    config = {"algorithm_type": "sde-dpmsolver++"} if name == "DPMSolverMultistepScheduler" else {}
    with float64_reference(name):
        _, _, ref_traj = run_diffusers(name, config, 10, 7)
    _, _, same = run_refldm(name, config, 10, 7)
    _, _, other = run_refldm(name, config, 10, 8)
    assert rel_err(same[-1], ref_traj[-1]) <= FLOAT64_REL
    assert rel_err(other[-1], ref_traj[-1]) > 1e-3


@pytest.mark.parametrize("name", NAMES)
@with_numpy2_tensor_protocol
def test_step_output_fields_and_return_dict_false_match_diffusers(name):
    """step() returns an object with .prev_sample (and .pred_original_sample / .denoised where diffusers has
    them); return_dict=False gives diffusers' tuple, in the same order."""
    torch = require("torch")
    diffusers = require("diffusers")
    ref, ours = getattr(diffusers, name)(), getattr(rs, name)()
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    x = numpy.random.default_rng(0).standard_normal((1, 2, 2, 2))
    t_ref, t_ours = ref.timesteps[0], ours.timesteps[0]
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
    ref.scale_model_input(torch.from_numpy(x), t_ref)  # diffusers' calling convention (LMS warns without it)
    ref_tuple = ref.step(torch.from_numpy(x), t_ref, torch.from_numpy(x), return_dict=False, **kwargs)
    kwargs = {"generator": Generator(0)} if takes_generator else {}
    our_tuple = ours.step(x, t_ours, x, return_dict=False, **kwargs)
    assert isinstance(our_tuple, tuple) and len(our_tuple) == len(ref_tuple)
    ours.set_timesteps(5)
    out = ours.step(x, t_ours, x, **kwargs)
    assert out.prev_sample.shape == x.shape
    for field in ("pred_original_sample", "denoised"):
        assert (getattr(out, field) is not None) == (field in _DIFFUSERS_FIELDS[name]), field


_DIFFUSERS_FIELDS = {name: ("pred_original_sample",) for name in NAMES}  # the fields of diffusers' outputs
_DIFFUSERS_FIELDS.update({"PNDMScheduler": (), "DPMSolverMultistepScheduler": (), "UniPCMultistepScheduler": (),
                          "LCMScheduler": ("denoised",)})


def test_sd15_style_config_file_round_trip(tmp_path):
    """from_pretrained reads scheduler_config.json; foreign keys (of other schedulers) are carried along unused, as
    diffusers does."""
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
              "clip_sample": False}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pndm = rs.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert pndm.config.skip_prk_steps and pndm.config.steps_offset == 1
    euler = rs.EulerDiscreteScheduler.from_config(pndm.config)  # the swap idiom
    assert euler.config.steps_offset == 1 and euler.config.beta_schedule == "scaled_linear"
    dpm = rs.get_scheduler("dpm++2m", config, use_karras_sigmas=True)
    assert isinstance(dpm, rs.DPMSolverMultistepScheduler) and dpm.config.use_karras_sigmas


# ------------------------------------------------------------------------------------------------------
# Properties of the schedule
# ------------------------------------------------------------------------------------------------------

SCHEDULES = st.sampled_from([("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012),
                             ("squaredcos_cap_v2", 0.0001, 0.02)])


@settings(max_examples=30, deadline=None)
@given(schedule_=SCHEDULES, T=st.integers(2, 2000))
def test_alphas_cumprod_is_strictly_decreasing_in_the_open_unit_interval(schedule_, T):
    kind, start, end = schedule_
    config = rs.DDIMScheduler.Config(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=kind)
    abar = schedule.alphas_cumprod_from_betas(schedule.betas_for(config))
    assert abar.dtype == numpy.float64
    assert numpy.all(abar > 0) and numpy.all(abar < 1)
    assert numpy.all(numpy.diff(abar) < 0)


def test_rescaled_betas_reach_zero_terminal_snr_and_keep_the_first_step():
    betas = schedule.scaled_linear_betas(0.00085, 0.012, 1000)
    rescaled = schedule.rescale_zero_terminal_snr(betas)
    abar, abar_new = schedule.alphas_cumprod_from_betas(betas), schedule.alphas_cumprod_from_betas(rescaled)
    assert abar_new[-1] == 0.0
    assert abar_new[0] == pytest.approx(abar[0], rel=1e-14)
    assert numpy.all(numpy.diff(abar_new) < 0)


SIGMA_SCHEDULERS = ["LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(SIGMA_SCHEDULERS), steps=st.integers(1, 50))
def test_sigmas_decrease_and_end_as_configured(data, name, steps):
    config = data.draw(configs(name))
    scheduler = getattr(rs, name).from_config(config)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas
    # Heun repeats each inner sigma, so not strictly; a Karras grid's last point (sigma_max^(1/7) + (sigma_min^(1/7)
    # - sigma_max^(1/7)))^7 can land an ulp above sigma_min, which then follows as the final sigma (so in diffusers)
    assert numpy.all(numpy.diff(sigmas) <= 4 * numpy.finfo(numpy.float64).eps * sigmas[:-1])
    final = config.get("final_sigmas_type", "zero")
    if final == "zero":
        assert sigmas[-1] == 0.0
    elif config.get("use_karras_sigmas") and name == "UniPCMultistepScheduler":
        assert sigmas[-1] == sigmas[-2]
    else:
        assert sigmas[-1] == pytest.approx(float(numpy.sqrt((1 - scheduler.alphas_cumprod[0])
                                                            / scheduler.alphas_cumprod[0])), rel=1e-15)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES))
def test_len_timesteps_equals_steps(data, name):
    """One model call per step: len(timesteps) == steps, except where the algorithm says otherwise
    (Heun: 2 calls per step but the last; PNDM: 12 Runge-Kutta calls, or one extra warm-up call with
    skip_prk_steps)."""
    config = data.draw(configs(name))
    steps = data.draw(st.integers(4 if name == "PNDMScheduler" else 1, 50))
    assume(name != "LCMScheduler" or steps <= config["original_inference_steps"])
    scheduler = getattr(rs, name).from_config(config)
    scheduler.set_timesteps(steps)
    expected = steps
    if name == "HeunDiscreteScheduler":
        expected = 2 * steps - 1
    elif name == "PNDMScheduler":
        expected = steps + 1 if config["skip_prk_steps"] else steps + 9
    assert len(scheduler.timesteps) == expected
    assert numpy.all(numpy.diff(numpy.asarray(scheduler.timesteps, numpy.float64)) <= 0) or name == "PNDMScheduler"


@settings(max_examples=40, deadline=None)
@given(schedule_=SCHEDULES, spacing=st.sampled_from(["linspace", "leading", "trailing"]), steps=st.integers(1, 50),
       set_alpha_to_one=st.booleans())
def test_ddim_with_an_oracle_x0_predictor_follows_its_closed_form(schedule_, spacing, steps, set_alpha_to_one):
    """A model that predicts the true x_0 (prediction_type="sample") keeps the DDIM sample a combination
    x = p x_0 + q eps of the true x_0 and the start noise eps, and each step maps (p, q) by scalars: with
    a, s = sqrt(abar_t), sqrt(1 - abar_t) of the step's timestep and a', s' of its previous one, the model's
    eps estimate is ((p - a) x_0 + q eps) / s, so x_prev = (a' + s' (p - a) / s) x_0 + (s' q / s) eps. Replaying
    that recurrence on scalars must give the sampler's final latent, for every spacing and final alpha. On the
    schedule's own line (p, q) = (a, s) the estimate is exact, so with "leading" spacing (where DDIM's previous
    timestep t - T//n is the next grid point) the sampler ends exactly at sqrt(abar_end) x_0 + sqrt(1 - abar_end)
    eps, and at x_0 itself with set_alpha_to_one."""
    kind, start, end = schedule_
    scheduler = rs.DDIMScheduler(beta_schedule=kind, beta_start=start, beta_end=end, timestep_spacing=spacing,
                                 prediction_type="sample", clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(steps)
    rng = numpy.random.default_rng(steps)
    x0, eps = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3))
    abar = scheduler.alphas_cumprod
    t0 = int(scheduler.timesteps[0])
    p, q = abar[t0] ** 0.5, (1 - abar[t0]) ** 0.5
    x = scheduler.add_noise(x0, eps, numpy.array([t0]))
    for t in scheduler.timesteps:
        x = scheduler.step(x0, t, x).prev_sample
        prev = int(t) - scheduler.config.num_train_timesteps // steps
        abar_prev = abar[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        a, s = abar[int(t)] ** 0.5, (1 - abar[int(t)]) ** 0.5
        a_prev, s_prev = abar_prev**0.5, (1 - abar_prev) ** 0.5
        p, q = a_prev + s_prev * (p - a) / s, s_prev * q / s
    assert rel_err(x, p * x0 + q * eps) <= 1e-9
    if spacing == "leading":
        assert rel_err(x, abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps) <= 1e-9
        if set_alpha_to_one:
            assert rel_err(x, x0) <= 1e-9


@settings(max_examples=50, deadline=None)
@given(abar=st.floats(1e-6, 1 - 1e-6), seed=st.integers(0, 2**32 - 1))
def test_v_prediction_and_epsilon_conversions_are_inverse(abar, seed):
    rng = numpy.random.default_rng(seed)
    x0, eps = rng.standard_normal(16), rng.standard_normal(16)
    a, s = abar**0.5, (1 - abar) ** 0.5
    x_t = a * x0 + s * eps
    v = v_from_x0_eps(x0, eps, a, s)
    assert rel_err(eps_from_v(x_t, v, a, s), eps) <= 1e-9
    assert rel_err(x0_from_v(x_t, v, a, s), x0) <= 1e-9
    assert rel_err(x0_from_eps(x_t, eps, a, s), x0) <= 1e-6 / a  # dividing by a small a amplifies rounding
    assert rel_err(v_from_x0_eps(x0_from_v(x_t, v, a, s), eps_from_v(x_t, v, a, s), a, s), v) <= 1e-9


# ------------------------------------------------------------------------------------------------------
# Any backend
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_trajectory_on_backend_matches_numpy(name, on_backend):
    """A float32 trajectory on the active backend (the fake device catches host/device mixing) equals NumPy's."""
    config = {"algorithm_type": "sde-dpmsolver++"} if name == "DPMSolverMultistepScheduler" else {}
    step_kwargs = {"eta": 0.5} if name == "DDIMScheduler" else {}
    _, _, on_device = run_refldm(name, config, 6, 3, strength=0.8, step_kwargs=step_kwargs, dtype="float32")
    with backend.use("numpy"):
        _, _, on_host = run_refldm(name, config, 6, 3, strength=0.8, step_kwargs=step_kwargs, dtype="float32")
    assert on_device[-1].dtype == numpy.float32
    assert rel_err(on_device[-1], on_host[-1]) <= 1e-6


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------

def test_unknown_scheduler_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; choose one of .*Euler a.*dpmpp_2m.*dpm\\+\\+2m"):
        rs.get_scheduler("eulr")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_are_refused(name, steps):
    scheduler = getattr(rs, name)()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "cosine"), ("prediction_type", "x0"), ("timestep_spacing", "even"),
    ("variance_type", "learned"), ("steps_offset", -1), ("num_train_timesteps", 1), ("table_dtype", "float16")])
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        rs.DDPMScheduler.from_config({key: value})


def test_unknown_config_key_is_an_error_but_other_schedulers_keys_are_carried_unused():
    with pytest.raises(ConfigError, match="'use_magic'"):
        rs.EulerDiscreteScheduler.from_config({"use_magic": True})
    euler = rs.EulerDiscreteScheduler.from_config({"skip_prk_steps": True, "solver_order": 3})  # foreign: carried
    assert euler.config == rs.EulerDiscreteScheduler().config
    assert rs.DPMSolverMultistepScheduler.from_config(euler.config).config.solver_order == 3
    with pytest.raises(ConfigError, match="unknown config key 'solver_order' .value 3.: a key of other diffusers"):
        rs.EulerDiscreteScheduler(solver_order=3)  # passed explicitly: refused, as diffusers' constructor does
    with pytest.raises(ConfigError, match="'solver_order'"):
        rs.EulerDiscreteScheduler.from_config({}, solver_order=3)  # an override is explicit too
    with pytest.raises(ConfigError, match="timestep_type"):  # this class's key, not implemented
        rs.EulerDiscreteScheduler.from_config({"timestep_type": "continuous"})
    with pytest.raises(ConfigError, match="algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min'"):
        rs.DPMSolverMultistepScheduler.from_config({"algorithm_type": "dpmsolver"})
    with pytest.raises(ConfigError, match="use_karras_sigmas=True and use_beta_sigmas=True"):
        rs.DPMSolverMultistepScheduler.from_config({"use_karras_sigmas": True, "use_beta_sigmas": True})
    with pytest.raises(ConfigError, match="trained_betas"):
        rs.DDIMScheduler.from_config({"trained_betas": [0.1, 0.2], "num_train_timesteps": 3})


def test_step_with_a_timestep_not_in_the_schedule_is_refused():
    scheduler = rs.EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 12.5 is not one of"):
        scheduler.step(numpy.zeros((1, 1)), 12.5, numpy.zeros((1, 1)))


def test_every_name_in_the_table_builds_and_config_is_a_dataclass():
    for key, (cls, implied) in rs.SCHEDULERS.items():
        scheduler = rs.get_scheduler(key)
        assert isinstance(scheduler, cls) and dataclasses.is_dataclass(scheduler.config)
        for k, v in implied.items():
            assert getattr(scheduler.config, k) == v
