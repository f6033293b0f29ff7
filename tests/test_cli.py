"""The generation CLI: txt2img / img2img / info / demo, their PNG metadata, and their one-line errors."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from refldm.cli import common as cli_common  # load_pipeline finds the embedded model here
from refldm.cli import generate, main
from tests.test_pipeline import build_tiny_sd

PROMPT = "a photo of a red cat"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The tiny models' matrices are small: one BLAS thread is fastest, and robust on a shared machine."""
    from refldm.accel import single_threaded_blas
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
    from refldm.pipelines.sd import StableDiffusionPipeline
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
    from refldm.checkpoints import convert, weights
    from refldm.pipelines.sd import StableDiffusionPipeline
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
    from refldm.checkpoints import convert, weights
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
    monkeypatch.setattr(cli_common, "DEFAULT_MODEL", tiny_folder)
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
    monkeypatch.setattr(cli_common, "DEFAULT_MODEL", tiny_folder)
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


# ---------------------------------------------------------------------------------------------------------------
# Hardening (issue 12): outputs checked before the work and written atomically, values refused rather than
# silently changed, one line instead of a traceback


@pytest.fixture
def no_work(monkeypatch):
    """Make any model load fail loudly: a test using this proves its error came before the work."""
    from refldm.models.vae import AutoencoderKL

    def fail(*args, **kwargs):
        raise AssertionError("the work started before the error")

    monkeypatch.setattr(generate, "load_pipeline", fail)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(fail))


def one_error_line(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refldm: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


BAD_OUTPUTS = [("/nonexistent/dir/out.png", "does not exist"), ("/proc/x.png", "cannot write"),
               ("{tmp}", "is a folder"), ("", "empty"), ("{tmp}/out.xyz", "must end in")]


@pytest.mark.parametrize("output, needle", BAD_OUTPUTS, ids=["no-folder", "proc", "a-folder", "empty", "suffix"])
@pytest.mark.parametrize("command", ["txt2img", "img2img", "demo", "encode", "decode"])
def test_output_path_is_checked_before_the_work(command, output, needle, tmp_path, capsys, no_work):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    np.save(tmp_path / "z.npy", np.zeros((1, 4, 2, 2), np.float32))
    output = output.format(tmp=tmp_path)
    if command == "encode":
        needle = {"must end in": "must end in .npy"}.get(needle, needle)
        output = output.replace(".png", ".npy")
    argv = {"txt2img": ["txt2img", "-p", "x", "-q"], "demo": ["demo", "-q"],
            "img2img": ["img2img", "-i", str(tmp_path / "in.png"), "-p", "x", "-q"],
            "encode": ["encode", str(tmp_path / "in.png"), "-m", "vae"],
            "decode": ["decode", str(tmp_path / "z.npy"), "-m", "vae"]}[command]
    rc, _, err = run(capsys, *argv, "-o", output)
    assert rc == 2
    one_error_line(err, needle)


def test_jpeg_output_is_jpeg_with_the_parameters(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out.jpg"
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", PROMPT, "--steps", "1", "--seed", "3", "-o",
                     str(out), "-q")
    assert rc == 0, err
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, not PNG bytes under a .jpg name
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
        comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0") and "Seed: 3" in comment[8:].decode("utf-16-be")


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A crash or Ctrl-C in the middle of writing leaves the old file whole and no stray temporary file."""
    from refldm.core.images import save_pil
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    before = out.read_bytes()
    original = Image.Image.save

    def half_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_pil(Image.new("RGB", (8, 8), (9, 9, 9)), out, "params")
    monkeypatch.setattr(Image.Image, "save", original)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    save_pil(Image.new("RGB", (8, 8), (9, 9, 9)), out, "params")
    with Image.open(out) as im:
        assert im.getpixel((0, 0)) == (9, 9, 9) and im.info["parameters"] == "params"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_killed_process_leaves_the_previous_file(tmp_path):
    """SIGKILL while the image is being written: the earlier file survives whole."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    before = out.read_bytes()
    script = ("import os, signal\nfrom PIL import Image\nfrom refldm.core.images import atomic_write\n"
              "def write(f):\n    f.write(b'partial')\n    f.flush()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write({str(out)!r}, write)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == before


@pytest.mark.parametrize("flags, needle", [
    (["--cfg", "nan"], "--cfg nan"), (["--cfg", "inf"], "--cfg inf"), (["--cfg", "1e30"], "--cfg 1e+30"),
    (["--cfg", "-1"], "outside"), (["--seed", str(2 ** 64)], "outside 0..2**64-1"),
    (["--seed", str(2 ** 100)], "outside"), (["--seed", "-1"], "outside"), (["--steps", "0"], "--steps"),
])
@pytest.mark.parametrize("command", ["txt2img", "demo"])
def test_values_outside_their_range_are_refused(command, flags, needle, tmp_path, capsys, no_work):
    argv = ["txt2img", "-p", "x"] if command == "txt2img" else ["demo"]
    rc, _, err = run(capsys, *argv, *flags, "-o", str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, needle)


def test_largest_seed_is_taken_and_recorded(tiny_folder, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", PROMPT, "--steps", "1", "--seed", str(2 ** 64 - 1),
                     "-o", str(out), "-q")
    assert rc == 0, err
    with Image.open(out) as im:
        assert parse_parameters(im.info["parameters"])["Seed"] == str(2 ** 64 - 1)


def test_too_many_steps_for_the_schedule_is_one_line(tiny_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "x", "--steps", "1000", "--sampler", "ddim", "-o",
                     str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, "1000 steps", "at most 999")


def test_builtin_model_defaults_are_its_recommended_settings(tiny_folder, tmp_path, capsys, monkeypatch):
    """Without -m the built-in model's measured settings (25 steps, CFG 3); explicit flags still win."""
    monkeypatch.setattr(cli_common, "DEFAULT_MODEL", tiny_folder)
    out = tmp_path / "d.png"
    rc, _, err = run(capsys, "txt2img", "-p", "x", "-o", str(out), "-q")
    assert rc == 0, err
    with Image.open(out) as im:
        meta = parse_parameters(im.info["parameters"])
    assert meta["Steps"] == str(generate.DEMO_STEPS) == "25" and meta["CFG scale"] == "3"
    rc, _, err = run(capsys, "txt2img", "-p", "x", "--steps", "2", "--cfg", "5", "-o", str(out), "-q")
    with Image.open(out) as im:
        meta = parse_parameters(im.info["parameters"])
    assert meta["Steps"] == "2" and meta["CFG scale"] == "5"
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "x", "-o", str(out), "-q")
    with Image.open(out) as im:
        meta = parse_parameters(im.info["parameters"])
    assert meta["Steps"] == "20" and meta["CFG scale"] == "7.5"


def test_huge_size_is_refused_before_the_work_saying_what_it_takes(tiny_folder, tmp_path, capsys):
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "x", "-W", "100000", "-H", "100000", "-o",
                     str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, "100000x100000", "GiB of memory", "available")


