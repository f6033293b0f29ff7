"""diffusers' Python spellings on refldm's objects (issue 31, item 18), each checked against diffusers itself:

- the pipelines' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` / ``disable_lora`` /
  ``enable_lora`` / ``unload_lora_weights`` / ``load_textual_inversion`` (refldm/adapters/loaders.py): the same
  calls in the same order give float64 text-encoder and U-Net outputs within 1e-10 relative of diffusers', and
  the float32 8-bit image within 2/255 (>= 99% equal), the pipeline tests' tolerance;
- a scheduler's ``config`` read as a mapping (``dict(c)``, ``{**c}``, ``c[key]``, keys / len / iteration) gives
  the values diffusers' FrozenDict gives for the same keys; item assignment and deletion are refused.

The tiny SD folder and the two LoRA files are tests/test_lora.py's fixtures.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import require
from tests.test_lora import (SCALES, _allow_old_peft, _inputs, _one_blas_thread, _refldm_outputs,  # noqa: F401
                             _rel, _torch_outputs, files, folder)


def _diffusers_pipe(folder, dtype=None):
    torch = require("torch")
    diffusers = require("diffusers")
    _allow_old_peft()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, torch


def _weights(pipe):
    return {p: {k: v.tobytes() for k, v in getattr(pipe, p).state_dict().items()} for p in ("unet", "text_encoder")}


def test_lora_methods_give_diffusers_outputs(folder, files):
    """load / set_adapters / fuse / unfuse / disable / enable / unload, the same calls on both, float64."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    ref, torch = _diffusers_pipe(folder)
    ref.load_lora_weights(files["diffusers"], adapter_name="d")
    kohya_dir, kohya_name = os.path.split(files["kohya"])
    ref.load_lora_weights(kohya_dir, weight_name=kohya_name, adapter_name="k")
    ref.to(torch.float64)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    original = _weights(pipe)
    pipe.load_lora_weights(files["diffusers"], adapter_name="d")
    pipe.load_lora_weights(kohya_dir, weight_name=kohya_name, adapter_name="k")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["k"]  # the last loaded alone is on
    assert pipe.get_list_adapters() == {part: sorted(names) for part, names in ref.get_list_adapters().items()}
    x, ids = _inputs()
    base = _refldm_outputs(StableDiffusionPipeline.from_pretrained(folder, dtype="float64"), x, ids)

    def agree(step):
        want, got = _torch_outputs(ref, x, ids), _refldm_outputs(pipe, x, ids)
        for w, g in zip(want, got):
            assert _rel(g, w) <= 1e-10, step
        return got

    agree("loaded")
    got = agree(("set_adapters", ref.set_adapters(["d", "k"], list(SCALES)), pipe.set_adapters(["d", "k"], list(SCALES))))
    assert _rel(got[1], base[1]) > 1e-3 and _rel(got[0], base[0]) > 1e-3  # the adapters change both outputs
    ref.set_adapters(["d"], [1.0]), pipe.set_adapters(["d"], [1.0])
    ref.fuse_lora(), pipe.fuse_lora()
    agree("fused")
    ref.set_adapters(["d"], [0.0]), pipe.set_adapters(["d"], [0.0])  # the fused weights alone
    agree("fused, weight 0")
    # peft unmerges with the adapter's weight at that moment (0 here would leave the fusion in diffusers'
    # weights); refldm puts the original arrays back whatever the weight. Unfuse at the fusing weight:
    ref.set_adapters(["d"], [1.0]), pipe.set_adapters(["d"], [1.0])
    ref.unfuse_lora(), pipe.unfuse_lora()
    agree("unfused")
    ref.set_adapters(["d", "k"], [0.3, 0.9]), pipe.set_adapters(["d", "k"], [0.3, 0.9])
    agree("unfused, new weights")
    ref.disable_lora(), pipe.disable_lora()
    got = agree("disabled")
    assert all(np.array_equal(g, b) for g, b in zip(got, base))
    ref.enable_lora(), pipe.enable_lora()
    agree("enabled")
    ref.unload_lora_weights(), pipe.unload_lora_weights()
    agree("unloaded")
    assert _weights(pipe) == original and pipe.get_active_adapters() == []


def test_unload_keeps_fused_weights_as_diffusers_does(folder, files):
    from refldm.pipelines.sd import StableDiffusionPipeline
    ref, torch = _diffusers_pipe(folder)
    ref.load_lora_weights(files["diffusers"])
    ref.to(torch.float64)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    pipe.load_lora_weights(files["diffusers"])
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["default_0"]
    ref.fuse_lora(lora_scale=0.8), pipe.fuse_lora(lora_scale=0.8)
    ref.unload_lora_weights(), pipe.unload_lora_weights()
    x, ids = _inputs()
    for w, g in zip(_torch_outputs(ref, x, ids), _refldm_outputs(pipe, x, ids)):
        assert _rel(g, w) <= 1e-10
    from refldm.adapters.lora import adapted_layers
    assert not adapted_layers(pipe)  # the fused weights are now the model's own


