"""Cross-attention maps per token (refldm/analysis/attention_maps.py) on the built-in model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refldm.analysis.attention_maps import ATTENTION_PATTERNS, attention_maps, from_recording, prompt_tokens
from refldm.core import ops, record

PROMPT = "a large red circle in the top left on a white background"
ARGS = dict(num_inference_steps=3, guidance_scale=3.0, seed=1, progress=False, output_type="latent")


@pytest.fixture(scope="module")
def builtin():
    from refldm.about import DEFAULT_MODEL
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


def test_maps_shapes_rows_and_unchanged_output(builtin):
    plain = builtin(PROMPT, **ARGS).latents
    m = attention_maps(builtin, PROMPT, **ARGS)
    np.testing.assert_array_equal(m.output.latents, plain)          # recording changes nothing
    assert m.tokens == ["a", "large", "red", "circle", "in", "the", "top", "left", "on", "a", "white", "background"]
    assert m.resolutions == [(8, 8), (4, 4), (2, 2)]
    assert len(m.layers[(8, 8)]) == 3 and m.layers[(2, 2)] == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    for hw, a in m.maps.items():
        assert a.shape == (3, 1, 32, *hw)
        np.testing.assert_allclose(a.sum(axis=2), 1.0, atol=1e-12)   # each pixel's probabilities over the tokens
    assert m.token_map(4).shape == (8, 8) and m.token_map(4, (4, 4), step=2).shape == (4, 4)


def test_probabilities_are_the_ones_the_model_used(builtin):
    """P V W_o^T + b_o, from the recorded q, k, v, equals the recorded attn2 output (float32, <= 1e-5 rel.)."""
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    with record.Recorder(include=[*ATTENTION_PATTERNS, f"steps.0.unet.{name}", f"steps.0.unet.{name}.to_v"]) as r:
        builtin(PROMPT, **ARGS)
    a = r.activations
    attn = builtin.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    q, k, v = (np.asarray(a[f"steps.0.unet.{name}.to_{x}"], np.float64) for x in "qkv")
    heads = attn.heads
    p = ops.softmax(ops.split_heads(q, heads) @ np.swapaxes(ops.split_heads(k, heads), -1, -2)
                    / math.sqrt(q.shape[-1] // heads), axis=-1)
    out = ops.merge_heads(p @ ops.split_heads(v, heads)) @ np.asarray(attn.to_out[0].weight, np.float64).T \
        + np.asarray(attn.to_out[0].bias, np.float64)
    want = a[f"steps.0.unet.{name}"]
    assert np.abs(out - want).max() / np.abs(want).max() <= 1e-5
    maps, _ = from_recording(a, builtin.unet, (8, 8), slice(1, 2))
    assert maps[(4, 4)].shape == (3, 1, 32, 4, 4)


def test_bad_inputs(builtin):
    with pytest.raises(ValueError, match="no cross-attention"):
        from_recording({}, builtin.unet, (8, 8))
    tok = builtin.tokenizer
    try:
        builtin.tokenizer = None
        with pytest.raises(ValueError, match="has no tokenizer"):
            prompt_tokens(builtin, "x")
    finally:
        builtin.tokenizer = tok
