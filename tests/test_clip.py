"""refldm.models.clip.CLIPTextModel against transformers' CLIPTextModel on random weights.

Tolerances (relative error max|a - b| / max|b|, against transformers run in float64):
<= 1e-10 for refldm in float64, <= 1e-4 for refldm in float32, on last_hidden_state, every hidden state
and the pooled output.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm import backend
from refldm.crosscheck import trace
from refldm.checkpoints.config import ConfigError
from refldm.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from refldm.checkpoints.weights import WeightsError, load_file, save_file
from tests.conftest import require

TOL64, TOL32 = 1e-10, 1e-4

# transformers' config.json of the SD 1.x text encoder (openai/clip-vit-large-patch14's text tower) and of
# the SD 2.x one (OpenCLIP ViT-H/14's text tower as diffusers ships it: 23 of 24 layers), keys as written
SD1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
           max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
           bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD2 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
           max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
           bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=49, pad_token_id=1)


def rel(a, b) -> float:
    """max|a - b| / max|b|, on the host."""
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(b.detach().double().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def reference(config: dict, seed: int):
    """A transformers CLIPTextModel with every weight redrawn at random (none zero, LN scales near 1)."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    # every weight is drawn below, so transformers' own (slow, for 300M weights) initialisation is skipped
    skip_init = getattr(importlib.import_module("transformers.initialization"), "no_init_weights", None) \
        if importlib.util.find_spec("transformers.initialization") else None
    with (skip_init or contextlib.nullcontext)():
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            elif "embedding" in name:
                torch.nn.init.normal_(p, std=0.5)
            else:
                torch.nn.init.normal_(p, std=0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1)
    return model


def run_reference(model, ids, mask=None):
    """transformers' outputs in float64 (the model is converted in place)."""
    torch = require("torch")
    model.double()
    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
                     output_hidden_states=True)


