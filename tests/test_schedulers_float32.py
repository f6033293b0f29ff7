"""table_dtype="float32": the tables diffusers builds, and trajectories at float32 precision.

diffusers builds betas, alphas_cumprod and sigmas in float32 (torch.linspace, torch.cumprod, torch's sqrt) and rounds
its inference sigmas and fractional timesteps to float32. With table_dtype="float32" refldm builds them the same way:
- betas and alphas_cumprod bit for bit (torch's float32 linspace is a fused multiply-add per point, its cumprod
  accumulates in float64; both reproduced exactly);
- sigma tables to 1 float32 ulp (Karras grids, drawn between two such sigmas, to 2): torch 2.13's float32 sqrt on the CPU is not the correctly rounded IEEE square root
  (measured on an AVX2 machine: 17.5% of random inputs differ by 1 ulp), refldm's (NumPy's) is;
- rescale_betas_zero_snr goes through a sqrt and then cancels (sqrt(abar) - sqrt(abar_T)), so one ulp of sqrt
  becomes up to a few thousand ulp of the smallest betas: compared there at float32 precision relative to the
  largest entry instead.
"""

from __future__ import annotations

import inspect

import numpy
import pytest

from refldm import schedulers as rs
from refldm.checkpoints.config import ConfigError
from tests.conftest import require
from tests.test_schedulers import NAMES, rel_err, run_diffusers, run_refldm, with_numpy2_tensor_protocol

CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 200},
    {"beta_schedule": "linear", "num_train_timesteps": 1100, "use_karras_sigmas": True},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
     "steps_offset": 1},
    {"beta_schedule": "linear", "timestep_spacing": "trailing"},
]
RESCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


def ulps(a, b):
    """Largest distance in float32 units in the last place between two float32 arrays."""
    a, b = numpy.asarray(a, numpy.float32), numpy.asarray(b, numpy.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(numpy.max(numpy.abs(a.view(numpy.int32).astype(numpy.int64) - b.view(numpy.int32).astype(numpy.int64)),
                         initial=0))


def pair(name, config):
    diffusers = require("diffusers")
    reference = getattr(diffusers, name)
    config = {k: v for k, v in config.items() if k in inspect.signature(reference.__init__).parameters}
    return reference(**config), getattr(rs, name)(**config, table_dtype="float32")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("name", NAMES)
@with_numpy2_tensor_protocol
def test_float32_tables_are_diffusers_tables(name, config):
    ref, ours = pair(name, config)
    for attr in ("betas", "alphas_cumprod"):
        assert getattr(ours, attr).dtype == numpy.float32
        numpy.testing.assert_array_equal(getattr(ours, attr), getattr(ref, attr).numpy(), err_msg=attr)
    steps = 10 if name in ("PNDMScheduler", "LCMScheduler") else 17
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    if ref.timesteps.dtype.is_floating_point:  # fractional timesteps: float32, and from a Karras sigma within 1 ulp
        assert ulps(ours.timesteps, ref.timesteps.numpy()) <= (1 if config.get("use_karras_sigmas") else 0)
    else:
        numpy.testing.assert_array_equal(numpy.asarray(ours.timesteps, numpy.int64), ref.timesteps.numpy())
    if hasattr(ref, "sigmas") and name != "DDPMScheduler":
        assert ours.sigmas.dtype == numpy.float32
        # 1 ulp from torch's sqrt; a Karras grid drawn between two such sigmas moves by up to 2
        assert ulps(ours.sigmas, ref.sigmas.numpy()) <= (2 if config.get("use_karras_sigmas") else 1)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "PNDMScheduler"])
@with_numpy2_tensor_protocol
def test_float32_rescaled_zero_snr_tables_agree_at_float32_precision(name):
    """Measured: 2.9e-6 of the largest beta (the cancellation amplifies torch's 1-ulp sqrt about 50 times)."""
    ref, ours = pair(name, RESCALED)
    for attr in ("betas", "alphas_cumprod"):
        assert rel_err(getattr(ours, attr), getattr(ref, attr).numpy()) <= 1e-5, attr


@pytest.mark.parametrize("name", NAMES)
@with_numpy2_tensor_protocol
def test_float32_tables_trajectory_tracks_installed_diffusers_closer_than_float64(name):
    """20 steps of SD's schedule in float32 against diffusers as installed: float32 tables bring refldm to within
    2e-6 relative (the remaining difference: the order of float32 operations and torch's sqrt), at least as
    close as float64 tables do."""
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    _, _, ref = run_diffusers(name, config, 20, 0, dtype="float32")
    _, _, f32 = run_refldm(name, {**config, "table_dtype": "float32"}, 20, 0, dtype="float32")
    _, _, f64 = run_refldm(name, config, 20, 0, dtype="float32")
    assert f32[-1].dtype == numpy.float32
    assert rel_err(f32[-1], ref[-1]) <= 2e-6
    assert rel_err(f32[-1], ref[-1]) <= rel_err(f64[-1], ref[-1]) + 1e-7


@pytest.mark.parametrize("value", ["float16", "double", None, 32])
def test_other_table_dtypes_are_one_clear_line(value):
    with pytest.raises(ConfigError, match=r"table_dtype=.* is not supported \(choose one of 'float64', 'float32'\)"):
        rs.EulerDiscreteScheduler(table_dtype=value)


def test_table_dtype_goes_through_from_config_and_get_scheduler():
    euler = rs.EulerDiscreteScheduler.from_config({"beta_schedule": "scaled_linear"}, table_dtype="float32")
    assert euler.config.table_dtype == "float32" and euler.sigmas.dtype == numpy.float32
    dpm = rs.get_scheduler("dpm++2m", euler.config)
    assert dpm.config.table_dtype == "float32" and dpm.alphas_cumprod.dtype == numpy.float32
    assert rs.DDIMScheduler().alphas_cumprod.dtype == numpy.float64
