"""The web UIs' noise options, Model hash, hires fix and --from-png, wired into the pipelines and the CLI
(refldm/pipelines/common.py, refldm/cli/generate.py; docs/reproduce.md).

The built-in model (64x64, no torch needed) runs every case at 2 steps; the latent upscale modes are
checked against torch.nn.functional.interpolate and SDXL's wiring on a tiny diffusers-built SDXL (slow)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.cli import main
from refldm.core import pnginfo
from refldm.core.noise import webui_noise
from refldm.pipelines import common
from tests.conftest import require

PROMPT = "a red circle"
RUN = dict(num_inference_steps=2, progress=False, height=64, width=64)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


@pytest.fixture(scope="module")
def pipe():
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


def fields(text: str) -> dict:
    return pnginfo.parse_parameters(text)


# -- the noise options in the pipeline -----------------------------------------------------------------------


def test_defaults_and_rng_cpu_keep_todays_noise(pipe):
    """No option: the noise of before (checked against diffusers in test_pipeline.py); rng="cpu" for one
    image is the same CPU stream, so the same pixels, and the text says RNG: CPU."""
    base = pipe(PROMPT, seed=3, **RUN)
    cpu = pipe(PROMPT, seed=3, rng="cpu", **RUN)
    assert np.array_equal(np.asarray(base.images[0]), np.asarray(cpu.images[0]))
    assert "RNG" not in fields(base.parameters[0])["other"] and fields(base.parameters[0])["defaults"]
    assert fields(cpu.parameters[0])["rng"] == "CPU"
    assert fields(base.parameters[0])["model_hash"] == pipe.model_hash


def test_initial_noise_is_the_web_uis(pipe):
    """The pipeline starts from ImageNoise.first() (per image seeds, NV stream, variation, resize)."""
    opts = dict(rng="cuda", variation_seed=5, variation_strength=0.3, seed_resize_from=(48, 56))
    out = pipe(PROMPT, seed=11, num_images_per_prompt=2, sampler="DDIM", **opts, **RUN)
    x = webui_noise((4, 8, 8), 11, 2, rng="NV", variation_seed=5, variation_strength=0.3,
                    seed_resize_from=(48, 56)).first()
    mine = pipe(PROMPT, seed=11, num_images_per_prompt=2, sampler="DDIM", latents=x, **RUN)
    assert np.array_equal(np.asarray(out.latents), np.asarray(mine.latents))
    got = [fields(t) for t in out.parameters]
    assert [g["seed"] for g in got] == [11, 11] and [g["variation_seed"] for g in got] == [5, 6]
    assert got[0]["rng"] == "NV" and got[0]["variation_seed_strength"] == 0.3 and got[0]["seed_resize_from"] == [48, 56]


def test_batch_image_i_is_seed_plus_i_with_its_own_sampler_noise(pipe):
    """A1111: image i of a batch is the image of seed + i alone, ancestral noise (and ENSD) included."""
    opts = dict(rng="cuda", ensd=31337, sampler="Euler a")
    batch = pipe(PROMPT, seed=20, num_images_per_prompt=2, **opts, **RUN)
    second = pipe(PROMPT, seed=21, **opts, **RUN)
    # the same noise throughout; only the U-Net's float32 sums differ between a batch of 2 and of 1
    assert np.max(np.abs(np.asarray(batch.latents)[1] - np.asarray(second.latents)[0])) < 1e-4
    assert np.max(np.abs(np.asarray(batch.latents)[0] - np.asarray(second.latents)[0])) > 0.1
    assert [fields(t)["seed"] for t in batch.parameters] == [20, 21]
    assert fields(second.parameters[0])["ensd"] == 31337


def test_ensd_and_sampler_rng_change_only_the_samplers_noise(pipe):
    ddim = [pipe(PROMPT, seed=4, rng="cpu", sampler="DDIM", **kw, **RUN).latents for kw in ({}, {"ensd": 7})]
    assert np.array_equal(ddim[0], ddim[1])  # DDIM (eta 0) draws no noise while sampling
    anc = [pipe(PROMPT, seed=4, rng="cpu", sampler="Euler a", **kw, **RUN) for kw in
           ({}, {"ensd": 7}, {"sampler_rng": "cuda"})]
    assert not np.array_equal(anc[0].latents, anc[1].latents)
    assert not np.array_equal(anc[0].latents, anc[2].latents)
    assert fields(anc[2].parameters[0])["other"]["Sampler RNG"] == "NV"


@pytest.mark.parametrize("kwargs, words", [
    (dict(rng="gpu2"), "choose cpu or cuda"),
    (dict(variation_seed=1, variation_strength=1.5), "variation_strength=1.5 must lie in [0, 1]"),
    (dict(variation_strength=0.5), "needs a variation_seed"),
    (dict(seed_resize_from=(4, 64)), "seed_resize_from=4x64: each side must be at least 8 pixels"),
    (dict(ensd=-2), "ensd must be an integer >= 0"),
    (dict(hires_scale=1.3), "the nearest sizes are 80x80 and 88x88"),
    (dict(hires_scale=2, hires_upscaler="ESRGAN"), "'Latent (bicubic)'"),
    (dict(hires_scale=2, hires_denoise=0), "hires_denoise=0 must lie in (0, 1]"),
])
def test_bad_noise_and_hires_arguments_are_one_line(pipe, kwargs, words):
    with pytest.raises(ValueError) as e:
        pipe(PROMPT, seed=1, **kwargs, **RUN)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_model_hash_of_a_folder_is_its_unet_weights_file(pipe, tmp_path):
    from refldm.about import DEFAULT_MODEL
    assert common.checkpoint_hash(DEFAULT_MODEL) == pnginfo.model_hash(
        os.path.join(DEFAULT_MODEL, "unet", "diffusion_pytorch_model.safetensors"))
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"abc")
    assert common.checkpoint_hash(single) == "ba7816bf8f"  # sha256("abc")
    assert common.checkpoint_hash(tmp_path / "none") is None


# -- hires fix -------------------------------------------------------------------------------------------------


def test_hires_fix_makes_the_larger_image_and_records_the_web_uis_fields(pipe):
    out = pipe(PROMPT, seed=2, hires_scale=1.5, hires_steps=3, hires_denoise=0.55, hires_upscaler="Latent (nearest)",
               **RUN)
    assert out.images[0].size == (96, 96) and out.latents.shape == (1, 4, 12, 12)
    got = fields(out.parameters[0])
    assert (got["width"], got["height"]) == (64, 64)  # Size is the first pass's, as A1111 writes it
    assert got["hires_upscale"] == 1.5 and got["hires_steps"] == 3 and got["denoising_strength"] == 0.55
    assert got["hires_upscaler"] == "Latent (nearest)"
    pixel = pipe(PROMPT, seed=2, hires_scale=2, hires_upscaler="Lanczos", **RUN)
    assert pixel.images[0].size == (128, 128)


@pytest.mark.parametrize("steps, denoise, run", [(10, 0.5, 6), (20, 0.7, 15), (4, 1.0, 4), (10, 0.05, 1)])
def test_hires_steps_follow_a1111s_img2img_rule(pipe, steps, denoise, run):
    """t_enc = int(min(d, 0.999) * steps); the last t_enc + 1 steps run."""
    sched = pipe.make_scheduler("Euler")
    sched.set_timesteps(steps)
    assert len(common.hires_timesteps(sched, steps, denoise)) == run


def test_latent_upscale_nearest_and_constants():
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 5)).astype(np.float32)
    assert np.array_equal(common.upscale_latents(x, (6, 10), "nearest"), x.repeat(2, 2).repeat(2, 3))
    flat = np.full((1, 1, 4, 4), 0.25, np.float32)
    for mode in ("bilinear", "bicubic"):
        assert np.allclose(common.upscale_latents(flat, (7, 9), mode), 0.25, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(st.integers(2, 9), st.integers(2, 9), st.integers(2, 19), st.integers(2, 19),
       st.sampled_from(["nearest", "nearest-exact", "bilinear", "bicubic"]))
def test_latent_upscale_modes_match_torch(h, w, big_h, big_w, mode):
    torch = require("torch")
    x = np.random.default_rng(h * 31 + w).standard_normal((1, 3, h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(big_h, big_w), mode=mode).numpy()
    got = np.asarray(common.upscale_latents(x, (big_h, big_w), mode))
    if mode.startswith("nearest"):
        assert np.array_equal(got, want)
    else:
        assert np.max(np.abs(got - want)) <= (1e-6 if mode == "bilinear" else 8e-6)


def test_sdxl_noise_options_and_hires(tmp_path):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    folder = build_tiny_sdxl(tmp_path / "base", seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    run = dict(num_inference_steps=2, progress=False, height=32, width=32, sampler="Euler a")
    out = pipe(PROMPT, seed=5, rng="cuda", ensd=3, hires_scale=1.5, hires_upscaler="Latent (bicubic)", **run)
    assert out.images[0].size == (48, 48)
    got = fields(out.parameters[0])
    assert got["rng"] == "NV" and got["ensd"] == 3 and got["hires_upscale"] == 1.5 and got["width"] == 32
    assert got["model_hash"] == pnginfo.model_hash(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    plain = pipe(PROMPT, seed=5, **run)
    cpu = pipe(PROMPT, seed=5, rng="cpu", **run)  # one image: the same CPU stream as the default
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(cpu.images[0]))


# -- the CLI: flags, --from-png round trips --------------------------------------------------------------------


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


BASE = ("txt2img", "-p", PROMPT, "--steps", "2", "-W", "64", "-H", "64", "--seed", "7", "-q")


@pytest.mark.parametrize("flags", [
    (),
    ("--rng", "cuda", "--ensd", "31337", "--sampler", "Euler a", "--clip-skip", "1"),
    ("--variation-seed", "9", "--variation-strength", "0.4", "--seed-resize-from", "48x56", "--sampler-rng", "cuda",
     "--sampler", "Euler a"),
    ("--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.5", "--hires-upscaler", "Latent (bicubic)",
     "--sampler", "DPM++ SDE Karras", "--rng", "cpu"),
])
def test_from_png_gives_the_same_bytes(tmp_path, capsys, flags):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    rc, _, err = cli(capsys, *BASE, *flags, "-o", first)
    assert rc == 0, err
    rc, _, err = cli(capsys, "txt2img", "--from-png", first, "-q", "-o", second)
    assert rc == 0 and "warning" not in err, err
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("flags, words", [
    (("--rng", "philox"), "--rng: unknown random source 'philox'; choose cpu or cuda"),
    (("--variation-seed", "3", "--variation-strength", "2"), "--variation-strength 2.0 must lie in [0, 1]"),
    (("--seed-resize-from", "64"), "--seed-resize-from '64': give WIDTHxHEIGHT"),
    (("--hires-scale", "1.1"), "the nearest sizes are 64x64 and 72x72"),
    (("--sampler-rng", "x"), "--sampler-rng: unknown random source"),
    (("--ensd", "-1"), "--ensd must be an integer >= 0"),
])
def test_bad_flags_one_line_no_file(tmp_path, capsys, flags, words):
    out = tmp_path / "x.png"
    rc, _, err = cli(capsys, *BASE, *flags, "-o", out)
    assert rc != 0 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_from_png_names_what_it_cannot_honour_and_a_different_model(tmp_path, capsys):
    from PIL import Image, PngImagePlugin
    src = tmp_path / "webui.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nNegative prompt: blue\nSteps: 2, Sampler: DPM++ 2M, Schedule type: "
                  "Karras, CFG scale: 3, Seed: 5, Size: 64x64, Model hash: 0123456789, Model: other, RNG: NV, "
                  "Eta: 0.5, Hires sampler: DDIM, Face restoration: CodeFormer, Version: v1.9.0")
    Image.new("RGB", (8, 8)).save(src, pnginfo=info)
    out = tmp_path / "out.png"
    rc, _, err = cli(capsys, "txt2img", "--from-png", src, "-q", "-o", out)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert any("cannot honour Eta, Hires sampler, Face restoration" in line for line in lines), err
    assert any("Model hash 0123456789" in line for line in lines), err
    got = fields(Image.open(out).info["parameters"])
    assert got["seed"] == 5 and got["rng"] == "NV" and got["sampler"] == "DPM++ 2M Karras"
    rc, _, err = cli(capsys, "txt2img", "--from-png", tmp_path / "missing.png", "-o", tmp_path / "y.png")
    assert rc != 0 and "no such image file" in err and not (tmp_path / "y.png").exists()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "x\nSteps: 2, Sampler: Euler a, Schedule type: Karras, Seed: 5, Size: 64x64")
    Image.new("RGB", (8, 8)).save(src, pnginfo=info)
    rc, _, err = cli(capsys, "txt2img", "--from-png", src, "-o", tmp_path / "y.png")
    assert rc != 0 and "sampler 'Euler a Karras' is not one refldm runs" in err and not (tmp_path / "y.png").exists()


def test_sd_parsers_reads_every_field_the_pipeline_writes(pipe, tmp_path):
    """A real metadata reader (sd-parsers) reads a pipeline's PNG with every option on, field for field."""
    sd_parsers = require("sd_parsers")
    out = pipe(PROMPT, negative_prompt="blue", seed=6, rng="cuda", ensd=31337, variation_seed=2, variation_strength=0.5,
               seed_resize_from=(48, 48), sampler_rng="cpu", clip_skip=1, hires_scale=1.5, hires_steps=2,
               hires_upscaler="Latent (nearest-exact)", **RUN)
    path = tmp_path / "all.png"
    out.save(path)
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    theirs = dict(info.metadata)
    back = {"cfg_scale": "CFG scale", "seed": "Seed", "steps": "Steps", "ensd": "ENSD", "scheduler": "Schedule type"}
    theirs.update({back[k]: v for k, v in sampler.parameters.items()})
    theirs.update({"Sampler": sampler.name, "Model": sampler.model.name, "Model hash": sampler.model.hash})
    ours = {name.strip(): value.strip() for name, value in pnginfo._FIELD.findall(out.parameters[0].splitlines()[-1])}
    wanted = {"RNG", "ENSD", "Variation seed", "Seed resize from", "Hires upscaler", "Model hash", "Clip skip"}
    assert wanted <= set(ours)
    assert theirs == ours
    assert [p.value for p in sampler.prompts] == [PROMPT] and [p.value for p in sampler.negative_prompts] == ["blue"]
