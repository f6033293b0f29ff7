"""The web UI's antialiased latent upscalers (refldm/pipelines/common.py `_antialias_weights`) against
torch.nn.functional.interpolate(..., antialias=True), and ComfyUI graphs of several sampler passes read
and run (refldm/core/pnginfo.py, refldm/cli/generate.py; docs/reproduce.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.pipelines import common
from tests.conftest import require

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe():
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


# -- antialiased latent upscale --------------------------------------------------------------------------------

# measured max |refldm - torch| on N(0, 1) values over 400 random sizes 1..39 -> 2..79: bilinear 4.8e-7,
# bicubic 4.3e-6 (float32 sums in another order; torch's kernel may fuse its multiply-adds)
TOLERANCE = {"bilinear": 1e-6, "bicubic": 8e-6}


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(2, 40), st.integers(2, 40),
       st.sampled_from(["bilinear", "bicubic"]))
def test_antialiased_upscale_matches_torch(h, w, big_h, big_w, mode):
    """Up- and downscaling factors both (output sides from 2: torch's kernel leaves the height unresampled when
    the output width is 1, a quirk of its own)."""
    torch = require("torch")
    x = np.random.default_rng(h * 41 + w).standard_normal((2, 3, h, w)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(big_h, big_w), mode=mode,
                                           antialias=True).numpy()
    got = np.asarray(common.upscale_latents(x, (big_h, big_w), mode, antialias=True))
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= TOLERANCE[mode]


@pytest.mark.parametrize("size, big", [((4, 6), (9, 15)), ((9, 15), (4, 6)), ((8, 8), (3, 20)), ((6, 6), (6, 6))])
def test_antialias_fixed_factors_and_the_upscaling_identity(size, big):
    """Fixed up/down factors against torch; on upscaling antialiased bilinear is plain bilinear (to float32
    rounding), antialiased bicubic is not (A = -0.5, renormalised edges, vs A = -0.75, clamped edges)."""
    torch = require("torch")
    x = np.random.default_rng(3).standard_normal((1, 4) + size).astype(np.float32)
    for mode in ("bilinear", "bicubic"):
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=big, mode=mode, antialias=True).numpy()
        got = np.asarray(common.upscale_latents(x, big, mode, antialias=True))
        assert np.max(np.abs(got - want)) <= TOLERANCE[mode]
    if big[0] >= size[0] and big[1] >= size[1]:
        aa = np.asarray(common.upscale_latents(x, big, "bilinear", antialias=True))
        assert np.max(np.abs(aa - np.asarray(common.upscale_latents(x, big, "bilinear")))) <= 2e-6
        if big != size:
            cubic_aa = np.asarray(common.upscale_latents(x, big, "bicubic", antialias=True))
            assert np.max(np.abs(cubic_aa - np.asarray(common.upscale_latents(x, big, "bicubic")))) > 1e-3


def test_antialias_weights_sum_to_one_and_average_on_downscale():
    for cubic in (False, True):
        for n_in, n_out in ((16, 4), (5, 13), (7, 7)):
            index, weights = common._antialias_weights(n_in, n_out, cubic)
            assert np.allclose(sum(weights), 1, atol=1e-6)
            assert all(((i >= 0) & (i < n_in)).all() for i in index)
    _, weights = common._antialias_weights(16, 4, False)  # 4x down: a triangle 4 inputs wide on each side
    assert [int(n) for n in sum((w > 0).astype(int) for w in weights)] == [6, 8, 8, 6]  # cut at the borders
    flat = np.full((1, 1, 12, 12), 0.5, np.float32)
    for mode in ("bilinear", "bicubic"):
        assert np.allclose(common.upscale_latents(flat, (5, 17), mode, antialias=True), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="antialias is for bilinear and bicubic"):
        common.upscale_latents(flat, (5, 5), "area", antialias=True)


def test_hires_fix_with_the_antialiased_upscalers(pipe):
    """Upscaling: "Latent (antialiased)" is "Latent" to float32 rounding; the bicubic one is its own image."""
    run = dict(num_inference_steps=2, seed=3, height=64, width=64, progress=False, hires_scale=1.5)
    lat = {name: np.asarray(pipe(PROMPT, hires_upscaler=name, output_type="latent", **run).latents)
           for name in ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)")}
    assert np.max(np.abs(lat["Latent"] - lat["Latent (antialiased)"])) < 1e-4
    assert np.max(np.abs(lat["Latent (bicubic)"] - lat["Latent (bicubic antialiased)"])) > 1e-3
    text = pipe(PROMPT, hires_upscaler="Latent (bicubic antialiased)", **run).parameters[0]
    assert "Hires upscaler: Latent (bicubic antialiased)" in text


# -- ComfyUI graphs with several sampler passes -------------------------------------------------------------------

def sampler_node(seed, steps, latent, advanced=None, denoise=1.0, cfg=3.0, sampler="euler"):
    inputs = {"steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "model": ["4", 0],
              "positive": ["6", 0], "negative": ["7", 0], "latent_image": latent}
    if advanced is None:
        return {"class_type": "KSampler", "inputs": {"seed": seed, "denoise": denoise, **inputs}}
    add_noise, start, end, leftover = advanced
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "noise_seed": seed, "add_noise": "enable" if add_noise else "disable", "start_at_step": start,
        "end_at_step": end, "return_with_leftover_noise": "enable" if leftover else "disable", **inputs}}


def graph(first, second=None, upscale=None):
    """ComfyUI's API ("prompt") format, as its "Save (API Format)" writes it: node id -> class_type, inputs."""
    g = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blue", "clip": ["4", 1]}},
         "3": first, "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
         "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["8", 0]}}}
    if upscale is not None:
        g["10"] = {"class_type": upscale[0], "inputs": {"samples": ["3", 0], **upscale[1]}}
    if second is not None:
        g["11"] = second
        g["8"]["inputs"]["samples"] = ["11", 0]
    return g


