"""ControlNetModel (refldm/models/controlnet.py) and the U-Net's residual inputs, against diffusers on tiny
random-weight models (every weight redrawn, the zero convolutions included, so every path matters).
Tolerances as tests/test_unet.py: relative error <= 1e-10 in float64, <= 1e-4 in float32."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest

from refldm import backend
from refldm.checkpoints.config import ConfigError
from refldm.models.controlnet import (ControlNetModel, MultiControlNetModel, check_compatible,
                                      guess_mode_scales)
from refldm.models.unet import UNet2DConditionModel
from tests.conftest import require
from tests.test_unet import TOL32, TOL64, float64_timesteps, rel_err, torch_threads

SD1_TINY = dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                layers_per_block=1, norm_num_groups=4, cross_attention_dim=768, attention_head_dim=2)  # 768: SD 1.x
CN_EXTRA = dict(conditioning_embedding_out_channels=[4, 4, 6, 8])           # control image 8x the latent
SDXL_TINY = dict(block_out_channels=[8, 16, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                                    "CrossAttnDownBlock2D"],
                 layers_per_block=2, norm_num_groups=4, cross_attention_dim=24, attention_head_dim=[1, 2, 2],
                 transformer_layers_per_block=[1, 2, 1], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=12 + 6 * 8)


def _randomise(model, seed):
    torch = require("torch")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    return model.eval()


CN_ONLY = ("global_pool_conditions", "controlnet_conditioning_channel_order")


def _unet_config(cfg):
    up = [t.replace("Down", "Up") for t in reversed(cfg["down_block_types"])]
    return dict({k: v for k, v in cfg.items() if k not in CN_ONLY}, up_block_types=up, sample_size=8)


def build_diffusers_pair(cfg, seed=0):
    """A random diffusers U-Net and a random ControlNet of the same shape."""
    require("torch")
    diffusers = require("diffusers")
    unet = _randomise(diffusers.UNet2DConditionModel(**_unet_config(cfg)), seed)
    controlnet = _randomise(diffusers.ControlNetModel(**cfg, **CN_EXTRA), seed + 1)
    return unet, controlnet


def _case(rng, cfg, batch=2, h=8, w=6):
    case = dict(sample=rng.standard_normal((batch, 4, h, w)), t=np.round(rng.uniform(0, 1000, batch), 1),
                context=rng.standard_normal((batch, 5, cfg["cross_attention_dim"])),
                cond=rng.uniform(0, 1, (batch, 3, 8 * h, 8 * w)))
    if cfg.get("addition_embed_type"):
        case["added"] = dict(text_embeds=rng.standard_normal((batch, 12)),
                             time_ids=np.round(rng.uniform(0, 1024, (batch, 6))))
    return case


def _diffusers_run(unet, controlnet, case, dtype, scale, guess_mode):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    T = lambda a: torch.from_numpy(a).to(td)
    added = {k: T(v) for k, v in case["added"].items()} if "added" in case else None
    t = torch.tensor(case["t"], dtype=torch.float64)
    with torch.no_grad():
        down, mid = controlnet(T(case["sample"]), t, T(case["context"]), T(case["cond"]), scale,
                               guess_mode=guess_mode, added_cond_kwargs=added, return_dict=False)
        out = unet(T(case["sample"]), t, T(case["context"]), added_cond_kwargs=added,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return [d.double().numpy() for d in down], mid.double().numpy(), out.double().numpy()


def _refldm_run(unet, controlnet, case, dtype, scale, guess_mode):
    A = lambda a: backend.asarray(a, dtype)
    added = {k: A(v) for k, v in case["added"].items()} if "added" in case else None
    res = controlnet(A(case["sample"]), case["t"], A(case["context"]), A(case["cond"]), scale,
                     guess_mode=guess_mode, added_cond_kwargs=added)
    out = unet(A(case["sample"]), case["t"], A(case["context"]), added_cond_kwargs=added,
               down_block_additional_residuals=res.down_block_res_samples,
               mid_block_additional_residual=res.mid_block_res_sample)
    return [backend.to_numpy(d) for d in res.down_block_res_samples], backend.to_numpy(res.mid_block_res_sample), \
        backend.to_numpy(out)


def _agreement(cfg, runs, seed=0):
    """runs: [(scale, guess_mode)]; returns the worst relative error per dtype over residuals and U-Net output."""
    rng = np.random.default_rng(seed)
    case = _case(rng, cfg)
    with torch_threads(1):
        dunet, dcn = build_diffusers_pair(cfg, seed)
        refs = {"float32": [_diffusers_run(dunet, dcn, case, "float32", *r) for r in runs]}
        dunet.double(), dcn.double()
        with float64_timesteps():
            refs["float64"] = [_diffusers_run(dunet, dcn, case, "float64", *r) for r in runs]
        worst = {}
        with tempfile.TemporaryDirectory() as folder:
            dunet.save_pretrained(f"{folder}/unet", safe_serialization=True)
            dcn.save_pretrained(f"{folder}/controlnet", safe_serialization=True)
            for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
                unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", dtype=dtype)
                cn = ControlNetModel.from_pretrained(f"{folder}/controlnet", dtype=dtype)
                assert cn.num_parameters() == sum(p.numel() for p in dcn.parameters())
                errs = []
                for r, (rdown, rmid, rout) in zip(runs, refs[dtype]):
                    down, mid, out = _refldm_run(unet, cn, case, dtype, *r)
                    assert len(down) == len(rdown)
                    errs += [rel_err(a, b) for a, b in zip(down, rdown)] + [rel_err(mid, rmid), rel_err(out, rout)]
                worst[dtype] = max(errs)
                assert worst[dtype] <= tol, f"{dtype}: {errs}"
    return worst


def test_tiny_sd1_controlnet_and_unet_with_residuals_match_diffusers():
    _agreement(SD1_TINY, [(1.0, False), (0.7, True)])


def test_tiny_sdxl_controlnet_and_unet_with_residuals_match_diffusers():
    _agreement(SDXL_TINY, [(0.5, False), (1.0, True)], seed=3)


def test_global_pool_conditions_and_bgr_channel_order_match_diffusers():
    """The "shuffle" ControlNets' layout: residuals averaged over H, W (and guess mode forced by the pipeline);
    a "bgr" ControlNet reverses the control image's channels."""
    cfg = dict(SD1_TINY, global_pool_conditions=True, controlnet_conditioning_channel_order="bgr")
    _agreement(cfg, [(0.9, False), (1.0, True)], seed=11)


