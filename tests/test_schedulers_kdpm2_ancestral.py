"""KDPM2AncestralDiscreteScheduler ("DPM2 a") against diffusers step by step, with the same noise: refldm's
Generator(seed) draws torch.Generator().manual_seed(seed)'s numbers, and both draw once per full step (on the
second model call). Float64 tables on both sides (tests/test_schedulers.float64_reference) to 1e-10 relative;
table_dtype="float32" against diffusers as installed at float32 precision."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from tests.conftest import require
from tests.test_schedulers import (FLOAT64_REL, MODULES, _common, _grid, expect_repeated_first_timestep,
                                   float64_reference, rel_err, run_diffusers, run_refldm)

NAME = "KDPM2AncestralDiscreteScheduler"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers 0.42 on NumPy 2: slow when recorded
MODULES.setdefault(NAME, "scheduling_k_dpm_2_ancestral_discrete")  # where float64_reference patches diffusers


@st.composite
def cases(draw):
    config = _common(draw, ("epsilon", "v_prediction"))  # diffusers: "sample" not implemented
    config.update(_grid(draw))
    steps = draw(st.integers(1, 30))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=20, deadline=None)
@given(case=cases())
def test_dpm2_ancestral_agrees_with_float64_diffusers_with_the_same_noise(case):
    config, steps, seed, strength = case
    try:
        with float64_reference(NAME):
            ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength)
    except (AssertionError, IndexError) as error:  # rounded Karras timesteps repeating the first one
        expect_repeated_first_timestep(NAME, config, steps, seed, strength, error=error)
        return
    assume(all(numpy.isfinite(x).all() for x in ref_traj))
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength)
    # midpoint timesteps are mapped back from sigma_mid through log/exp, whose last bit torch and NumPy may round
    # differently; the others are equal
    for a, b in ((ours.timesteps, ref.timesteps), (our_timesteps, ref_timesteps)):
        numpy.testing.assert_allclose(numpy.asarray(a, numpy.float64), b.numpy(), rtol=1e-12, atol=1e-9)
    for attr in ("sigmas", "sigmas_interpol", "sigmas_down"):
        assert rel_err(getattr(ours, attr), getattr(ref, attr).numpy()) <= FLOAT64_REL, attr
    up, ref_up = ours.sigmas_up[:-3], ref.sigmas_up.numpy()[:-3]  # the last (sigma = 0, 3 copies) is 0/0, unused
    assert rel_err(up, ref_up) <= FLOAT64_REL
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=FLOAT64_REL)
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


def test_the_noise_really_enters():
    """Same seed: equal to diffusers; another seed: a different result (so the comparison above tests the noise)."""
    with float64_reference(NAME):
        _, _, ref = run_diffusers(NAME, {}, 10, 7)
    _, _, same = run_refldm(NAME, {}, 10, 7)
    _, _, other = run_refldm(NAME, {}, 10, 8)
    assert rel_err(same[-1], ref[-1]) <= FLOAT64_REL
    assert rel_err(other[-1], ref[-1]) > 1e-3


@pytest.mark.parametrize("config", [{"beta_schedule": "scaled_linear"}, {"use_karras_sigmas": True},
                                    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}])
def test_float32_tables_track_installed_diffusers(config):
    _, _, ref = run_diffusers(NAME, config, 20, 0, dtype="float32")
    ours, _, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    # diffusers' sigma_mid, sigma_up and sigma_down go through torch's float32 log, exp and sqrt, which are not
    # correctly rounded (see test_schedulers_float32.py); NumPy's are: a few float32 ulps per table entry.
    # Measured on the final latent: 3.0e-6, 8.9e-6 (Karras), 2.9e-7
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_refuses_what_diffusers_does_not_implement():
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        rs.KDPM2AncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        rs.KDPM2AncestralDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)


def test_web_ui_names():
    for name in ("DPM2 a", "dpm_2_ancestral", "dpm2_a"):
        assert isinstance(rs.get_scheduler(name), rs.KDPM2AncestralDiscreteScheduler)
    assert rs.get_scheduler("DPM2 a Karras").config.use_karras_sigmas
    assert rs.names.label("dpm_2_ancestral", "karras") == "DPM2 a Karras"
