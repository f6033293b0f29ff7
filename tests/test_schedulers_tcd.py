"""TCDScheduler against diffusers step by step on a hypothesis grid of configs (schedules, prediction types, zero
terminal SNR, original_inference_steps, eta, img2img starts), with the same noise (refldm's Generator(seed) draws
torch.manual_seed(seed)'s numbers): float64 on both sides (tests/test_schedulers.float64_reference) to 1e-10
relative; table_dtype="float32" against diffusers as installed at float32 precision."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.test_schedulers import FLOAT64_REL, MODULES, _common, float64_reference, rel_err, run_diffusers, run_refldm

NAME = "TCDScheduler"
MODULES.setdefault(NAME, "scheduling_tcd")  # where float64_reference patches diffusers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@st.composite
def cases(draw):
    config = _common(draw, rescale=True)
    if config["rescale_betas_zero_snr"]:
        config["prediction_type"] = "v_prediction"  # zero terminal SNR needs v-prediction (eps divides by 0)
    config.update(set_alpha_to_one=draw(st.booleans()),
                  original_inference_steps=draw(st.sampled_from([50, 50, 20])))
    steps = draw(st.integers(1, config["original_inference_steps"]))
    strength = draw(st.sampled_from([None, None, 0.3, 0.75, 1.0]))
    step_kwargs = {"eta": draw(st.sampled_from([0.0, 0.3, 0.3, 1.0]))}
    return config, steps, draw(st.integers(0, 2**32 - 1)), strength, step_kwargs


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_tcd_agrees_with_float64_diffusers_with_the_same_noise(case):
    config, steps, seed, strength, step_kwargs = case
    with float64_reference(NAME):
        ref, ref_timesteps, ref_traj = run_diffusers(NAME, config, steps, seed, strength, step_kwargs)
    ours, our_timesteps, our_traj = run_refldm(NAME, config, steps, seed, strength, step_kwargs)
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    numpy.testing.assert_array_equal(numpy.asarray(our_timesteps), numpy.asarray(ref_timesteps))
    assert len(our_traj) == len(ref_traj)
    worst = max(rel_err(a, b) for a, b in zip(our_traj, ref_traj))
    assert worst <= FLOAT64_REL, f"trajectory relative error {worst:.3g}"


def test_the_noise_really_enters():
    with float64_reference(NAME):
        _, _, ref = run_diffusers(NAME, {}, 8, 7)
    _, _, same = run_refldm(NAME, {}, 8, 7)
    _, _, other = run_refldm(NAME, {}, 8, 8)
    assert rel_err(same[-1], ref[-1]) <= FLOAT64_REL
    assert rel_err(other[-1], ref[-1]) > 1e-3


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "set_alpha_to_one": False},
                                    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}])
def test_float32_tables_track_installed_diffusers(config):
    """diffusers' float32 alphas_cumprod (reproduced bit for bit with table_dtype="float32") and float32 sqrt; the
    remaining difference is torch's float32 sqrt against NumPy's correctly rounded one."""
    _, _, ref = run_diffusers(NAME, config, 8, 0, dtype="float32")
    ours, _, traj = run_refldm(NAME, {**config, "table_dtype": "float32"}, 8, 0, dtype="float32")
    assert traj[-1].dtype == numpy.float32 and ours.alphas_cumprod.dtype == numpy.float32
    assert rel_err(traj[-1], ref[-1]) <= 1e-5


def test_output_fields_and_refusals():
    scheduler = rs.TCDScheduler()
    scheduler.set_timesteps(4)
    x = numpy.ones((1, 2, 2, 2))
    out = scheduler.step(x, scheduler.timesteps[0], x, eta=0.0)
    assert out.pred_noised_sample is not None and len(scheduler.step(x, scheduler.timesteps[1], x, eta=0.0,
                                                                     return_dict=False)) == 2
    with pytest.raises(ValueError, match=r"eta=1.5 must be in \[0, 1\]"):
        scheduler.step(x, scheduler.timesteps[2], x, eta=1.5)
    with pytest.raises(ConfigError, match="clip_sample=True is not implemented"):
        rs.TCDScheduler(clip_sample=True)
    with pytest.raises(ValueError, match="custom timesteps must be strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 500])
    assert isinstance(rs.get_scheduler("tcd"), rs.TCDScheduler)
