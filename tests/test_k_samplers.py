"""DPM++ 2S a, DPM++ 3M SDE, DPM fast and DPM adaptive against k-diffusion's own sampling.py functions
(sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpm_fast, sample_dpm_adaptive), in float64, on the same
model, the same sigmas and the same noise.

The model is an eps-predicting function of (scaled input, timestep), as a Stable Diffusion U-Net is: refldm's
sample() calls it through the scheduler; k-diffusion calls it through the usual denoiser wrapper (A1111's
CompVisDenoiser): D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1), t(sigma)), with t(sigma) the same log-linear
interpolation refldm uses for its timesteps. The noise is one list of standard normal arrays that both sides draw
from in order (k-diffusion's noise_sampler= argument, refldm's scheduler.noise_sampler), and both sides must ask
for it at the same (sigma, sigma_next).

Tolerance: 1e-10 relative (max |a - b| / max |b|) on the final sample and on every denoised value the samplers
report; DPM adaptive must also take the same accepted / rejected trials with the same nfe.
"""

from __future__ import annotations

import os

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import schedulers as rs
from refldm.pipelines.sampling import sample
from refldm.schedulers import schedule
from tests.conftest import require
from tests.kdiffusion import load_sampling

REL = 1e-10  # float64 on both sides
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
      "steps_offset": 1, "timestep_spacing": "leading"}
SHAPE = (2, 3, 4, 4)


def rel_err(a, b):
    a, b = numpy.asarray(a, numpy.float64), numpy.asarray(b, numpy.float64)
    return float(numpy.abs(a - b).max() / numpy.abs(b).max())


@pytest.fixture(scope="module")
def k():
    """k-diffusion's sampling module, with torch computing in float64 (its sample_dpm_* build tensors from floats)."""
    torch = require("torch")
    sampling = load_sampling()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield sampling
    torch.set_default_dtype(old)


def sd_sigmas_table():
    return rs.EulerDiscreteScheduler(**SD).sigmas_table


def analytic_eps(sigmas_table):
    """A smooth nonlinear eps model: the exact eps of data ~ N(0, 1), x_in sigma / sqrt(sigma^2 + 1), plus a
    nonlinear term coupling neighbouring pixels (sigma by timestep from the training table)."""
    def eps(x_in, t):
        sigma = float(numpy.interp(float(t), numpy.arange(len(sigmas_table)), sigmas_table))
        c = sigma / (sigma**2 + 1) ** 0.5
        return c * x_in + 0.3 * c * numpy.tanh(numpy.roll(x_in, 1, axis=-1) * x_in)
    return eps


class SharedNoise:
    """Standard normal arrays z_0, z_1, ... (seeded), handed out in call order; records each call's (sigma,
    sigma_next)."""

    def __init__(self, seed, shape=SHAPE, as_torch=False):
        self.seed, self.shape, self.as_torch, self.calls = seed, shape, as_torch, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        z = numpy.random.default_rng([self.seed, len(self.calls)]).standard_normal(self.shape)
        if self.as_torch:
            import torch
            return torch.from_numpy(z)
        return z


def k_denoiser(eps_model, sigmas_table, prediction_type="epsilon"):
    """The denoiser k-diffusion sees: x_0(x, sigma) from the model at (x / sqrt(sigma^2 + 1), t(sigma)), as A1111's
    CompVisDenoiser (eps) and CompVisVDenoiser (v: x_0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v)."""
    import torch
    log_sigmas = numpy.log(sigmas_table)

    def denoiser(x, sigma):
        s = float(sigma[0])
        assert bool((sigma == sigma[0]).all())
        x = x.numpy()
        t = schedule.sigma_to_t(numpy.array([s]), log_sigmas)[0]
        out = eps_model(x / (s**2 + 1) ** 0.5, t)
        x0 = x - s * out if prediction_type == "epsilon" else x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * out
        return torch.from_numpy(numpy.asarray(x0, numpy.float64))
    return denoiser


