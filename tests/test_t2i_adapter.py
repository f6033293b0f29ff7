"""T2IAdapter (refldm/models/t2i_adapter.py) and the U-Net's down_intrablock_additional_residuals, against
diffusers on tiny random models: relative error <= 1e-10 in float64, <= 1e-4 in float32 (as tests/test_unet.py)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from refldm import backend
from refldm.checkpoints.config import ConfigError
from refldm.models.t2i_adapter import MultiAdapter, T2IAdapter, avg_pool2x2, pixel_unshuffle
from refldm.models.unet import UNet2DConditionModel
from tests.conftest import require
from tests.test_controlnet import SD1_TINY, SDXL_TINY, _randomise, _unet_config
from tests.test_unet import TOL32, TOL64, float64_timesteps, rel_err, torch_threads

SD1_ADAPTER = dict(channels=[8, 16], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
SD1_LIGHT = dict(channels=[8], num_res_blocks=2, downscale_factor=8, adapter_type="light_adapter")
XL_ADAPTER = dict(channels=[8, 16, 16, 16], num_res_blocks=1, downscale_factor=16, adapter_type="full_adapter_xl")


def _diffusers_adapter(cfg, seed):
    require("torch")
    diffusers = require("diffusers")
    return _randomise(diffusers.T2IAdapter(**cfg), seed)


def _features(model, image, dtype):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    with torch.no_grad():
        return [f.double().numpy() for f in model.to(td)(torch.from_numpy(image).to(td))]


def _adapter_errors(cfg, image, seed=0):
    """The worst relative error of refldm's features against diffusers', per dtype."""
    dmodel = _diffusers_adapter(cfg, seed)
    worst = {}
    with tempfile.TemporaryDirectory() as folder:
        dmodel.save_pretrained(folder, safe_serialization=True)
        for dtype in ("float32", "float64"):
            ref = _features(dmodel, image, dtype)
            model = T2IAdapter.from_pretrained(folder, dtype=dtype)
            assert model.num_parameters() == sum(p.numel() for p in dmodel.parameters())
            assert model.total_downscale_factor == dmodel.total_downscale_factor
            ours = model(backend.asarray(image, dtype))
            assert [tuple(f.shape) for f in ours] == [r.shape for r in ref]
            worst[dtype] = max(rel_err(backend.to_numpy(a), b) for a, b in zip(ours, ref))
    return worst


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["full_adapter", "light_adapter", "full_adapter_xl"]),
       levels=st.integers(1, 4), blocks=st.integers(0, 2), r=st.sampled_from([1, 2, 4]),
       h=st.integers(1, 7), w=st.integers(1, 7), in_channels=st.sampled_from([1, 3]), data=st.data())
def test_adapters_of_drawn_sizes_match_diffusers(kind, levels, blocks, r, h, w, in_channels, data):
    """Every layout, odd sizes included (the pooling's ceil mode averages the last row's 1 or 2 pixels)."""
    widths = data.draw(st.lists(st.sampled_from([4, 8]), min_size=levels, max_size=levels))
    if kind == "full_adapter_xl":
        widths = widths[:3] + [widths[2]] * (levels - 3) if levels > 3 else widths
    cfg = dict(in_channels=in_channels, channels=widths, num_res_blocks=blocks, downscale_factor=r,
               adapter_type=kind)
    image = np.random.default_rng(levels * 10 + h).uniform(0, 1, (2, in_channels, h * r, w * r))
    with torch_threads(1):
        worst = _adapter_errors(cfg, image)
    assert worst["float64"] <= TOL64 and worst["float32"] <= TOL32, worst


def test_pixel_unshuffle_and_ceil_pooling_equal_torch():
    torch = require("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 10))
    assert np.array_equal(pixel_unshuffle(x, 2), torch.nn.PixelUnshuffle(2)(torch.from_numpy(x)).numpy())
    odd = x[:, :, :5, :7]
    ref = torch.nn.AvgPool2d(2, 2, ceil_mode=True)(torch.from_numpy(odd)).numpy()
    assert avg_pool2x2(odd).shape == (2, 3, 3, 4)
    assert np.max(np.abs(avg_pool2x2(odd) - ref)) <= 1e-15


def test_multi_adapter_matches_diffusers_weighted_sum():
    torch = require("torch")
    diffusers = require("diffusers")
    images = [np.random.default_rng(k).uniform(0, 1, (1, 3, 16, 24)) for k in range(2)]
    with torch_threads(1), tempfile.TemporaryDirectory() as folder:
        dmodels = [_diffusers_adapter(SD1_ADAPTER, 5 + k).double() for k in range(2)]
        for k, m in enumerate(dmodels):
            m.save_pretrained(f"{folder}/a{k}", safe_serialization=True)
        multi = MultiAdapter([T2IAdapter.from_pretrained(f"{folder}/a{k}", dtype="float64") for k in range(2)])
        for weights in (None, [0.3, 1.2]):
            with torch.no_grad():
                ref = diffusers.MultiAdapter(dmodels)([torch.from_numpy(i) for i in images], weights)
            ours = multi(images, weights)
            assert max(rel_err(a, b.numpy()) for a, b in zip(ours, ref)) <= TOL64


# -- the U-Net with the adapter's features ------------------------------------------------------------------

def _unet_case(cfg, rng, batch=2, h=8, w=6):
    case = dict(sample=rng.standard_normal((batch, 4, h, w)), t=np.round(rng.uniform(0, 1000, batch), 1),
                context=rng.standard_normal((batch, 5, cfg["cross_attention_dim"])))
    if cfg.get("addition_embed_type"):
        case["added"] = dict(text_embeds=rng.standard_normal((batch, 12)),
                             time_ids=np.round(rng.uniform(0, 1024, (batch, 6))))
    return case


def _unet_agreement(unet_cfg, adapter_cfg, scale=0.8, seed=0):
    """adapter features (scaled) -> U-Net, refldm against diffusers; -> worst error per dtype and the refldm
    models (float64) for further checks."""
    torch = require("torch")
    diffusers = require("diffusers")
    rng = np.random.default_rng(seed)
    case = _unet_case(unet_cfg, rng)
    image = rng.uniform(0, 1, (2, 3, 8 * 8, 8 * 6))
    worst = {}
    with torch_threads(1), tempfile.TemporaryDirectory() as folder:
        dunet = _randomise(diffusers.UNet2DConditionModel(**_unet_config(unet_cfg)), seed)
        dadapter = _diffusers_adapter(adapter_cfg, seed + 1)
        dunet.save_pretrained(f"{folder}/unet", safe_serialization=True)
        dadapter.save_pretrained(f"{folder}/adapter", safe_serialization=True)
        for dtype, tol in (("float32", TOL32), ("float64", TOL64)):
            td = {"float32": torch.float32, "float64": torch.float64}[dtype]
            T = lambda a: torch.from_numpy(a).to(td)
            added = {k: T(v) for k, v in case["added"].items()} if "added" in case else None
            dunet.to(td), dadapter.to(td)     # (diffusers warns about the cast; nothing is kept in float32)
            with torch.no_grad(), (float64_timesteps() if dtype == "float64" else _nothing()):
                feats = [f * scale for f in dadapter(T(image))]
                ref = dunet(T(case["sample"]), torch.tensor(case["t"], dtype=torch.float64), T(case["context"]),
                            added_cond_kwargs=added, down_intrablock_additional_residuals=feats).sample.double().numpy()
            A = lambda a: backend.asarray(a, dtype)
            unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", dtype=dtype)
            adapter = T2IAdapter.from_pretrained(f"{folder}/adapter", dtype=dtype)
            ours_feats = [f * scale for f in adapter(A(image))]
            added_ours = {k: A(v) for k, v in case["added"].items()} if "added" in case else None
            ours = unet(A(case["sample"]), case["t"], A(case["context"]), added_cond_kwargs=added_ours,
                        down_intrablock_additional_residuals=ours_feats)
            plain = unet(A(case["sample"]), case["t"], A(case["context"]), added_cond_kwargs=added_ours)
            assert rel_err(backend.to_numpy(plain), ref) > 1e-3    # the features change the output
            worst[dtype] = rel_err(backend.to_numpy(ours), ref)
            assert worst[dtype] <= tol, (dtype, worst)
    return worst, unet, adapter, case, image


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_tiny_sd1_unet_with_full_and_light_adapter_features_matches_diffusers():
    _unet_agreement(SD1_TINY, SD1_ADAPTER)
    _unet_agreement(dict(SD1_TINY, block_out_channels=[8, 8]), SD1_LIGHT)   # 2 levels: 8, then 8 repeated


def test_tiny_sdxl_unet_with_xl_adapter_features_and_the_mid_block_matches_diffusers():
    _unet_agreement(SDXL_TINY, XL_ADAPTER, scale=1.3)


def test_scale_zero_is_the_plain_unet_exactly_and_bad_features_are_named():
    _, unet, adapter, case, image = _unet_agreement(SD1_TINY, SD1_ADAPTER)
    A = lambda a: backend.asarray(a, "float64")
    feats = adapter(A(image))
    args = (A(case["sample"]), case["t"], A(case["context"]))
    plain = unet(*args)
    zero = unet(*args, down_intrablock_additional_residuals=[f * 0.0 for f in feats])
    assert np.array_equal(backend.to_numpy(plain), backend.to_numpy(zero))
    with pytest.raises(ValueError, match=r"4 down_intrablock_additional_residuals .* for 2 down blocks") as e:
        unet(*args, down_intrablock_additional_residuals=feats + feats[-1:] * 2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"enters down_blocks.1, whose hidden state is \(2, 16, 4, 3\)"):
        unet(*args, down_intrablock_additional_residuals=[feats[0], feats[1][:, :, :2]])


def test_bad_configs_and_images_are_one_line_naming_them(tmp_path):
    with pytest.raises(ConfigError, match="adapter_type='medium_adapter'"):
        T2IAdapter.from_config(dict(SD1_ADAPTER, adapter_type="medium_adapter"))
    with pytest.raises(ConfigError, match=r"channels\[3:\] must equal channels\[2\]"):
        T2IAdapter.from_config(dict(XL_ADAPTER, channels=[8, 16, 16, 32]))
    with pytest.raises(ConfigError, match="downscale_factor"):
        T2IAdapter.from_config(dict(SD1_ADAPTER, downscale_factor=0))
    with pytest.raises(ConfigError, match="unknown config key 'adapter_depth'"):
        T2IAdapter.from_config(dict(SD1_ADAPTER, adapter_depth=3))
    model = T2IAdapter.from_config(SD1_ADAPTER)
    assert [k for k, *_ in model.params()][:3] == ["adapter.conv_in.weight", "adapter.conv_in.bias",
                                                   "adapter.body.0.resnets.0.block1.weight"]
    model.load_state_dict({k: np.zeros(v.shape) for k, _, _, v in model.params()})
    with pytest.raises(ValueError, match=r"multiples of downscale_factor 8, got \(1, 3, 12, 16\)"):
        model(np.zeros((1, 3, 12, 16), np.float32))


def _random_model(model, seed):
    """Every weight drawn with NumPy (no torch): N(0, 1/fan_in) for matrices, small values for vectors."""
    rng = np.random.default_rng(seed)
    state = {k: (rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[1:])) if len(v.shape) > 1
                 else 1.0 + 0.1 * rng.standard_normal(v.shape)) for k, _, _, v in model.params()}
    return model, state


def test_adapter_and_unet_with_features_run_on_every_backend(on_backend):
    """The same features and U-Net output on NumPy, the fake device (catches host/device mixing) and CuPy;
    odd sizes, so the ceil-mode pooling's partial windows run too."""
    from tests.test_controlnet import _unet_config
    cfg = dict(_unet_config(SD1_TINY))
    cfg.pop("sample_size")
    image = np.random.default_rng(1).uniform(0, 1, (1, 3, 8 * 5, 8 * 3))
    case = _unet_case(SD1_TINY, np.random.default_rng(2), batch=1, h=5, w=3)
    results = []
    for name in ("numpy", on_backend):
        with backend.use(name):
            adapter, a_state = _random_model(T2IAdapter.from_config(SD1_ADAPTER), 3)
            unet, u_state = _random_model(UNet2DConditionModel.from_config(cfg), 4)
            adapter.load_state_dict(a_state, dtype="float32")
            unet.load_state_dict(u_state, dtype="float32")
            A = lambda a: backend.asarray(a, "float32")
            feats = adapter(A(image))
            assert [tuple(f.shape) for f in feats] == [(1, 8, 5, 3), (1, 16, 3, 2)]
            out = unet(A(case["sample"]), A(case["t"]), A(case["context"]), down_intrablock_additional_residuals=feats)
            results.append([backend.to_numpy(f) for f in feats] + [backend.to_numpy(out)])
    for a, b in zip(*results):
        assert rel_err(a, b) <= TOL32