def test_guess_mode_scales_equal_torch_logspace_in_float32():
    torch = require("torch")
    for n in (4, 7, 12):
        assert np.array_equal(guess_mode_scales(n), torch.logspace(-1, 0, n + 1).double().numpy())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    require("torch")
    dunet, dcn = build_diffusers_pair(SD1_TINY, 5)
    root = tmp_path_factory.mktemp("cn")
    dunet.save_pretrained(root / "unet", safe_serialization=True)
    dcn.save_pretrained(root / "controlnet", safe_serialization=True)
    _, dxl = build_diffusers_pair(SDXL_TINY, 6)
    dxl.save_pretrained(root / "controlnet_xl", safe_serialization=True)
    return root


def test_conditioning_scale_zero_is_the_plain_unet_exactly(folders):
    rng = np.random.default_rng(1)
    case = _case(rng, SD1_TINY)
    unet = UNet2DConditionModel.from_pretrained(folders / "unet", dtype="float64")
    cn = ControlNetModel.from_pretrained(folders / "controlnet", dtype="float64")
    _, _, out = _refldm_run(unet, cn, case, "float64", 0.0, False)
    plain = backend.to_numpy(unet(case["sample"], case["t"], case["context"]))
    assert np.array_equal(out, plain)
    _, _, controlled = _refldm_run(unet, cn, case, "float64", 1.0, False)
    assert rel_err(controlled, plain) > 1e-3                      # and scale 1 does change it


