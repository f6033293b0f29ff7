"""force_upcast: a float16 VAE decodes in float32 (as diffusers' upcast_vae), and a non-finite decoded
image is an error, never a black PNG. Checked on the built-in model, whose VAE overflows float16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refldm.images import unscale_latents
from refldm.models.vae import AutoencoderKL, NonFiniteImageError, decode_checked, needs_upcast, upcast
from refldm.random import randn
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
