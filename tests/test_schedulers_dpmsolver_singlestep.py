"""DPMSolverSinglestepScheduler against diffusers step by step on a hypothesis grid of configs (orders 1-3, the
three algorithm types, midpoint / heun, Karras / exponential / beta sigmas, thresholding, img2img starts): float64
on both sides (tests/test_schedulers.float64_reference) to 1e-10 relative, with the same SDE noise (refldm's
Generator(seed) draws torch.manual_seed(seed)'s numbers); table_dtype="float32" against diffusers as installed."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.test_schedulers import (FLOAT64_REL, MODULES, _common, _grid, _thresholding, expect_repeated_first_timestep,
                                   float64_reference, rel_err, run_diffusers, run_refldm)

NAME = "DPMSolverSinglestepScheduler"
MODULES.setdefault(NAME, "scheduling_dpmsolver_singlestep")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@st.composite
def cases(draw):
    config = _common(draw)
    for key in ("timestep_spacing", "steps_offset"):  # not keys of this class in diffusers (ignored by both)
        config.pop(key)
    config.update(solver_order=draw(st.sampled_from([1, 2, 2, 3])),
                  algorithm_type=draw(st.sampled_from(["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])),
                  solver_type=draw(st.sampled_from(["midpoint", "heun"])), lower_order_final=draw(st.booleans()),
                  final_sigmas_type=draw(st.sampled_from(["zero", "sigma_min"])))
    config.update(_grid(draw))
    if config["algorithm_type"] == "dpmsolver":
        config["final_sigmas_type"] = "sigma_min"  # diffusers refuses "zero" there
    else:
        config.update(_thresholding(draw))
    steps = draw(st.integers(1, 30))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_singlestep_agrees_with_float64_diffusers(case):
    config, steps, seed, strength = case
    try:
        with float64_reference(NAME):
            ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength)
    except (AssertionError, IndexError) as error:  # rounded Karras timesteps repeating the first one
        expect_repeated_first_timestep(NAME, config, steps, seed, strength, error=error)
        return
    # a zero-length step (grid sigmas repeating) divides 0/0 in diffusers' higher orders: not compared
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength)
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    numpy.testing.assert_array_equal(numpy.asarray(our_timesteps), numpy.asarray(ref_timesteps))
    assert ours.order_list == ref.order_list
    assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "use_karras_sigmas": True},
                                    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun", "prediction_type": "v_prediction"}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers' float32 tables and 0-d float32 step coefficients; refldm's float32 tables with the coefficients
    from them in float64 (as dpmsolver.py): float32 rounding of the coefficients, amplified a little by the solver."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **config}
    _, _, ref = run_diffusers(NAME, config, 20, 0, dtype="float32")
    ours, _, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_refuses_what_it_does_not_implement_in_one_line():
    with pytest.raises(ConfigError, match="use_flow_sigmas=True is not implemented"):
        rs.DPMSolverSinglestepScheduler(use_flow_sigmas=True)
    with pytest.raises(ConfigError, match="algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min'"):
        rs.DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ConfigError, match="algorithm_type='sde-dpmsolver' is not supported"):
        rs.DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver")
    scheduler = rs.DPMSolverSinglestepScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 3 is not one of"):
        scheduler.step(numpy.zeros((1, 1)), 3, numpy.zeros((1, 1)))
