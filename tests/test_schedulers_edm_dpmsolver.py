"""EDMDPMSolverMultistepScheduler against diffusers step by step on a hypothesis grid of configs (orders 1-3,
DPM-Solver++ and its SDE variant with the same noise, midpoint / heun, Karras / exponential sigmas, thresholding,
img2img starts): float64 on both sides (tests/test_schedulers.float64_reference) to 1e-10 relative;
table_dtype="float32" against diffusers as installed at float32 precision."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.test_schedulers import (FLOAT64_REL, MODULES, _thresholding, float64_reference, rel_err, run_diffusers,
                                   run_refldm)

NAME = "EDMDPMSolverMultistepScheduler"
MODULES.setdefault(NAME, "scheduling_edm_dpmsolver_multistep")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@st.composite
def cases(draw):
    config = {
        "sigma_min": draw(st.sampled_from([0.002, 0.0292])), "sigma_max": draw(st.sampled_from([80.0, 14.6])),
        "sigma_data": draw(st.sampled_from([0.5, 1.0])),
        "sigma_schedule": draw(st.sampled_from(["karras", "exponential"])),
        "prediction_type": draw(st.sampled_from(["epsilon", "v_prediction"])),
        "rho": draw(st.sampled_from([7.0, 3.0])),
        "solver_order": draw(st.sampled_from([1, 2, 2, 3])),
        "algorithm_type": draw(st.sampled_from(["dpmsolver++", "sde-dpmsolver++"])),
        "solver_type": draw(st.sampled_from(["midpoint", "heun"])),
        "lower_order_final": draw(st.booleans()), "euler_at_final": draw(st.booleans()),
        "final_sigmas_type": draw(st.sampled_from(["zero", "sigma_min"])),
    }
    config.update(_thresholding(draw))
    if config["algorithm_type"] == "sde-dpmsolver++" and config["solver_order"] == 3:
        config["solver_order"] = 2  # no third-order SDE step in diffusers
    steps = draw(st.integers(1, 30))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_edm_dpmsolver_agrees_with_float64_diffusers(case):
    config, steps, seed, strength = case
    with float64_reference(NAME):
        ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength)
    # a zero-length last step (sigma_min to sigma_min) divides 0/0 in diffusers' higher orders: not compared
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength)
    # timesteps are log(sigma) / 4: torch's and NumPy's float64 log may differ in the last bit
    for a, b in ((ours.timesteps, ref.timesteps), (our_timesteps, ref_timesteps)):
        numpy.testing.assert_allclose(numpy.asarray(a, numpy.float64), b.numpy(), rtol=1e-12, atol=1e-12)
    assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


@pytest.mark.parametrize("config", [{}, {"sigma_schedule": "exponential", "solver_order": 3},
                                    {"prediction_type": "v_prediction", "algorithm_type": "sde-dpmsolver++",
                                     "solver_type": "heun"}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers evaluates the ramp and the Karras formula in float32 (torch's default dtype) and its step
    coefficients as 0-d float32 tensors; table_dtype="float32" rounds the same way (torch's float32 pow / exp /
    log are not correctly rounded, NumPy's are: a float32 ulp or two per sigma)."""
    _, ref_t, ref = run_diffusers(NAME, config, 20, 0, dtype="float32")
    ours, our_t, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    numpy.testing.assert_allclose(our_t, ref_t.numpy(), rtol=1e-5, atol=1e-6)
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_refuses_what_it_does_not_implement_in_one_line():
    with pytest.raises(ConfigError, match="prediction_type='sample' is not supported"):
        rs.EDMDPMSolverMultistepScheduler(prediction_type="sample")
    with pytest.raises(ConfigError, match="algorithm_type='sde-dpmsolver\\+\\+' has no third-order step"):
        rs.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    assert isinstance(rs.get_scheduler("EDMDPMSolverMultistepScheduler"), rs.EDMDPMSolverMultistepScheduler)


@pytest.mark.parametrize("table_dtype", ["float32", "float64"])
@pytest.mark.parametrize("sigma_min", [0.002, 0.0292, 0.5])
def test_sde_last_step_from_sigma_min_to_sigma_min_is_zero_length(sigma_min, table_dtype):
    """With final_sigmas_type="sigma_min" the last step goes from the ramp's end, sigma_min by the Karras formula,
    to sigma_min: zero length in exact arithmetic. Rounding (here the float32 Karras formula) leaves the first
    sigma a hair below the second, h < 0, where the SDE noise scale sqrt(1 - e^{-2h}) is undefined: this was a bare
    "math domain error". diffusers gives NaN for sigma_min 0.0292 and 0.5 and a finite x for 0.002 (its float32
    logs of the two sigmas round to one value). refldm's step leaves x unchanged (dpmsolver.step_length); where
the rounding goes the other way (h a hair above 0) the step is taken and barely moves x."""
    config = {"algorithm_type": "sde-dpmsolver++", "sigma_min": sigma_min, "final_sigmas_type": "sigma_min",
              "table_dtype": table_dtype}
    scheduler, _, trajectory = run_refldm(NAME, config, 10, 0, dtype=table_dtype)
    assert abs(scheduler.sigmas[-2] - scheduler.sigmas[-1]) <= 1e-6 * sigma_min  # the zero-length step
    assert all(numpy.isfinite(x).all() for x in trajectory)
    assert rel_err(trajectory[-1], trajectory[-2]) <= 1e-6  # unchanged where h rounds below 0, else barely moved


def test_sde_last_step_agrees_with_diffusers_where_diffusers_is_finite():
    """sigma_min=0.002 (diffusers' default), float32 tables: the whole trajectory as diffusers', at float32
    precision (diffusers' last step multiplies x by sigma_t / sigma_s = 1 + 2.4e-7 where refldm keeps x)."""
    config = {"algorithm_type": "sde-dpmsolver++", "final_sigmas_type": "sigma_min"}
    _, _, ref = run_diffusers(NAME, config, 10, 0, dtype="float32")
    _, _, ours = run_refldm(NAME, {**config, "table_dtype": "float32"}, 10, 0, dtype="float32")
    assert numpy.isfinite(ref[-1]).all()
    assert max(rel_err(a, b) for a, b in zip(ours, ref)) <= 1e-5
