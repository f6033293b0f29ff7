"""refldm.models.t5.T5EncoderModel against transformers' T5EncoderModel on random weights.

Tolerances (max|a - b| / max|b|): <= 1e-10 for refldm in float64 against transformers in float64, <= 1e-4
for refldm in float32 against transformers in float32, on last_hidden_state and every hidden state.

transformers' T5LayerNorm computes mean(x^2) in float32 whatever the dtype (so its float64 model carries
float32 rounding, ~1e-7); refldm computes it in float64 for float64. For the float64 comparison the
reference's norm is swapped for the same equation computed in float64 (`wide_norm`); for float32 the
reference runs unchanged.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm import backend
from refldm.checkpoints.config import ConfigError
from refldm.checkpoints.weights import WeightsError, load_file, save_file
from refldm.models.t5 import T5Config, T5EncoderModel, relative_position_bucket
from tests.conftest import require

TOL64, TOL32 = 1e-10, 1e-4
TINY = dict(vocab_size=60, d_model=16, d_kv=6, d_ff=24, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
# T5 v1.1 XXL, the text_encoder_3 of SD3 / text_encoder_2 of FLUX (config.json as shipped, less bookkeeping)
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
           layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True, dropout_rate=0.1,
           num_decoder_layers=24, tie_word_embeddings=False, is_encoder_decoder=True, output_past=True,
           decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, initializer_factor=1.0, torch_dtype="float16")


def rel(a, b) -> float:
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(b.detach().double().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(config: dict, seed: int = 0):
    """A transformers T5EncoderModel with random weights (norm scales near 1)."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            elif "relative_attention_bias" in name:
                torch.nn.init.normal_(p, std=1.0)
    return model


@contextlib.contextmanager
def wide_norm():
    """transformers' T5LayerNorm with mean(x^2) in the input's dtype when that is float64 (refldm's rule)."""
    torch = require("torch")
    modeling = require("transformers.models.t5.modeling_t5")
    original = modeling.T5LayerNorm.forward

    def forward(self, x):
        wide = x if x.dtype == torch.float64 else x.to(torch.float32)
        y = x * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (y.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) else y)

    modeling.T5LayerNorm.forward = forward
    try:
        yield
    finally:
        modeling.T5LayerNorm.forward = original


def run_reference(model, ids, mask=None, dtype="float64"):
    torch = require("torch")
    model.to(getattr(torch, dtype))
    with torch.no_grad(), (wide_norm() if dtype == "float64" else contextlib.nullcontext()):
        return model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
                     output_hidden_states=True)


def saved(model, folder, **kwargs):
    model.save_pretrained(str(folder), **kwargs)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model = reference(TINY)
    return model, saved(model, tmp_path_factory.mktemp("t5") / "tiny")


def assert_agrees(out, ref, tol):
    assert rel(out.last_hidden_state, ref.last_hidden_state) <= tol
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_layers"] + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel(mine, theirs) <= tol


@settings(max_examples=12)
@given(length=st.integers(1, 48), batch=st.integers(1, 2), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_agrees_with_transformers_over_token_counts(tiny_folder, length, batch, padded, seed):
    """Lengths past relative_attention_max_distance (20) reach the log-spaced and the last buckets."""
    model, folder = tiny_folder
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], (batch, length))
    mask = None
    if padded:
        mask = np.ones((batch, length), dtype=np.int64)
        mask[-1, rng.integers(1, length + 1):] = 0  # right padding, at least one token kept
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        ref = run_reference(model, ids, mask, dtype)
        out = T5EncoderModel.from_pretrained(folder, dtype=dtype)(ids, attention_mask=mask, output_hidden_states=True)
        assert out.last_hidden_state.dtype == np.dtype(dtype)
        assert_agrees(out, ref, tol)


@pytest.mark.parametrize("proj", ["relu", "gated-relu", "gelu", "gated-silu"])
def test_other_feed_forward_kinds_agree(tmp_path, proj):
    model = reference({**TINY, "feed_forward_proj": proj}, seed=3)
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 25))
    out = T5EncoderModel.from_pretrained(saved(model, tmp_path / proj), dtype="float64")(ids, output_hidden_states=True)
    assert_agrees(out, run_reference(model, ids), TOL64)


