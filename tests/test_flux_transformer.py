"""FluxTransformer2DModel against diffusers on tiny random configs: max relative error max|a - b| / max|b|
<= 1e-10 in float64, <= 1e-4 in float32; the published dev / schnell parameter counts; packing.

float64 and diffusers: besides the float32 timestep sinusoid (tests/test_unet.py), diffusers rounds the RoPE
table to float32 (get_1d_rotary_pos_embed ends in ``.float()``) and rotates q and k in float32
(apply_rotary_emb's ``x.float()``), whatever the model's dtype. For the float64 reference those two are
replaced, inside the test only, by the same formulas without the float32 casts; the unpatched float64 model
is also compared, within 1e-3: its sinusoid of 1000 g (up to 4000 rad here) is taken in float32, whose spacing
there is 2.4e-4.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.checkpoints.config import ConfigError
from refldm.models.flux_transformer import (FluxTransformer2DModel, apply_rope, latent_image_ids, pack_latents, rope,
                                            unpack_latents)
from tests.conftest import require
from tests.test_unet import float64_timesteps, rel_err, torch_threads

TOL64, TOL32 = 1e-10, 1e-4

# the published transformer/config.json of FLUX.1-schnell; dev differs only in guidance_embeds
SCHNELL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
               axes_dims_rope=[16, 56, 56])
DEV = dict(SCHNELL, guidance_embeds=True)
PUBLISHED = {"flux.1-dev": (DEV, 11_901_408_320), "flux.1-schnell": (SCHNELL, 11_891_178_560)}


def tiny_config(axes=(2, 4, 2), heads=2, layers=2, single=2, guidance=True, in_ch=8):
    return dict(patch_size=1, in_channels=in_ch, num_layers=layers, num_single_layers=single,
                attention_head_dim=sum(axes), num_attention_heads=heads, joint_attention_dim=12,
                pooled_projection_dim=10, guidance_embeds=guidance, axes_dims_rope=list(axes))


@contextlib.contextmanager
def float64_rope():
    """diffusers' RoPE table and rotation without the float32 casts (the same formulas), inside the block."""
    torch = require("torch")
    from diffusers.models.transformers import transformer_flux

    originals = transformer_flux.get_1d_rotary_pos_embed, transformer_flux.apply_rotary_emb

    def table(dim, pos, theta, repeat_interleave_real, use_real, freqs_dtype):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = torch.outer(pos.to(torch.float64), freqs)
        return angle.cos().repeat_interleave(2, dim=1), angle.sin().repeat_interleave(2, dim=1)

    def rotate(x, freqs, sequence_dim):
        cos, sin = (f[None, :, None, :].to(x.dtype) for f in freqs)
        real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * cos + torch.stack([-imag, real], dim=-1).flatten(3) * sin

    transformer_flux.get_1d_rotary_pos_embed, transformer_flux.apply_rotary_emb = table, rotate
    try:
        yield
    finally:
        transformer_flux.get_1d_rotary_pos_embed, transformer_flux.apply_rotary_emb = originals


def build(tmp_path, config, seed=0):
    """A diffusers model with every parameter random (the adaLN linears are zero in training), saved."""
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("weight") else 0.1))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def inputs(rng, config, batch, h, w, seq, id_offset=0):
    """Packed tokens for an h x w token grid; text ids zero, image ids (0, row, col) (+ an offset to reach far
    positions)."""
    x = rng.standard_normal((batch, h * w, config["in_channels"]))
    c = rng.standard_normal((batch, seq, config["joint_attention_dim"]))
    y = rng.standard_normal((batch, config["pooled_projection_dim"]))
    t = rng.uniform(0, 1, batch)
    g = rng.uniform(1, 4, batch)                     # FLUX.1-dev's default is 3.5
    img_ids = latent_image_ids(h, w) + np.array([0, id_offset, id_offset])
    txt_ids = np.zeros((seq, 3), dtype=np.int64)
    return x, c, y, t, g, img_ids, txt_ids


