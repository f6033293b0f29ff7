"""DPMSolverSDEScheduler ("DPM++ SDE") against diffusers step by step. diffusers draws its noise from torchsde's
Brownian tree, whose numbers refldm does not reproduce (torchsde is not a dependency), so:

* the deterministic parts are compared exactly: both schedulers get the same noise through their noise_sampler
  hook (set after set_timesteps, as diffusers allows), and the (sigma, sigma_next) each asks for must agree; float64
  on both sides (tests/test_schedulers.float64_reference) to 1e-10 relative, table_dtype="float32" against diffusers
  as installed at float32 precision;
* refldm's own noise (BrownianIncrements) is checked in distribution: standard normal per call, the two calls of a
  step correlated as increments of one Brownian path, steps independent.

diffusers' module imports torchsde at the top but uses it only for that Brownian tree, which these tests replace;
where torchsde is not installed a stand-in module is put in sys.modules while diffusers' module is imported."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from refldm.schedulers.dpmsolver_sde import BrownianIncrements
from tests.conftest import require
from tests.test_schedulers import FLOAT64_REL, MODULES, _common, _grid, float64_reference, rel_err, synthetic_model

NAME = "DPMSolverSDEScheduler"
MODULES.setdefault(NAME, "scheduling_dpmsolver_sde")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def diffusers_class():
    require("torch")
    require("diffusers")
    name = "diffusers.schedulers.scheduling_dpmsolver_sde"
    stub = None
    if "torchsde" not in sys.modules and importlib.util.find_spec("torchsde") is None:
        stub = sys.modules["torchsde"] = types.ModuleType("torchsde")  # never used: the noise is injected
    try:
        return importlib.import_module(name).DPMSolverSDEScheduler
    finally:
        if stub is not None:
            del sys.modules["torchsde"]


def run(scheduler, steps, seed, to_array, dtype="float64"):
    """The sampling loop with injected noise; returns the trajectory and the (sigma, sigma_next) of each draw."""
    rng = numpy.random.default_rng(seed)
    x0 = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    scheduler.set_timesteps(steps)
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return to_array(rng.standard_normal(x0.shape).astype(dtype))

    scheduler.noise_sampler = noise_sampler
    x = to_array(x0) * scheduler.init_noise_sigma
    trajectory = [numpy.asarray(x).copy()]
    for t in scheduler.timesteps:
        x = scheduler.step(synthetic_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        trajectory.append(numpy.asarray(x).copy())
    return trajectory, calls


@st.composite
def cases(draw):
    config = _common(draw, ("epsilon", "v_prediction"))  # diffusers: "sample" not implemented
    config.update(_grid(draw))
    return config, draw(st.integers(1, 25)), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_dpmpp_sde_agrees_with_float64_diffusers_given_the_same_noise(case):
    config, steps, seed = case
    torch = require("torch")
    cls = diffusers_class()
    with float64_reference(NAME):
        ref = cls.from_config(config)
        ref_traj, ref_calls = run(ref, steps, seed, torch.from_numpy)
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours = rs.DPMSolverSDEScheduler.from_config(config)
    our_traj, our_calls = run(ours, steps, seed, lambda a: a)
    # midpoint timesteps are mapped back from sigma_mid through log/exp (last-bit differences); the others equal
    numpy.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-12, atol=1e-9)
    assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    numpy.testing.assert_allclose(our_calls, ref_calls, rtol=1e-12)
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


@pytest.mark.parametrize("config", [{"beta_schedule": "scaled_linear"}, {"use_karras_sigmas": True},
                                    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers' float32 sigmas and 0-d float32 step scalars (through torch's float32 log / exp / expm1, not
    correctly rounded, against NumPy's): float32 precision."""
    torch = require("torch")
    ref_traj, _ = run(diffusers_class().from_config(config), 20, 0, torch.from_numpy, "float32")
    ours = rs.DPMSolverSDEScheduler.from_config({**config, "table_dtype": "float32"})
    our_traj, _ = run(ours, 20, 0, lambda a: a, "float32")
    assert our_traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    assert rel_err(our_traj[-1], ref_traj[-1]) <= 1e-5


def test_brownian_increments_have_the_distribution_of_a_brownian_path():
    """Two calls of one step, (2.0, 1.2) then (2.0, 0.5): each standard normal, correlation sqrt(0.8 / 1.5);
    the next step's call (0.5, 0.2) independent of both. 200 000 samples: standard error ~0.003."""
    noise = BrownianIncrements(numpy.zeros(200_000), seed=0)
    z1, z2, z3 = noise(2.0, 1.2), noise(2.0, 0.5), noise(0.5, 0.2)
    for z in (z1, z2, z3):
        assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.015
    assert abs(numpy.corrcoef(z1, z2)[0, 1] - (0.8 / 1.5) ** 0.5) < 0.015
    assert abs(numpy.corrcoef(z2, z3)[0, 1]) < 0.015 and abs(numpy.corrcoef(z1, z3)[0, 1]) < 0.015


def test_noise_sampler_seed_makes_runs_reproducible():
    def final(seed):
        scheduler = rs.DPMSolverSDEScheduler(noise_sampler_seed=seed)
        scheduler.set_timesteps(6)
        x = numpy.random.default_rng(0).standard_normal((1, 2, 3, 3)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(synthetic_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        return x
    numpy.testing.assert_array_equal(final(3), final(3))
    assert rel_err(final(3), final(4)) > 1e-3


def test_refusals_and_names():
    with pytest.raises(ConfigError, match="prediction_type='sample'"):
        rs.DPMSolverSDEScheduler(prediction_type="sample")
    assert isinstance(rs.get_scheduler("DPM++ SDE Karras"), rs.DPMSolverSDEScheduler)
    assert rs.get_scheduler("dpmpp_sde", schedule="karras").config.use_karras_sigmas