@settings(max_examples=40)
@given(buckets=st.integers(4, 64), distance=st.integers(1, 300))
def test_relative_position_buckets_equal_transformers(buckets, distance):
    """Equal on every distance, except that on an exact bucket boundary (the float32 expression an
    integer) the side depends on the last bit of the float32 log, which NumPy and torch (SLEEF) may round
    differently: there either neighbouring bucket is accepted."""
    torch = require("torch")
    modeling = require("transformers.models.t5.modeling_t5")
    distance = max(distance, buckets // 4 + 1)
    positions = torch.arange(-3 * distance - 5, 3 * distance + 6)
    theirs = modeling.T5Attention._relative_position_bucket(positions, True, buckets, distance).numpy()
    mine = relative_position_bucket(positions.numpy(), buckets, distance)
    n, exact = buckets // 2, buckets // 4
    d = np.abs(positions.numpy())
    with np.errstate(divide="ignore"):
        x = np.log(np.maximum(d, 1) / exact) / np.log(distance / exact) * (n - exact)
    boundary = (d >= exact) & (np.abs(x - np.round(x)) < 1e-4)
    assert np.array_equal(mine[~boundary], theirs[~boundary])
    assert np.all(np.abs(mine[boundary] - theirs[boundary]) <= 1)


def test_bucket_table_of_the_published_configuration():
    """32 buckets up to 128 (every T5): exact up to 7, then log-spaced, 16, 32, 64 on boundaries; from 128
    on the last bucket. Equal to transformers' table on every distance up to 1000."""
    torch = require("torch")
    modeling = require("transformers.models.t5.modeling_t5")
    buckets = relative_position_bucket(np.array([-16, -15, 0, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 10**6]))
    assert buckets.tolist() == [10, 9, 0, 23, 24, 25, 26, 27, 28, 29, 30, 31, 31, 31]
    positions = torch.arange(-1000, 1001)
    assert np.array_equal(relative_position_bucket(positions.numpy()),
                          modeling.T5Attention._relative_position_bucket(positions, True, 32, 128).numpy())


def test_sharded_checkpoint_loads(tiny_folder, tmp_path):
    model, _ = tiny_folder
    folder = saved(model, tmp_path / "sharded", max_shard_size="10KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    ids = np.arange(1, 30).reshape(1, -1)
    out = T5EncoderModel.from_pretrained(folder, dtype="float64")(ids, output_hidden_states=True)
    assert_agrees(out, run_reference(model, ids), TOL64)


@pytest.mark.parametrize("keys", ["shared", "embed_tokens", "both", "both_differ"])
def test_tied_embedding_keys(tiny_folder, tmp_path, keys):
    transformers = require("transformers")
    model, folder = tiny_folder
    state = load_file(folder / "model.safetensors")
    table = state.pop("shared.weight")
    if keys != "embed_tokens":
        state["shared.weight"] = table
    if keys != "shared":
        state["encoder.embed_tokens.weight"] = table + (0.5 if keys == "both_differ" else 0.0)
    out_folder = tmp_path / keys
    out_folder.mkdir()
    (out_folder / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, out_folder / "model.safetensors")
    ids = np.arange(3, 20).reshape(1, -1)
    with pytest.warns(UserWarning, match="differ") if keys == "both_differ" else contextlib.nullcontext():
        mine = T5EncoderModel.from_pretrained(out_folder, dtype="float64")
    theirs = transformers.T5EncoderModel.from_pretrained(str(out_folder))
    assert rel(mine(ids).last_hidden_state, run_reference(theirs, ids).last_hidden_state) <= TOL64
    tied = mine.encoder.embed_tokens.weight is mine.shared.weight
    assert tied is (keys != "both_differ")
    assert set(mine.state_dict()) == set(theirs.state_dict())


def test_float16_keeps_wo_in_float32_as_transformers(tiny_folder):
    torch = require("torch")
    transformers = require("transformers")
    model, folder = tiny_folder
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], (2, 30))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    mine = T5EncoderModel.from_pretrained(folder, dtype="float16")
    assert mine.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == np.float32
    assert mine.encoder.block[1].layer[1].DenseReluDense.wi_0.weight.dtype == np.float16
    out = mine(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == np.float16
    theirs = transformers.T5EncoderModel.from_pretrained(str(folder), dtype=torch.float16)
    with torch.no_grad():
        half = theirs(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state
    exact = run_reference(model, ids, mask).last_hidden_state
    assert rel(out, half) <= 5e-3 and rel(out, exact) <= 5e-3  # float16: an 11-bit mantissa


def test_xxl_parameter_count_equals_transformers():
    torch = require("torch")
    transformers = require("transformers")
    with torch.device("meta"):
        theirs = transformers.T5EncoderModel(transformers.T5Config(**XXL))
    mine = T5EncoderModel.from_config(XXL)
    assert mine.num_parameters() == theirs.num_parameters() == 4_762_310_656
    assert {k for k, _, _, _ in mine.params()} | {"encoder.embed_tokens.weight"} == set(theirs.state_dict())


def test_runs_on_every_backend(tiny_folder, on_backend):
    _, folder = tiny_folder
    ids = np.arange(2, 26).reshape(2, 12)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    with backend.use("numpy"):
        want = T5EncoderModel.from_pretrained(folder, dtype="float64")(ids, attention_mask=mask).last_hidden_state
    got = T5EncoderModel.from_pretrained(folder, dtype="float64")(ids, attention_mask=mask).last_hidden_state
    assert rel(got, want) <= 1e-12


# ---------------------------------------------------------------------------------------------------------
# Bad input, without the cross-check packages


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'rope_theta'"):
        T5EncoderModel.from_config({**TINY, "rope_theta": 10000})
    with pytest.raises(ConfigError, match=r"is_decoder=True is not implemented"):
        T5EncoderModel.from_config({**TINY, "is_decoder": True})
    with pytest.raises(ConfigError, match=r"feed_forward_proj='gated-mish': activation 'mish' is not implemented"):
        T5EncoderModel.from_config({**TINY, "feed_forward_proj": "gated-mish"})
    with pytest.raises(ConfigError, match=r"feed_forward_proj='double-gated-gelu' is not 'ACT' or 'gated-ACT'"):
        T5EncoderModel.from_config({**TINY, "feed_forward_proj": "double-gated-gelu"})
    config = T5EncoderModel.from_config(XXL).config  # every key of the shipped config is known
    assert isinstance(config, T5Config) and (config.d_ff, config.activation, config.is_gated) == (10240, "gelu_new", True)


def random_state(model, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) * 0.3 for k, _, _, v in model.params()
            if k != "encoder.embed_tokens.weight"}  # tied to shared.weight


def test_input_and_weight_errors_are_one_line():
    model = T5EncoderModel.from_config(TINY)
    with pytest.raises(ValueError, match="weights are not loaded"):
        model(np.zeros((1, 3), dtype=np.int64))
    state = random_state(model)
    model.load_state_dict(state)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    for bad, match in ((np.array([[0, 60]]), r"range \[0, 60\] lies outside the vocabulary \[0, 60\)"),
                       (np.zeros((1, 0), dtype=np.int64), "length >= 1"),
                       (np.zeros((1, 3)), "must be integer token ids")):
        with pytest.raises(ValueError, match=match):
            model(bad)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\) does not match input_ids \(1, 3\)"):
        model(np.zeros((1, 3), dtype=np.int64), attention_mask=np.ones((1, 2)))
    state.pop("shared.weight")
    with pytest.raises(WeightsError, match=r"missing: shared.weight \(or encoder.embed_tokens.weight\)"):
        T5EncoderModel.from_config(TINY).load_state_dict(state)


