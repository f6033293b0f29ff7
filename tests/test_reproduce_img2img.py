"""The web UIs' noise options in image-to-image, inpainting, SD3 and FLUX (refldm/pipelines/common.py
`start_noise`; docs/reproduce.md): A1111 adds its per-image noise (NV stream, variation seed, seed resize)
to the image's latents as its txt2img starts from it; the CLI's img2img / inpaint take the flags and
img2img's --from-png gives the same bytes.

The built-in model (64x64) runs the SD cases at 2 to 4 steps; SD3 and FLUX on tiny diffusers-built folders
(slow)."""

from __future__ import annotations

import numpy as np
import pytest

from refldm.cli import main
from refldm.core import pnginfo
from refldm.core.noise import webui_noise
from refldm.core.record import Recorder
from refldm.pipelines.sampling import img2img_timesteps

PROMPT = "a red circle"
WEB = dict(rng="cuda", variation_seed=3, variation_strength=0.4, seed_resize_from=(48, 56))


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


@pytest.fixture(scope="module")
def image(pipe):
    return pipe(PROMPT, seed=1, num_inference_steps=2, progress=False).images[0]


def start_and_output(pipe, *args, **kwargs):
    """(x where the loop starts (the latents before step 0), the output)."""
    with Recorder(include=["steps.0.latents"]) as r:
        out = pipe(*args, **kwargs)
    return r.activations["steps.0.latents"], out


def fields(text):
    return pnginfo.parse_parameters(text)


def web_eps(seed, batch, shape, **options):
    opts = dict(WEB, **options)
    return webui_noise(shape, seed, batch, rng="NV" if opts["rng"] == "cuda" else "CPU",
                       variation_seed=opts["variation_seed"], variation_strength=opts["variation_strength"],
                       seed_resize_from=opts["seed_resize_from"]).first()


def test_img2img_adds_the_web_uis_noise_to_the_image(pipe, image):
    """x_start = add_noise(z, eps, t_0): with the options eps is ImageNoise.first() (per-image seeds, NV,
    variation, seed resize) and z the posterior's mean; without them the start differs."""
    from refldm.core.images import scale_latents
    run = dict(image=image, strength=0.5, seed=8, num_images_per_prompt=2, sampler="DDIM", num_inference_steps=4,
               progress=False)
    x_web, out = start_and_output(pipe, "a blue square", **run, **WEB)
    z = scale_latents(pipe.vae.encode(pipe.preprocess_image(image)).mode(), pipe.vae.config)
    sched = pipe.make_scheduler("DDIM")
    sched.set_timesteps(4)
    t0 = np.repeat(np.asarray(img2img_timesteps(sched, 4, 0.5)[0])[:1], 2)
    want = np.asarray(sched.add_noise(np.concatenate([z, z]), web_eps(8, 2, (4, 8, 8)), t0))
    assert np.max(np.abs(x_web - want)) <= 1e-6               # the same float32 operations
    x_plain, _ = start_and_output(pipe, "a blue square", **run)
    assert np.max(np.abs(x_web - x_plain)) > 0.1
    texts = [fields(t) for t in out.parameters]
    assert [t["seed"] for t in texts] == [8, 8] and [t["variation_seed"] for t in texts] == [3, 4]
    assert texts[0]["rng"] == "NV" and texts[0]["seed_resize_from"] == [48, 56]
    assert texts[0]["denoising_strength"] == 0.5


def test_img2img_batch_is_seed_plus_i_and_ensd_changes_only_the_samplers_noise(pipe, image):
    run = dict(image=image, strength=0.75, num_inference_steps=4, progress=False)  # 3 steps
    batch = pipe("a blue square", seed=20, num_images_per_prompt=2, rng="cuda", sampler="Euler a", ensd=9, **run)
    alone = pipe("a blue square", seed=21, rng="cuda", sampler="Euler a", ensd=9, **run)
    assert np.max(np.abs(np.asarray(batch.latents)[1] - np.asarray(alone.latents)[0])) < 1e-4  # U-Net batch sums
    assert [fields(t)["seed"] for t in batch.parameters] == [20, 21] and fields(alone.parameters[0])["ensd"] == 9
    ddim = [pipe("a blue square", seed=4, rng="cpu", sampler="DDIM", **kw, **run).latents for kw in ({}, {"ensd": 7})]
    assert np.array_equal(ddim[0], ddim[1])                    # DDIM (eta 0) draws nothing while sampling
    anc = [pipe("a blue square", seed=4, rng="cpu", sampler="Euler a", **kw, **run).latents
           for kw in ({}, {"ensd": 7}, {"sampler_rng": "cuda"})]
    assert not np.array_equal(anc[0], anc[1]) and not np.array_equal(anc[0], anc[2])
    plain = pipe("a blue square", seed=4, sampler="DDIM", **run).latents
    assert not np.array_equal(plain, ddim[0])  # A1111's noise: a fresh generator's draw, not diffusers' second


