"""Pipelines loaded with weights_dtype="stored": every model they load keeps its layers' weights as the files
store them (float16 / bfloat16, memory-mapped), and the whole generation gives the same bytes as the default
float32 load of the same 16-bit files (the conversion bf16/f16 -> f32 is exact, refldm.checkpoints.stored).

Tiny random pipelines are built by diffusers / transformers (the builders of the pipelines' own tests), and their
weight files rewritten in 16 bits here."""

from __future__ import annotations

import os

import numpy as np
import pytest

from refldm.checkpoints.stored import StoredTensor, release_mapped
from tests.conftest import require

PROMPT = "a photo of a red cat on the white background"


def to_16_bit(folder, dtype="bf16"):
    """Rewrite every .safetensors under `folder` with its floating tensors in bfloat16 or float16."""
    torch = require("torch")
    from safetensors.torch import load_file, save_file
    want = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                state = {k: v.to(want) if v.is_floating_point() else v for k, v in load_file(path).items()}
                save_file(state, path)
    return folder


def kept(model) -> int:
    """How many of `model`'s tensors are kept as stored (read-only views of the mapped file)."""
    values = [v for _, _, _, v in model.params() if isinstance(v, StoredTensor)]
    assert all(not v.raw.flags.writeable for v in values)
    return len(values)


def _same_generation(plain, stored, models, **kwargs):
    for part in models:
        assert kept(getattr(stored, part)) > 0, f"{part}: no weight kept as stored"
        assert kept(getattr(plain, part)) == 0
    a, b = plain(PROMPT, seed=3, progress=False, **kwargs), stored(PROMPT, seed=3, progress=False, **kwargs)
    la, lb = np.asarray(a.latents), np.asarray(b.latents)
    assert la.dtype == lb.dtype == np.float32 and np.all(np.isfinite(la)) and np.std(la) > 0
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    # the call dropped the mapped pages of the models it was done with; a second call reads them in again
    assert release_mapped(*(getattr(stored, part) for part in models)) >= 1  # files (a single file: one)
    again = stored(PROMPT, seed=3, progress=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(again.latents), lb)


def _sd(tmp_path):
    from refldm.pipelines.sd import StableDiffusionPipeline
    from tests.test_pipeline import build_tiny_sd
    return StableDiffusionPipeline, to_16_bit(build_tiny_sd(tmp_path / "sd"), "f16"), \
        ("unet", "vae", "text_encoder"), dict(num_inference_steps=2, height=32, width=32)


def _sdxl(tmp_path):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    return StableDiffusionXLPipeline, to_16_bit(build_tiny_sdxl(tmp_path / "sdxl"), "bf16"), \
        ("unet", "vae", "text_encoder", "text_encoder_2"), dict(num_inference_steps=2, height=32, width=32)


def _sd3(tmp_path):
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_sd3_pipeline import build_tiny_sd3
    return StableDiffusion3Pipeline, to_16_bit(build_tiny_sd3(tmp_path / "sd3", t5=True), "bf16"), \
        ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), \
        dict(num_inference_steps=2, height=32, width=32, max_sequence_length=8)


def _flux(tmp_path):
    from refldm.pipelines.flux import FluxPipeline
    from tests.test_flux_pipeline import build_tiny_flux
    return FluxPipeline, to_16_bit(build_tiny_flux(tmp_path / "flux"), "bf16"), \
        ("transformer", "vae", "text_encoder", "text_encoder_2"), \
        dict(num_inference_steps=2, height=32, width=32, max_sequence_length=8)


@pytest.mark.parametrize("case", [_sd, _sdxl, _sd3, _flux], ids=["sd", "sdxl", "sd3", "flux"])
def test_pipeline_with_stored_weights_gives_the_float32_bytes(tmp_path, case):
    cls, folder, models, kwargs = case(tmp_path)
    _same_generation(cls.from_pretrained(folder), cls.from_pretrained(folder, weights_dtype="stored"), models,
                     **kwargs)


def test_single_file_with_stored_weights_gives_the_float32_bytes(tmp_path):
    """An original SD 1.x single file in float16: its tensors stay mapped through the key converter."""
    from refldm.checkpoints import convert, weights
    from refldm.pipelines.sd import StableDiffusionPipeline
    from tests.test_convert import _folder_state
    from tests.test_pipeline import build_tiny_sd
    folder = build_tiny_sd(tmp_path / "sd", seed=3, conventional=True)
    parts, configs = _folder_state(folder)
    original = {k: np.asarray(v).astype(np.float16) for k, v in convert.to_original(parts, configs, "sd1").items()}
    original["model_ema.num_updates"] = np.zeros((), dtype=np.int32)  # an integer tensor, as real files hold
    path = str(tmp_path / "tiny.safetensors")
    weights.save_file(original, path)
    load = dict(config=folder)
    _same_generation(StableDiffusionPipeline.from_single_file(path, **load),
                     StableDiffusionPipeline.from_single_file(path, weights_dtype="stored", **load),
                     ("unet", "vae", "text_encoder"), num_inference_steps=2, height=32, width=32)


def test_controlnet_pipeline_keeps_the_nets_weights_as_stored(tmp_path):
    """The ControlNet pipeline passes the option to its base and to each net (a folder here)."""
    diffusers = require("diffusers")
    from refldm.pipelines.controlnet import StableDiffusionControlNetPipeline
    from tests.test_pipeline import build_tiny_sd
    folder = build_tiny_sd(tmp_path / "sd")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16)).save_pretrained(
        tmp_path / "cn")
    to_16_bit(folder, "f16"), to_16_bit(tmp_path / "cn", "f16")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, tmp_path / "cn", weights_dtype="stored")
    assert kept(pipe.base.unet) and kept(pipe.nets[0]) and kept(pipe.base.vae) and kept(pipe.base.text_encoder)


def test_bad_weights_dtype_is_one_line_for_a_pipeline(tmp_path):
    from refldm.pipelines.sd import StableDiffusionPipeline
    from tests.test_pipeline import build_tiny_sd
    folder = build_tiny_sd(tmp_path / "sd")
    with pytest.raises(ValueError, match="weights_dtype='float16'; the only option is 'stored'"):
        StableDiffusionPipeline.from_pretrained(folder, weights_dtype="float16")