HIRES = graph(sampler_node(5, 3, ["5", 0]), sampler_node(9, 2, ["10", 0], denoise=0.5),
              ("LatentUpscaleBy", {"upscale_method": "bilinear", "scale_by": 1.5}))
SPLIT = graph(sampler_node(5, 4, ["5", 0], advanced=(True, 0, 2, True)),
              sampler_node(5, 4, ["3", 0], advanced=(False, 2, 10000, False)))


def save_graph(path, g):
    import json

    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(g))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_comfyui_passes_map_onto_the_hires_pass():
    from refldm.core import pnginfo
    kwargs, problems = pnginfo.comfyui_passes(pnginfo.parse_comfyui_prompt(HIRES))
    assert problems == [] and kwargs == {"hires_scale": 1.5, "hires_steps": 2, "hires_upscaler": "Latent",
                                         "hires_denoise": 0.5, "hires_comfyui": {"seed": 9, "size": (96, 96)}}
    kwargs, problems = pnginfo.comfyui_passes(pnginfo.parse_comfyui_prompt(SPLIT))
    assert problems == [] and kwargs["hires_comfyui"] == {"seed": 5, "size": (64, 64), "start": 2}
    bad = graph(sampler_node(5, 3, ["5", 0]), sampler_node(9, 2, ["10", 0], denoise=0.5, cfg=7.0),
                ("LatentUpscale", {"upscale_method": "area", "width": 100, "height": 64, "crop": "center"}))
    _, problems = pnginfo.comfyui_passes(pnginfo.parse_comfyui_prompt(bad))
    assert problems == ["node 11 (KSampler): another cfg than node 3",
                        "node 11 (KSampler): latent upscale_method 'area' (refldm has bilinear, bicubic, "
                        "nearest-exact)",
                        "node 11 (KSampler): latent upscale crop 'center'"]
    alone = graph(sampler_node(5, 4, ["5", 0], advanced=(True, 1, 4, False)))
    assert pnginfo.comfyui_passes(pnginfo.parse_comfyui_prompt(alone))[1] == [
        "node 3 (KSamplerAdvanced): add_noise enable, steps 1 .. 4 of 4 (refldm runs a first pass from pure noise "
        "over all steps)"]
    assert common.comfyui_schedule(2, 0.5) == (4, 2) and common.comfyui_schedule(10, 0.3) == (33, 23)


