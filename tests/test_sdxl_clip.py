"""CLIPTextModelWithProjection (SDXL's second text encoder) against transformers' class of the same name.

Random weights (every parameter redrawn), saved by transformers' save_pretrained (keys ``text_model.*`` and
``text_projection.weight``), loaded by refldm's from_pretrained. Tolerances, relative error
max|a - b| / max|b| against transformers in float64: <= 1e-10 for refldm in float64, <= 1e-4 in float32,
on text_embeds, last_hidden_state and every hidden state.
"""

from __future__ import annotations

import numpy as np
import pytest

from refldm.checkpoints.config import ConfigError
from refldm.models.clip import CLIPTextModelWithProjection
from tests.conftest import require
from tests.test_clip import TOL32, TOL64, rel

# laion/CLIP-ViT-bigG-14's text tower as SDXL ships it in text_encoder_2/config.json
BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1)
BIGG_PARAMETERS = 694_659_840


def reference(config: dict, seed: int):
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, mean=1.0, std=0.2)
            elif "embedding" in name:
                torch.nn.init.normal_(p, std=0.5)
            else:
                torch.nn.init.normal_(p, std=0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1)
    return model


def padded_ids(rng, batch, length, vocab, eos, pad):
    ids = np.full((batch, 77 if length is None else length), pad, dtype=np.int64)
    for b in range(batch):
        n = int(rng.integers(1, ids.shape[1] - 2))
        ids[b, :n + 2] = [vocab - 2, *rng.integers(1, vocab - 2, n), eos]
    return ids


CASES = [
    # (config, pad id, ids length): SDXL's convention (legacy eos_token_id=2: pool at the largest id; pad "!")
    (dict(vocab_size=60, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
          max_position_embeddings=77, hidden_act="gelu", projection_dim=24, bos_token_id=0, eos_token_id=2,
          pad_token_id=1), 0, 77),
    # transformers 5's convention: pool at the first eos id; quick_gelu; projection wider than the model
    (dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
          max_position_embeddings=12, hidden_act="quick_gelu", projection_dim=40, bos_token_id=48,
          eos_token_id=49, pad_token_id=49), 49, 12),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tiny_configs_agree_with_transformers(tmp_path, case):
    torch = require("torch")
    config, pad, length = CASES[case]
    model = reference(config, seed=case)
    model.save_pretrained(tmp_path)
    eos = config["vocab_size"] - 1
    ids = padded_ids(np.random.default_rng(case), 3, length, config["vocab_size"], eos, pad)
    model.double()
    with torch.no_grad():
        ref = model(torch.as_tensor(ids), output_hidden_states=True)
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        mine = CLIPTextModelWithProjection.from_pretrained(tmp_path, dtype=dtype)
        out = mine(ids, output_hidden_states=True)
        assert out.text_embeds.shape == (3, config["projection_dim"])
        assert rel(out.text_embeds, ref.text_embeds) <= tol
        assert rel(out.last_hidden_state, ref.last_hidden_state) <= tol
        assert len(out.hidden_states) == len(ref.hidden_states) == config["num_hidden_layers"] + 1
        for a, b in zip(out.hidden_states, ref.hidden_states):
            assert rel(a, b) <= tol
        assert out[0] is out.text_embeds


def test_bigg_config_parameter_count_from_config():
    """SDXL's text_encoder_2: counted from the config, transformers on the meta device, refldm's shapes."""
    torch = require("torch")
    transformers = require("transformers")
    with torch.device("meta"):
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**BIGG))
    theirs = {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(int(np.prod(s)) for s in theirs.values()) == BIGG_PARAMETERS
    mine = CLIPTextModelWithProjection.from_config(BIGG)
    assert mine.num_parameters() == BIGG_PARAMETERS
    assert {k: tuple(v.shape) for k, _, _, v in mine.params()} == theirs


def test_projection_dim_must_be_positive():
    with pytest.raises(ConfigError, match="projection_dim"):
        CLIPTextModelWithProjection.from_config({**CASES[0][0], "projection_dim": 0})