def run_refldm(sched, eps_model, x, noise):
    """refldm.pipelines.sampling.sample with the noise sampler; also the denoised value of each step's (or trial's) first
    model call, as k-diffusion's callback reports it."""
    sched.noise_sampler = noise
    denoised = []
    step = sched.step

    def recording_step(model_output, timestep, sample_, **kwargs):
        first = sched.call_stages[sched.step_index if sched.step_index is not None else 0] == 0
        out = step(model_output, timestep, sample_, **kwargs)
        if first:
            denoised.append(out.pred_original_sample)
        return out
    sched.step = recording_step
    result = sample(eps_model, sched, x, progress=False)
    return result, denoised


def run_k(fn, eps_model, sigmas_table, x, noise, prediction_type="epsilon", **kwargs):
    import torch
    denoised = []
    result = fn(k_denoiser(eps_model, sigmas_table, prediction_type), torch.from_numpy(x.copy()), noise_sampler=noise,
                callback=lambda info: denoised.append(info["denoised"].numpy()), disable=True, **kwargs)
    if isinstance(result, tuple):
        return result[0].numpy(), denoised, result[1]
    return result.numpy(), denoised


def assert_same(ours, ref, our_denoised, ref_denoised, our_noise, ref_noise):
    assert len(our_denoised) == len(ref_denoised)
    for a, b in zip(our_denoised, ref_denoised):
        assert rel_err(a, b) <= REL
    assert len(our_noise.calls) == len(ref_noise.calls)
    if our_noise.calls:
        assert rel_err(our_noise.calls, ref_noise.calls) <= 1e-12
    err = rel_err(ours, ref)
    assert err <= REL, f"final sample: relative error {err:.3g}"


def start(sched, seed):
    z = numpy.random.default_rng(seed).standard_normal(SHAPE)
    return z * float(sched.init_noise_sigma)


GRIDS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"timestep_spacing": "linspace"}]


@settings(max_examples=12, deadline=None)
@given(steps=st.integers(1, 12), grid=st.sampled_from(GRIDS), eta=st.sampled_from([0.0, 0.5, 1.0, 1.7]),
       s_noise=st.sampled_from([1.0, 0.7]), seed=st.integers(0, 2**16))
def test_dpmpp_2s_ancestral_equals_k_diffusion(k, steps, grid, eta, s_noise, seed):
    noisy_sampler_equals_k_diffusion(rs.DPMPP2SAncestralScheduler, k.sample_dpmpp_2s_ancestral, steps, grid, eta,
                                     s_noise, seed)


def noisy_sampler_equals_k_diffusion(scheduler_class, k_sampler, steps, grid, eta, s_noise, seed):
    """The scheduler and k-diffusion's sampler, on the same sigmas, model and noise, give the same steps."""
    import torch
    sched = scheduler_class(**{**SD, **grid}, eta=eta, s_noise=s_noise)
    sched.set_timesteps(steps)
    eps, x = analytic_eps(sched.sigmas_table), start(sched, seed)
    ours, our_denoised = run_refldm(sched, eps, x, our_noise := SharedNoise(seed))
    ref, ref_denoised = run_k(k_sampler, eps, sched.sigmas_table, x, ref_noise := SharedNoise(seed, as_torch=True),
                              sigmas=torch.from_numpy(sched.sigmas), eta=eta, s_noise=s_noise)
    assert_same(ours, ref, our_denoised, ref_denoised, our_noise, ref_noise)


@settings(max_examples=12, deadline=None)
@given(steps=st.integers(2, 15), grid=st.sampled_from(GRIDS), eta=st.sampled_from([0.0, 0.5, 1.0]),
       s_noise=st.sampled_from([1.0, 0.7]), seed=st.integers(0, 2**16))
def test_dpmpp_3m_sde_equals_k_diffusion(k, steps, grid, eta, s_noise, seed):
    noisy_sampler_equals_k_diffusion(rs.DPMPP3MSDEScheduler, k.sample_dpmpp_3m_sde, steps, grid, eta, s_noise, seed)


