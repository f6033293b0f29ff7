"""The rectified-flow schedulers (FlowMatchEuler, FlowMatchHeun) against diffusers, step by step.

diffusers builds its flow tables in NumPy float64 (the inference grid and the shift) and then rounds sigmas and
timesteps to float32, and its step() casts the sample to float32. So:
- table_dtype="float32" reproduces diffusers' tables bit for bit and its float32 trajectory to float32 rounding;
- table_dtype="float64" (refldm's default) keeps the tables in float64: they equal diffusers' to float32
  precision (what diffusers' rounding leaves), and a float64 trajectory is checked against the exact solution
  of the flow ODE on straight paths, where Euler is exact, to 1e-12.
"""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given, settings, strategies as st

from refldm import schedulers as rs
from refldm.core.random import Generator
from refldm.schedulers.flow_match_euler import calculate_shift
from refldm.schedulers import names
from tests.conftest import require

EULER_CONFIGS = [
    {},
    {"shift": 3.0},                                     # SD3 / SD3.5
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 2.0, "use_exponential_sigmas": True},
    {"shift": 3.0, "use_beta_sigmas": True},
    {"shift": 3.0, "invert_sigmas": True},
    {"shift": 1.5, "shift_terminal": 0.1},
    {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},  # FLUX
    {"use_dynamic_shifting": True, "time_shift_type": "linear"},
    {"shift": 3.0, "num_train_timesteps": 500},
]


