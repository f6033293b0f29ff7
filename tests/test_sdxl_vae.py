"""force_upcast: a float16 VAE decodes in float32 (as diffusers' upcast_vae), and a non-finite decoded
image is an error, never a black PNG. Checked on the built-in model, whose VAE overflows float16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refldm.core.images import unscale_latents
from refldm.models.vae import AutoencoderKL, NonFiniteImageError, decode_checked, needs_upcast, upcast
from refldm.core.random import randn
from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VAE = os.path.join(ROOT, "refldm", "default_model", "vae")


@pytest.fixture(scope="module")
def latents():
    return randn((2, 4, 8, 6), seed=3, dtype="float32")


def test_float16_vae_with_force_upcast_decodes_in_float32_as_diffusers(latents):
    """diffusers: the VAE loaded in float16, then upcast to float32 (the float16 weights widened); refldm's
    decode_checked on the float16 VAE must give the same image to float32 precision (<= 1e-4 relative)."""
    torch = require("torch")
    diffusers = require("diffusers")
    vae16 = AutoencoderKL.from_pretrained(DEFAULT_VAE, dtype="float16")
    assert needs_upcast(vae16) and upcast(vae16).dtype == np.float32
    z = unscale_latents(latents.astype("float16"), vae16.config)
    got = decode_checked(vae16, z)
    assert got.dtype == np.float32
    ref_model = diffusers.AutoencoderKL.from_pretrained(DEFAULT_VAE).half().float().eval()  # upcast_vae
    with torch.no_grad():
        ref = ref_model.decode(torch.from_numpy(np.asarray(z, np.float32))).sample.double().numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    vae32 = AutoencoderKL.from_pretrained(DEFAULT_VAE, dtype="float32")
    assert not needs_upcast(vae32) and upcast(vae32) is vae32


def test_float16_vae_without_force_upcast_overflows_and_is_a_clear_error(latents):
    vae16 = AutoencoderKL.from_pretrained(DEFAULT_VAE, dtype="float16")
    vae16.config.force_upcast = False
    with np.errstate(all="ignore"):
        with pytest.raises(NonFiniteImageError, match="NaN or inf") as e:
            decode_checked(vae16, unscale_latents(latents.astype("float16"), vae16.config))
    assert "\n" not in str(e.value)


def test_cli_float16_on_the_built_in_model_writes_a_real_image(tmp_path):
    """Issue 12 item 7 / issue 14 item 4: it wrote an all-black PNG and exited 0."""
    from PIL import Image
    out = tmp_path / "f16.png"
    proc = subprocess.run([sys.executable, "-m", "refldm", "txt2img", "-p", "a red circle", "--dtype", "float16",
                           "--steps", "1", "--seed", "1", "-q", "-W", "32", "-H", "32", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pixels = np.asarray(Image.open(out)).astype(np.float64)
    assert pixels.shape == (32, 32, 3)
    assert pixels.mean() > 20 and pixels.std() > 3  # not black, not flat


# ---------------------------------------------------------------------------------------------------
# tiling: diffusers' enable_tiling, tile by tile with cross-faded borders


def _tiny_vae(tmp_path, sample_size):
    torch = require("torch")
    diffusers = require("diffusers")
    from tests.test_pipeline import _rerandomise
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, sample_size=sample_size)
    _rerandomise(torch, model, 5)
    model.eval().save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("sample_size", [16, 24])
def test_tiled_decode_and_encode_match_diffusers_tiling(tmp_path, sample_size):
    """Latents (2, 4, 13, 10) and images (1, 3, 44, 28): several tiles each way, ragged edge tiles.
    Relative error <= 1e-10 in float64 and <= 1e-4 in float32; and the tiled result differs from the
    untiled one (so the test would notice tiling being skipped)."""
    torch = require("torch")
    model = _tiny_vae(tmp_path, sample_size)
    model.enable_tiling()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 13, 10))
    x = np.clip(rng.standard_normal((1, 3, 44, 28)) * 0.5, -1, 1)
    model.double()
    with torch.no_grad():
        ref_dec = model.decode(torch.from_numpy(z)).sample.numpy()
        ref_enc = model.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-4)):
        vae = AutoencoderKL.from_pretrained(tmp_path, dtype=dtype)
        plain_dec = vae.decode(z.astype(dtype))
        vae.enable_tiling()
        dec = vae.decode(z.astype(dtype))
        enc = vae.encode(x.astype(dtype)).mean
        assert dec.shape == ref_dec.shape and enc.shape == ref_enc.shape
        assert np.abs(dec - ref_dec).max() / np.abs(ref_dec).max() <= tol
        assert np.abs(enc - ref_enc).max() / np.abs(ref_enc).max() <= tol
        if plain_dec.shape == dec.shape:  # tiling changed the result (the test would see it skipped)
            assert np.abs(plain_dec - ref_dec).max() / np.abs(ref_dec).max() > 1e-3
        else:  # sample_size 24: the kept part of a tile (18 px) exceeds the stride (16 px): diffusers' tiled
            assert sample_size == 24  # output is larger than the untiled one, and refldm's is the same
    small = np.zeros((1, 4, 2, 2))
    np.testing.assert_array_equal(vae.decode(small.astype("float32")),
                                  vae.disable_tiling().decode(small.astype("float32")))  # one tile: untiled
