"""Original single-file checkpoints: refldm's key table against diffusers' own single-file loader.

A tiny SD folder is built by diffusers (tests/test_pipeline.py `build_tiny_sd`), written as an original
CompVis-layout single file with `refldm.checkpoints.convert.to_original`, and loaded back two ways:

- by diffusers' ``StableDiffusionPipeline.from_single_file(path, config=folder)``, whose key mapping
  (diffusers/loaders/single_file_utils.py) is written independently of refldm's table;
- by refldm's `StableDiffusionPipeline.from_single_file` (`refldm.checkpoints.convert.from_original`).

Both must give back every weight of the folder bit for bit: the renaming, the VAE's 1x1-conv <-> linear
reshape and OpenCLIP's fused q/k/v are exact operations. SD 1.x (CLIP ViT-L layout) and SD 2.x
(OpenCLIP layout, linear transformer projections) are both checked.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from refldm.checkpoints import convert, weights
from tests.conftest import require
from tests.test_pipeline import build_tiny_sd

STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The tiny models' matrices are small: one BLAS thread is fastest, and robust on a shared machine."""
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def _folder_state(folder):
    parts, configs = {}, {}
    for part, stem in STEMS.items():
        parts[part] = weights.load_state(weights.find_weights(os.path.join(folder, part), stem))
        configs[part] = weights.read_config(os.path.join(folder, part))
    return parts, configs


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def single_file(request, tmp_path_factory):
    """(kind, diffusers folder, its weights by part, its configs, the single file written from it)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"convert_{kind}")
    folder = build_tiny_sd(os.path.join(root, "tiny"), kind=kind, seed=3, conventional=True)
    parts, configs = _folder_state(folder)
    path = os.path.join(root, f"tiny-{kind}.safetensors")
    original = convert.to_original(parts, configs, kind)
    # what real files carry besides the three networks: noise-schedule buffers and an EMA copy's bookkeeping
    original["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)
    original["model_ema.num_updates"] = np.zeros((), dtype=np.int32)
    weights.save_file(original, path)
    return kind, folder, parts, configs, path


def test_written_file_uses_the_original_key_layout(single_file):
    kind, _, _, _, path = single_file
    header, _, _ = weights.read_header(path)
    keys = set(header)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert header["first_stage_model.encoder.mid.attn_1.q.weight"]["shape"][2:] == [1, 1]  # a 1x1 conv
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    if kind == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    else:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert header["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]["shape"] == [192, 64]
    assert convert.detect(keys) == kind


def test_diffusers_single_file_loader_reads_our_file_to_the_same_weights(single_file):
    """diffusers maps the original keys with its own code; every tensor must come back unchanged."""
    require("torch")
    diffusers = require("diffusers")
    kind, folder, parts, _, path = single_file
    pipe = diffusers.StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                              safety_checker=None)
    for part, ref in parts.items():
        got = {k: v.detach().numpy() for k, v in getattr(pipe, part).state_dict().items()}
        got.pop("text_model.embeddings.position_ids", None)
        got.pop("embeddings.position_ids", None)
        assert set(got) == set(ref), f"{part}: {sorted(set(got) ^ set(ref))[:5]}"
        for key, value in ref.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{part} {key}")


def test_refldm_from_original_inverts_to_original(single_file):
    kind, _, parts, configs, path = single_file
    state = weights.load_file(path)
    back = convert.from_original(state, {p: list(s) for p, s in parts.items()}, configs, kind, source=path)
    for part, ref in parts.items():
        assert set(back[part]) == set(ref)
        for key, value in ref.items():
            np.testing.assert_array_equal(back[part][key], value, err_msg=f"{part} {key}")


def test_refldm_pipeline_from_single_file_loads_every_weight(single_file):
    """The pipeline built from the single file holds exactly the folder's weights."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    kind, folder, parts, _, path = single_file
    pipe = StableDiffusionPipeline.from_single_file(path, config=folder)
    for part, ref in parts.items():
        got = getattr(pipe, part).state_dict()
        bare = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in ref.items()}
        assert set(got) == set(bare), f"{part}: {sorted(set(got) ^ set(bare))[:5]}"
        for key, value in bare.items():
            np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=f"{part} {key}")


