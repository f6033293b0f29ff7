"""Compression, as properties: an H x W RGB image becomes a (4, H/8, W/8) latent, 48x fewer values.

These tests need no torch: the VAE here has random weights drawn by NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.cli.vae import compression
from refldm.models.vae import AutoencoderKL
from refldm.checkpoints.weights import load_into

SD = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
      "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2}
MINI = {"block_out_channels": [4, 4, 4, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 2}



def random_vae(config, seed=0):
    vae = AutoencoderKL(config)
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(v.shape) / np.sqrt(max(1, np.prod(v.shape[1:]))) for k, _, _, v in vae.params()}
    load_into(vae, state, dtype="float32")
    vae.dtype = np.dtype("float32")
    return vae


@pytest.fixture(scope="module")
def mini():
    return random_vae(MINI)


# Integer arithmetic: a few representative cases say as much as a hundred random ones.
SIZES_OK = [(1, 8, 8), (1, 512, 512), (2, 64, 1024), (3, 1024, 8), (8, 4096, 4096), (5, 768, 1360)]
SIZES_BAD = [(9, 512), (512, 500), (7, 7), (4095, 8), (100, 12), (1, 1)]


@pytest.mark.parametrize("batch, h, w", SIZES_OK)
def test_latent_is_b_4_h8_w8_and_48x_smaller(batch, h, w):
    shape = AutoencoderKL(SD).latent_shape(batch, h, w)
    assert shape == (batch, 4, h // 8, w // 8)
    assert batch * 3 * h * w == 48 * int(np.prod(shape))
    c = compression(h, w)
    assert c["ratio"] == 48 and c["raw"] == 48 * c["latent"] and c["raw_bytes_fp16"] == 2 * c["raw"]


@pytest.mark.parametrize("h, w", SIZES_BAD)
def test_other_sizes_are_a_clear_error(h, w):
    with pytest.raises(ValueError, match="multiple of 8"):
        AutoencoderKL(SD).latent_shape(1, h, w)
    with pytest.raises(ValueError, match="multiple of 8"):
        compression(h, w)


@settings(max_examples=12)
@given(st.integers(1, 2), st.integers(1, 6).map(lambda k: 8 * k), st.integers(1, 6).map(lambda k: 8 * k))
def test_encode_and_decode_shapes(mini, batch, h, w):
    x = np.random.default_rng(h * w).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
    post = mini.encode(x)
    assert post.mean.shape == post.logvar.shape == (batch, 4, h // 8, w // 8)
    assert x.size == 48 * post.mean.size
    assert mini.decode(post.mode()).shape == (batch, 3, h, w)


@settings(max_examples=10)
@given(st.integers(9, 48).filter(lambda v: v % 8))
def test_encode_refuses_other_sizes(mini, h):
    with pytest.raises(ValueError, match="multiple of 8"):
        mini.encode(np.zeros((1, 3, h, 16), np.float32))


@pytest.mark.parametrize("blocks, factor", [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)])
def test_downscale_factor_is_two_to_the_blocks_minus_one(blocks, factor):
    config = {"block_out_channels": [4] * blocks, "down_block_types": ["DownEncoderBlock2D"] * blocks,
              "up_block_types": ["UpDecoderBlock2D"] * blocks, "norm_num_groups": 2}
    vae = random_vae(config)
    assert vae.downscale_factor == factor
    x = np.zeros((1, 3, 2 * factor, 3 * factor), np.float32)
    assert vae.encode(x).mean.shape == (1, 4, 2, 3)


def _sizes(capsys, *args):
    from refldm.cli import main

    assert main(["sizes", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_sizes_command_512(capsys):
    out = _sizes(capsys, 512, 512)
    for text in ("786,432", "16,384", "48x", "1.5 MB", "32 KB", "64 x 64 x 4"):
        assert text in out


def test_sizes_command_sdxl_1024(capsys):
    out = _sizes(capsys, 1024, 1024)
    for text in ("3,145,728", "65,536", "48x", "6 MB", "128 KB", "128 x 128 x 4"):
        assert text in out


@pytest.mark.parametrize("h, w", [(h, w) for _, h, w in SIZES_OK])
def test_sizes_command_any_size(h, w):
    import contextlib
    import io

    from refldm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sizes", str(h), str(w)]) == 0
    out = buf.getvalue()
    assert f"{h * w * 3:,} values" in out and f"{(h // 8) * (w // 8) * 4:,} values" in out and "48x" in out


def test_sizes_command_refuses_other_sizes(capsys):
    from refldm.cli import main

    assert main(["sizes", "512", "500"]) == 2
    err = capsys.readouterr().err
    assert "500" in err and "multiple of 8" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--factor", "0"], "factor"), (["--factor", "-8"], "factor"), (["--latent-channels", "0"], "latent channels"),
    (["--latent-channels", "-4"], "latent channels"), (["--channels", "0"], "channels"), (["-8", "512"], "height"),
])
def test_sizes_command_refuses_zero_and_negative_values(capsys, flags, needle):
    """No ZeroDivisionError, no negative sizes printed: one line naming the value."""
    from refldm.cli import main

    args = ["512", "512", *flags] if flags[0].startswith("--") else ["--", *flags]
    assert main(["sizes", *args]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and len(captured.err.strip().splitlines()) == 1 and not captured.out
