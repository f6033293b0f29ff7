"""The CLI before the work (issue 31, items 10, 12, 13, 15): inpaint's memory check and time estimate, img2img's
estimate counting only the steps that run, the built-in model's size warning, float16 on the CPU, and messages
that name the CLI's flags (--tokenizer, --config, --max-length).
"""

from __future__ import annotations

import json
import os
import shutil
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import _one_blas_thread, one_error_line, run, tiny_folder  # noqa: F401


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    return str(image), str(mask)


@pytest.fixture
def slow_machine(monkeypatch):
    """A machine whose measured matmul speed is 1 MFLOP/s: every run's estimate is long, so it is printed."""
    from refldm.cli import resources
    monkeypatch.setattr(resources, "matmul_throughput", lambda: 1e6)


def test_inpaint_refuses_what_does_not_fit_before_the_work(tiny_folder, pictures, tmp_path, capsys, monkeypatch):
    from refldm.cli import resources
    monkeypatch.setattr(resources, "available_memory", lambda: 2 ** 20)
    out = tmp_path / "o.png"
    rc, _, err = run(capsys, "inpaint", "-m", tiny_folder, "-i", pictures[0], "--mask", pictures[1], "-p", "x",
                     "--steps", "2", "-q", "-o", str(out))
    assert rc == 2 and not out.exists()
    one_error_line(err, "32x32", "of memory", "available")


def test_inpaint_announces_its_time_counting_the_steps_that_run(tiny_folder, pictures, tmp_path, capsys,
                                                               slow_machine):
    rc, _, err = run(capsys, "inpaint", "-m", tiny_folder, "-i", pictures[0], "--mask", pictures[1], "-p", "x",
                     "--steps", "4", "--strength", "0.5", "-q", "-o", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert "refldm: 32x32, 2 of 4 steps (strength 0.5): estimated" in err and "TFLOP" in err


def test_img2img_estimate_counts_int_strength_times_steps(tiny_folder, tmp_path, capsys, slow_machine):
    from refldm.analysis.cost import estimate_pipeline, steps_run
    from refldm.cli.common import check_resources
    from refldm.pipelines.sd import StableDiffusionPipeline
    assert [steps_run(25, s) for s in (None, 1.0, 0.7, 0.5, 0.03)] == [25, 25, 17, 12, 0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
    got = check_resources(pipe, 1, 32, 32, 25, 7.5, strength=0.7)
    assert got["steps"] == 17 and got["flops"] == estimate_pipeline(pipe, 1, 32, 32, 17, 7.5)["flops"]
    assert got["flops"] < 0.75 * check_resources(pipe, 1, 32, 32, 25, 7.5)["flops"]
    capsys.readouterr()
    image = tmp_path / "in.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    rc, _, err = run(capsys, "img2img", "-m", tiny_folder, "-i", str(image), "-p", "x", "--steps", "5",
                     "--strength", "0.7", "-q", "-o", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert "32x32, 3 of 5 steps (strength 0.7): estimated" in err


def _warnings(args, height, width, pipe=None):
    from refldm.cli.common import warn_run_choices
    pipe = pipe or types.SimpleNamespace(default_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_run_choices(args, pipe, height, width)
    return [str(w.message) for w in caught]


def test_builtin_model_far_from_64_warns_once(tmp_path, capsys):
    builtin = types.SimpleNamespace(model=None, dtype="float32")
    assert _warnings(builtin, 64, 64) == [] and _warnings(builtin, None, None) == [] and _warnings(builtin, 128, 32) == []
    for size in ((512, 512), (64, 256), (16, 64)):
        said = _warnings(builtin, *size)
        assert len(said) == 1 and "trained on 64x64" in said[0] and f"{size[1]}x{size[0]}" in said[0]
    assert _warnings(types.SimpleNamespace(model="some/folder", dtype="float32"), 512, 512) == []
    rc, _, err = run(capsys, "txt2img", "-p", "x", "-W", "136", "-H", "136", "--steps", "1", "-q",
                     "-o", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert err.count("trained on 64x64") == 1 and err.startswith("refldm: warning:")


def test_float16_on_the_cpu_warns_once(tiny_folder, tmp_path, capsys):
    said = _warnings(types.SimpleNamespace(model="m", dtype="float16"), 64, 64)
    assert len(said) == 1 and "x slower than float32" in said[0] and "--dtype float32" in said[0]
    assert _warnings(types.SimpleNamespace(model="m", dtype="float32"), 64, 64) == []
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "x", "-W", "32", "-H", "32", "--steps", "1",
                     "--dtype", "float16", "-q", "-o", str(tmp_path / "o.png"))
    assert rc == 0, err
    assert err.count("x slower than float32") == 1
    from pathlib import Path
    assert "x slower than float32" in (Path(__file__).parent.parent / "docs" / "performance.md").read_text(encoding="utf-8")


def _single_file(folder, path):
    from refldm.checkpoints import convert, weights
    parts, configs = {}, {}
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        parts[part] = weights.load_state(weights.find_weights(os.path.join(folder, part), stem))
        configs[part] = weights.read_config(os.path.join(folder, part))
    weights.save_file(convert.to_original(parts, configs, "sd1"), path)
    return str(path)


def test_messages_name_the_cli_flags(tiny_folder, tmp_path, capsys):
    single = _single_file(tiny_folder, tmp_path / "tiny.safetensors")
    rc, _, err = run(capsys, "txt2img", "-m", single, "-p", "x", "--steps", "1", "-q", "-o", str(tmp_path / "o.png"))
    assert rc == 2
    line = one_error_line(err, "--tokenizer", "--config")
    assert "tokenizer=" not in line and "config=" not in line
    from refldm.pipelines.sd import StableDiffusionPipeline
    with pytest.raises(ValueError, match="tokenizer=a CLIP"):  # the Python API keeps its argument names
        StableDiffusionPipeline.from_single_file(single)


def test_max_length_flag_for_a_tokenizer_without_one(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "no-limit"
    shutil.copytree(tiny_folder, folder)
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["model_max_length"]
    config_path.write_text(json.dumps(config))
    common = ["txt2img", "-m", str(folder), "-p", "x", "-W", "32", "-H", "32", "--steps", "1", "--seed", "3", "-q"]
    rc, _, err = run(capsys, *common, "-o", str(tmp_path / "a.png"))
    assert rc == 2
    one_error_line(err, "model_max_length", "--max-length 77")
    rc, _, err = run(capsys, *common, "--max-length", "1000", "-o", str(tmp_path / "a.png"))
    assert rc == 2
    one_error_line(err, "--max-length 1000", "2..77")
    rc, _, err = run(capsys, *common, "--max-length", "77", "-o", str(tmp_path / "a.png"))
    assert rc == 0, err
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, *common[3:], "-o", str(tmp_path / "b.png"))
    assert rc == 0, err
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same as the folder that says 77


def test_inpaint_output_help_names_its_own_default(capsys):
    from refldm.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command" or getattr(a, "choices", None)
               and "inpaint" in (a.choices or {}))
    help_text = sub.choices["inpaint"].format_help()
    assert "refldm-inpaint.png" in help_text and "refldm-txt2img.png" not in help_text