def test_padding_is_invisible_to_the_kept_tokens():
    """A padded key gets the lowest score: the kept tokens' outputs equal those of the unpadded prompt."""
    model = T5EncoderModel.from_config(TINY).load_state_dict(random_state(T5EncoderModel.from_config(TINY), 1),
                                                             dtype="float64")
    ids = np.array([[5, 9, 11, 3, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 0, 0]])
    padded = model(ids, attention_mask=mask).last_hidden_state[:, :4]
    alone = model(ids[:, :4]).last_hidden_state
    assert np.abs(padded - alone).max() <= 1e-12
    assert np.abs(model(ids).last_hidden_state[:, :4] - alone).max() > 1e-3  # unmasked padding is attended to


def test_trace_names_follow_transformers_modules(tiny_folder):
    from refldm.crosscheck import trace
    model, folder = tiny_folder
    mine_model = T5EncoderModel.from_pretrained(folder, dtype="float64")
    with trace.record() as t:
        mine_model(np.arange(1, 13).reshape(1, -1))
    mine = set(t.activations) - {trace.ROOT}
    theirs = {name for name, _ in model.named_modules()}
    assert mine <= theirs, mine - theirs
    assert {"encoder.embed_tokens", "encoder.block.0.layer.0.SelfAttention.q", "encoder.block.2.layer.1.DenseReluDense",
            "encoder.final_layer_norm", "encoder"} <= mine
