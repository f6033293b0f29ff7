"""The generation CLI: txt2img / img2img / info / demo, their PNG metadata, and their one-line errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from refldm.cli import generate, main
from tests.test_pipeline import build_tiny_sd

PROMPT = "a photo of a red cat"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The tiny models' matrices are small: one BLAS thread is fastest, and robust on a shared machine."""
    from refldm.backend import single_threaded_blas
    with single_threaded_blas():
        yield


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("cli") / "tiny-sd", kind="sd1", seed=1)


def run(capsys, *argv):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def parse_parameters(text: str) -> dict:
    """Read the web UIs' parameters text back, the way their PNG-info readers do: prompt lines, an
    optional "Negative prompt:" line, then one line of "Key: value" pairs separated by commas."""
    lines = text.strip().split("\n")
    *head, last = lines
    pairs = dict(re.findall(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last))
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative), **pairs}


def test_txt2img_writes_png_with_webui_parameters(tiny_folder, tmp_path, capsys):
    from refldm.pipeline import StableDiffusionPipeline
    out = tmp_path / "out.png"
    rc, stdout, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", PROMPT, "-n", "blurry, dark", "--steps", "3",
                          "--cfg", "6.5", "--seed", "42", "--sampler", "euler", "-W", "40", "-H", "32", "-o", str(out),
                          "-q")
    assert rc == 0, err
    assert str(out) in stdout
    with Image.open(out) as im:
        assert im.size == (40, 32)
        text = im.info["parameters"]
        pixels = np.asarray(im.convert("RGB"))
    meta = parse_parameters(text)
    assert meta["prompt"] == PROMPT and meta["negative"] == "blurry, dark"
    assert meta["Steps"] == "3" and meta["Sampler"] == "Euler" and meta["CFG scale"] == "6.5"
    assert meta["Seed"] == "42" and meta["Size"] == "40x32" and meta["Model"] == "tiny-sd"
    ref = StableDiffusionPipeline.from_pretrained(tiny_folder)(
        PROMPT, negative_prompt="blurry, dark", height=32, width=40, num_inference_steps=3, guidance_scale=6.5,
        seed=42, scheduler="euler", progress=False)
    np.testing.assert_array_equal(pixels, np.asarray(ref.images[0]))  # PNG is lossless


def test_parameters_chunk_is_tEXt_for_ascii(tmp_path):
    image = Image.new("RGB", (8, 8))
    path = tmp_path / "p.png"
    generate.save_png(image, path, "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 8x8, Model: m")
    data = path.read_bytes()
    assert b"tEXtparameters\x00a cat\nSteps: 20" in data


def test_img2img_and_default_seed(tiny_folder, tmp_path, capsys):
    src = tmp_path / "in.png"
    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray(np.stack([xx * 8, yy * 8, xx * 4], -1).astype(np.uint8)).save(src)
    out = tmp_path / "i2i.png"
    rc, stdout, err = run(capsys, "img2img", "-m", tiny_folder, "-i", str(src), "--strength", "0.5", "-p", "a dog",
                          "--steps", "4", "-o", str(out), "-q")
    assert rc == 0, err
    with Image.open(out) as im:
        meta = parse_parameters(im.info["parameters"])
        assert im.size == (32, 32)
    assert meta["Denoising strength"] == "0.5" and meta["Steps"] == "4"
    assert meta["Seed"].isdigit()  # a random seed, recorded so the image can be made again
    assert f"seed {meta['Seed']}" in stdout


def test_info_on_folder_and_single_file(tiny_folder, tmp_path, capsys):
    from refldm import convert, weights
    from refldm.pipeline import StableDiffusionPipeline
    rc, stdout, err = run(capsys, "info", tiny_folder)
    assert rc == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    for part in ("unet", "vae", "text_encoder"):
        n = getattr(pipe, part).num_parameters()
        assert re.search(rf"^{part}: \w+, {n:,} parameters, stored as F32$", stdout, re.M), part
    assert "block_out_channels: [16, 32, 32]" in stdout
    # a single file: the same counts, read from its header alone
    parts, configs = {}, {}
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        parts[part] = weights.load_state(weights.find_weights(os.path.join(tiny_folder, part), stem))
        configs[part] = weights.read_config(os.path.join(tiny_folder, part))
    path = tmp_path / "tiny.safetensors"
    weights.save_file({k: v.astype(np.float16) for k, v in convert.to_original(parts, configs, "sd1").items()}, path)
    rc, stdout, err = run(capsys, "info", str(path))
    assert rc == 0, err
    for part in ("unet", "vae", "text_encoder"):
        n = getattr(pipe, part).num_parameters()
        assert re.search(rf"^{part}: \w+, {n:,} parameters, stored as F16$", stdout, re.M), part


def test_txt2img_from_a_single_file_with_config(tiny_folder, tmp_path, capsys):
    from refldm import convert, weights
    parts, configs = {}, {}
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        parts[part] = weights.load_state(weights.find_weights(os.path.join(tiny_folder, part), stem))
        configs[part] = weights.read_config(os.path.join(tiny_folder, part))
    single = tmp_path / "tiny.safetensors"
    weights.save_file(convert.to_original(parts, configs, "sd1"), single)
    args = ["-p", PROMPT, "--steps", "2", "--seed", "5", "-q"]
    rc, _, err = run(capsys, "txt2img", "-m", str(single), "--config", tiny_folder, "-o", str(tmp_path / "a.png"),
                     *args)
    assert rc == 0, err
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-o", str(tmp_path / "b.png"), *args)
    assert rc == 0, err
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert "Model: tiny," in a.info["parameters"]