def test_same_image_with_fused_lora_and_textual_inversion(folder, files, tmp_path):
    """float32, 4 Euler steps: load_textual_inversion (a 2-vector token) + load_lora_weights + fuse_lora."""
    diffusers = require("diffusers")
    from refldm.checkpoints.weights import save_file
    from refldm.pipelines.sd import StableDiffusionPipeline
    rng = np.random.default_rng(11)
    save_file({"<toy>": rng.normal(scale=0.5, size=(2, 32)).astype(np.float32)}, tmp_path / "learned_embeds.safetensors")
    ref, torch = _diffusers_pipe(folder)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    kwargs = dict(prompt="a photo of <toy> on a table", height=32, width=32, num_inference_steps=4, guidance_scale=7.5)
    for p in (ref, pipe):
        p.load_textual_inversion(tmp_path, token="<toy>")
        p.load_lora_weights(files["diffusers"], adapter_name="d")
        p.fuse_lora(lora_scale=0.9)
    assert pipe.tokenizer.tokenize("<toy>") == ["<toy>"] and len(pipe.tokenizer) == len(ref.tokenizer)
    want = (ref(generator=torch.Generator().manual_seed(1), output_type="np", **kwargs).images * 255).round()
    want = want.astype(np.uint8)[0]
    got = np.asarray(pipe(**kwargs, seed=1, scheduler="euler", progress=False).images[0])
    pipe.unfuse_lora()
    plain = np.asarray(pipe(**kwargs, seed=1, scheduler="euler", progress=False).images[0])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert np.abs(plain.astype(int) - want.astype(int)).max() > 10  # the fused LoRA changes the image
    assert want.std() > 20
    assert diff.max() <= 2 and np.mean(diff == 0) >= 0.99


def test_refused_calls_change_nothing(folder, files, tmp_path):
    from refldm.adapters.lora import LoRAError
    from refldm.checkpoints.weights import save_file
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(files["diffusers"], adapter_name="d")
    pipe.set_adapters("d", 0.5)
    x, ids = _inputs()
    before, weights = _refldm_outputs(pipe, x.astype(np.float32), ids), _weights(pipe)
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_unet_nothing_here.lora_up.weight": np.ones((4, 2), np.float32)}, bad)
    with pytest.raises(LoRAError, match="match no layer"):
        pipe.load_lora_weights(bad)
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_lora_weights(files["diffusers"], adapter_name="d")
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        pipe.set_adapters(["d", "x"], [1.0, 1.0])
    with pytest.raises(LoRAError, match="scale"):
        pipe.set_adapters(["d"], [float("nan")])
    with pytest.raises(FileNotFoundError, match="no file"):
        pipe.load_lora_weights(tmp_path, weight_name="missing.safetensors")
    assert pipe.get_active_adapters() == ["d"] and _weights(pipe) == weights
    for a, b in zip(_refldm_outputs(pipe, x.astype(np.float32), ids), before):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name, diffusers_class, config", [
    ("ddim", "DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                               "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    ("dpmpp_2m karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "num_train_timesteps": 500}),
    ("euler", "EulerDiscreteScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
])
def test_scheduler_config_reads_as_diffusers_frozendict(name, diffusers_class, config):
    diffusers = require("diffusers")
    from refldm.schedulers import get_scheduler
    ours = get_scheduler(name, config)
    theirs = getattr(diffusers, diffusers_class).from_config({**config, **(
        {"use_karras_sigmas": True} if "karras" in name else {})}).config
    c = ours.config
    as_dict = dict(c)
    assert as_dict == {**c} == dict(c.items()) and list(c) == list(c.keys()) and len(c) == len(as_dict) > 5
    shared = set(as_dict) & set(theirs)
    assert set(as_dict) - shared <= {"table_dtype"}  # every other key is one diffusers' config has
    for key in shared:
        want = theirs[key]
        want = list(want) if isinstance(want, tuple) else want
        assert c[key] == want, key
        if key in c.__dataclass_fields__:  # keys held at diffusers' default only are not attributes
            assert getattr(c, key) == want, key
    assert c["num_train_timesteps"] == theirs["num_train_timesteps"] and "num_train_timesteps" in c
    with pytest.raises(KeyError):
        c["no_such_key"]
    with pytest.raises(TypeError, match="read-only"):
        c["num_train_timesteps"] = 10
    with pytest.raises(TypeError, match="read-only"):
        del c["num_train_timesteps"]
    again = type(ours).from_config(dict(c))  # a plain dict of the mapping builds the same scheduler
    assert dict(again.config) == as_dict


def test_every_sd_pipeline_has_the_diffusers_methods():
    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    methods = ("load_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters", "disable_lora", "enable_lora",
               "unload_lora_weights", "delete_adapters", "get_active_adapters", "get_list_adapters",
               "load_textual_inversion")
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline,
                StableDiffusionInpaintPipeline):
        assert [m for m in methods if not callable(getattr(cls, m, None))] == [], cls.__name__