def diffusers_forward(model, case, dtype, guidance):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model.to(td)
    x, c, y, t, g, img_ids, txt_ids = case
    x, c, y, t, g = (torch.from_numpy(a).to(td) for a in (x, c, y, t, g))
    with torch.no_grad():
        out = model(x, c, y, t, torch.from_numpy(img_ids).float(), torch.from_numpy(txt_ids).float(),
                    guidance=g if guidance else None)
    return out.sample.numpy().astype(np.float64)


def check(tmp_path, config, cases, seed=0):
    guidance = config["guidance_embeds"]
    with torch_threads(1):
        dmodel, folder = build(tmp_path, config, seed)
        ref32 = [diffusers_forward(dmodel, case, "float32", guidance) for case in cases]
        with float64_timesteps(), float64_rope():
            ref64 = [diffusers_forward(dmodel, case, "float64", guidance) for case in cases]
        plain64 = [diffusers_forward(dmodel, case, "float64", guidance) for case in cases]
    for dtype, refs, tol in (("float64", ref64, TOL64), ("float32", ref32, TOL32)):
        model = FluxTransformer2DModel.from_pretrained(folder, dtype=dtype)
        for i, (case, ref) in enumerate(zip(cases, refs)):
            x, c, y, t, g, img_ids, txt_ids = case
            out = model(x.astype(dtype), c.astype(dtype), y.astype(dtype), t, img_ids, txt_ids,
                        guidance=g if guidance else None)
            assert out.dtype == np.dtype(dtype) and out.shape == ref.shape
            err = rel_err(out, ref)
            assert err <= tol, (dtype, i, err)
            if dtype == "float64":  # diffusers' own float64: 1000 g rounded to float32 (ulp 2.4e-4 at 4000)
                assert rel_err(out, plain64[i]) <= 1e-3


def test_tiny_dev_matches_diffusers_batch_and_non_square(tmp_path):
    rng = np.random.default_rng(0)
    config = tiny_config()
    check(tmp_path, config, [inputs(rng, config, 2, 3, 5, 4), inputs(rng, config, 1, 4, 2, 1, id_offset=37)])


def test_tiny_schnell_no_guidance_matches_diffusers(tmp_path):
    rng = np.random.default_rng(1)
    config = tiny_config(guidance=False, axes=(4, 2, 2), layers=1, single=3)
    check(tmp_path, config, [inputs(rng, config, 2, 2, 3, 5)])


@settings(max_examples=4, deadline=None)
@given(axes=st.lists(st.sampled_from([2, 4, 6]), min_size=3, max_size=3), h=st.integers(1, 4), w=st.integers(1, 4),
       seq=st.integers(1, 6), batch=st.integers(1, 2), layers=st.integers(0, 2), single=st.integers(0, 2),
       guidance=st.booleans())
def test_random_sizes_token_counts_and_rope_axes_match_diffusers(tmp_path_factory, axes, h, w, seq, batch, layers,
                                                                 single, guidance):
    rng = np.random.default_rng(h * 100 + w * 10 + seq)
    config = tiny_config(axes=axes, layers=layers, single=single, guidance=guidance)
    check(tmp_path_factory.mktemp("flux"), config, [inputs(rng, config, batch, h, w, seq)])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_have_diffusers_parameter_count(name):
    torch = require("torch")
    diffusers = require("diffusers")
    config, count = PUBLISHED[name]
    with torch.device("meta"):
        dmodel = diffusers.FluxTransformer2DModel(**config)
    assert dmodel.num_parameters() == count
    model = FluxTransformer2DModel.from_config(dict(dmodel.config))
    assert model.num_parameters() == count
    assert {k: tuple(v.shape) for k, _, _, v in model.params()} == \
        {k: tuple(v.shape) for k, v in dmodel.state_dict().items()}


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4))
def test_pack_unpack_roundtrip_and_formula(b, c, h, w):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((b, c, 2 * h, 2 * w))
    packed = pack_latents(lat)
    assert packed.shape == (b, h * w, 4 * c)
    r, s, ch, i, j = h - 1, w - 1, c - 1, 1, 0
    assert packed[0, r * w + s, 4 * ch + 2 * i + j] == lat[0, ch, 2 * r + i, 2 * s + j]
    np.testing.assert_array_equal(unpack_latents(packed, 2 * h, 2 * w), lat)
    ids = latent_image_ids(h, w)
    assert ids.shape == (h * w, 3) and tuple(ids[r * w + s]) == (0, r, s)


