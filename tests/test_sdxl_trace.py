"""`refldm trace` and tools/trace_diffusers.py on SDXL's parts: the U-Net with its added embedding (pooled
text + time ids) and the second text encoder (CLIPTextModelWithProjection), layer by layer in float64.

Tolerance: each layer's relative error max|a - b| / max|b| <= tests/test_trace.py's F64_RTOL.
"""

from __future__ import annotations

import pytest

from refldm.crosscheck import trace
from refldm.cli import main as cli_main
from tests.conftest import require
from tests.test_sdxl_unet import tiny_sdxl_config
from tests.test_trace import _assert_layers_agree, _diffusers_tool, _rerandomise


@pytest.fixture(scope="module")
def tiny_sdxl_unet(tmp_path_factory):
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**tiny_sdxl_config())
    _rerandomise(torch, unet, 6, 0.1)
    folder = tmp_path_factory.mktemp("sdxl_unet")
    unet.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip_with_projection(tmp_path_factory):
    torch = require("torch")
    transformers = require("transformers")
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                                         projection_dim=24, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPTextModelWithProjection(config)
    _rerandomise(torch, model, 7, 0.1)
    root = tmp_path_factory.mktemp("sdxl_pipe")
    model.save_pretrained(root / "text_encoder_2")
    return str(root)


def test_sdxl_unet_trace_has_the_added_inputs_and_matches_diffusers(tiny_sdxl_unet):
    tool = _diffusers_tool()
    ours = trace.trace_part(tiny_sdxl_unet, "unet", dtype="float64", seed=3, batch=2, seq_len=5, timestep=321.0)
    assert set(trace.SDXL_UNET_INPUTS) <= set(ours.inputs)
    assert ours.inputs["time_ids"].shape == (2, 6)
    theirs = tool.trace_like(ours, folder=tiny_sdxl_unet)
    r = _assert_layers_agree(ours, theirs, min_layers=60)
    names = {row.name for row in r.rows}
    assert {"add_embedding", "add_embedding.linear_1", "<root>"} <= names


def test_sdxl_unet_trace_refuses_inputs_without_the_added_ones(tiny_sdxl_unet):
    inputs = trace.make_inputs("unet", {"sample_size": 8, "cross_attention_dim": 24}, seq_len=5)
    with pytest.raises(ValueError, match="text_embeds"):
        trace.trace_part(tiny_sdxl_unet, "unet", dtype="float64", inputs=inputs)


def test_second_text_encoder_trace_matches_transformers(tiny_clip_with_projection):
    tool = _diffusers_tool()
    ours = trace.trace_part(tiny_clip_with_projection, "text-encoder-2", dtype="float64", seed=8, batch=2)
    theirs = tool.trace_like(ours, folder=tiny_clip_with_projection)
    r = _assert_layers_agree(ours, theirs, min_layers=25)
    names = {row.name for row in r.rows}
    assert {"text_projection", "encoder.layers.1.self_attn.out_proj", "final_layer_norm"} <= names


def test_cli_traces_the_second_text_encoder(tiny_clip_with_projection, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert cli_main(["trace", tiny_clip_with_projection, "--part", "text-encoder-2", "-o", str(out)]) == 0
    assert "text_projection" in trace.load(out).names
