"""The sampling loop (refldm/pipelines/sampling.py): guidance formula, loop vs. diffusers' pipeline loop, callback,
progress bar, img2img timesteps for a strength, starting noise."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import backend
from refldm import schedulers as rs
from refldm.core.random import Generator
from refldm.pipelines.sampling import (classifier_free_guidance, img2img_latents, img2img_timesteps, initial_latents,
                             rescale_guidance, sample)
from tests.conftest import require
from tests.test_schedulers import NAMES, float64_reference, rel_err


def guided_model(x, t):
    """Batch [x_u, x_c] -> [uncond, cond] predictions that differ, so guidance changes the result."""
    half = x.shape[0] // 2
    u, c = x[:half], x[half:]
    parts = [0.1 * u + math.sin(float(t)), 0.15 * c + math.cos(float(t) / 100)]
    if type(x).__module__.startswith("torch"):  # diffusers' side of the comparison
        return require("torch").cat(parts)
    return backend.array_namespace(x).concatenate(parts, axis=0)


def test_classifier_free_guidance_is_the_explicit_formula():
    rng = numpy.random.default_rng(0)
    u, c = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((2, 4, 3, 3))
    assert numpy.array_equal(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    assert numpy.allclose(classifier_free_guidance(u, c, 1.0), c, rtol=0, atol=1e-15)
    assert numpy.array_equal(classifier_free_guidance(u, c, 0.0), u)


def test_guidance_rescale_equals_diffusers():
    torch = require("torch")
    require("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    rng = numpy.random.default_rng(1)
    cfg, cond = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((2, 4, 5, 5))
    expected = rescale_noise_cfg(torch.from_numpy(cfg), torch.from_numpy(cond), 0.7).numpy()
    assert rel_err(rescale_guidance(cfg, cond, 0.7), expected) <= 1e-12


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler",
                                  "EulerAncestralDiscreteScheduler"])
def test_guided_sampling_loop_equals_diffusers_pipeline_loop(name):
    """The loop of StableDiffusionPipeline (scale input, batch twice, guidance, step with the generator) in
    float64 diffusers against refldm.pipelines.sampling.sample."""
    torch = require("torch")
    diffusers = require("diffusers")
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "clip_sample": False}
    x_T = numpy.random.default_rng(2).standard_normal((1, 4, 4, 4))
    with float64_reference(name):
        ref = getattr(diffusers, name).from_config(config)
        ref.set_timesteps(12)
        generator = torch.Generator().manual_seed(5)
        latents = torch.from_numpy(x_T) * ref.init_noise_sigma
        for t in ref.timesteps:
            model_in = ref.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = guided_model(model_in, t).chunk(2)
            pred = uncond + 6.0 * (cond - uncond)
            kwargs = {"generator": generator} if name in ("DDIMScheduler", "EulerAncestralDiscreteScheduler",
                                                          "EulerDiscreteScheduler") else {}
            latents = ref.step(pred, t, latents, **kwargs).prev_sample
    ours = getattr(rs, name).from_config(config)
    ours.set_timesteps(12)
    result = sample(guided_model, ours, x_T * ours.init_noise_sigma, guidance_scale=6.0, generator=Generator(5),
                    progress=False)
    assert rel_err(result, latents.numpy()) <= 1e-10


def test_callback_runs_every_step_and_can_replace_latents():
    scheduler = rs.EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    seen = []

    def callback(i, t, x):
        seen.append((i, float(t)))
        return x * 0 if i == 4 else None

    out = sample(lambda x, t: 0.1 * x, scheduler, numpy.ones((1, 1, 2, 2)), callback=callback, progress=False)
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == [float(t) for t in scheduler.timesteps]
    assert numpy.array_equal(out, numpy.zeros((1, 1, 2, 2)))


def test_progress_bar_shows_and_can_be_silenced(capsys):
    scheduler = rs.DDIMScheduler()
    scheduler.set_timesteps(3)
    sample(lambda x, t: 0 * x, scheduler, numpy.zeros((1, 1, 2, 2)), progress=False)
    assert capsys.readouterr().err == ""
    scheduler.set_timesteps(3)
    sample(lambda x, t: 0 * x, scheduler, numpy.zeros((1, 1, 2, 2)), progress=True)
    assert "3/3" in capsys.readouterr().err


class _FakePipeline:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), steps=st.integers(4, 50), strength=st.floats(0, 1))
def test_img2img_timesteps_equal_diffusers_get_timesteps(name, steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps run on diffusers' scheduler vs. the helper."""
    require("torch")
    diffusers = require("diffusers")
    ref = getattr(diffusers, name)()
    ref.set_timesteps(steps)
    ref_timesteps, ref_n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        _FakePipeline(ref), steps, strength, "cpu")
    ours = getattr(rs, name)()
    ours.set_timesteps(steps)
    timesteps, n = img2img_timesteps(ours, steps, strength)
    assert n == ref_n
    numpy.testing.assert_allclose(numpy.asarray(timesteps, numpy.float64), ref_timesteps.numpy(), rtol=1e-6)
    assert ours.begin_index == getattr(ref, "begin_index", None) or not hasattr(ref, "set_begin_index")


def test_img2img_bad_input():
    scheduler = rs.DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        img2img_timesteps(scheduler, 10, 0.5)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="strength=1.5"):
        img2img_timesteps(scheduler, 10, 1.5)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        sample(lambda x, t: x, scheduler, numpy.zeros((1, 1)), guidance_rescale=0.5)


def test_strength_zero_leaves_the_image_latents_alone():
    scheduler = rs.EulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    timesteps, n = img2img_timesteps(scheduler, 10, 0.0)
    assert n == 0 and len(timesteps) == 0
    x0 = numpy.ones((1, 4, 2, 2), numpy.float32)
    assert img2img_latents(scheduler, x0, timesteps, generator=Generator(0)) is x0


def test_initial_latents_equal_diffusers_for_a_seed():
    torch = require("torch")
    scheduler = rs.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(20)
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42)).numpy()
    got = initial_latents((1, 4, 8, 8), scheduler, seed=42)
    assert got.dtype == numpy.float32
    assert numpy.array_equal(got, expected * numpy.float32(scheduler.init_noise_sigma))


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_guided_loop_runs_on_backend(name, on_backend):
    """CFG + img2img start + loop on the active backend equal the NumPy run (float32)."""
    def run():
        scheduler = getattr(rs, name)()
        scheduler.set_timesteps(8)
        timesteps, _ = img2img_timesteps(scheduler, 8, 0.6)
        x0 = backend.asarray(numpy.random.default_rng(0).standard_normal((1, 4, 4, 4)), "float32")
        generator = Generator(3)
        x = img2img_latents(scheduler, x0, timesteps, generator=generator)
        x = sample(guided_model, scheduler, x, timesteps, guidance_scale=4.0, guidance_rescale=0.3,
                   generator=generator, progress=False)
        return backend.to_numpy(x)
    on_device = run()
    with backend.use("numpy"):
        on_host = run()
    assert on_device.dtype == numpy.float32
    assert rel_err(on_device, on_host) <= 1e-6