def test_long_runs_announce_an_estimated_time(tiny_folder, capsys):
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    generate.check_resources(pipe, 1, 2048, 2048, 25, 7.5, announce_after_s=0)
    err = capsys.readouterr().err
    assert "2048x2048, 25 steps: estimated" in err and "minutes" in err
    from refldm.analysis.cost import estimate_pipeline  # the one cost model (refldm/analysis/cost.py)
    small = estimate_pipeline(pipe, 1, 32, 32, 25, 7.5)
    big = estimate_pipeline(pipe, 1, 2048, 2048, 25, 7.5)
    assert big["flops"] > 4096 * small["flops"] and big["bytes"] > small["bytes"]


def test_non_utf8_prompt_byte_is_one_line(tmp_path, capsys, no_work):
    bad = b"a cat \xff".decode("utf-8", "surrogateescape")  # how Python hands over such an argv byte
    rc, _, err = run(capsys, "txt2img", "-p", bad, "-o", str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, "--prompt", "0xff", "UTF-8")


def test_image_input_errors_name_the_file(tmp_path, capsys, no_work, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-200])
    rc, _, err = run(capsys, "img2img", "-i", str(cut), "-p", "x", "-o", str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, str(cut))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64x64 image is then a "decompression bomb"
    rc, _, err = run(capsys, "img2img", "-i", str(good), "-p", "x", "-o", str(tmp_path / "o.png"), "-q")
    assert rc == 2
    one_error_line(err, str(good), "too large")


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from refldm.core.images import load_image
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(load_image(path))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 64, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_bad_latents_are_one_line_before_allocating(tmp_path, capsys, no_work):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 4, 4, 4), np.float32))
    rc, _, err = run(capsys, "decode", str(empty), "-m", "vae", "-o", str(tmp_path / "o.png"))
    assert rc == 2
    one_error_line(err, "(0, 4, 4, 4)")
    huge = tmp_path / "huge.npy"  # a header claiming (1, 4, 100000, 100000) float32 (149 GiB), 16 bytes of data
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 100000, 100000), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    huge.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 16)
    rc, _, err = run(capsys, "decode", str(huge), "-m", "vae", "-o", str(tmp_path / "o.png"))
    assert rc == 2
    one_error_line(err, str(huge), "(1, 4, 100000, 100000)")
    from refldm.cli.vae import read_latent
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="more than the"):
        read_latent(small, max_bytes=100)


def test_decode_refuses_what_does_not_fit_in_memory(monkeypatch):
    from refldm.cli import vae as vae_cli
    from refldm.models.vae import AutoencoderKL
    from refldm.pipelines.sd import TooLargeError
    vae = AutoencoderKL({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4})
    monkeypatch.setattr(vae_cli, "available_memory", lambda: 8 * 2 ** 30)
    vae_cli.check_decode_memory(vae, (1, 4, 64, 64), "float32")  # 512x512: fits in 8 GiB
    with pytest.raises(TooLargeError, match="8192x8192 images needs about"):
        vae_cli.check_decode_memory(vae, (1, 4, 1024, 1024), "float32")


def test_big_decode_announces_an_estimated_time(monkeypatch, capsys):
    from refldm.cli import vae as vae_cli
    from refldm.models.vae import AutoencoderKL
    vae = AutoencoderKL({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                         "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4})
    monkeypatch.setattr(vae_cli, "available_memory", lambda: 2 ** 50)
    vae_cli.check_decode_memory(vae, (1, 4, 256, 256), "float32", announce_after_s=0)
    assert "into 2048x2048: estimated" in capsys.readouterr().err


def test_info_counts_the_vocabulary_of_a_tokenizer_json(tmp_path, capsys):
    """A folder saved by today's diffusers has tokenizer/tokenizer.json only."""
    from tests.test_pipeline import build_tiny_sd
    folder = build_tiny_sd(tmp_path / "saved", as_saved=True)
    info = generate.describe_model(folder)
    assert info["tokenizer"]["vocabulary"] > 512