def _ids(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "default"


def _pair(name, config, **set_kwargs):
    diffusers = require("diffusers")
    ref = getattr(diffusers, name)(**config)
    ours = getattr(rs, name)(**config, table_dtype="float32")
    ours64 = getattr(rs, name)(**config)
    for s in (ref, ours, ours64):
        s.set_timesteps(**set_kwargs)
    return ref, ours, ours64


def _mu(config):
    return {"mu": calculate_shift(1024)} if config.get("use_dynamic_shifting") else {}


def _velocity(x, t):
    """A stand-in model: smooth in x and t, so errors in the trajectory show up."""
    return numpy.tanh(x) * (0.3 + t / 1000.0) - 0.5 * x


def _run(scheduler, x, torch=None, generator=None):
    for t in scheduler.timesteps:
        if torch is not None:
            v = torch.from_numpy(_velocity(x.numpy(), float(t)).astype(numpy.float32))
            x = scheduler.step(v, t, x, generator=generator).prev_sample
        else:
            v = _velocity(x, float(t)).astype(x.dtype)
            x = scheduler.step(v, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("config", EULER_CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_euler_tables_and_trajectory_equal_diffusers(config, steps):
    torch = require("torch")
    if config.get("shift_terminal") and steps == 1:  # 1 - t_last = 0 cannot be stretched (diffusers: NaN)
        with pytest.raises(ValueError, match="shift_terminal=0.1 cannot stretch"):
            rs.FlowMatchEulerDiscreteScheduler(**config).set_timesteps(1)
        return
    ref, ours, ours64 = _pair("FlowMatchEulerDiscreteScheduler", config, num_inference_steps=steps, **_mu(config))
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours64.sigmas.dtype == numpy.float64
    numpy.testing.assert_allclose(ours64.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    x = numpy.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype(numpy.float32)
    expected = _run(ref, torch.from_numpy(x), torch).numpy()
    got = _run(ours, x)
    assert got.dtype == numpy.float32
    numpy.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    numpy.testing.assert_allclose(_run(ours64, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigmas", [[1.0, 0.8, 0.4, 0.1], [0.9, 0.3]])
@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True}], ids=_ids)
def test_euler_custom_sigmas_equal_diffusers(config, sigmas):
    ref, ours, _ = _pair("FlowMatchEulerDiscreteScheduler", config, sigmas=sigmas, **_mu(config))
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_euler_custom_timesteps_equal_diffusers():
    ref, ours, _ = _pair("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, timesteps=[1000.0, 750.5, 300.0])
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_euler_stochastic_sampling_equals_diffusers_with_the_same_seed():
    torch = require("torch")
    ref, ours, _ = _pair("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "stochastic_sampling": True},
                         num_inference_steps=5)
    x = numpy.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(numpy.float32)
    expected = _run(ref, torch.from_numpy(x), torch, generator=torch.Generator().manual_seed(7)).numpy()
    numpy.testing.assert_allclose(_run(ours, x, generator=Generator(7)), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_heun_tables_and_trajectory_equal_diffusers(shift, steps):
    torch = require("torch")
    ref, ours, ours64 = _pair("FlowMatchHeunDiscreteScheduler", {"shift": shift}, num_inference_steps=steps)
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert len(ours.timesteps) == 2 * steps - 1
    x = numpy.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(numpy.float32)
    expected = _run(ref, torch.from_numpy(x), torch).numpy()
    numpy.testing.assert_allclose(_run(ours, x), expected, rtol=0, atol=2e-6)
    numpy.testing.assert_allclose(_run(ours64, x), expected, rtol=0, atol=1e-5)


def test_heun_churn_equals_diffusers_with_the_same_seed():
    torch = require("torch")
    ref, ours, _ = _pair("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, num_inference_steps=4)
    x = numpy.random.default_rng(3).standard_normal((1, 2, 3, 3)).astype(numpy.float32)
    g_ref, g_ours = torch.Generator().manual_seed(5), Generator(5)
    for t in ref.timesteps:
        v = _velocity(x, float(t)).astype(numpy.float32)
        expected = ref.step(torch.from_numpy(v), t, torch.from_numpy(x), s_churn=1.0, generator=g_ref).prev_sample
        got = ours.step(v, ours.timesteps[ref.step_index - 1], x, s_churn=1.0, generator=g_ours).prev_sample
        numpy.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=2e-6)
        x = got


@pytest.mark.parametrize("config", EULER_CONFIGS[:2], ids=_ids)
def test_scale_noise_is_the_forward_process_as_diffusers(config):
    torch = require("torch")
    ref, ours, _ = _pair("FlowMatchEulerDiscreteScheduler", config, num_inference_steps=10)
    x0 = numpy.random.default_rng(4).standard_normal((2, 2, 3, 3)).astype(numpy.float32)
    e = numpy.random.default_rng(5).standard_normal((2, 2, 3, 3)).astype(numpy.float32)
    t = ref.timesteps[3:4].repeat(2)
    expected = ref.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(e)).numpy()
    numpy.testing.assert_allclose(ours.scale_noise(x0, t.numpy(), e), expected, rtol=0, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(shift=st.floats(0.5, 6.0), steps=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_euler_is_exact_on_straight_paths_in_float64(shift, steps, seed):
    """On x_t = (1 - t) x_0 + t e the velocity v = e - x_0 is constant, so Euler from t = 1 lands on x_0 exactly
    (up to float64 rounding), whatever the grid: the property that makes few-step rectified flow work."""
    rng = numpy.random.default_rng(seed)
    x0, e = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    scheduler = rs.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    x = scheduler.scale_noise(x0, scheduler.timesteps[:1], e)
    for t in scheduler.timesteps:
        x = scheduler.step(e - x0, t, x).prev_sample
    assert x.dtype == numpy.float64
    numpy.testing.assert_allclose(x, x0, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(u=st.floats(1e-6, 1.0), shift=st.floats(0.2, 8.0))
def test_time_shift_is_the_dynamic_shift_with_mu_log_s(u, shift):
    """t' = s u / (1 + (s - 1) u) equals e^mu / (e^mu + 1/u - 1) with mu = ln s; it maps [0, 1] onto itself."""
    from refldm.schedulers.flow_match_euler import time_shift, time_shift_exponential, time_shift_linear
    a = time_shift(shift, u)
    assert 0 <= a <= 1
    assert abs(a - time_shift_exponential(numpy.log(shift), u)) <= 1e-12
    assert abs(a - time_shift_linear(shift, u)) <= 1e-12


def test_dynamic_shifting_without_mu_is_refused():
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs mu"):
        rs.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)


def test_integer_timestep_is_refused_naming_it():
    scheduler = rs.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer timestep 0"):
        scheduler.step(numpy.zeros(2), 0, numpy.zeros(2))


def test_web_ui_names_on_a_flow_model():
    assert names.resolve_flow("Euler") == ("FlowMatchEulerDiscreteScheduler", {})
    assert names.resolve_flow("euler")[0] == "FlowMatchEulerDiscreteScheduler"
    assert names.resolve_flow("Heun")[0] == "FlowMatchHeunDiscreteScheduler"
    assert names.resolve_flow("dpmpp_2m") == ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True,
        "prediction_type": "flow_prediction"})
    scheduler = rs.get_scheduler(names.resolve_flow("euler")[0], {"shift": 3.0, "_class_name": "x"})
    assert isinstance(scheduler, rs.FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    with pytest.raises(ValueError, match="'DPM\\+\\+ 2M SDE' has no rectified-flow version"):
        names.resolve_flow("DPM++ 2M SDE")


DPM_FLOW = [
    {"solver_order": 2},
    {"solver_order": 3},
    {"solver_order": 1},
    {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
    {"solver_order": 2, "solver_type": "heun", "lower_order_final": False},
]


@pytest.mark.parametrize("config", DPM_FLOW, ids=_ids)
@pytest.mark.parametrize("steps", [2, 8, 20])
def test_dpmsolver_in_flow_mode_equals_diffusers(config, steps):
    """DPM-Solver++ on the flow grid (use_flow_sigmas, flow_shift, prediction_type "flow_prediction"), as SD3 and
    Wan pipelines use it: tables bit for bit, trajectories to float32 rounding."""
    torch = require("torch")
    config = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction", **config}
    ref, ours, _ = _pair("DPMSolverMultistepScheduler", config, num_inference_steps=steps)
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    numpy.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x = numpy.random.default_rng(6).standard_normal((2, 3, 4, 4)).astype(numpy.float32)
    g = (torch.Generator().manual_seed(3), Generator(3))
    expected = _run(ref, torch.from_numpy(x), torch, generator=g[0]).numpy()
    numpy.testing.assert_allclose(_run(ours, x, generator=g[1]), expected, rtol=0, atol=2e-6)


def test_dpmsolver_flow_mode_with_mu_and_add_noise():
    torch = require("torch")
    config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    ref, ours, _ = _pair("DPMSolverMultistepScheduler", config, num_inference_steps=6, mu=0.9)
    numpy.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    x0 = numpy.random.default_rng(7).standard_normal((2, 2, 3, 3)).astype(numpy.float32)
    e = numpy.random.default_rng(8).standard_normal((2, 2, 3, 3)).astype(numpy.float32)
    t = ref.timesteps[2:3].repeat(2)
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(e), t).numpy()
    numpy.testing.assert_allclose(ours.add_noise(x0, e, t.numpy()), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config,match", [
    ({"use_flow_sigmas": True, "use_karras_sigmas": True, "prediction_type": "flow_prediction"},
     "cannot be combined with use_karras_sigmas"),
    ({"use_flow_sigmas": True, "prediction_type": "epsilon"}, "prediction_type 'flow_prediction'"),
    ({"prediction_type": "flow_prediction"}, "needs use_flow_sigmas=True"),
])
def test_dpmsolver_flow_mode_refusals_name_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        rs.DPMSolverMultistepScheduler(**config)
