"""SDXL single-file checkpoints: refldm/checkpoints/convert.py's key table for conditioner.embedders.* and label_emb.

A single file is written from a tiny diffusers SDXL folder with `convert.to_original` (fused in_proj,
text_projection transposed, label_emb), then loaded by refldm's StableDiffusionXLPipeline.from_single_file and by
diffusers' own from_single_file (which maps the keys independently): both must give the folder's weights
exactly (the same float32 values, key for key).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from refldm.checkpoints import convert, weights
from tests.conftest import require
from tests.test_sdxl_pipeline import build_tiny_sdxl

PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def folder_and_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-file")
    folder = build_tiny_sdxl(root / "base", seed=2)
    parts = {p: weights.load_state(weights.find_weights(os.path.join(folder, p), stem)) for p, stem in PARTS.items()}
    configs = {p: weights.read_config(os.path.join(folder, p)) for p in PARTS}
    original = convert.to_original(parts, configs, "sdxl")
    path = root / "tiny_sdxl.safetensors"
    weights.save_file(original, path)
    return folder, str(path), original


def test_file_has_the_original_sdxl_layout(folder_and_file):
    _, _, original = folder_and_file
    keys = set(original)
    assert convert.detect(keys) == "sdxl"
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "model.diffusion_model.label_emb.0.2.bias" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    p = "conditioner.embedders.1.model."
    assert original[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 24, 24)  # fused q, k, v
    assert original[p + "text_projection"].shape == (24, 20)  # (D, P): the transpose of the Linear weight
    assert not any(k.startswith("cond_stage_model.") for k in keys)


def test_refldm_single_file_loads_the_folder_weights(folder_and_file):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    folder, path, _ = folder_and_file
    a = StableDiffusionXLPipeline.from_single_file(path, config=folder)
    b = StableDiffusionXLPipeline.from_pretrained(folder)
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{part}: {k}")
    out = a("a red cat", height=32, width=32, num_inference_steps=2, seed=1, progress=False)
    ref = b("a red cat", height=32, width=32, num_inference_steps=2, seed=1, progress=False)
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))


def test_diffusers_from_single_file_reads_the_same_weights(folder_and_file):
    """diffusers' own loader, given the folder as config (no download), on the file refldm wrote."""
    torch = require("torch")
    diffusers = require("diffusers")
    folder, path, _ = folder_and_file
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                                  add_watermarker=False)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    for part in PARTS:
        sa = {k: v for k, v in getattr(theirs, part).state_dict().items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in getattr(ref, part).state_dict().items() if not k.endswith("position_ids")}
        assert sa.keys() == sb.keys(), part
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}: {k}"


def test_not_sd_nor_sdxl_and_refiner_files_are_named(tmp_path):
    with pytest.raises(convert.ConversionError, match=r"neither an SD 1.x/2.x nor an SDXL.*found top-level names: "
                                                      r"lora_te, lora_unet"):
        convert.detect(["lora_unet.down.weight", "lora_te.up.weight"])
    with pytest.raises(convert.ConversionError, match="SDXL refiner"):
        convert.detect(["conditioner.embedders.0.model.ln_final.weight", "model.diffusion_model.out.2.weight"])


def test_sd_pipeline_points_sdxl_files_to_the_xl_pipeline(folder_and_file):
    from refldm.pipelines.sd import StableDiffusionPipeline
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline.from_single_file"):
        StableDiffusionPipeline.from_single_file(folder_and_file[1])


def test_sdxl_file_without_config_is_a_clear_error(folder_and_file):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    with pytest.raises(ValueError, match="give config=an SDXL diffusers folder"):
        StableDiffusionXLPipeline.from_single_file(folder_and_file[1])


def test_info_on_an_sdxl_single_file_shows_both_encoders(folder_and_file, capsys):
    import re
    from tests.test_cli import run
    folder, path, original = folder_and_file
    rc, stdout, err = run(capsys, "info", path)
    assert rc == 0, err
    n = sum(v.size for k, v in original.items() if k.startswith("conditioner.embedders.1.model."))
    assert re.search(rf"^text_encoder_2: CLIPTextModelWithProjection, {n:,} parameters, stored as F32$", stdout, re.M)
    assert re.search(r"^text_encoder: CLIPTextModel, ", stdout, re.M)
