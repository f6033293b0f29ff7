"""DEISMultistepScheduler against diffusers step by step on a hypothesis grid of configs (orders 1-3, every
timestep spacing, Karras / exponential / beta sigmas, thresholding, img2img starts): float64 on both sides
(tests/test_schedulers.float64_reference) to 1e-10 relative; table_dtype="float32" against diffusers as installed."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.test_schedulers import (FLOAT64_REL, MODULES, _common, _grid, _thresholding, expect_repeated_first_timestep,
                                   float64_reference, rel_err, run_diffusers, run_refldm)

NAME = "DEISMultistepScheduler"
MODULES.setdefault(NAME, "scheduling_deis_multistep")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")


@st.composite
def cases(draw):
    config = _common(draw)
    config.update(solver_order=draw(st.sampled_from([1, 2, 2, 3])), lower_order_final=draw(st.booleans()))
    config.update(_grid(draw))
    config.update(_thresholding(draw))
    steps = draw(st.integers(1, 30))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_deis_agrees_with_float64_diffusers(case):
    config, steps, seed, strength = case
    try:
        with float64_reference(NAME):
            ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength)
    except (AssertionError, IndexError) as error:  # rounded Karras timesteps repeating the first one
        expect_repeated_first_timestep(NAME, config, steps, seed, strength, error=error)
        return
    # repeated grid sigmas give log(b) - log(c) = 0 in the higher orders: NaN in diffusers, not compared
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength)
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    numpy.testing.assert_array_equal(numpy.asarray(our_timesteps), numpy.asarray(ref_timesteps))
    assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "use_karras_sigmas": True},
                                    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers' float32 tables and 0-d float32 coefficients (its log-rho Lagrange integrals in float32 numpy);
    refldm's float32 tables, coefficients from them: float32 rounding, amplified a little by the solver."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **config}
    _, _, ref = run_diffusers(NAME, config, 20, 0, dtype="float32")
    ours, _, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_refuses_what_it_does_not_implement_in_one_line():
    with pytest.raises(ConfigError, match="use_flow_sigmas=True is not implemented"):
        rs.DEISMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ConfigError, match="solver_type='tab' is not supported"):
        rs.DEISMultistepScheduler(solver_type="tab")
    assert rs.DEISMultistepScheduler(algorithm_type="dpmsolver++").config.algorithm_type == "deis"  # as diffusers
    assert isinstance(rs.get_scheduler("deis"), rs.DEISMultistepScheduler)
    assert rs.get_scheduler("DEIS Karras").config.use_karras_sigmas