def test_comfyui_hires_second_pass_noise_and_schedule(pipe):
    """KSampler denoise 0.5, 2 steps: the last 2 of a 4-step schedule, from upscale(x) + eps sigma_t0 with eps
    from a fresh CPU generator of the second node's seed."""
    from refldm.core.random import Generator
    from refldm.core.record import Recorder
    run = dict(num_inference_steps=3, guidance_scale=3.0, sampler="euler", seed=5, height=64, width=64,
               sampler_rng="cpu", progress=False)
    first = pipe(PROMPT, output_type="latent", **run).latents
    with Recorder(include=["steps.0.latents"]) as r:
        out = pipe(PROMPT, hires_scale=1.5, hires_steps=2, hires_denoise=0.5, hires_comfyui={"seed": 9}, **run)
    sched = pipe.make_scheduler("euler")
    sched.set_timesteps(4)
    x0 = np.asarray(common.upscale_latents(first, (12, 12), "bilinear"))
    want = sched.add_noise(x0, Generator(9).randn((1, 4, 12, 12)), np.asarray(sched.timesteps)[2:3])
    assert np.max(np.abs(r.activations["steps.0.latents#2"] - np.asarray(want))) <= 1e-6
    assert out.images[0].size == (96, 96)
    with pytest.raises(ValueError, match="hires_comfyui needs hires_scale"):
        pipe(PROMPT, hires_comfyui={"seed": 1}, **run)


def test_comfyui_split_schedule(pipe):
    """A KSamplerAdvanced pair 0..2 / 2..4: for Euler (no state) the same latents as one 4-step pass; for
    DPM++ 2M the second node starts its history afresh, as ComfyUI's does."""
    run = dict(num_inference_steps=4, guidance_scale=3.0, seed=5, height=64, width=64, sampler_rng="cpu",
               progress=False, output_type="latent")
    split = dict(hires_scale=1, hires_denoise=1.0, hires_comfyui={"seed": 5, "start": 2})
    for sampler, same in (("euler", True), ("dpmpp_2m", False)):
        whole = pipe(PROMPT, sampler=sampler, **run).latents
        two = pipe(PROMPT, sampler=sampler, **split, **run).latents
        assert np.array_equal(whole, two) == same, sampler
        assert np.max(np.abs(np.asarray(whole) - np.asarray(two))) < 0.5


def cli(capsys, *argv):
    from refldm.cli import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("g, size", [(HIRES, (96, 96)), (SPLIT, (64, 64))])
def test_comfyui_graph_png_info_from_png_and_round_trip(tmp_path, capsys, g, size):
    import json

    from PIL import Image
    src = save_graph(tmp_path / "comfy.png", g)
    rc, out, err = cli(capsys, "png-info", src)
    assert rc == 0 and [p["node"] for p in json.loads(out)["settings"]["passes"]] == ["3", "11"]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    rc, _, err = cli(capsys, "txt2img", "--from-png", src, "-q", "-o", first)
    assert rc == 0 and "warning" not in err, err
    assert Image.open(first).size == size
    rc, _, err = cli(capsys, "txt2img", "--from-png", first, "-q", "-o", second)
    assert rc == 0 and "warning" not in err, err
    assert first.read_bytes() == second.read_bytes()


def test_comfyui_graph_that_cannot_run_is_named_in_one_line(tmp_path, capsys):
    three = graph(sampler_node(5, 3, ["5", 0]), sampler_node(9, 2, ["3", 0], denoise=0.5))
    three["12"] = sampler_node(1, 2, ["11", 0], denoise=0.3)
    three["8"]["inputs"]["samples"] = ["12", 0]
    rc, _, err = cli(capsys, "txt2img", "--from-png", save_graph(tmp_path / "c.png", three), "-q",
                     "-o", tmp_path / "o.png")
    lines = [line for line in err.splitlines() if "warning" in line]
    assert rc == 0 and len(lines) == 1
    assert "cannot honour 2 further sampler passes after node 3 (KSampler)" in lines[0]