def test_dpmpp_3m_sde_single_step_returns_the_denoised():
    """One step (sigma_max -> 0) is x_0(x, sigma_max). (k-diffusion 0.1.1's sample_dpmpp_3m_sde raises
    UnboundLocalError for one step, so this case is checked against the definition.)"""
    sched = rs.DPMPP3MSDEScheduler(**SD)
    sched.set_timesteps(1)
    eps, x = analytic_eps(sched.sigmas_table), start(sched, 0)
    sigma = float(sched.sigmas[0])
    expected = x - sigma * eps(x / (sigma**2 + 1) ** 0.5, sched.timesteps[0])
    assert rel_err(sample(eps, sched, x, progress=False), expected) <= 1e-15


def test_custom_sigmas_from_k_diffusion_karras(k):
    """set_timesteps(sigmas=...) takes k-diffusion's own get_sigmas_karras list (ComfyUI's way of passing sigmas)."""
    table = sd_sigmas_table()
    sigmas = k.get_sigmas_karras(9, float(table[0]), float(table[-1])).numpy()
    for cls, fn in ((rs.DPMPP2SAncestralScheduler, k.sample_dpmpp_2s_ancestral),
                    (rs.DPMPP3MSDEScheduler, k.sample_dpmpp_3m_sde)):
        import torch
        sched = cls(**SD)
        sched.set_timesteps(sigmas=sigmas)
        assert sched.num_inference_steps == 9
        eps, x = analytic_eps(table), start(sched, 3)
        ours, our_denoised = run_refldm(sched, eps, x, our_noise := SharedNoise(3))
        ref, ref_denoised = run_k(fn, eps, table, x, ref_noise := SharedNoise(3, as_torch=True),
                                  sigmas=torch.from_numpy(sigmas))
        assert_same(ours, ref, our_denoised, ref_denoised, our_noise, ref_noise)


@settings(max_examples=12, deadline=None)
@given(nfe=st.integers(1, 20), eta=st.sampled_from([0.0, 0.0, 0.5, 1.0]), s_noise=st.sampled_from([1.0, 0.7]),
       seed=st.integers(0, 2**16))
def test_dpm_fast_equals_k_diffusion(k, nfe, eta, s_noise, seed):
    sched = rs.DPMFastScheduler(**SD, eta=eta, s_noise=s_noise)
    sched.set_timesteps(nfe)
    assert len(sched.timesteps) == nfe == sum(sched.orders)  # the budget is the number of model calls
    table = sched.sigmas_table
    eps, x = analytic_eps(table), start(sched, seed)
    ours, our_denoised = run_refldm(sched, eps, x, our_noise := SharedNoise(seed))
    ref, ref_denoised = run_k(k.sample_dpm_fast, eps, table, x, ref_noise := SharedNoise(seed, as_torch=True),
                              sigma_min=float(table[0]), sigma_max=float(table[-1]), n=nfe, eta=eta, s_noise=s_noise)
    if not eta:  # k-diffusion draws (and multiplies by 0) noise even for eta = 0; refldm draws none
        assert our_noise.calls == []
        ref_noise.calls = []
    assert_same(ours, ref, our_denoised, ref_denoised, our_noise, ref_noise)


def test_dpm_fast_order_sequence():
    """N = 3k: 3, ..., 3, 2, 1; otherwise 3, ..., 3, N mod 3 (Lu et al. 2022, DPM-Solver-fast)."""
    from refldm.schedulers.dpm_fast import fast_orders
    assert fast_orders(1) == [1] and fast_orders(2) == [2] and fast_orders(3) == [2, 1]
    assert fast_orders(10) == [3, 3, 3, 1] and fast_orders(12) == [3, 3, 3, 2, 1] and fast_orders(14) == [3] * 4 + [2]
    assert all(sum(fast_orders(n)) == n for n in range(1, 60))


