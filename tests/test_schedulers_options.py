"""Schedule options beyond the hypothesis grids of test_schedulers.py: custom set_timesteps(timesteps=...) /
(sigmas=...) against diffusers (float64 reference, relative 1e-10), the error for a timestep not in the schedule,
and the bad input each option refuses in one line."""

from __future__ import annotations

import inspect

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from refldm.core.random import Generator
from tests.conftest import require
from tests.test_schedulers import FLOAT64_REL, float64_reference, rel_err, synthetic_model

CUSTOM = {  # scheduler -> the custom lists diffusers' set_timesteps accepts
    "EulerDiscreteScheduler": ("timesteps", "sigmas"),
    "HeunDiscreteScheduler": ("timesteps",),
    "DPMSolverMultistepScheduler": ("timesteps",),
    "DDPMScheduler": ("timesteps",),
}


def _trajectory(scheduler, x, lib):
    """The synthetic model's trajectory; stochastic steps draw from seed 0 (torch's generator or refldm's,
    which give the same numbers)."""
    if lib == "torch":
        import torch

        generator = torch.Generator().manual_seed(0)
    else:
        generator = Generator(0)
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    out = []
    for t in scheduler.timesteps:
        model_output = synthetic_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, **kwargs).prev_sample
        out.append(x.numpy().copy() if lib == "torch" else numpy.asarray(x).copy())
    return out


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(CUSTOM)), data=st.data())
def test_custom_timesteps_and_sigmas_agree_with_diffusers(name, data):
    """A custom list (drawn: a subset of the training timesteps, or of a Karras sigma grid) gives diffusers'
    timesteps, sigmas and trajectory (float64 reference, relative 1e-10)."""
    torch = require("torch")
    diffusers = require("diffusers")
    kind = data.draw(st.sampled_from(CUSTOM[name]))
    config = {"beta_schedule": data.draw(st.sampled_from(["linear", "scaled_linear"])),
              "prediction_type": data.draw(st.sampled_from(["epsilon", "v_prediction"]))}
    if name == "DDPMScheduler":
        config["clip_sample"] = False
    if kind == "timesteps":
        chosen = data.draw(st.lists(st.integers(0, 999), min_size=2, max_size=20, unique=True))
        kwargs = {"timesteps": sorted(chosen, reverse=True)}
    else:
        n = data.draw(st.integers(2, 20))
        sigmas = rs.EulerDiscreteScheduler(**config, use_karras_sigmas=True)
        sigmas.set_timesteps(n)
        kwargs = {"sigmas": [float(s) for s in sigmas.sigmas]}
    x = numpy.random.default_rng(0).standard_normal((1, 2, 3, 3))
    with float64_reference(name):
        ref = getattr(diffusers, name).from_config(config)
        ref.set_timesteps(**kwargs)
        ref_traj = _trajectory(ref, torch.from_numpy(x) * float(ref.init_noise_sigma), "torch")
    ours = getattr(rs, name).from_config(config)
    ours.set_timesteps(**kwargs)
    numpy.testing.assert_allclose(numpy.asarray(ours.timesteps, numpy.float64), ref.timesteps.numpy(), rtol=1e-12)
    if hasattr(ref, "sigmas") and name != "DDPMScheduler":
        assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    our_traj = _trajectory(ours, x * float(ours.init_noise_sigma), "numpy")
    assert len(our_traj) == len(ref_traj)
    assert max(rel_err(a, b) for a, b in zip(our_traj, ref_traj)) <= FLOAT64_REL