def test_inpaint_starts_from_the_web_uis_noise(pipe, image):
    """strength 1 on a 4-channel U-Net: x_T = eps * init_noise_sigma (DDIM: 1), eps = ImageNoise.first()."""
    from PIL import Image

    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    inpaint = StableDiffusionInpaintPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet,
                                             pipe.scheduler_config, pipe.configs, name=pipe.name)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    x, out = start_and_output(inpaint, "a blue square", image=image, mask_image=mask, seed=5, num_inference_steps=2,
                              sampler="DDIM", num_images_per_prompt=2, progress=False, **WEB)
    assert np.array_equal(x, web_eps(5, 2, (4, 8, 8)))
    got = fields(out.parameters[1])
    assert got["seed"] == 5 and got["variation_seed"] == 4 and got["rng"] == "NV"
    with pytest.raises(ValueError, match="variation_strength=2 must lie in"):
        inpaint("x", image=image, mask_image=mask, seed=1, variation_seed=1, variation_strength=2, progress=False)


# -- the CLI ------------------------------------------------------------------------------------------------------


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("noise, other", [
    (("--rng", "cuda", "--ensd", "5", "--variation-seed", "2", "--variation-strength", "0.3"),
     ("--sampler", "Euler a")),
    (("--seed-resize-from", "48x40", "--sampler-rng", "cuda"), ("--sampler", "DPM++ SDE Karras", "--strength", "0.7")),
])
def test_img2img_from_png_gives_the_same_bytes(tmp_path, capsys, image, noise, other):
    src, first, second, plain = (tmp_path / f"{name}.png" for name in ("in", "a", "b", "c"))
    image.save(src)
    base = ("img2img", "-i", src, "-p", "a blue square", "--steps", "3", "--seed", "3", "-q", *other)
    rc, _, err = cli(capsys, *base, *noise, "-o", first)
    assert rc == 0, err
    rc, _, err = cli(capsys, "img2img", "-i", src, "--from-png", first, "-q", "-o", second)
    assert rc == 0 and "warning" not in err, err
    assert first.read_bytes() == second.read_bytes()
    rc, _, err = cli(capsys, *base, "-o", plain)
    assert rc == 0 and plain.read_bytes() != first.read_bytes()  # the options change the image


def test_inpaint_cli_takes_the_noise_flags(tmp_path, capsys, image):
    from PIL import Image
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    image.save(src)
    Image.new("L", (64, 64), 255).save(mask)
    rc, _, err = cli(capsys, "inpaint", "-i", src, "--mask", mask, "-p", "x", "--steps", "2", "--seed", "4", "-q",
                     "--rng", "cuda", "--ensd", "31337", "-o", out)
    assert rc == 0, err
    got = fields(Image.open(out).info["parameters"])
    assert got["rng"] == "NV" and got["ensd"] == 31337 and got["model_hash"]
    rc, _, err = cli(capsys, "inpaint", "-i", src, "--mask", mask, "-p", "x", "--rng", "mt", "-o", tmp_path / "y.png")
    assert rc != 0 and "--rng: unknown random source 'mt'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y.png").exists()


# -- SD3 and FLUX (tiny diffusers-built folders) ----------------------------------------------------------------