def test_demo_writes_one_captioned_png_and_reports_the_path(tiny_folder, tmp_path, capsys, monkeypatch):
    """The demo on the tiny folder standing in for the embedded model (the real one is tested below)."""
    monkeypatch.setattr(generate, "DEFAULT_MODEL", tiny_folder)
    out = tmp_path / "demo.png"
    rc, stdout, err = run(capsys, "demo", "-o", str(out), "--steps", "2", "-p", "a red cat", "-p", "a blue dog",
                          "-q")
    assert rc == 0, err
    for needle in ("(2, 4, 8, 8)", "(2, 3, 32, 32)", "compression", "= 12x", "load", "text encode", "denoise",
                   "decode", str(out)):
        assert needle in stdout, needle
    with Image.open(out) as im:
        assert im.width > 2 * 32 and "a red cat | a blue dog" in im.info["parameters"]


def test_txt2img_without_model_uses_the_embedded_one(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "DEFAULT_MODEL", tiny_folder)
    out = tmp_path / "default.png"
    rc, _, err = run(capsys, "txt2img", "-p", "", "--steps", "1", "-o", str(out), "-q")
    assert rc == 0, err
    with Image.open(out) as im:
        assert im.size == (32, 32) and "Model: refldm-default" in im.info["parameters"]


def test_long_prompt_warning_is_one_line(tiny_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "red cat " * 60, "--steps", "1", "-o",
                     str(tmp_path / "long.png"), "-q")
    assert rc == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("refldm: warning:") and "truncated" in warnings[0]


@pytest.mark.parametrize("argv, needle", [
    (["txt2img", "-p", "x", "-W", "33"], "multiple of 8"),
    (["txt2img", "-p", "x", "--steps", "0"], "--steps"),
    (["txt2img", "-m", "/nonexistent/model", "-p", "x"], "/nonexistent/model"),
    (["txt2img", "-m", "{tmp}/model.ckpt", "-p", "x"], "safetensors"),
    (["txt2img", "-m", "{broken}", "-p", "x"], "no vae/"),
    (["img2img", "-m", "{tiny}", "-i", "{tmp}/missing.png", "-p", "x"], "missing.png"),
    (["img2img", "-m", "{tiny}", "-i", "{tmp}/odd.png", "-p", "x"], "multiples of 8"),
    (["img2img", "-m", "{tiny}", "-i", "{tmp}/odd.png", "--strength", "2", "-p", "x"], "strength"),
    (["info", "{tmp}/model.ckpt"], "safetensors"),
])
def test_user_errors_are_one_line_without_traceback(argv, needle, tiny_folder, tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 pickle")
    Image.new("RGB", (30, 20)).save(tmp_path / "odd.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_folder):
        if name != "vae":
            os.symlink(os.path.join(tiny_folder, name), broken / name)
    argv = [a.format(tmp=tmp_path, tiny=tiny_folder, broken=broken) for a in argv]
    rc, _, err = run(capsys, *argv, "-q") if argv[0] != "info" else run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refldm: error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_captioned_grid_layout():
    cells = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue", "white")]
    grid = generate.captioned_grid(cells, ["one", "two", "three", "a much longer caption " * 3], columns=3, scale=2)
    assert grid.width == 3 * (32 + 8) + 8
    arr = np.asarray(grid)
    assert (arr[8:40, 8:40] == (255, 0, 0)).all()  # the first cell, upscaled 2x, at the top left
    below = arr[40:60, 8:40]
    assert (below < 128).any()  # caption ink under the cell


DEFAULT_MODEL = generate.DEFAULT_MODEL


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")),
                    reason="refldm/default_model is not there yet")
def test_demo_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "refldm-demo.png"
    rc, stdout, err = run(capsys, "demo", "-o", str(out), "-q")
    assert rc == 0, err
    assert "(6, 4, 8, 8)" in stdout and "(6, 3, 64, 64)" in stdout and "= 48x" in stdout
    with Image.open(out) as im:
        assert im.width >= 3 * 64
    rc, stdout, err = run(capsys, "info")
    assert rc == 0, err
    assert "the embedded model" in stdout and "unet: UNet2DConditionModel" in stdout


def test_backend_flag_switches_the_backend(tiny_folder, tmp_path, capsys, monkeypatch):
    """--backend must really switch: asking for cupy here either runs on it or fails with one clear line."""
    from refldm import backend

    rc, _, err = run(capsys, "txt2img", "-m", str(tiny_folder), "-p", "x", "--steps", "1", "-W", "32",
                     "-H", "32", "--backend", "cupy", "-o", str(tmp_path / "gpu.png"), "-q")
    if rc == 0:  # a machine with a GPU: the run really used cupy; switch back for the other tests
        assert backend.name() == "cupy"
        backend.use("numpy")
        return
    assert rc == 2 and err.startswith("refldm: error: backend 'cupy'"), err
    assert backend.name() == "numpy"
