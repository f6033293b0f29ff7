"""Previews of the loop (refldm/pipelines/preview.py) and the linear latent-to-RGB map, on the built-in model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from refldm.cli import main
from refldm.models.autoencoder_tiny import AutoencoderTiny, AutoencoderTinyConfig
from refldm.models.latent_rgb import LATENT_RGB, family_of, latent_to_rgb

PROMPT = "a large red circle in the center on a white background"
ARGS = dict(prompt=PROMPT, num_inference_steps=5, guidance_scale=3.0, seed=2, progress=False)


@pytest.fixture(scope="module")
def builtin():
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


def test_vae_previews_of_every_second_step_and_the_last(builtin, tmp_path):
    out = builtin(**ARGS, preview_every=2, preview_dir=tmp_path / "p", preview="vae")
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == [f"step-{i:03d}-{k}.png" for i in (2, 4, 5) for k in ("latent", "x0")]
    last = np.asarray(Image.open(tmp_path / "p" / "step-005-latent.png"))
    np.testing.assert_array_equal(last, np.asarray(out.images[0]))   # the last latent decodes to the image
    x0 = np.asarray(Image.open(tmp_path / "p" / "step-002-x0.png"), np.int16)
    noisy = np.asarray(Image.open(tmp_path / "p" / "step-002-latent.png"), np.int16)
    assert x0.shape == noisy.shape == (64, 64, 3) and np.abs(x0 - noisy).max() > 0


def test_linear_and_tiny_previews_and_the_callers_callback(builtin, tmp_path):
    plain = builtin(**ARGS, output_type="latent").latents
    seen = []

    def mine(p, i, t, kw):
        seen.append(sorted(kw))
        return {}

    out = builtin(**ARGS, output_type="latent", preview_every=5, preview_dir=tmp_path / "lin",
                  callback_on_step_end=mine)
    np.testing.assert_array_equal(out.latents, plain)                 # previews change nothing
    assert seen == [["latents"]] * 5                                 # the caller gets what it asked for
    lin = np.asarray(Image.open(tmp_path / "lin" / "step-005-latent.png"))
    want = np.round(255 * np.clip((latent_to_rgb(plain, "refldm-default") + 1) / 2, 0, 1)).astype(np.uint8)
    np.testing.assert_array_equal(lin[::8, ::8], want[0].transpose(1, 2, 0))  # one colour per latent pixel
    taesd = AutoencoderTiny(AutoencoderTinyConfig(encoder_block_out_channels=[8, 8, 8, 8],
                                                  decoder_block_out_channels=[8, 8, 8, 8]))
    rng = np.random.default_rng(0)
    taesd.load_state_dict({k: 0.2 * rng.standard_normal(v.shape).astype(np.float32)
                           for k, _, _, v in taesd.params()})
    builtin.tiny_vae = taesd
    try:
        builtin(**ARGS, output_type="latent", preview_every=5, preview_dir=tmp_path / "tiny", preview="tiny")
    finally:
        del builtin.tiny_vae
    tiny = np.asarray(Image.open(tmp_path / "tiny" / "step-005-latent.png"))
    dec = np.asarray(taesd.decode(np.asarray(plain, np.float32)))
    np.testing.assert_array_equal(tiny, np.round(255 * np.clip(dec[0] / 2 + 0.5, 0, 1)).astype(np.uint8)
                                  .transpose(1, 2, 0))


@pytest.mark.parametrize("every,where,message", [
    (0, "dir", "from 1 to the step count (5)"), (6, "dir", "from 1 to the step count (5)"),
    (2, "file", "is a file, not a folder"), (2.5, "dir", "must be an integer")])
def test_bad_preview_arguments_are_one_line(builtin, tmp_path, every, where, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError) as e:
        builtin(**ARGS, preview_every=every, preview_dir=tmp_path / where)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="choose one of linear, tiny, vae"):
        builtin(**ARGS, preview_every=1, preview_dir=tmp_path / "d", preview="taesd")
    with pytest.raises(ValueError, match="needs a TAESD decoder"):
        builtin(**ARGS, preview_every=1, preview_dir=tmp_path / "d", preview="tiny")


@pytest.mark.parametrize("flags,message", [
    (["--preview-every", "0", "--preview-dir", "D"], "--preview-every 0 must be an integer from 1 to the step count (3)"),
    (["--preview-every", "4", "--preview-dir", "D"], "from 1 to the step count (3)"),
    (["--preview-every", "1", "--preview-dir", "FILE"], "is a file, not a folder for the previews (--preview-dir)"),
    (["--preview-every", "1"], "--preview-every needs --preview-dir DIR"),
    (["--preview-every", "1", "--preview-dir", "D", "--preview", "tiny"], "--preview tiny needs --taesd DIR")])
def test_cli_bad_preview_flags(tmp_path, capsys, flags, message):
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f in ("D", "FILE") else f for f in flags]
    assert main(["txt2img", "-p", "x", "--steps", "3", "-q", "-o", str(tmp_path / "o.png"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_cli_writes_previews(tmp_path):
    assert main(["txt2img", "-p", PROMPT, "--steps", "3", "-q", "-o", str(tmp_path / "o.png"),
                 "--preview-every", "3", "--preview-dir", str(tmp_path / "pv")]) == 0
    assert sorted(p.name for p in (tmp_path / "pv").iterdir()) == ["step-003-latent.png", "step-003-x0.png"]


@settings(max_examples=10)
@given(st.sampled_from(sorted(LATENT_RGB)), st.integers(0, 2 ** 31))
def test_latent_to_rgb_is_the_affine_map(family, seed):
    w, b = np.asarray(LATENT_RGB[family]["factors"]), np.asarray(LATENT_RGB[family]["bias"])
    z = np.random.default_rng(seed).standard_normal((2, w.shape[0], 3, 5))        # 4 channels, or SD3 / FLUX's 16
    got = latent_to_rgb(z, family)
    for n, i, j in ((0, 0, 0), (1, 2, 4), (0, 1, 3)):
        np.testing.assert_allclose(got[n, :, i, j], z[n, :, i, j] @ w + b, rtol=0, atol=1e-12)


def test_family_of(builtin):
    from types import SimpleNamespace
    assert family_of(builtin.vae.config, builtin.name) == "refldm-default"
    assert family_of(SimpleNamespace(latent_channels=4, scaling_factor=0.13025)) == "sdxl"
    assert family_of(SimpleNamespace(latent_channels=4, scaling_factor=0.18215)) == "sd1"
    assert family_of(SimpleNamespace(latent_channels=16, scaling_factor=1.5305)) == "sd3"
    assert family_of(SimpleNamespace(latent_channels=16, scaling_factor=0.3611)) == "flux"
    with pytest.raises(ValueError, match="8 latent channels"):
        family_of(SimpleNamespace(latent_channels=8, scaling_factor=1.5))


def test_sdxl_previews_text_to_image_image_to_image_and_cli(tmp_path):
    """SDXL (refldm's tiny base, VAE scaling 0.13025): the VAE preview of the last latent is the image; the linear
    one uses SDXL's factors; img2img and `refldm txt2img --preview-every` write them too."""
    from refldm.crosscheck.tiny import build
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    folder = build("sdxl", tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    kw = dict(prompt="a red circle", num_inference_steps=3, seed=1, progress=False)
    out = pipe(**kw, preview_every=2, preview_dir=tmp_path / "vae", preview="vae")
    names = sorted(p.name for p in (tmp_path / "vae").iterdir())
    assert names == [f"step-{i:03d}-{k}.png" for i in (2, 3) for k in ("latent", "x0")]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "vae" / "step-003-latent.png")),
                                  np.asarray(out.images[0]))
    pipe(**kw, preview_every=3, preview_dir=tmp_path / "lin")
    lin = np.asarray(Image.open(tmp_path / "lin" / "step-003-latent.png"))
    want = np.round(255 * np.clip((latent_to_rgb(out.latents, "sdxl") + 1) / 2, 0, 1)).astype(np.uint8)
    np.testing.assert_array_equal(lin[::4, ::4], want[0].transpose(1, 2, 0))
    with pytest.raises(ValueError, match="preview_every=4 must be an integer from 1 to the step count"):
        pipe(**kw, preview_every=4, preview_dir=tmp_path / "bad")
    i2i = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    i2i(**kw, image=out.images[0], strength=0.7, preview_every=1, preview_dir=tmp_path / "i2i")
    assert sorted(p.name for p in (tmp_path / "i2i").iterdir())[-1] == "step-002-x0.png"  # 2 of 3 steps
    assert main(["txt2img", "-p", "a red circle", "-m", folder, "--steps", "2", "--seed", "1",
                 "-o", str(tmp_path / "cli.png"), "--preview-every", "1", "--preview-dir", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").iterdir())) == 4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_pipelines_step_callback_and_previews(family, tmp_path):
    """SD3 / FLUX (tiny folders built by diffusers): diffusers' callback_on_step_end with the flow estimate
    x_0 = x_t - sigma v (at the last Euler step, sigma_next = 0, it is the result), latents a callback returns
    continue the loop, and the previews decode unpacked latents with the family's 16 x 3 factors."""
    if family == "sd3":
        from refldm.pipelines.sd3 import StableDiffusion3Pipeline as cls
        from tests.test_sd3_pipeline import build_tiny_sd3 as build
    else:
        from refldm.models.flux_transformer import unpack_latents
        from refldm.pipelines.flux import FluxPipeline as cls
        from tests.test_flux_pipeline import build_tiny_flux as build
    pipe = cls.from_pretrained(build(tmp_path / family))
    kw = dict(prompt="a red circle", num_inference_steps=3, seed=1, progress=False, height=32, width=32)
    plain = pipe(**kw).latents
    seen = []

    def look(p, i, t, d):
        seen.append({k: np.asarray(v) for k, v in d.items()})
        return {}

    out = pipe(**kw, callback_on_step_end=look, preview_every=3, preview_dir=tmp_path / "p",
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "pred_original_sample"])
    np.testing.assert_array_equal(out.latents, plain)                          # watching changes nothing
    assert len(seen) == 3 and sorted(seen[0]) == ["latents", "pred_original_sample", "prompt_embeds"]
    np.testing.assert_allclose(seen[-1]["pred_original_sample"], plain, rtol=1e-5, atol=1e-5)
    assert np.abs(seen[0]["pred_original_sample"] - plain).max() > 1e-3        # an estimate early on
    z = np.asarray(plain) if family == "sd3" else unpack_latents(np.asarray(plain), 8, 8)
    want = np.round(255 * np.clip((latent_to_rgb(z, family) + 1) / 2, 0, 1)).astype(np.uint8)
    lin = np.asarray(Image.open(tmp_path / "p" / "step-003-latent.png"))
    np.testing.assert_array_equal(lin[::pipe.vae_scale_factor, ::pipe.vae_scale_factor], want[0].transpose(1, 2, 0))
    halved = pipe(**kw, callback_on_step_end=lambda p, i, t, d: {"latents": d["latents"] * 0.5} if i == 0 else {})
    assert not np.allclose(halved.latents, plain)                               # returned latents are used
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs: 'add_time_ids' is not one of"):
        pipe(**kw, callback_on_step_end=look, callback_on_step_end_tensor_inputs=["add_time_ids"])
