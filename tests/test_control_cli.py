"""``refldm txt2img --controlnet / --t2i-adapter / --control-image / --control-scale`` on the built-in model with
tiny random ControlNets and T2I-Adapters of its U-Net's shape: scale 0 is the plain image bit for bit, the
web UI's "ControlNet <i>" fields are written and read back by --from-png, bad input is one line naming it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from refldm.about import DEFAULT_MODEL
from refldm.cli import main
from refldm.core.pnginfo import control_units, parse_control_unit, parse_parameters
from tests.conftest import require

BASE = ("txt2img", "-p", "a large red circle in the center on a white background", "--steps", "2", "--seed", "7",
        "-q")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random ControlNet and T2I-Adapter for the built-in U-Net, an SDXL ControlNet, a control image."""
    torch = require("torch")
    diffusers = require("diffusers")
    from tests.test_controlnet import SDXL_TINY, _randomise
    from tests.test_pipeline import _rerandomise
    root = tmp_path_factory.mktemp("control-cli")
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(DEFAULT_MODEL, "unet"))
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    _rerandomise(torch, cn, 500)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_down_blocks") or name.startswith("controlnet_mid_block"):
                p.mul_(0.3)
    cn.save_pretrained(root / "cn", safe_serialization=True)
    adapter = diffusers.T2IAdapter(channels=[64, 128, 128], num_res_blocks=1, downscale_factor=8)
    _rerandomise(torch, adapter, 501)
    adapter.save_pretrained(root / "adapter", safe_serialization=True)
    xl = _randomise(diffusers.ControlNetModel(**SDXL_TINY, conditioning_embedding_out_channels=[4, 4, 6, 8]), 3)
    xl.save_pretrained(root / "xl-cn", safe_serialization=True)
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(im).rectangle([8, 20, 40, 56], outline=(255, 255, 255), width=3)
    im.save(root / "edges.png")
    im.resize((80, 48)).save(root / "edges-80x48.png")
    del unet, cn, adapter, xl
    return root


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_controlnet_and_adapter_steer_scale_zero_is_the_plain_image_and_fields_are_written(models, tmp_path,
                                                                                          capsys):
    r = models
    plain = tmp_path / "plain.png"
    assert cli(capsys, *BASE, "-o", plain)[0] == 0
    runs = {"cn": ("--controlnet", r / "cn", "--control-image", r / "edges.png", "--control-scale", "0.7"),
            "ad": ("--t2i-adapter", r / "adapter", "--control-image", r / "edges.png"),
            "both": ("--controlnet", r / "cn", "--t2i-adapter", r / "adapter", "--control-image", r / "edges.png",
                     "--control-image", r / "edges.png", "--control-scale", "0.5", "--control-scale", "0.8"),
            "zero": ("--controlnet", r / "cn", "--t2i-adapter", r / "adapter", "--control-image", r / "edges.png",
                     "--control-image", r / "edges.png", "--control-scale", "0", "--control-scale", "0")}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.png"
        rc, _, err = cli(capsys, *BASE, *flags, "-o", out)
        assert rc == 0 and "warning" not in err, err
        diff = np.abs(_pixels(out) - _pixels(plain)).max()
        assert (diff == 0) if name == "zero" else (diff > 10), (name, diff)
    settings = parse_parameters(Image.open(tmp_path / "both.png").info["parameters"])
    units = [parse_control_unit(text, name) for name, text in control_units(settings["other"])]
    assert [u["model_name"] for u in units] == ["cn", "adapter"]
    assert [u["weight"] for u in units] == [0.5, 0.8]
    assert units[0]["module"] == "none" and len(units[0]["model_hash"]) == 8
    text = Image.open(tmp_path / "cn.png").info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: cn [' in text and 'Weight: 0.7, Resize Mode: Just Resize' in text


def test_from_png_reads_the_units_back_and_asks_for_the_models_again(models, tmp_path, capsys):
    r = models
    first, second, third = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    flags = ("--controlnet", r / "cn", "--control-image", r / "edges.png", "--control-scale", "0.6")
    assert cli(capsys, *BASE, *flags, "-o", first)[0] == 0
    rc, _, err = cli(capsys, "txt2img", "--from-png", first, "--controlnet", r / "cn", "--control-image",
                     r / "edges.png", "-q", "-o", second)                  # the scale 0.6 comes from the image
    assert rc == 0 and "warning" not in err, err
    assert first.read_bytes() == second.read_bytes()
    rc, _, err = cli(capsys, "txt2img", "--from-png", first, "-q", "-o", third)
    assert rc == 0
    assert "cannot honour ControlNet 0 (cn [" in err and "give it again: --controlnet or --t2i-adapter" in err


@pytest.mark.parametrize("flags, words", [
    (("--controlnet", "{cn}", "--control-image", "{img}", "--control-image", "{img}"),
     "--control-image: 2 images for 1 model (--controlnet, --t2i-adapter); give one per model, in order"),
    (("--controlnet", "{cn}", "--control-image", "{img}", "--control-scale", "nan"),
     "--control-scale nan: must be a finite number >= 0"),
    (("--t2i-adapter", "{ad}", "--control-image", "{img}", "--control-scale", "-0.5"),
     "--control-scale -0.5: must be a finite number >= 0"),
    (("--control-image", "{img}"), "--control-image needs --controlnet MODEL or --t2i-adapter MODEL"),
    (("--controlnet", "{xl}", "--control-image", "{img}"),
     "--controlnet: SDXL ControlNet with a cross_attention_dim-64 U-Net"),
    (("--controlnet", "{cn}", "--control-image", "{img}", "--hires-scale", "2"),
     "--hires-scale: not with --controlnet / --t2i-adapter"),
    (("--controlnet", "{cn}", "--control-image", "missing.png"), "--control-image missing.png: no such image file"),
])
def test_bad_control_input_is_one_line_naming_it(models, tmp_path, capsys, flags, words):
    names = {"cn": models / "cn", "ad": models / "adapter", "xl": models / "xl-cn", "img": models / "edges.png"}
    argv = [str(f).format(**names) for f in flags]
    rc, _, err = cli(capsys, *BASE, *argv, "-o", tmp_path / "x.png")
    assert rc != 0 and words in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_control_image_of_another_size_is_resized_with_a_warning(models, tmp_path, capsys):
    rc, _, err = cli(capsys, *BASE, "--t2i-adapter", models / "adapter", "--control-image", models / "edges-80x48.png",
                     "-o", tmp_path / "x.png")
    assert rc == 0
    assert "warning: adapter image 0 is 80x48; resized to 64x64" in err
    info = json.loads(json.dumps(parse_parameters(Image.open(tmp_path / "x.png").info["parameters"])["other"]))
    assert list(info) == ["ControlNet 0"]


def test_webui_units_parse_as_the_extension_writes_them_and_png_info_shows_them(tmp_path, capsys):
    """A unit as sd-webui-controlnet writes it (its sliders included), in an A1111 text; png-info parses it."""
    from refldm.cli.common import save_png
    unit = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, "
            "Low Vram: False, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, "
            "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both, "
            "Save Detected Map: True")
    text = (f'a house\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, '
            f'ControlNet 0: {json.dumps(unit)}, Version: v1.9.4')
    settings = parse_parameters(text)
    (name, raw), = control_units(settings["other"])
    u = parse_control_unit(raw, name)
    assert (u["module"], u["model_name"], u["model_hash"], u["weight"], u["threshold_b"], u["hr_option"]) == \
        ("canny", "control_v11p_sd15_canny", "d14c016b", 1, 200, "Both")
    with pytest.raises(ValueError, match="ControlNet 1: 'starting/ending' is not 'Name: value'"):
        parse_control_unit("preprocessor: canny, starting/ending", "ControlNet 1")
    path = tmp_path / "a.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    assert main(["png-info", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["controlnet"][0]["model"] == "control_v11p_sd15_canny [d14c016b]"
    assert shown["controlnet"][0]["field"] == "ControlNet 0"