def test_dpm_fast_converges_at_third_order_and_dpm_adaptive_to_its_tolerance():
    """The same ODE from sigma_max to sigma_min: DPM fast's error falls about 8x per doubling of the model calls
    (third order), and DPM adaptive's error follows rtol while its model calls grow (reference: DPM fast, 192 calls)."""
    eps, x = analytic_eps(sd_sigmas_table()), numpy.random.default_rng(0).standard_normal(SHAPE)

    def run(sched, n):
        sched.set_timesteps(n)
        return sample(eps, sched, x * float(sched.init_noise_sigma), progress=False)
    ref = run(rs.DPMFastScheduler(**SD), 192)
    errors = [rel_err(run(rs.DPMFastScheduler(**SD), n), ref) for n in (12, 24, 48)]
    assert errors[1] < errors[0] / 6 and errors[2] < errors[1] / 6, errors
    nfe, errors = [], []
    for rtol in (1e-2, 1e-3, 1e-4):
        sched = rs.DPMAdaptiveScheduler(**SD, rtol=rtol, atol=rtol / 10)
        errors.append(rel_err(run(sched, 1), ref))
        nfe.append(sched.info["nfe"])
    assert errors[0] < 1e-2 and errors[1] < 1e-3 and errors[2] < 1e-4, errors
    assert nfe[0] < nfe[1] < nfe[2], nfe


def adaptive_case(k, seed, eps_model=None, prediction_type="epsilon", config=None, shape=SHAPE):
    config = config or {}
    sched = rs.DPMAdaptiveScheduler(**{**SD, "prediction_type": prediction_type}, **config)
    sched.set_timesteps(20)
    table = sched.sigmas_table
    eps_model = eps_model or analytic_eps(table)
    x = numpy.random.default_rng(seed).standard_normal(shape) * float(sched.init_noise_sigma)
    ours, our_denoised = run_refldm(sched, eps_model, x, our_noise := SharedNoise(seed, shape))
    trials = []
    kwargs = {key: config[key] for key in ("order", "rtol", "atol", "h_init", "eta", "s_noise", "pcoeff", "icoeff",
                                           "dcoeff", "accept_safety") if key in config}

    def callback(info):
        trials.append(info)
    import torch
    result = k.sample_dpm_adaptive(k_denoiser(eps_model, table, prediction_type), torch.from_numpy(x.copy()),
                                   float(table[0]), float(table[-1]), noise_sampler=(
                                       ref_noise := SharedNoise(seed, shape, as_torch=True)),
                                   callback=callback, disable=True, return_info=True, **kwargs)
    ref, info = result[0].numpy(), result[1]
    if not config.get("eta"):
        assert our_noise.calls == []
        ref_noise.calls = []
    assert sched.info == info, (sched.info, info)  # steps, nfe, n_accept, n_reject
    assert len(sched.timesteps) == info["nfe"]
    assert [t["accepted"] for t in sched.trials] == [
        (b["n_accept"] - a) == 1 for a, b in zip([0] + [t["n_accept"] for t in trials], trials)]
    for ours_t, ref_t in zip(sched.trials, trials):
        assert abs(ours_t["error"] - float(ref_t["error"])) <= 1e-9 * max(1.0, float(ref_t["error"]))
        assert ours_t["h"] == pytest.approx(float(ref_t["h"]), rel=1e-9)
    assert_same(ours, ref, our_denoised, [t["denoised"].numpy() for t in trials], our_noise, ref_noise)
    return sched


@settings(max_examples=8, deadline=None)
@given(order=st.sampled_from([2, 3]), rtol=st.sampled_from([0.05, 0.01, 0.2]), atol=st.sampled_from([0.0078, 0.05]),
       h_init=st.sampled_from([0.05, 0.5, 2.0]), eta=st.sampled_from([0.0, 0.0, 0.6]), seed=st.integers(0, 2**16))
def test_dpm_adaptive_equals_k_diffusion(k, order, rtol, atol, h_init, eta, seed):
    adaptive_case(k, seed, config={"order": order, "rtol": rtol, "atol": atol, "h_init": h_init, "eta": eta})


