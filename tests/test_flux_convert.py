"""FLUX single files (the reference repository's key names) <-> diffusers keys.

The key table (`flux_key` in refldm/checkpoints/convert.py) is checked against diffusers'
convert_flux_transformer_checkpoint_to_diffusers: diffusers fixes the width at 3072, so the comparison runs on
meta tensors of a full-width, one-block-deep model (keys and shapes; no memory). The values are checked on a tiny
model: written in the reference layout (flux_to_original) and loaded back, it gives the same output bit for bit,
with and without the "model.diffusion_model." prefix and with weights_dtype="stored".
"""

from __future__ import annotations

import numpy as np
import pytest

from refldm.checkpoints import convert
from refldm.checkpoints.weights import save_file
from refldm.models.flux_transformer import FluxTransformer2DModel, latent_image_ids
from tests.conftest import require


def _run(model):
    rng = np.random.default_rng(0)
    x, c, y = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 3, 12)), rng.standard_normal((1, 10))
    return model(*(a.astype("float32") for a in (x, c, y)), 0.3, latent_image_ids(2, 3), np.zeros((3, 3)),
                 guidance=2.0)


@pytest.mark.parametrize("prefix,stored", [("", None), ("model.diffusion_model.", "stored")])
def test_single_file_loads_to_the_same_model(tmp_path, prefix, stored):
    from tests.test_flux_transformer import build, tiny_config
    config = tiny_config()
    _, folder = build(tmp_path / "d", config)
    model = FluxTransformer2DModel.from_pretrained(folder)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    original = convert.flux_to_original(model.state_dict(), dim)
    assert "double_blocks.0.img_attn.qkv.weight" in original and "single_blocks.1.linear1.weight" in original
    save_file({prefix + k: v for k, v in original.items()}, tmp_path / "flux.safetensors")
    loaded = FluxTransformer2DModel.from_single_file(tmp_path / "flux.safetensors", config=config,
                                                     weights_dtype=stored)
    np.testing.assert_array_equal(_run(loaded), _run(model))


def test_key_table_equals_diffusers_converter_at_full_width():
    torch = require("torch")
    diffusers = require("diffusers")
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    config = dict(num_layers=1, num_single_layers=1, in_channels=16, joint_attention_dim=32,
                  pooled_projection_dim=24, guidance_embeds=True)                  # width 24 x 128 = 3072
    ours = FluxTransformer2DModel.from_config(config)
    with torch.device("meta"):
        theirs_model = diffusers.FluxTransformer2DModel(**config)
    want = {k: tuple(v.shape) for k, v in theirs_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, _, _, v in ours.params()} == want
    # the original file's keys and shapes, from refldm's table
    original = {}
    for key, shape in want.items():
        old, rows, _ = convert.flux_key(key, 3072)
        if rows is None:
            original[old] = shape
        else:
            prev = original.get(old, (0,) + shape[1:])
            original[old] = (prev[0] + shape[0],) + shape[1:]
    converted = convert_flux_transformer_checkpoint_to_diffusers(
        {k: torch.empty(s, device="meta") for k, s in original.items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    shapes = {k: np.broadcast_to(np.float32(0), s) for k, s in original.items()}   # shapes only, no memory
    inferred = convert.flux_config_from_shapes(shapes)
    assert {k: inferred[k] for k in config} == config and inferred["num_attention_heads"] == 24


def test_bad_single_files_are_one_line(tmp_path):
    save_file({"img_in.weight": np.zeros((2, 2), np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a FLUX single file"):
        FluxTransformer2DModel.from_single_file(tmp_path / "x.safetensors")
    from tests.test_flux_transformer import tiny_config
    model = FluxTransformer2DModel.from_config(tiny_config())
    state = {k: np.zeros(v.shape, np.float32) for k, _, _, v in model.params()}
    original = convert.flux_to_original(state, 8)
    original.pop("single_blocks.0.linear2.weight")
    original["double_blocks.0.extra.weight"] = np.zeros(1, np.float32)
    save_file(original, tmp_path / "y.safetensors")
    with pytest.raises(convert.ConversionError, match=r"missing: single_blocks.0.linear2.weight; not understood: "
                                                      r"double_blocks.0.extra.weight"):
        FluxTransformer2DModel.from_single_file(tmp_path / "y.safetensors", config=tiny_config())
