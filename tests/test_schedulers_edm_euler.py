"""EDMEulerScheduler against diffusers step by step on a hypothesis grid of configs: float64 on both sides
(tests/test_schedulers.float64_reference; diffusers' step casts the sample to float32 and its sigmas to float32,
which there become float64) to 1e-10 relative, including the churn noise (the same generator numbers); and
table_dtype="float32" against diffusers as installed at float32 precision."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.conftest import require
from tests.test_schedulers import FLOAT64_REL, MODULES, float64_reference, rel_err, run_diffusers, run_refldm

NAME = "EDMEulerScheduler"
MODULES.setdefault(NAME, "scheduling_edm_euler")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@st.composite
def cases(draw):
    config = {
        "sigma_min": draw(st.sampled_from([0.002, 0.0292])), "sigma_max": draw(st.sampled_from([80.0, 14.6])),
        "sigma_data": draw(st.sampled_from([0.5, 1.0])),
        "sigma_schedule": draw(st.sampled_from(["karras", "exponential"])),
        "prediction_type": draw(st.sampled_from(["epsilon", "v_prediction"])),
        "rho": draw(st.sampled_from([7.0, 3.0])),
        "final_sigmas_type": draw(st.sampled_from(["zero", "sigma_min"])),
    }
    steps = draw(st.integers(1, 40))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    step_kwargs = {"s_churn": draw(st.sampled_from([0.0, 0.0, 1.0, 40.0]))}
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength, step_kwargs


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_edm_euler_agrees_with_float64_diffusers(case):
    config, steps, seed, strength, step_kwargs = case
    with float64_reference(NAME):
        ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength, step_kwargs)
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength, step_kwargs)
    # timesteps are log(sigma) / 4: torch's and NumPy's float64 log may differ in the last bit
    for a, b in ((ours.timesteps, ref.timesteps), (our_timesteps, ref_timesteps)):
        numpy.testing.assert_allclose(numpy.asarray(a, numpy.float64), b.numpy(), rtol=1e-12, atol=1e-12)
    assert rel_err(ours.sigmas, ref.sigmas.numpy()) <= FLOAT64_REL
    assert ours.init_noise_sigma == ref.init_noise_sigma
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


@pytest.mark.parametrize("config", [{}, {"sigma_schedule": "exponential"},
                                    {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers computes every EDM Euler step in float32 (its step casts the sample to float32) on float32 sigmas;
    with table_dtype="float32" refldm rounds the same sigmas. The exponential schedule's float32 exp and the
    log of the timesteps are torch's (not correctly rounded) against NumPy's: a float32 ulp or two."""
    _, ref_t, ref = run_diffusers(NAME, config, 20, 0, dtype="float32")
    ours, our_t, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.sigmas.dtype == numpy.float32
    numpy.testing.assert_allclose(our_t, ref_t.numpy(), rtol=1e-6, atol=1e-6)
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_custom_ramp_is_diffusers_sigmas_argument():
    torch = require("torch")
    diffusers = require("diffusers")
    ramp = [0.0, 0.2, 0.5, 0.9]
    ref = diffusers.EDMEulerScheduler()
    ref.set_timesteps(sigmas=torch.tensor(ramp, dtype=torch.float64))  # diffusers casts the ramp to float64
    ours = rs.EDMEulerScheduler(table_dtype="float32")
    ours.set_timesteps(sigmas=ramp)
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    with pytest.raises(ValueError, match=r"sigmas is a ramp here .* values in \[0, 1\]"):
        ours.set_timesteps(sigmas=[14.6, 1.0])


def test_refuses_bad_config_in_one_line():
    with pytest.raises(ConfigError, match="sigma_schedule='beta' is not supported"):
        rs.EDMEulerScheduler(sigma_schedule="beta")
    with pytest.raises(ConfigError, match="prediction_type='sample'"):
        rs.EDMEulerScheduler(prediction_type="sample")
    with pytest.raises(ConfigError, match="unknown config key 'sigma_foo'"):
        rs.EDMEulerScheduler(sigma_foo=1.0)
    with pytest.raises(ConfigError, match="unknown config key 'beta_schedule' .value 'scaled_linear'.: a key of other"):
        rs.EDMEulerScheduler(beta_schedule="scaled_linear")  # passed on purpose: refused (diffusers: TypeError)
    rs.EDMEulerScheduler.from_config({"beta_schedule": "scaled_linear"})  # in a config: carried along, as diffusers
    assert isinstance(rs.get_scheduler("EDMEulerScheduler", {"beta_schedule": "scaled_linear"}), rs.EDMEulerScheduler)