def test_dpm_adaptive_rejects_and_retries_like_k_diffusion(k):
    """A large first step and a tight tolerance: rejected trials, repeated from the same x, as in k-diffusion."""
    sched = adaptive_case(k, 5, config={"rtol": 0.005, "atol": 0.001, "h_init": 3.0, "pcoeff": 0.1, "dcoeff": 0.05})
    assert sched.info["n_reject"] >= 1 and sched.info["n_accept"] >= 3


@pytest.mark.parametrize("name", ["DPM++ 2S a", "DPM++ 3M SDE", "DPM fast", "DPM adaptive"])
def test_the_built_in_unet_agrees_with_k_diffusion(k, name):
    """The built-in tiny U-Net (a v-prediction model) in float64, run by refldm's sample() and by k-diffusion
    through A1111's v denoiser wrapper."""
    import refldm
    import torch
    from refldm.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(refldm.DEFAULT_MODEL, "unet"), dtype="float64")
    width = numpy.ravel(unet.config.cross_attention_dim)[0]
    context = numpy.random.default_rng(0).standard_normal((1, 4, int(width))) * 0.5

    def eps_model(x_in, t):  # the U-Net's prediction (v for this model)
        return unet(x_in, float(t), context)
    shape = (1, 4, 8, 8)
    model_config = rs.DDIMScheduler.from_pretrained(refldm.DEFAULT_MODEL, subfolder="scheduler").config
    sched = rs.get_scheduler(name, model_config)
    if name == "DPM adaptive":
        adaptive_case(k, 1, eps_model, "v_prediction", shape=shape)
        return
    sched.set_timesteps(6)
    assert sched.config.prediction_type == "v_prediction"
    x = numpy.random.default_rng(1).standard_normal(shape) * float(sched.init_noise_sigma)
    ours, our_denoised = run_refldm(sched, eps_model, x, our_noise := SharedNoise(1, shape))
    ref_noise = SharedNoise(1, shape, as_torch=True)
    table = sched.sigmas_table
    if name == "DPM fast":
        ref, ref_denoised = run_k(k.sample_dpm_fast, eps_model, table, x, ref_noise, "v_prediction",
                                  sigma_min=float(table[0]), sigma_max=float(table[-1]), n=6)
        ref_noise.calls = []
    else:
        fn = k.sample_dpmpp_2s_ancestral if name == "DPM++ 2S a" else k.sample_dpmpp_3m_sde
        ref, ref_denoised = run_k(fn, eps_model, table, x, ref_noise, "v_prediction",
                                  sigmas=torch.from_numpy(sched.sigmas))
    assert_same(ours, ref, our_denoised, ref_denoised, our_noise, ref_noise)


# -- pipelines, CLI, names ----------------------------------------------------------------------------------------

# name -> (model calls per step, extra): 2S a calls the model twice per step but once on the last
PIPELINE_NAMES = {"DPM++ 2S a": (2, -1), "DPM++ 2S a Karras": (2, -1), "DPM++ 3M SDE Karras": (1, 0),
                  "DPM fast": (1, 0), "dpmpp_2s_ancestral": (2, -1), "dpmpp_3m_sde": (1, 0), "dpm_fast": (1, 0)}


@pytest.fixture(scope="module")
def default_pipe():
    import refldm
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)


