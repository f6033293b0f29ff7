"""SDXL's U-Net: the "text_time" added embedding, per-level transformer depths, and the full configs.

Agreement with diffusers on tiny random-weight SDXL-shaped U-Nets (built by diffusers, every parameter
re-randomised, saved with save_pretrained, loaded by refldm): relative error max|a - b| / max|b| <= 1e-10
in float64 and <= 1e-4 in float32 (the tolerances of tests/test_unet.py, whose module docstring says why
diffusers' sinusoids are patched to float64 for the float64 reference; the patch covers the time ids'
sinusoids too, which go through the same helper).

The full SDXL base and refiner configs are checked by parameter count only: diffusers builds them on
the meta device (no memory), refldm counts its declared shapes without loading (10 GB of float32
weights per copy would not fit the test machine).
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from refldm import backend
from refldm.checkpoints.config import ConfigError
from refldm.models.unet import UNet2DConditionModel
from tests.conftest import require
from tests.test_unet import TOL32, TOL64, build_diffusers_unet, float64_timesteps, rel_err, torch_threads

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (keys that differ from diffusers' defaults)
SDXL_BASE = dict(
    sample_size=128, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, upcast_attention=None)
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json
SDXL_REFINER = dict(
    sample_size=128, addition_embed_type="text_time", addition_time_embed_dim=256,
    attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4, use_linear_projection=True)
SDXL_BASE_PARAMETERS = 2_567_463_684
SDXL_REFINER_PARAMETERS = 2_259_526_660


def tiny_sdxl_config(pooled=12, n_ids=6, time_dim=8, depths=(1, 2, 3), reverse=None, heads=(1, 2, 2),
                     refiner=False):
    """An SDXL-shaped U-Net at toy size: no attention at the top level, linear projections, per-level
    transformer depths and head counts, the "text_time" added embedding with n_ids ids."""
    if refiner:
        down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        up = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        channels = [8, 16, 16, 16]
    else:
        down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        up = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
        channels = [8, 16, 16]
    config = dict(
        sample_size=8, block_out_channels=channels, down_block_types=down, up_block_types=up,
        layers_per_block=2, norm_num_groups=4, cross_attention_dim=24, attention_head_dim=list(heads),
        transformer_layers_per_block=list(depths), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + n_ids * time_dim)
    if reverse is not None:
        config["reverse_transformer_layers_per_block"] = list(reverse)
    return config


def sdxl_inputs(rng, batch, h, w, seq, cross, pooled, n_ids):
    sample = rng.standard_normal((batch, 4, h, w))
    t = np.round(rng.uniform(0, 1000, size=batch), 1)
    context = rng.standard_normal((batch, seq, cross))
    text_embeds = rng.standard_normal((batch, pooled))
    # micro-conditioning ids are pixel sizes, crop offsets, aesthetic scores: values up to ~1024
    time_ids = np.round(rng.uniform(0, 1024, size=(batch, n_ids)))
    return sample, t, context, text_embeds, time_ids


def diffusers_forward(model, case, dtype):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    sample, t, context, text_embeds, time_ids = case
    with torch.no_grad():
        out = model(torch.from_numpy(sample).to(td), torch.tensor(t, dtype=torch.float64),
                    torch.from_numpy(context).to(td),
                    added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds).to(td),
                                       "time_ids": torch.from_numpy(time_ids).to(td)}).sample
    return out.numpy().astype(np.float64)


def refldm_forward(unet, case, dtype):
    sample, t, context, text_embeds, time_ids = case
    return backend.to_numpy(unet(backend.asarray(sample, dtype), t, backend.asarray(context, dtype),
                                 added_cond_kwargs={"text_embeds": backend.asarray(text_embeds, dtype),
                                                    "time_ids": backend.asarray(time_ids, dtype)}))


def check_agreement(config, cases, seed=0):
    with torch_threads(1):
        dmodel = build_diffusers_unet(config, seed)
        ref32 = [diffusers_forward(dmodel, c, "float32") for c in cases]
        dmodel.double()
        with float64_timesteps():
            ref64 = [diffusers_forward(dmodel, c, "float64") for c in cases]
        with tempfile.TemporaryDirectory() as folder:
            dmodel.save_pretrained(folder, safe_serialization=True)
            count = sum(p.numel() for p in dmodel.parameters())
            worst = {}
            for dtype, refs, tol in (("float64", ref64, TOL64), ("float32", ref32, TOL32)):
                unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
                assert unet.num_parameters() == count
                errs = [rel_err(refldm_forward(unet, c, dtype), r) for c, r in zip(cases, refs)]
                assert max(errs) <= tol, f"{dtype}: relative errors {errs} exceed {tol}"
                worst[dtype] = max(errs)
    return worst


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def test_tiny_sdxl_base_shaped_unet_matches_diffusers_batch_and_non_square():
    cfg = tiny_sdxl_config()
    rng = np.random.default_rng(0)
    cases = [sdxl_inputs(rng, 2, 8, 12, 7, 24, 12, 6), sdxl_inputs(rng, 3, 12, 8, 5, 24, 12, 6)]
    check_agreement(cfg, cases, seed=1)


def test_tiny_sdxl_refiner_shaped_unet_five_ids_uniform_depth_matches_diffusers():
    cfg = tiny_sdxl_config(pooled=10, n_ids=5, time_dim=6, depths=(2, 2, 2, 2), heads=(1, 2, 4, 4), refiner=True)
    rng = np.random.default_rng(1)
    check_agreement(cfg, [sdxl_inputs(rng, 2, 16, 8, 6, 24, 10, 5)], seed=2)


def test_tiny_sdxl_reverse_transformer_layers_per_block_matches_diffusers():
    cfg = tiny_sdxl_config(depths=(1, 1, 2), reverse=(3, 1, 1), heads=(2, 2, 4))
    rng = np.random.default_rng(2)
    check_agreement(cfg, [sdxl_inputs(rng, 1, 8, 8, 3, 24, 12, 6)], seed=3)


@pytest.mark.parametrize("config, count", [(SDXL_BASE, SDXL_BASE_PARAMETERS),
                                           (SDXL_REFINER, SDXL_REFINER_PARAMETERS)], ids=["base", "refiner"])
def test_full_sdxl_configs_have_diffusers_parameter_count(config, count):
    """Counted from the config alone: diffusers on the meta device, refldm from its declared shapes."""
    torch = require("torch")
    diffusers = require("diffusers")
    with torch.device("meta"):
        dmodel = diffusers.UNet2DConditionModel(**config)
    dshapes = {k: tuple(v.shape) for k, v in dmodel.state_dict().items()}
    assert sum(int(np.prod(s)) for s in dshapes.values()) == count
    unet = UNet2DConditionModel.from_config(dict(dmodel.config))
    assert unet.num_parameters() == count
    ours = {k: tuple(v.shape) for k, _, _, v in unet.params()}
    assert ours == dshapes  # the same keys with the same shapes


def test_added_conditioning_errors_name_what_is_wrong():
    cfg = tiny_sdxl_config()
    unet = UNet2DConditionModel.from_config(cfg)
    rng = np.random.default_rng(3)
    state = {k: rng.standard_normal(v.shape) * 0.1 for k, _, _, v in unet.params()}
    unet.load_state_dict(state, dtype="float64")
    sample, t, context, text_embeds, time_ids = sdxl_inputs(rng, 2, 8, 8, 3, 24, 12, 6)
    with pytest.raises(ValueError, match="needs added_cond_kwargs with text_embeds and time_ids"):
        unet(sample, t, context)
    with pytest.raises(ValueError, match=r"time_ids \(2, 5\).*projection_class_embeddings_input_dim"):
        unet(sample, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids[:, :5]})
    plain = UNet2DConditionModel.from_config({**cfg, "addition_embed_type": None})
    with pytest.raises(ValueError, match="no addition_embed_type"):
        plain._added_inputs({"text_embeds": text_embeds}, 2, np, np.float64)


@pytest.mark.parametrize("key, value, match", [
    ("addition_embed_type", "text", "only None and 'text_time'"),
    ("addition_time_embed_dim", None, "needs addition_time_embed_dim"),
    ("projection_class_embeddings_input_dim", None, "needs projection_class_embeddings_input_dim"),
])
def test_bad_added_embedding_config_is_an_error_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        UNet2DConditionModel.from_config({**tiny_sdxl_config(), key: value})