def test_custom_timesteps_equal_the_spaced_schedule_they_copy():
    """diffusers' test_custom_timesteps idea: set_timesteps(timesteps=s.timesteps) reproduces s's run."""
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        a, b = getattr(rs, name)(), getattr(rs, name)()
        a.set_timesteps(12)
        b.set_timesteps(timesteps=list(a.timesteps))
        x = numpy.random.default_rng(1).standard_normal((1, 2, 2, 2))
        assert rel_err(_trajectory(a, x, "numpy")[-1], _trajectory(b, x, "numpy")[-1]) <= 1e-12


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_timestep_not_in_the_schedule_is_an_error_not_the_last_step(name):
    """diffusers treats an unknown timestep as the last step; refldm refuses it (issue 15, item 7)."""
    scheduler = getattr(rs, name)()
    scheduler.set_timesteps(10)
    x = numpy.zeros((1, 1, 2, 2))
    with pytest.raises(ValueError, match=f"{name}: timestep 12 is not one of scheduler.timesteps"):
        scheduler.step(x, 12, x)
    with pytest.raises(ValueError, match="is not one of scheduler.timesteps"):
        scheduler.add_noise(x, x, numpy.array([13]))


@pytest.mark.parametrize("name,kwargs,message", [
    ("EulerDiscreteScheduler", {"timesteps": [10, 20]}, "strictly decreasing"),
    ("EulerDiscreteScheduler", {"timesteps": [1000, 20]}, r"in \[0, 999\]"),
    ("EulerDiscreteScheduler", {"timesteps": [20, -1]}, r"in \[0, 999\]"),
    ("EulerDiscreteScheduler", {"sigmas": [3.0, float("nan"), 0.0]}, "finite numbers >= 0"),
    ("EulerDiscreteScheduler", {"sigmas": [1.0, 2.0, 0.0]}, "decreasing"),
    ("EulerDiscreteScheduler", {"num_inference_steps": 5, "sigmas": [1.0, 0.0]}, "exactly one"),
    ("HeunDiscreteScheduler", {"timesteps": [5, 5]}, "strictly decreasing"),
    ("DPMSolverMultistepScheduler", {"timesteps": [500.5, 20]}, "integers"),
    ("DPMSolverMultistepScheduler", {"timesteps": []}, "non-empty"),
])
def test_bad_custom_schedules_are_one_clear_line(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(rs, name)().set_timesteps(**kwargs)


def test_custom_timesteps_with_a_sigma_grid_are_refused():
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        with pytest.raises(ValueError, match=f"cannot be used with {key}=True"):
            rs.EulerDiscreteScheduler(**{key: True}).set_timesteps(timesteps=[500, 100])
    with pytest.raises(ValueError, match="use_lu_lambdas=True"):
        rs.DPMSolverMultistepScheduler(use_lu_lambdas=True).set_timesteps(timesteps=[500, 100])


def test_options_diffusers_refuses_are_refused():
    with pytest.raises(ConfigError, match="interpolation_type='cubic'"):
        rs.EulerDiscreteScheduler(interpolation_type="cubic")
    with pytest.raises(ConfigError, match="use_exponential_sigmas=True and use_beta_sigmas=True"):
        rs.HeunDiscreteScheduler(use_exponential_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ConfigError, match="no third-order step"):
        rs.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    with pytest.raises(ConfigError, match="timestep_type='continuous' is not implemented"):
        rs.EulerDiscreteScheduler(timestep_type="continuous")


@pytest.mark.parametrize("table_dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,config", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "use_karras_sigmas": True}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "sigma_min": 0.5}),
])
def test_sde_solvers_take_the_zero_length_last_step_of_a_grid_ending_on_sigma_min(name, config, table_dtype):
    """final_sigmas_type="sigma_min" after a grid that ends on sigma_min: the last step has h = 0 in exact
    arithmetic and h a hair below 0 after rounding, where sqrt(1 - e^{-2h}) was a bare "math domain error" (float64
    Karras / Lu grids, float32 EDM ramps). It now leaves x (almost: h may round above 0) unchanged."""
    scheduler = getattr(rs, name)(**config, final_sigmas_type="sigma_min", table_dtype=table_dtype)
    scheduler.set_timesteps(5)
    x = numpy.random.default_rng(0).standard_normal((1, 2, 3, 3)) * float(scheduler.init_noise_sigma)
    trajectory = _trajectory(scheduler, x, "numpy")
    assert all(numpy.isfinite(t).all() for t in trajectory)
    assert rel_err(trajectory[-1], trajectory[-2]) <= 1e-6