@pytest.mark.parametrize("name", list(PIPELINE_NAMES))
def test_sd_pipeline_runs_each_name_with_its_model_calls_and_label(default_pipe, name):
    """The SD pipeline on the built-in model: per name the planned number of U-Net calls (2n - 1 for 2S a, n for 3M SDE,
    N for DPM fast), the web UIs' label in the parameters, the same image for the same seed."""
    from refldm.schedulers import names
    calls = []
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=7.5, progress=False, sampler=name)
    out = default_pipe("a red circle", seed=1, callback=lambda i, t, x: calls.append(float(t)), **kwargs)
    per_step, extra = PIPELINE_NAMES[name]
    assert len(calls) == 4 * per_step + extra
    assert f"Sampler: {names.label(name)}," in out.parameters[0]
    again = default_pipe("a red circle", seed=1, **kwargs)
    numpy.testing.assert_array_equal(numpy.asarray(out.latents), numpy.asarray(again.latents))
    if "2S a" in name or "sde" in name.lower():  # the noise enters: another seed, another result
        other = default_pipe("a red circle", seed=2, **kwargs)
        assert not numpy.array_equal(numpy.asarray(out.latents), numpy.asarray(other.latents))


def test_sd_pipeline_dpm_adaptive_and_the_cli_label(default_pipe, tmp_path, capsys):
    """DPM adaptive in the pipeline (its model calls decided as it goes, whole trials of three), and
    `refldm txt2img --sampler "DPM fast"`: the PNG records the label and holds the image the Python API gives."""
    from PIL import Image

    from refldm.cli import main
    calls = []
    out = default_pipe("a red circle", height=32, width=32, num_inference_steps=4, guidance_scale=7.5, seed=1,
                       sampler="dpm_adaptive", progress=False, callback=lambda i, t, x: calls.append(i))
    assert len(calls) % 3 == 0 and len(calls) >= 6
    assert "Sampler: DPM adaptive," in out.parameters[0]
    png = tmp_path / "out.png"
    argv = ["txt2img", "-p", "a red circle", "--steps", "5", "--cfg", "7.5", "--seed", "1", "-W", "32", "-H", "32",
            "-q", "--sampler", "DPM fast", "-o", str(png)]
    assert main(argv) == 0, capsys.readouterr().err
    ref = default_pipe("a red circle", height=32, width=32, num_inference_steps=5, guidance_scale=7.5, seed=1,
                       sampler="dpm_fast", progress=False)
    with Image.open(png) as im:
        assert "Sampler: DPM fast," in im.info["parameters"]
        numpy.testing.assert_array_equal(numpy.asarray(im.convert("RGB")), numpy.asarray(ref.images[0]))


def test_inpaint_pipeline_runs_the_k_samplers(default_pipe):
    """Inpainting (4-channel model: the kept region is re-noised to the next model call's sigma after every call)."""
    import refldm
    from PIL import Image

    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_pretrained(refldm.DEFAULT_MODEL)
    image = Image.fromarray((numpy.random.default_rng(0).random((32, 32, 3)) * 255).astype(numpy.uint8))
    mask = numpy.zeros((32, 32), numpy.uint8)
    mask[8:24, 8:24] = 255
    for name in ("DPM++ 2S a Karras", "DPM++ 3M SDE", "DPM fast", "DPM adaptive"):
        out = pipe("a red circle", image=image, mask_image=Image.fromarray(mask), height=32, width=32,
                   num_inference_steps=3, seed=1, sampler=name, progress=False)
        assert numpy.isfinite(numpy.asarray(out.latents)).all()


def test_sdxl_pipeline_runs_the_k_samplers(tmp_path):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl(tmp_path / "xl", seed=0))
    for name in ("DPM++ 2S a", "DPM++ 3M SDE Karras", "DPM fast"):
        out = pipe("a red circle", height=32, width=32, num_inference_steps=3, guidance_scale=5.0, seed=1,
                   sampler=name, progress=False)
        assert numpy.isfinite(numpy.asarray(out.latents)).all()


def test_img2img_starts_at_a_step_or_says_why_not(default_pipe):
    """2S a and 3M SDE start img2img at the strength's step; DPM fast and adaptive refuse it in one line."""
    first = default_pipe("a red circle", height=32, width=32, num_inference_steps=2, seed=1, progress=False)
    for name in ("DPM++ 2S a", "DPM++ 3M SDE"):
        out = default_pipe("a red circle", image=first.images[0], strength=0.5, height=32, width=32,
                           num_inference_steps=6, seed=1, sampler=name, progress=False)
        assert numpy.isfinite(numpy.asarray(out.latents)).all()
    for name, why in (("DPM fast", "whole sigma range"), ("DPM adaptive", "chosen as it goes")):
        with pytest.raises(ValueError, match=f"img2img \\(strength < 1\\) is not implemented: its steps .*{why}"):
            default_pipe("a red circle", image=first.images[0], strength=0.5, height=32, width=32,
                         num_inference_steps=6, seed=1, sampler=name, progress=False)