def test_sd3_noise_options_txt2img_img2img_and_cli(tmp_path, capsys):
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from tests.test_sd3_pipeline import build_tiny_sd3
    folder = build_tiny_sd3(tmp_path / "sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    run = dict(height=32, width=32, num_inference_steps=2, progress=False, max_sequence_length=8)
    x, out = start_and_output(pipe, PROMPT, seed=6, num_images_per_prompt=2, **run, **WEB)
    assert np.array_equal(x, web_eps(6, 2, (16, 8, 8)))         # sigma_1 = 1: the start is the noise
    assert [fields(t)["variation_seed"] for t in out.parameters] == [3, 4]
    assert np.array_equal(pipe(PROMPT, seed=6, rng="cpu", **run).latents, pipe(PROMPT, seed=6, **run).latents)
    i2i = StableDiffusion3Img2ImgPipeline.from_pretrained(folder)
    a = i2i(PROMPT, image=out.images[0], seed=6, strength=0.7, **run)
    b = i2i(PROMPT, image=out.images[0], seed=6, strength=0.7, **run, **WEB)
    assert not np.array_equal(a.latents, b.latents) and fields(b.parameters[0])["rng"] == "NV"
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    rc, _, err = cli(capsys, "txt2img", "-m", folder, "-p", PROMPT, "-W", "32", "-H", "32", "--steps", "2", "--seed",
                     "2", "--rng", "cuda", "--variation-seed", "5", "--variation-strength", "0.5", "-q", "-o", first)
    assert rc == 0, err
    rc, _, err = cli(capsys, "txt2img", "-m", folder, "--from-png", first, "-q", "-o", second)
    assert rc == 0 and "warning" not in err, err
    assert first.read_bytes() == second.read_bytes()
    rc, _, err = cli(capsys, "txt2img", "-m", folder, "-p", PROMPT, "-W", "32", "-H", "32", "--hires-scale", "2",
                     "-o", tmp_path / "c.png")
    assert rc != 0 and "--hires-scale: StableDiffusion3Pipeline does not take it" in err


def test_flux_noise_options_txt2img_and_img2img(tmp_path):
    from refldm.models.flux_transformer import pack_latents
    from refldm.pipelines.flux import FluxImg2ImgPipeline, FluxPipeline
    from tests.test_flux_pipeline import build_tiny_flux
    folder = build_tiny_flux(tmp_path / "flux")
    pipe = FluxPipeline.from_pretrained(folder)
    run = dict(height=32, width=32, num_inference_steps=2, progress=False, max_sequence_length=8)
    x, out = start_and_output(pipe, [PROMPT, PROMPT], seed=6, **run, **WEB)
    assert np.array_equal(x, np.asarray(pack_latents(web_eps(6, 2, (16, 8, 8)))))
    got = [fields(t) for t in out.parameters]
    assert [g["variation_seed"] for g in got] == [3, 4] and got[0]["rng"] == "NV" and got[0]["seed"] == 6
    assert np.array_equal(pipe(PROMPT, seed=6, rng="cpu", **run).latents, pipe(PROMPT, seed=6, **run).latents)
    i2i = FluxImg2ImgPipeline.from_pretrained(folder)
    a = i2i(PROMPT, image=out.images[0], seed=6, strength=0.7, **run)
    b = i2i(PROMPT, image=out.images[0], seed=6, strength=0.7, **run, **WEB)
    assert not np.array_equal(a.latents, b.latents) and fields(b.parameters[0])["seed_resize_from"] == [48, 56]


def test_sdxl_img2img_noise_options_and_the_comfyui_split(tmp_path):
    from refldm.core.images import scale_latents
    from refldm.models.vae import encode_upcast
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    folder = build_tiny_sdxl(tmp_path / "base", seed=0)
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    run = dict(num_inference_steps=4, progress=False, sampler="Euler", seed=5)
    whole = base(PROMPT, height=32, width=32, output_type="latent", **run).latents
    split = base(PROMPT, height=32, width=32, output_type="latent", hires_scale=1, hires_denoise=1.0,
                 hires_comfyui={"seed": 5, "start": 2}, **run).latents
    assert np.array_equal(whole, split)  # Euler keeps no state: 0..2 then 2..4 is the whole schedule
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    image = base(PROMPT, height=32, width=32, **run).images[0]
    x, out = start_and_output(pipe, PROMPT, image=image, strength=0.5, sampler="DDIM", seed=5,
                              num_inference_steps=4, progress=False, **WEB)
    z = scale_latents(encode_upcast(pipe.vae, pipe.preprocess_image(image)).mode(), pipe.vae.config)
    sched = pipe.make_scheduler("DDIM")
    sched.set_timesteps(4)
    t0 = np.asarray(img2img_timesteps(sched, 4, 0.5)[0])[:1]
    want = np.asarray(sched.add_noise(z, web_eps(5, 1, (4, 8, 8)), t0))
    assert np.max(np.abs(x - want)) <= 1e-6
    assert fields(out.parameters[0])["variation_seed"] == 3
    with pytest.raises(ValueError, match="not with denoising_start"):
        pipe(PROMPT, image=whole, denoising_start=0.5, seed=5, rng="cuda", progress=False)
