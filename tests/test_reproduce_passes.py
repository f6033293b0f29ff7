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
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(big_h, big_w), mode=mode, antialias=True).numpy()
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
        assert np.max(np.abs(np.asarray(common.upscale_latents(x, big, mode, antialias=True)) - want)) <= TOLERANCE[mode]
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
