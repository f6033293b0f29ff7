"""AutoencoderTiny (TAESD) against diffusers': a random-weight tiny model that diffusers saves, loaded by refldm.

Tolerances (relative error max|a - b| / max|b|): <= 1e-10 in float64, <= 1e-4 in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

from refldm import backend
from refldm.checkpoints.config import ConfigError
from refldm.models.autoencoder_tiny import AutoencoderTiny
from tests.conftest import require

# two levels (one 2x resampling each way), so the stride-2 and bias-free convs are exercised
TINY = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 2],
            num_decoder_blocks=[2, 1], latent_channels=4)


def rel(a, b):
    a, b = np.asarray(backend.to_numpy(a), np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderTiny(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    folder = tmp_path_factory.mktemp("taesd")
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_matches_diffusers(taesd_folder, dtype, tol):
    torch = require("torch")
    folder, model = taesd_folder
    ours = AutoencoderTiny.from_pretrained(folder, dtype=dtype)
    tdtype = getattr(torch, dtype)
    model = model.to(tdtype)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 5, 6)) * 2
    x = rng.uniform(-1, 1, (1, 3, 16, 24))
    with torch.no_grad():
        want_dec = model.decode(torch.tensor(z, dtype=tdtype)).sample.numpy()
        want_enc = model.encode(torch.tensor(x, dtype=tdtype)).latents.numpy()
    assert rel(ours.decode(z.astype(dtype)), want_dec) <= tol
    assert rel(ours.encode(x.astype(dtype)), want_enc) <= tol
    keys = {k for k, *_ in ours.params()}
    assert keys == set(model.state_dict())                        # diffusers' key names, all of them


def test_default_config_is_taesd():
    m = AutoencoderTiny()                                             # TAESD: 1.22 M parameters per half
    assert (m.encoder.num_parameters(), m.decoder.num_parameters()) == (1_222_532, 1_222_531)


def test_bad_config_one_line():
    with pytest.raises(ConfigError) as e:
        AutoencoderTiny.from_config(dict(TINY, upsample_fn="bilinear"))
    assert "upsample_fn" in str(e.value) and "\n" not in str(e.value)