def test_infer_configs_reads_the_architecture_off_the_shapes(single_file):
    """Without a config folder the shapes give the architecture; the heads follow SD's conventions."""
    kind, _, _, configs, path = single_file
    inferred = convert.infer_configs(weights.load_file(path), kind)
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "use_linear_projection"):
        want = configs["unet"][key]
        assert inferred["unet"][key] == (list(want) if isinstance(want, (list, tuple)) else want), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        assert inferred["vae"][key] == configs["vae"][key], key
    text = configs["text_encoder"]
    for key in ("hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "hidden_act"):
        assert inferred["text_encoder"][key] == text[key], key
    # SD 2.x files hold one OpenCLIP layer more than the text encoder uses (the penultimate layer)
    expected_layers = text["num_hidden_layers"] - (1 if kind == "sd2" else 0)
    assert inferred["text_encoder"]["num_hidden_layers"] == expected_layers


def test_extra_text_layer_is_skipped_in_sd2_only(single_file):
    """Real SD 2.x files carry OpenCLIP's 24th layer, which SD 2.x does not use: loading skips it. In an
    SD 1.x file an extra CLIP layer means another architecture, and is an error naming the keys."""
    kind, _, parts, configs, path = single_file
    n = configs["text_encoder"]["num_hidden_layers"]
    expected = {p: list(s) for p, s in parts.items()}
    if kind == "sd2":
        state = _with_unused_last_resblock(weights.load_file(path), n)
        back = convert.from_original(state, expected, configs, kind)
        key = f"encoder.layers.{n - 1}.mlp.fc1.weight"
        np.testing.assert_array_equal(back["text_encoder"][key], parts["text_encoder"][key])
    else:
        state = dict(weights.load_file(path))
        extra = f"{convert.CLIP_PREFIX}encoder.layers.{n}.mlp.fc1.weight"
        state[extra] = state[f"{convert.CLIP_PREFIX}encoder.layers.{n - 1}.mlp.fc1.weight"]
        with pytest.raises(convert.ConversionError, match=re.escape(extra)):
            convert.from_original(state, expected, configs, kind)


def test_unknown_or_missing_keys_are_named(single_file):
    kind, _, parts, configs, path = single_file
    state = dict(weights.load_file(path))
    extra = "model.diffusion_model.input_blocks.1.0.mystery.weight"
    state[extra] = np.zeros(3, np.float32)
    gone = "first_stage_model.decoder.conv_out.bias"
    del state[gone]
    with pytest.raises(convert.ConversionError) as e:
        convert.from_original(state, {p: list(s) for p, s in parts.items()}, configs, kind, source="x.safetensors")
    msg = str(e.value)
    assert extra in msg and gone in msg and "\n" not in msg


def test_detect_refuses_what_it_cannot_load():
    with pytest.raises(convert.ConversionError, match="SDXL"):
        convert.detect(["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                        "model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(convert.ConversionError, match="first_stage_model"):
        convert.detect(["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(convert.ConversionError, match="text encoder"):
        convert.detect(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quant_conv.weight"])


def test_table_maps_sd15_reference_keys():
    """Spot checks against key pairs of the real SD 1.5 layout (L = 2, four levels, no attention in the last)."""
    shape = convert.Shape(layers_per_block=2, up_attention=(False, True, True, True), vae_levels=4)
    cases = {
        ("unet", "down_blocks.1.resnets.0.conv1.weight"): "model.diffusion_model.input_blocks.4.0.in_layers.2.weight",
        ("unet", "down_blocks.1.attentions.1.proj_in.weight"): "model.diffusion_model.input_blocks.5.1.proj_in.weight",
        ("unet", "down_blocks.2.downsamplers.0.conv.weight"): "model.diffusion_model.input_blocks.9.0.op.weight",
        ("unet", "mid_block.resnets.1.time_emb_proj.bias"): "model.diffusion_model.middle_block.2.emb_layers.1.bias",
        ("unet", "up_blocks.0.upsamplers.0.conv.weight"): "model.diffusion_model.output_blocks.2.1.conv.weight",
        ("unet", "up_blocks.1.upsamplers.0.conv.weight"): "model.diffusion_model.output_blocks.5.2.conv.weight",
        ("unet", "up_blocks.3.resnets.2.conv_shortcut.weight"):
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        ("unet", "conv_norm_out.weight"): "model.diffusion_model.out.0.weight",
        ("vae", "decoder.up_blocks.0.resnets.2.norm1.weight"): "first_stage_model.decoder.up.3.block.2.norm1.weight",
        ("vae", "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"):
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.bias",
        ("vae", "decoder.mid_block.attentions.0.to_out.0.weight"):
            "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        ("clip", "text_model.encoder.layers.11.mlp.fc2.bias"):
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
        ("open_clip", "encoder.layers.3.self_attn.k_proj.weight"):
            "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight",
        ("open_clip", "embeddings.position_embedding.weight"): "cond_stage_model.model.positional_embedding",
    }
    for (table, key), want in cases.items():
        assert convert.original_key(table, key, shape).key == want, key
    assert convert.original_key("open_clip", "encoder.layers.3.self_attn.k_proj.bias", shape).third == 1
    assert convert.original_key("vae", "encoder.mid_block.attentions.0.to_q.weight", shape).conv1x1
    assert not convert.original_key("vae", "encoder.mid_block.attentions.0.group_norm.weight", shape).conv1x1


def test_single_file_pipeline_draws_the_folders_image(single_file):
    from refldm.pipelines.sd import StableDiffusionPipeline
    kind, folder, _, _, path = single_file
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=4, scheduler="ddim", progress=False)
    a = StableDiffusionPipeline.from_single_file(path, config=folder)("a red cat", **kwargs)
    b = StableDiffusionPipeline.from_pretrained(folder)("a red cat", **kwargs)
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))


def _with_unused_last_resblock(state, n):
    """What real SD 2.x files hold: one OpenCLIP layer more (index n) than the text encoder uses."""
    state = dict(state)
    for key in [k for k in state if f"resblocks.{n - 1}." in k]:
        state[key.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = state[key] + 1
    return state


def test_single_file_without_config_infers_it(single_file, tmp_path):
    """No config folder: the architecture comes from the shapes; the tokenizer must be named, and an
    SD 2.x file must say its prediction type. The image is then the folder's image."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    kind, folder, _, configs, path = single_file
    if kind == "sd2":
        state = _with_unused_last_resblock(weights.load_file(path), configs["text_encoder"]["num_hidden_layers"])
        path = str(tmp_path / "with-24th-layer.safetensors")
        weights.save_file(state, path)
    tokenizer = os.path.join(folder, "tokenizer")
    with pytest.raises(ValueError, match="tokenizer" if kind == "sd1" else "prediction_type"):
        StableDiffusionPipeline.from_single_file(path)
    extra = {} if kind == "sd1" else {"prediction_type": "epsilon"}
    pipe = StableDiffusionPipeline.from_single_file(path, tokenizer=tokenizer, **extra)
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    assert pipe.text_encoder.config.hidden_act == ("quick_gelu" if kind == "sd1" else "gelu")
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=4, scheduler="ddim", progress=False)
    a = pipe("a red cat", **kwargs)
    b = StableDiffusionPipeline.from_pretrained(folder)("a red cat", **kwargs)
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
