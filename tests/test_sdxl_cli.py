"""The CLI on SDXL folders: txt2img detects SDXL, --refiner / --denoising-end, info shows both encoders, the
PNG records the sizes; bad input is one line. The folders are tests/test_sdxl_pipeline.py's tiny ones."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import parse_parameters, run
from tests.test_sdxl_pipeline import PROMPT, build_tiny_sdxl


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cli")
    return str(build_tiny_sdxl(root / "base", seed=0)), str(build_tiny_sdxl(root / "refiner", refiner=True, seed=1))


def test_txt2img_detects_sdxl_and_refiner_matches_the_python_api(folders, tmp_path, capsys):
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    base, refiner = folders
    out = tmp_path / "xl.png"
    rc, stdout, err = run(capsys, "txt2img", "-m", base, "--refiner", refiner, "--denoising-end", "0.75", "-p",
                          PROMPT, "--steps", "8", "--seed", "3", "-W", "32", "-H", "24", "--sampler", "euler", "-q",
                          "-o", str(out))
    assert rc == 0, err
    image = Image.open(out)
    meta = parse_parameters(image.info["parameters"])
    assert meta["Size"] == "32x24" and meta["Original size"] == "32x24" and meta["Target size"] == "32x24"
    assert meta["Refiner switch at"] == "0.75" and meta["Refiner"] == "refiner"
    b = StableDiffusionXLPipeline.from_pretrained(base)
    r = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    lat = b(PROMPT, height=24, width=32, num_inference_steps=8, guidance_scale=7.5, seed=3, scheduler="euler",
            denoising_end=0.75, output_type="latent", progress=False).latents
    want = r(PROMPT, image=lat, num_inference_steps=8, guidance_scale=7.5, seed=3, scheduler="euler",
             denoising_start=0.75, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want))


def test_info_shows_both_text_encoders_and_tokenizers(folders, capsys):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    rc, stdout, err = run(capsys, "info", folders[0])
    assert rc == 0, err
    pipe = StableDiffusionXLPipeline.from_pretrained(folders[0])
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        n = getattr(pipe, part).num_parameters()
        assert re.search(rf"^{part}: \w+, {n:,} parameters, stored as F32$", stdout, re.M), part
    assert re.search(r"^tokenizer_2: ", stdout, re.M)
    rc, stdout, err = run(capsys, "info", folders[1])  # the refiner: encoder 2 alone
    assert rc == 0, err
    assert re.search(r"^text_encoder_2: CLIPTextModelWithProjection", stdout, re.M)
    assert not re.search(r"^text_encoder: ", stdout, re.M)


@pytest.mark.parametrize("which, extra, match", [
    ("base", ["--refiner", "BASE", "--denoising-end", "0.8"], "a base model, not a refiner"),
    ("base", ["--denoising-end", "1.5", "--refiner", "REFINER"], "--denoising-end must lie strictly between 0 and 1"),
    ("base", ["--denoising-end", "0.8"], "--denoising-end needs --refiner"),
    ("refiner", [], "SDXL refiner.*StableDiffusionXLImg2ImgPipeline"),
    ("base", ["-W", "36"], "multiple of 8"),
])
def test_bad_input_is_one_line(folders, tmp_path, capsys, which, extra, match):
    base, refiner = folders
    extra = [{"BASE": base, "REFINER": refiner}.get(a, a) for a in extra]
    rc, _, err = run(capsys, "txt2img", "-m", base if which == "base" else refiner, "-p", PROMPT, "--steps", "2",
                     "-q", "-o", str(tmp_path / "x.png"), *extra)
    assert rc == 2
    assert re.search(match, err), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_single_file_with_config_and_img2img_on_sdxl(folders, tmp_path, capsys):
    import os
    from refldm.checkpoints import convert, weights
    from tests.test_pipeline import gradient_image
    base = folders[0]
    parts = {p: weights.load_state(weights.find_weights(os.path.join(base, p), stem)) for p, stem in
             (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"),
              ("text_encoder_2", "model"))}
    configs = {p: weights.read_config(os.path.join(base, p)) for p in parts}
    path = tmp_path / "xl.safetensors"
    weights.save_file(convert.to_original(parts, configs, "sdxl"), path)
    a, b = tmp_path / "file.png", tmp_path / "folder.png"
    common = ["-p", PROMPT, "--steps", "2", "--seed", "1", "-W", "32", "-H", "32", "-q"]
    assert run(capsys, "txt2img", "-m", str(path), "--config", base, *common, "-o", str(a))[0] == 0
    assert run(capsys, "txt2img", "-m", base, *common, "-o", str(b))[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    rc, _, err = run(capsys, "txt2img", "-m", str(path), *common, "-o", str(a))
    assert rc == 2 and "give --config an SDXL diffusers folder" in err
    src = tmp_path / "in.png"
    gradient_image().save(src)
    rc, _, err = run(capsys, "img2img", "-m", base, "-i", str(src), "--strength", "0.5", "-p", PROMPT, "--steps", "4",
                     "--seed", "1", "-q", "-o", str(tmp_path / "i2i.png"))
    assert rc == 0, err
    assert Image.open(tmp_path / "i2i.png").size == (32, 32)
