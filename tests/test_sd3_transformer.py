"""SD3Transformer2DModel (the MMDiT) against diffusers on tiny random configs: max relative error
max|a - b| / max|b| <= 1e-10 in float64, <= 1e-4 in float32; the published configs' parameter counts.

float64 and diffusers: its sinusoidal timestep embedding is computed in float32 whatever the dtype (see
tests/test_unet.py), and its RMSNorm (SD3.5's qk_norm) takes the mean of squares in float32 too
(``hidden_states.to(torch.float32).pow(2).mean(...)``). For the float64 reference both are replaced, inside
the test only, by the same formulas in float64; the unpatched float64 model is also compared, at float32
precision, to show what those two float32 steps cost.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.checkpoints.config import ConfigError
from refldm.models.sd3_transformer import SD3Transformer2DModel, get_2d_sincos_pos_embed
from tests.conftest import require
from tests.test_unet import float64_timesteps, rel_err, torch_threads

TOL64, TOL32 = 1e-10, 1e-4

# the published transformer/config.json of each model (diffusers folders on the Hugging Face Hub)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  qk_norm="rms_norm")
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13)))
# diffusers' num_parameters() on the meta device (the stored position table is a buffer, not counted)
PUBLISHED = {"sd3-medium": (SD3_MEDIUM, 2_028_328_000), "sd3.5-large": (SD35_LARGE, 8_056_627_520),
             "sd3.5-medium": (SD35_MEDIUM, 2_243_171_520)}


def tiny_config(patch=2, heads=2, head_dim=8, layers=2, qk_norm=None, dual=(), max_size=12, in_ch=4):
    return dict(sample_size=8, patch_size=patch, in_channels=in_ch, num_layers=layers, attention_head_dim=head_dim,
                num_attention_heads=heads, joint_attention_dim=20, caption_projection_dim=heads * head_dim,
                pooled_projection_dim=12, out_channels=in_ch, pos_embed_max_size=max_size,
                dual_attention_layers=list(dual), qk_norm=qk_norm)


@contextlib.contextmanager
def float64_rms_norm():
    """diffusers' RMSNorm with the mean of squares in the input's dtype (float64 here), inside the block."""
    torch = require("torch")
    from diffusers.models import normalization

    original = normalization.RMSNorm.forward

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y

    normalization.RMSNorm.forward = forward
    try:
        yield
    finally:
        normalization.RMSNorm.forward = original


def build(tmp_path, config, seed=0):
    """A diffusers model with random weights (including the adaLN linears, zero-initialised in training),
    saved to tmp_path; -> (diffusers model, folder)."""
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("weight") else 0.1))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def inputs(rng, config, batch, h, w, seq):
    x = rng.standard_normal((batch, config["in_channels"], h, w))
    c = rng.standard_normal((batch, seq, config["joint_attention_dim"]))
    y = rng.standard_normal((batch, config["pooled_projection_dim"]))
    t = rng.uniform(0, 1000, batch)
    return x, c, y, t


def diffusers_forward(model, case, dtype):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    model.to(td)
    x, c, y, t = (torch.from_numpy(a).to(td) for a in case)
    with torch.no_grad():
        return model(x, c, y, t.to(torch.float32 if dtype == "float32" else td)).sample.numpy().astype(np.float64)


def check(tmp_path, config, cases, seed=0):
    with torch_threads(1):
        dmodel, folder = build(tmp_path, config, seed)
        ref32 = [diffusers_forward(dmodel, case, "float32") for case in cases]
        with float64_timesteps(), float64_rms_norm():
            ref64 = [diffusers_forward(dmodel, case, "float64") for case in cases]
        plain64 = [diffusers_forward(dmodel, case, "float64") for case in cases]
    errors = {}
    for dtype, refs, tol in (("float64", ref64, TOL64), ("float32", ref32, TOL32)):
        model = SD3Transformer2DModel.from_pretrained(folder, dtype=dtype)
        for i, (case, ref) in enumerate(zip(cases, refs)):
            x, c, y, t = (a.astype(dtype) for a in case)
            out = model(x, c, y, t)
            assert out.dtype == np.dtype(dtype) and out.shape == ref.shape
            err = rel_err(out, ref)
            assert err <= tol, (dtype, i, err)
            errors[dtype, i] = err
            if dtype == "float64":  # diffusers' own float64 (float32 sinusoid and RMS) is float32-close only
                assert rel_err(out, plain64[i]) <= TOL32
    return errors


def test_tiny_sd3_matches_diffusers_batch_non_square_and_last_block(tmp_path):
    rng = np.random.default_rng(0)
    config = tiny_config(layers=3)
    check(tmp_path, config, [inputs(rng, config, 2, 6, 10, 5), inputs(rng, config, 1, 12, 4, 3)])


def test_tiny_sd35_qk_norm_and_dual_attention_match_diffusers(tmp_path):
    rng = np.random.default_rng(1)
    config = tiny_config(layers=3, qk_norm="rms_norm", dual=(0, 1))
    check(tmp_path, config, [inputs(rng, config, 2, 8, 6, 4)])


@settings(max_examples=4, deadline=None)
@given(patch=st.sampled_from([1, 2, 4]), hp=st.integers(1, 4), wp=st.integers(1, 4), seq=st.integers(1, 6),
       qk=st.booleans(), batch=st.integers(1, 2))
def test_random_patch_sizes_token_counts_and_shapes_match_diffusers(tmp_path_factory, patch, hp, wp, seq, qk, batch):
    """Patch sizes 1, 2, 4; (H/p) x (W/p) from 1 x 1 to 4 x 4 patches, any aspect; 1-6 text tokens."""
    rng = np.random.default_rng(patch * 100 + hp * 10 + wp)
    config = tiny_config(patch=patch, layers=2, qk_norm="rms_norm" if qk else None, dual=(0,) if qk else (),
                         max_size=5)
    check(tmp_path_factory.mktemp("sd3"), config, [inputs(rng, config, batch, hp * patch, wp * patch, seq)])


def test_stored_position_table_is_the_2d_sincos_formula(tmp_path):
    """diffusers stores pos_embed (float32) in the checkpoint; it equals get_2d_sincos_pos_embed to float32."""
    config = tiny_config()
    build(tmp_path, config)
    model = SD3Transformer2DModel.from_pretrained(tmp_path, dtype="float64")
    table = get_2d_sincos_pos_embed(16, config["pos_embed_max_size"], base_size=config["sample_size"] // 2)
    np.testing.assert_allclose(model.pos_embed.pos_embed[0], table, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_have_diffusers_parameter_count(name):
    """Counted from the config alone: diffusers on the meta device, refldm from its declared shapes."""
    torch = require("torch")
    diffusers = require("diffusers")
    config, count = PUBLISHED[name]
    with torch.device("meta"):
        dmodel = diffusers.SD3Transformer2DModel(**config)
    assert dmodel.num_parameters() == count
    model = SD3Transformer2DModel.from_config(dict(dmodel.config))
    assert model.num_parameters() == count
    shapes = {k: tuple(v.shape) for k, v in dmodel.state_dict().items()}
    assert {k: tuple(v.shape) for k, _, _, v in model.params()} == shapes  # the same keys, shapes, buffer
    assert model.num_parameters(include_buffers=True) == sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize("key,value,match", [
    ("qk_norm", "layer_norm", "qk_norm='layer_norm' is not implemented"),
    ("caption_projection_dim", 10, "caption_projection_dim=10 must equal"),
    ("dual_attention_layers", [5], r"dual_attention_layers has \[5\]"),
    ("use_magic", 1, "unknown config key 'use_magic'"),
])
def test_bad_config_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        SD3Transformer2DModel.from_config({**tiny_config(), key: value})


def test_bad_inputs_name_the_shape():
    model = SD3Transformer2DModel.from_config(tiny_config())
    x, c, y = np.zeros((1, 4, 5, 6)), np.zeros((1, 3, 20)), np.zeros((1, 12))
    with pytest.raises(ValueError, match="latent size 5 x 6 is not divisible by patch_size=2"):
        model(x, c, y, 500.0)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(1, S, 20\)"):
        model(np.zeros((1, 4, 4, 4)), np.zeros((1, 3, 7)), y, 500.0)


def test_float16_weights_run_close_to_float32(tmp_path):
    """float16: the weights cast on loading, the sinusoid and RMS norm's mean of squares in float32; the output
    stays within float16 rounding of the float32 model's."""
    config = tiny_config(layers=2, qk_norm="rms_norm", dual=(0,))
    build(tmp_path, config)
    rng = np.random.default_rng(5)
    x, c, y, t = inputs(rng, config, 2, 6, 8, 3)
    ref = SD3Transformer2DModel.from_pretrained(tmp_path, dtype="float32")(*(a.astype("float32") for a in (x, c, y)),
                                                                            t)
    model = SD3Transformer2DModel.from_pretrained(tmp_path, dtype="float16")
    out = model(*(a.astype("float16") for a in (x, c, y)), t)
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
    assert rel_err(out, ref) <= 1e-2