def test_dpm_adaptive_refuses_a_copy_of_its_timesteps():
    sched = rs.DPMAdaptiveScheduler(**SD)
    sched.set_timesteps(10)
    x = numpy.zeros(SHAPE)
    with pytest.raises(ValueError, match="chooses its timesteps as it goes; pass timesteps=None"):
        sample(lambda x, t: x, sched, x, list(sched.timesteps), progress=False)


@pytest.mark.parametrize("cls, key, value, message", [
    (rs.DPMPP2SAncestralScheduler, "eta", -0.5, "eta=-0.5 must be a finite number >= 0"),
    (rs.DPMPP3MSDEScheduler, "s_noise", float("nan"), "s_noise=nan must be a finite number >= 0"),
    (rs.DPMFastScheduler, "eta", "1", "eta='1' must be a finite number >= 0"),
    (rs.DPMAdaptiveScheduler, "order", 4, "order=4 must be 2 .* or 3"),
    (rs.DPMAdaptiveScheduler, "order", 3.0, "order=3.0 must be an integer"),
    (rs.DPMAdaptiveScheduler, "rtol", -0.01, "rtol=-0.01 must be a finite number >= 0"),
    (rs.DPMAdaptiveScheduler, "atol", float("inf"), "atol=inf must be a finite number >= 0"),
    (rs.DPMAdaptiveScheduler, "h_init", 0.0, "h_init=0.0 must be a finite number > 0"),
    (rs.DPMAdaptiveScheduler, "accept_safety", -1, "accept_safety=-1 must be a finite number > 0"),
])
def test_bad_arguments_are_one_clear_line_naming_the_argument(cls, key, value, message):
    with pytest.raises(ValueError, match=f"^{cls.__name__}: {message}"):
        cls(**{key: value})


def test_bad_custom_sigmas_and_tolerances():
    with pytest.raises(ValueError, match="rtol=0 and atol=0: at least one tolerance must be > 0"):
        rs.DPMAdaptiveScheduler(rtol=0, atol=0)
    sched = rs.DPMPP3MSDEScheduler()
    with pytest.raises(ValueError, match="custom sigmas must be strictly decreasing and above 0"):
        sched.set_timesteps(sigmas=[3.0, 2.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="pass exactly one of num_inference_steps, sigmas"):
        sched.set_timesteps(3, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="schedule 'karras' needs a sigma sampler; DPM fast"):
        rs.get_scheduler("DPM fast Karras")


@pytest.mark.parametrize("name", ["DPM++ 2S a", "DPM++ 3M SDE Karras", "DPM fast", "DPM adaptive"])
def test_every_backend_gives_the_numpy_result(on_backend, name):
    """float32 on each backend (numpy, the fake device, cupy on a GPU) equals the host NumPy run (to float32 rounding:
    a GPU may round its sums differently)."""
    from refldm import backend
    from refldm.core.random import Generator

    def model(x, t):
        return backend.array_namespace(x).tanh(x) * 0.5 + numpy.float32(float(t) / 2000)

    def run():
        sched = rs.get_scheduler(name, SD)
        sched.set_timesteps(6)
        x = backend.asarray(numpy.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype("float32"))
        out = sample(model, sched, x * float(sched.init_noise_sigma), generator=Generator(3), progress=False)
        assert out.dtype == numpy.float32
        return backend.to_numpy(out)
    ours = run()
    with backend.use("numpy"):
        ref = run()
    assert rel_err(ours, ref) <= 1e-6
