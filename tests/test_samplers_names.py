"""Sampler names as the web UIs write them (refldm.schedulers.names), `refldm samplers`, and --sampler."""

from __future__ import annotations

import numpy
import pytest
from PIL import Image

from refldm import schedulers as rs
from refldm.cli import main
from refldm.schedulers import names

SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "clip_sample": False}


@pytest.mark.parametrize("row", names.table(), ids=lambda r: r[0])
def test_every_listed_name_builds_the_listed_scheduler(row):
    """Each A1111 label, ComfyUI name (+ schedule) and refldm name of a row builds the row's class and config."""
    a1111, comfy, key, described, _ = row
    comfy_name, _, comfy_schedule = comfy.partition(" + ")
    built = [rs.get_scheduler(a1111, SD_CONFIG), rs.get_scheduler(key, SD_CONFIG),
             rs.get_scheduler(comfy_name, SD_CONFIG, schedule=comfy_schedule or None)]
    for scheduler in built:
        assert described.startswith(type(scheduler).__name__)
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
        for pair in described.partition("(")[2].rstrip(")").split(", "):
            if pair:
                k, v = pair.split("=")
                assert repr(getattr(scheduler.config, k)) == v, (a1111, k)
    assert names.label(a1111) == a1111 == names.label(comfy_name, comfy_schedule or None)


@pytest.mark.parametrize("spelling", ["DPM++ 2M Karras", "dpm++ 2m karras", "dpmpp_2m karras", "dpmpp_2m_karras",
                                      "dpm++2m karras", "DPMSolverMultistepScheduler karras"])
def test_spellings_of_dpmpp_2m_karras(spelling):
    scheduler = rs.get_scheduler(spelling, SD_CONFIG)
    assert isinstance(scheduler, rs.DPMSolverMultistepScheduler) and scheduler.config.use_karras_sigmas
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert names.label(spelling) == "DPM++ 2M Karras"


def test_karras_schedule_changes_the_sigmas_as_diffusers_documents():
    plain, karras = rs.get_scheduler("DPM++ 2M", SD_CONFIG), rs.get_scheduler("DPM++ 2M Karras", SD_CONFIG)
    plain.set_timesteps(20)
    karras.set_timesteps(20)
    assert plain.sigmas[0] == pytest.approx(karras.sigmas[0], rel=1e-12)  # same sigma_max
    # Karras spends more of its steps at low noise
    assert numpy.sum(karras.sigmas[:-1] < 1) > numpy.sum(plain.sigmas[:-1] < 1)
    assert karras.sigmas[-2] < plain.sigmas[-2]


@pytest.mark.parametrize("alias, key", [("dpmpp_3m_sde_gpu karras", "dpm++3m_sde"), ("dpmpp_2m_sde_gpu", "dpm++2m_sde"),
                                        ("dpmpp_sde_gpu", "dpm++sde"), ("k_euler_a", "euler_a")])
def test_comfyui_gpu_and_old_a1111_aliases(alias, key):
    assert type(rs.get_scheduler(alias, SD_CONFIG)) is type(rs.get_scheduler(key, SD_CONFIG))
    assert names.label(alias).startswith(names.label(key))


def test_unknown_and_missing_names_are_one_clear_line():
    with pytest.raises(ValueError, match=r"unknown sampler 'Eular'; choose one of Euler, Euler a, .*DPM\+\+ 2M"):
        rs.get_scheduler("Eular")
    with pytest.raises(ValueError, match=r"sampler 'Restart' .* is not implemented in refldm"):
        rs.get_scheduler("Restart")
    with pytest.raises(ValueError, match="unknown schedule 'polyexp'; choose one of normal, .*karras"):
        rs.get_scheduler("euler", schedule="polyexp")
    with pytest.raises(ValueError, match="schedule 'karras' needs a sigma sampler; DDIM"):
        rs.get_scheduler("DDIM Karras")


def test_refldm_samplers_lists_the_names_with_their_equivalents(capsys):
    assert main(["samplers", "--missing"]) == 0
    out = capsys.readouterr().out
    assert "DPM++ 2M Karras" in out and "dpmpp_2m + karras" in out and "use_karras_sigmas=True" in out
    assert "sample_dpmpp_2m" in out and "Euler a" in out and "euler_ancestral" in out
    assert "not implemented in refldm" in out and "Restart" in out
    assert "DPM++ 2S a Karras" in out and "dpmpp_3m_sde + karras" in out and "sample_dpm_adaptive" in out


def test_txt2img_sampler_name_reaches_the_png_parameters(tmp_path, capsys):
    """--sampler "DPM++ 2M Karras" on the built-in model: the PNG records the A1111 label, and the image is
    the one the Python API gives for the same name (and for its ComfyUI spelling)."""
    from refldm.pipelines.sd import StableDiffusionPipeline

    out = tmp_path / "out.png"
    argv = ["txt2img", "-p", "a red circle", "--steps", "3", "--cfg", "7.5", "--seed", "1", "-W", "32", "-H", "32", "-q",
            "--sampler", "DPM++ 2M Karras", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert "Sampler: DPM++ 2M Karras," in im.info["parameters"]
        pixels = numpy.asarray(im.convert("RGB"))
    pipe = StableDiffusionPipeline.from_pretrained(names_default_model())
    for spelling in ("DPM++ 2M Karras", "dpmpp_2m karras"):
        ref = pipe("a red circle", height=32, width=32, num_inference_steps=3, guidance_scale=7.5, seed=1,
                   sampler=spelling, progress=False)
        numpy.testing.assert_array_equal(pixels, numpy.asarray(ref.images[0]))


def test_txt2img_unknown_sampler_fails_before_loading_with_the_valid_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["txt2img", "-p", "x", "--sampler", "DPM++ 9M"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'DPM++ 9M'; choose one of" in err and "DPM++ 2M" in err


def names_default_model():
    from refldm.cli.generate import DEFAULT_MODEL
    return DEFAULT_MODEL