def test_layer_by_layer_trace_matches_diffusers_hooks(tmp_path):
    """refldm.crosscheck.trace records every MMDiT module under diffusers' module names, so a port can be compared
    layer by layer: each name both record agrees to 1e-10 in float64 (tools/trace_diffusers.py's hooks)."""
    torch = require("torch")
    from refldm.crosscheck import trace as rtrace
    from tools.trace_diffusers import hook_trace
    config = tiny_config(layers=2, qk_norm="rms_norm", dual=(0,))
    dmodel, folder = build(tmp_path, config)
    dmodel.to(torch.float64)
    x, c, y, t = inputs(np.random.default_rng(9), config, 1, 4, 6, 3)
    model = SD3Transformer2DModel.from_pretrained(folder, dtype="float64")
    with rtrace.record() as rec:
        model(x, c, y, t)
    ours = rec.activations
    with torch_threads(1), float64_timesteps(), float64_rms_norm():
        theirs = hook_trace(dmodel, lambda: dmodel(*(torch.from_numpy(a) for a in (x, c, y, t))), names=list(ours))
    common = [n for n in ours if n in theirs]
    assert len(common) >= 60 and "transformer_blocks.0.attn2" in common and "transformer_blocks.1.attn" in common
    for name in common:
        assert rel_err(ours[name], theirs[name]) <= TOL64, name