def assert_agrees(out: CLIPTextOutput, ref, tol: float):
    assert rel(out.last_hidden_state, ref.last_hidden_state) <= tol
    assert rel(out.pooler_output, ref.pooler_output) <= tol
    assert len(out.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel(mine, theirs) <= tol


def errors(out: CLIPTextOutput, ref) -> dict:
    return {"last": rel(out.last_hidden_state, ref.last_hidden_state),
            "pooled": rel(out.pooler_output, ref.pooler_output),
            "hidden": max(rel(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))}


def saved_state(folder) -> dict:
    """The weights save_pretrained wrote, under transformers 5's names (transformers 4 added text_model.)."""
    return {k.removeprefix("text_model."): v for k, v in load_file(folder / "model.safetensors").items()}


def state_of(model) -> dict:
    """A torch model's state dict as NumPy arrays (views, no copy)."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion's two text encoders at full size (batch 2 / 1, so they stay cheap)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_size_sd_text_encoders_agree_with_transformers(name):
    config = SD1 if name == "sd1" else SD2
    model = reference(config, seed=1 if name == "sd1" else 2)
    rng = np.random.default_rng(0)
    if name == "sd1":  # two prompts padded with <|endoftext|> (49407), the largest id: the legacy pooling rule
        ids = np.full((2, 77), 49407, dtype=np.int64)
        ids[0, :12] = [49406, *rng.integers(0, 49406, 10), 49407]
        ids[1, :40] = [49406, *rng.integers(0, 49406, 38), 49407]
    else:  # SD 2.x pads with "!" (id 0)
        ids = np.zeros((1, 77), dtype=np.int64)
        ids[0, :20] = [49406, *rng.integers(1, 49406, 18), 49407]
    ref = run_reference(model, ids)  # float64
    state = state_of(model)
    del model
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        if dtype == "float32":  # tensor by tensor, each float64 one freed as it goes (SD 2.x's is 2.7 GB)
            state = {name: state.pop(name).astype(np.float32) for name in list(state)}
        mine = CLIPTextModel(CLIPTextConfig.from_dict(config)).load_state_dict(state, dtype=dtype)
        out = mine(ids, output_hidden_states=True)
        assert_agrees(out, ref, tol)
        assert out.last_hidden_state.dtype == np.dtype(dtype)
        del mine, out


# ---------------------------------------------------------------------------------------------------------
# Tiny configurations, every option, through config.json + model.safetensors


@st.composite
def tiny_cases(draw):
    heads = draw(st.integers(1, 4))
    config = dict(
        vocab_size=draw(st.integers(8, 64)), hidden_size=heads * draw(st.integers(1, 6)),
        intermediate_size=draw(st.integers(1, 40)), num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads, max_position_embeddings=draw(st.integers(1, 12)),
        hidden_act=draw(st.sampled_from(["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])),
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])), bos_token_id=0, pad_token_id=1)
    config["eos_token_id"] = draw(st.sampled_from([2, config["vocab_size"] - 1, 3]))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, config["max_position_embeddings"]))
    seed = draw(st.integers(0, 2**16))
    ids = np.random.default_rng(seed).integers(0, config["vocab_size"], (batch, length))
    mask_kind = draw(st.sampled_from(["none", "right", "left", "random"]))
    mask = None
    if mask_kind != "none":
        lengths = np.random.default_rng(seed + 1).integers(0, length + 1, batch)
        pos = np.arange(length)
        mask = {"right": pos[None] < lengths[:, None], "left": pos[None] >= length - lengths[:, None],
                "random": np.random.default_rng(seed + 2).random((batch, length)) < 0.6}[mask_kind].astype(np.int64)
    return config, ids, mask, seed


@settings(max_examples=25, deadline=None)
@given(tiny_cases())
def test_tiny_configs_agree_with_transformers(tmp_path_factory, case):
    config, ids, mask, seed = case
    folder = tmp_path_factory.mktemp("clip")
    model = reference(config, seed)
    model.save_pretrained(folder)
    ref = run_reference(model, ids, mask)
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        out = CLIPTextModel.from_pretrained(folder, dtype=dtype)(ids, attention_mask=mask, output_hidden_states=True)
        assert_agrees(out, ref, tol)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny transformers CLIPTextModel saved with save_pretrained, and its float64 outputs."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    model = reference(TINY, seed=7)
    model.save_pretrained(folder)
    ids = np.array([[0, 5, 17, 33, 49, 1, 1, 1], [0, 8, 49, 1, 1, 1, 1, 1]])
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])  # right and left padding
    return folder, ids, mask, run_reference(model, ids), run_reference(model, ids, mask)


def test_runs_on_every_backend(on_backend, tiny_folder):
    folder, ids, mask, ref, ref_masked = tiny_folder
    xp = backend.xp()
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        model = CLIPTextModel.from_pretrained(folder, dtype=dtype)
        for given_ids, given_mask in ((ids, None), (backend.asarray(ids), None), (ids, mask),
                                      (backend.asarray(ids), backend.asarray(mask))):
            out = model(given_ids, attention_mask=given_mask, output_hidden_states=True)
            assert backend.array_namespace(out.last_hidden_state, out.pooler_output, *out.hidden_states) is xp
            assert_agrees(out, ref if given_mask is None else ref_masked, tol)


def test_float16_runs_close_to_float64(tiny_folder):
    folder, ids, _, ref, _ = tiny_folder
    out = CLIPTextModel.from_pretrained(folder, dtype="float16")(ids)
    assert out.last_hidden_state.dtype == np.float16
    assert rel(out.last_hidden_state, ref.last_hidden_state) <= 1e-2  # float16 has an 11-bit mantissa


def test_legacy_text_model_keys_position_ids_and_shards_load(tiny_folder, tmp_path):
    """transformers 4 (every SD text_encoder/ on the Hub) wrote text_model.* keys and a position_ids buffer."""
    folder, ids, _, ref, _ = tiny_folder
    state = saved_state(folder)
    legacy = {"text_model." + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None].astype(np.int64)
    keys = sorted(legacy)
    half = len(keys) // 2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for shard, names in shards.items():
        save_file({k: legacy[k] for k in names}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an arange position_ids is dropped silently
        out = CLIPTextModel.from_pretrained(tmp_path, dtype="float64")(ids, output_hidden_states=True)
    assert_agrees(out, ref, TOL64)


def test_position_ids_that_are_not_arange_warn(tiny_folder):
    folder, *_ = tiny_folder
    state = saved_state(folder)
    state["embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[::-1].copy()
    with pytest.warns(UserWarning, match="position_ids"):
        CLIPTextModel(CLIPTextConfig.from_dict(TINY)).load_state_dict(state)


def test_pooled_output_is_the_first_eos_position_or_the_argmax_for_legacy_configs(tiny_folder):
    folder, *_ = tiny_folder
    model = CLIPTextModel.from_pretrained(folder, dtype="float64")
    ids = np.array([[0, 49, 7, 49, 3], [0, 4, 5, 6, 7]])  # row 1 has no eos: transformers takes position 0
    out = model(ids)
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[[0, 1], [1, 0]])
    model.config.eos_token_id = 2  # legacy rule: the position of the largest id (first one on a tie)
    out = model(ids)
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[[0, 1], [1, 4]])


def test_clip_skip_final_norm_of_the_last_hidden_state_is_last_hidden_state(tiny_folder):
    folder, ids, *_ = tiny_folder
    model = CLIPTextModel.from_pretrained(folder, dtype="float64")
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    np.testing.assert_array_equal(model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)
    assert model(ids).hidden_states is None
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output


def test_one_dimensional_ids_are_a_batch_of_one(tiny_folder):
    folder, ids, *_ = tiny_folder
    model = CLIPTextModel.from_pretrained(folder, dtype="float64")
    np.testing.assert_array_equal(model(ids[0]).last_hidden_state, model(ids[:1]).last_hidden_state)


def test_trace_names_follow_transformers_modules(tiny_folder):
    transformers = require("transformers")
    folder, ids, *_ = tiny_folder
    model = CLIPTextModel.from_pretrained(folder, dtype="float64")
    with trace.record() as t:
        model(ids)
    theirs = {name.removeprefix("text_model.")  # transformers 4 nested the model under text_model
              for name, _ in transformers.CLIPTextModel.from_pretrained(folder).named_modules()}
    mine = set(t.activations) - {trace.ROOT}
    assert mine <= theirs, mine - theirs
    assert {"embeddings", "encoder.layers.1.self_attn.q_proj", "encoder", "final_layer_norm"} <= mine
    np.testing.assert_array_equal(t.activations["encoder"], t.activations["encoder.layers.1"])  # last layer


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the thing at fault


def test_unknown_or_unsupported_config_keys_are_errors_naming_the_key(tiny_folder, tmp_path):
    folder, *_ = tiny_folder
    base = json.loads((folder / "config.json").read_text())
    for change, key in (({"rope_theta": 10000.0}, "rope_theta"), ({"hidden_act": "relu"}, "hidden_act"),
                        ({"num_attention_heads": 3}, "num_attention_heads"),
                        ({"pruned_heads": {"0": [1]}}, "pruned_heads"), ({"eos_token_id": [2, 3]}, "eos_token_id")):
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        with pytest.raises(ConfigError, match=key):
            CLIPTextModel.from_pretrained(tmp_path)
    # keys that do not change the math are accepted (transformers 4 wrote many of them)
    extra = {"torch_dtype": "float16", "dropout": 0.1, "output_hidden_states": True, "top_k": 50, "pruned_heads": {}}
    (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
    CLIPTextModel.from_pretrained(tmp_path)


def test_missing_and_misshapen_weights_are_errors_naming_the_key(tiny_folder):
    folder, *_ = tiny_folder
    state = saved_state(folder)
    model = CLIPTextModel(CLIPTextConfig.from_dict(TINY))
    with pytest.raises(WeightsError, match="final_layer_norm.bias"):
        model.load_state_dict({k: v for k, v in state.items() if k != "final_layer_norm.bias"})
    with pytest.raises(WeightsError, match="fc1.weight"):
        model.load_state_dict({**state, "encoder.layers.0.mlp.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(WeightsError, match="both with and without"):
        model.load_state_dict({**state, "text_model.final_layer_norm.bias": state["final_layer_norm.bias"]})


def test_bad_input_ids_are_errors(tiny_folder):
    folder, ids, *_ = tiny_folder
    model = CLIPTextModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="more than max_position_embeddings"):
        model(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[0, 50]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.astype(np.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, attention_mask=np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="only 0"):
        model(ids, attention_mask=np.full(ids.shape, 2))
    with pytest.raises(ValueError, match="not loaded"):
        CLIPTextModel(CLIPTextConfig.from_dict(TINY))(ids)