def test_rope_is_a_rotation_that_depends_on_the_id_difference():
    """|rope(x)| = |x| per pair, and q_m . k_n is unchanged when both ids move by the same amount."""
    rng = np.random.default_rng(3)
    axes = [2, 4, 2]
    q, k = rng.standard_normal((2, 1, 1, 1, 8))
    ids = np.array([[0, 3, 5], [0, 7, 1], [0, 13, 15], [0, 17, 11]])
    cos, sin = rope(ids, axes)
    rq = [apply_rope(q, cos[n:n + 1], sin[n:n + 1]) for n in range(4)]
    rk = [apply_rope(k, cos[n:n + 1], sin[n:n + 1]) for n in range(4)]
    np.testing.assert_allclose(np.sum(rq[0] ** 2), np.sum(q ** 2), rtol=1e-12)
    np.testing.assert_allclose(np.sum(rq[0] * rk[1]), np.sum(rq[2] * rk[3]), rtol=1e-10)  # both shifted by 10
    assert abs(np.sum(rq[0] * rk[1]) - np.sum(rq[0] * rk[3])) > 1e-6


@pytest.mark.parametrize("key,value,match", [
    ("axes_dims_rope", [2, 4, 4], r"must sum to attention_head_dim=8"),
    ("axes_dims_rope", [3, 3, 2], r"must be even positive integers"),
    ("use_magic", 1, "unknown config key 'use_magic'"),
])
def test_bad_config_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        FluxTransformer2DModel.from_config({**tiny_config(), key: value})


def test_bad_inputs_name_the_thing():
    model = FluxTransformer2DModel.from_config(tiny_config())
    x, c, y = np.zeros((1, 6, 8)), np.zeros((1, 3, 12)), np.zeros((1, 10))
    ids, txt = latent_image_ids(2, 3), np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"hidden_states must be packed tokens \(B, N, 8\)"):
        model(np.zeros((1, 6, 7)), c, y, 0.5, ids, txt, guidance=3.5)
    with pytest.raises(ValueError, match=r"img_ids must be \(6, 3\)"):
        model(x, c, y, 0.5, latent_image_ids(3, 3), txt, guidance=3.5)
    with pytest.raises(ValueError, match="pass guidance"):
        model(x, c, y, 0.5, ids, txt)
    with pytest.raises(ValueError, match="both must be even"):
        pack_latents(np.zeros((1, 4, 3, 4)))


def test_float16_runs_close_to_float32(tmp_path):
    """float16 weights: the sinusoid and the RoPE rotation in float32, activations clipped to +-65504 after each
    block, as diffusers; the output within float16 rounding of the float32 model's. As in diffusers, 1000 t and
    1000 g are taken in the model's dtype (float16 spacing is 2 at 3000 rad), so t and g are chosen exact there."""
    config = tiny_config()
    build(tmp_path, config)
    x, c, y, _, _, img_ids, txt_ids = inputs(np.random.default_rng(4), config, 2, 3, 2, 3)
    t, g = np.array([0.25, 0.5]), np.array([2.0, 3.5])
    ref = FluxTransformer2DModel.from_pretrained(tmp_path, dtype="float32")(
        *(a.astype("float32") for a in (x, c, y)), t, img_ids, txt_ids, guidance=g)
    out = FluxTransformer2DModel.from_pretrained(tmp_path, dtype="float16")(
        *(a.astype("float16") for a in (x, c, y)), t, img_ids, txt_ids, guidance=g)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 1e-2
