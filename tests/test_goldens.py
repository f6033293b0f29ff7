"""refldm's float64 VAE, U-Net and CLIP text encoder against stored diffusers/transformers outputs, without torch.

tests/data/goldens/*.npz hold float64 outputs of tiny random-weight models that tools/make_goldens.py
built with diffusers and transformers (fixed seeds; the weights are recreated from their names and the
seed by tests/goldens.py, so each file is a few KB). These tests are part of the fast subset
(`pytest -m "not slow"`): they pin every constant of the models that the torch agreement tests pin,
at 1e-10 relative (max|refldm - golden| / max|golden|), with the speed layer on and off.

Each of these deliberate mutations of refldm was made by hand, run against this file, and fails it
(then reverted):

- GroupNorm eps of the VAE 1e-6 -> 1e-5 (`_EPS` in refldm/models/vae.py): the VAE tests fail.
- an off-by-one clip_skip (`hidden_states[-(clip_skip + 1)]` -> `[-clip_skip]` or `[-(clip_skip + 2)]`
  in refldm/adapters/prompt_weighting.py): test_clip_skip_is_diffusers_clip_skip fails.
- a wrong attention scale (1/sqrt(d) -> 1/d as the default in refldm/core/functional.py and ops.py, or
  CLIP's head_dim ** -0.5 -> head_dim ** -1): the U-Net and VAE tests (default scale) or the CLIP
  tests fail.
- a wrong VAE scaling factor (the default 0.18215 -> 0.18125 in refldm/models/vae.py, or
  `z / scaling_factor` -> `z * scaling_factor` in refldm/core/images.py): test_vae_latent_scaling fails.
- a wrong timestep-embedding shift (`downscale_freq_shift=cfg.freq_shift` -> `=1` in
  refldm/models/unet.py, or `half - downscale_freq_shift` -> `half - downscale_freq_shift + 1` in
  ops.timestep_embedding): test_unet_matches_diffusers fails.

Regenerate the fixtures with `python tools/make_goldens.py` (needs the crosscheck extra) when a config
there changes; docs/contributing.md describes the loop.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from refldm import accel
from tests import goldens

TOL = 1e-10
SWITCH = pytest.mark.parametrize("fast", [True, False], ids=["accel", "reference"])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != golden {b.shape}"
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from refldm.models.vae import AutoencoderKL
    golden = goldens.load("vae")
    folder = goldens.write_folder(golden, tmp_path_factory.mktemp("vae"), "diffusion_pytorch_model.safetensors")
    return AutoencoderKL.from_pretrained(folder, dtype="float64"), golden


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    from refldm.models.unet import UNet2DConditionModel
    golden = goldens.load("unet")
    folder = goldens.write_folder(golden, tmp_path_factory.mktemp("unet"), "diffusion_pytorch_model.safetensors")
    return UNet2DConditionModel.from_pretrained(folder, dtype="float64"), golden


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from refldm.models.clip import CLIPTextModel
    golden = goldens.load("clip")
    folder = goldens.write_folder(golden, tmp_path_factory.mktemp("clip"), "model.safetensors")
    return CLIPTextModel.from_pretrained(folder, dtype="float64"), golden


@SWITCH
def test_vae_encode_and_decode_match_diffusers(vae, fast):
    model, g = vae
    with accel.enabled(fast):
        posterior = model.encode(g["image"])
        decoded = model.decode(g["latents"] / 0.18215)
    assert rel(posterior.mean, g["mean"]) <= TOL
    assert rel(posterior.logvar, g["logvar"]) <= TOL
    assert rel(decoded, g["decoded"]) <= TOL


def test_vae_latent_scaling(vae):
    """The pipelines' scaling (refldm.core.images): z_unet = mean * scaling_factor on the way in, and
    decode(z_unet / scaling_factor) on the way out, with the default factor of a config that names none."""
    from refldm.core.images import scale_latents, unscale_latents
    model, g = vae
    assert "scaling_factor" not in g["config"]
    assert rel(scale_latents(model.encode(g["image"]).mean, model.config), g["scaled_mean"]) <= TOL
    assert rel(model.decode(unscale_latents(g["latents"], model.config)), g["decoded"]) <= TOL


@SWITCH
def test_unet_matches_diffusers(unet, fast):
    model, g = unet
    with accel.enabled(fast):
        out = model(g["sample"], g["timesteps"], g["context"])
    out = getattr(out, "sample", out)
    assert rel(out, g["out"]) <= TOL


@SWITCH
def test_clip_hidden_states_match_transformers(clip, fast):
    model, g = clip
    with accel.enabled(fast):
        out = model(g["input_ids"], output_hidden_states=True)
    assert rel(out.last_hidden_state, g["last_hidden_state"]) <= TOL
    assert rel(out.pooler_output, g["pooler_output"]) <= TOL
    assert len(out.hidden_states) == len(g["hidden_states"])
    for mine, theirs in zip(out.hidden_states, g["hidden_states"]):
        assert rel(mine, theirs) <= TOL


@pytest.mark.parametrize("k", [1, 2])
def test_clip_skip_is_diffusers_clip_skip(clip, k):
    """The pipelines' clip_skip (prompt_syntax "plain", as diffusers' encode_prompt) on the stored ids."""
    from refldm.adapters.prompt_weighting import encode_prompts
    model, g = clip
    pipe = types.SimpleNamespace(text_encoder=model, tokenize=lambda prompts: g["input_ids"])
    cond, uncond = encode_prompts(pipe, ["", ""], None, "plain", clip_skip=k)
    assert uncond is None
    assert rel(cond, g[f"clip_skip_{k}"]) <= TOL
    assert rel(cond, g["clip_skip_1" if k == 2 else "clip_skip_2"]) > 1e-3  # the two layers differ
