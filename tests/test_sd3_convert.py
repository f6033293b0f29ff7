"""SD3 single files: the key table of refldm/checkpoints/convert.py (sd3_from_original / sd3_to_original).

A single file is written from a tiny diffusers SD3 folder with `convert.sd3_to_original` (fused qkv, the
[shift; scale] halves of the last modulations, first_stage_model.*, text_encoders.clip_l / clip_g.*, CLIP-L
without text_projection, as in Stability's files). diffusers' own converter
(convert_sd3_transformer_checkpoint_to_diffusers, which maps the keys independently) must read that file's
transformer back to the folder's weights, and refldm's from_single_file must load the very same weights.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from refldm.checkpoints import convert, weights
from tests.conftest import require
from tests.test_sd3_pipeline import build_tiny_sd3

PARTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def folder_and_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-file")
    folder = build_tiny_sd3(root / "tiny", seed=3)
    parts = {p: weights.load_state(weights.find_weights(os.path.join(folder, p), stem)) for p, stem in PARTS.items()}
    # Stability's CLIP-L has no projection: leave it out of the file (refldm and diffusers then use the identity)
    text_projection = parts["text_encoder"].pop("text_projection.weight")
    configs = {p: weights.read_config(os.path.join(folder, p)) for p in PARTS}
    original = convert.sd3_to_original(parts, configs)
    path = root / "tiny_sd3.safetensors"
    weights.save_file(original, path)
    return folder, str(path), original, text_projection


def test_file_has_the_original_layout(folder_and_file):
    _, _, original, _ = folder_and_file
    keys = set(original)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in keys
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in keys        # MMDiT-X block 0
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.ln_q.weight" in keys  # qk-norm
    assert "model.diffusion_model.final_layer.adaLN_modulation.1.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert any(k.startswith("text_encoders.clip_g.transformer.text_model.") for k in keys)
    assert not any("attn.to_q" in k or "joint_blocks.1.context_block.attn.proj" in k for k in keys)


def test_diffusers_converter_reads_the_file_back_to_the_folder_weights(folder_and_file):
    torch = require("torch")
    require("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    folder, _, original, _ = folder_and_file
    checkpoint = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original.items()
                  if k.startswith("model.diffusion_model.")}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    expected = weights.load_state(weights.find_weights(os.path.join(folder, "transformer")))
    assert set(theirs) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(theirs[k].numpy(), v, err_msg=k)


def test_refldm_single_file_loads_the_folder_weights(folder_and_file):
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    folder, path, _, text_projection = folder_and_file
    a = StableDiffusion3Pipeline.from_single_file(path, config=folder)
    b = StableDiffusion3Pipeline.from_pretrained(folder)
    for part in PARTS:
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if part == "text_encoder" and k == "text_projection.weight":
                np.testing.assert_array_equal(sa[k], np.eye(text_projection.shape[1]))  # diffusers' identity
                continue
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=f"{part}: {k}")


def test_sd_pipelines_point_sd3_files_to_the_sd3_pipeline(folder_and_file):
    _, _, original, _ = folder_and_file
    with pytest.raises(convert.ConversionError, match="an SD3 / SD3.5 single file.*StableDiffusion3Pipeline"):
        convert.detect(original)


def test_file_without_clip_encoders_is_one_clear_line(folder_and_file, tmp_path):
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    folder, _, original, _ = folder_and_file
    path = tmp_path / "no_clips.safetensors"
    weights.save_file({k: v for k, v in original.items() if not k.startswith("text_encoders.")}, path)
    with pytest.raises(ValueError, match=r"holds no text_encoders\.clip_l\.transformer\.\* \(text_encoder\)"):
        StableDiffusion3Pipeline.from_single_file(path, config=folder)


def test_cli_runs_and_describes_the_single_file(folder_and_file, tmp_path, capsys):
    """refldm txt2img -m FILE --config SD3_FOLDER: the folder's image (same weights, bar CLIP-L's projection,
    which the file leaves out); without --config, one line asking for it. refldm info FILE: counts per part."""
    import re
    from PIL import Image
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_cli import run
    folder, path, original, _ = folder_and_file
    out = tmp_path / "file.png"
    args = ("txt2img", "-m", path, "-p", "a cat", "--steps", "2", "--seed", "1", "-W", "32", "-H", "32", "-q",
            "-o", str(out))
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "an SD3 / SD3.5 single file; give --config SD3_FOLDER" in err and err.count("\n") == 1
    rc, _, err = run(capsys, *args, "--config", folder)
    assert rc == 0, err
    want = StableDiffusion3Pipeline.from_single_file(path, config=folder)(
        "a cat", height=32, width=32, num_inference_steps=2, guidance_scale=7.5, seed=1, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    rc, stdout, err = run(capsys, "info", path)
    assert rc == 0, err
    for part, prefix in convert.SD3_PREFIXES.items():
        n = sum(int(np.prod(v.shape)) for k, v in original.items() if k.startswith(prefix))
        if part == "text_encoder_3":
            assert n == 0 and re.search(r"^text_encoder_3: class None, note not in the file", stdout, re.M)
        else:
            assert re.search(rf"^{part}: \w+, {n:,} parameters, stored as F32$", stdout, re.M), (part, stdout)