def test_two_controlnets_sum_their_residuals(folders):
    rng = np.random.default_rng(2)
    case = _case(rng, SD1_TINY)
    cn = ControlNetModel.from_pretrained(folders / "controlnet", dtype="float64")
    args = (case["sample"], case["t"], case["context"])
    both = MultiControlNetModel([cn, cn])(*args, [case["cond"], case["cond"][::-1]], [0.3, 0.9])
    a, b = cn(*args, case["cond"], 0.3), cn(*args, case["cond"][::-1], 0.9)
    assert np.allclose(both.mid_block_res_sample, a.mid_block_res_sample + b.mid_block_res_sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 control images and 2 scales for 2 ControlNets"):
        MultiControlNetModel([cn, cn])(*args, [case["cond"]] * 3, [1.0, 1.0])


def test_bad_input_is_one_line_naming_it(folders):
    unet = UNet2DConditionModel.from_pretrained(folders / "unet", dtype="float64")
    cn = ControlNetModel.from_pretrained(folders / "controlnet", dtype="float64")
    xl = ControlNetModel.from_pretrained(folders / "controlnet_xl", dtype="float64")
    rng = np.random.default_rng(3)
    case = _case(rng, SD1_TINY)
    args = (case["sample"], case["t"], case["context"])
    checks = [
        (lambda: check_compatible(xl, unet), "SDXL ControlNet with an SD 1.x U-Net"),
        (lambda: cn(*args, case["cond"], float("nan")), "controlnet_conditioning_scale=nan"),
        (lambda: cn(*args, case["cond"], -1.0), "controlnet_conditioning_scale=-1.0"),
        (lambda: cn(*args, case["cond"][:, :, :32]), r"controlnet_cond must be \(2, 3, 64, 48\)"),
        (lambda: unet(*args, down_block_additional_residuals=[case["sample"]] * 2,
                      mid_block_additional_residual=case["sample"]), "2 down_block_additional_residuals for"),
        (lambda: unet(*args, mid_block_additional_residual=case["sample"]), "both"),
        (lambda: ControlNetModel.from_pretrained(folders / "unet"), "not a ControlNet's config"),
    ]
    for call, message in checks:
        with pytest.raises((ValueError, ConfigError), match=message) as e:
            call()
        assert "\n" not in str(e.value)


# -- single files in the original layout ------------------------------------------------------------------------

# SD 1.x's conventions that a single file's shapes do not record: 8 heads, 32 groups per GroupNorm
SD1_SINGLE = dict(SD1_TINY, block_out_channels=[32, 64], attention_head_dim=8, norm_num_groups=32)


def _write_original(dmodel, path, prefix="control_model."):
    """The diffusers ControlNet's tensors under refldm's original keys (refldm/checkpoints/convert.py)."""
    from safetensors.numpy import save_file
    from refldm.checkpoints.convert import controlnet_original_key
    hint_blocks = len(dmodel.controlnet_cond_embedding.blocks)
    layers = dmodel.config.layers_per_block
    state = {controlnet_original_key(k, layers, hint_blocks).replace("control_model.", prefix):
             v.detach().float().numpy().copy() for k, v in dmodel.state_dict().items()}
    save_file(state, str(path))
    return state


def test_single_file_controlnet_keys_agree_with_diffusers_converter_and_config_is_inferred(tmp_path):
    torch = require("torch")
    diffusers = require("diffusers")
    _, dcn = build_diffusers_pair(SD1_SINGLE, 7)
    dcn.save_pretrained(tmp_path / "folder", safe_serialization=True)
    _write_original(dcn, tmp_path / "cn.safetensors")
    # diffusers' own converter reads refldm's key table back to the same tensors
    back = diffusers.ControlNetModel.from_single_file(str(tmp_path / "cn.safetensors"),
                                                      config=str(tmp_path / "folder"))
    theirs, ours = back.state_dict(), dcn.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    # refldm reads it, with the config read off the shapes, and computes what the folder's model computes
    single = ControlNetModel.from_single_file(tmp_path / "cn.safetensors", dtype="float64")
    folder = ControlNetModel.from_pretrained(tmp_path / "folder", dtype="float64")
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "conditioning_embedding_out_channels", "transformer_layers_per_block"):
        assert getattr(single.config, key) == getattr(folder.config, key), key
    case = _case(np.random.default_rng(4), SD1_SINGLE)
    a = single(case["sample"], case["t"], case["context"], case["cond"])
    b = folder(case["sample"], case["t"], case["context"], case["cond"])
    assert all(np.array_equal(x, y) for x, y in zip(a.down_block_res_samples, b.down_block_res_samples))
    assert np.array_equal(a.mid_block_res_sample, b.mid_block_res_sample)


def test_single_file_without_prefix_loads_and_bad_files_are_named(tmp_path):
    require("torch")
    from safetensors.numpy import save_file
    from refldm.checkpoints.convert import ConversionError
    _, dcn = build_diffusers_pair(SD1_SINGLE, 8)
    state = _write_original(dcn, tmp_path / "bare.safetensors", prefix="")
    ControlNetModel.from_single_file(tmp_path / "bare.safetensors")
    save_file(dict(state, **{"extra.weight": np.zeros(3, np.float32)}), str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConversionError, match="not understood: control_model.extra.weight"):
        ControlNetModel.from_single_file(tmp_path / "extra.safetensors")
    save_file({"model.diffusion_model.x": np.zeros(3, np.float32)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ConversionError, match="not a ControlNet checkpoint.*model"):
        ControlNetModel.from_single_file(tmp_path / "unet.safetensors")


def test_controlnet_and_unet_with_residuals_run_on_every_backend(folders, on_backend):
    """The same result on NumPy, the fake device (catches host/device mixing) and CuPy, guess mode included."""
    case = _case(np.random.default_rng(9), SD1_TINY)
    with backend.use("numpy"):
        unet = UNet2DConditionModel.from_pretrained(folders / "unet", dtype="float32")
        cn = ControlNetModel.from_pretrained(folders / "controlnet", dtype="float32")
        _, ref_mid, ref = _refldm_run(unet, cn, case, "float32", 0.8, True)
    unet = UNet2DConditionModel.from_pretrained(folders / "unet", dtype="float32")
    cn = ControlNetModel.from_pretrained(folders / "controlnet", dtype="float32")
    A = lambda a: backend.asarray(a, "float32")
    res = MultiControlNetModel([cn])(A(case["sample"]), A(case["t"]), A(case["context"]), [A(case["cond"])], [0.8],
                                     guess_mode=True)
    out = unet(A(case["sample"]), A(case["t"]), A(case["context"]),
               down_block_additional_residuals=res.down_block_res_samples,
               mid_block_additional_residual=res.mid_block_res_sample)
    assert type(out).__module__.split(".")[0] == type(A(np.zeros(1))).__module__.split(".")[0]
    assert rel_err(backend.to_numpy(res.mid_block_res_sample), ref_mid) <= TOL32
    assert rel_err(backend.to_numpy(out), ref) <= TOL32
