"""weights_dtype="stored": the layers' weights stay bfloat16 / float16 in the memory-mapped file and are converted
when each layer runs. The results equal, bit for bit, those of the default mode (the same file converted to
float32 on loading), for every model that has the option: UNet, VAE, CLIP, T5, SD3 and FLUX transformers.
Tiny random models are saved in bfloat16 or float16 by diffusers / transformers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from refldm.checkpoints.stored import StoredTensor, load_file_mapped
from refldm.checkpoints.weights import WeightsError, bf16_to_float32, save_file
from tests.conftest import require


def _stored_layers(model):
    kept = [v for _, _, _, v in model.params() if isinstance(v, StoredTensor)]
    assert kept, "no weight was kept as stored"
    for v in kept:  # a view into the read-only mapping, not a copy
        assert not v.raw.flags.owndata and not v.raw.flags.writeable
    return kept


def _save(model, folder, dtype):
    torch = require("torch")
    model.to({"bf16": torch.bfloat16, "f16": torch.float16}[dtype]).save_pretrained(str(folder))
    return folder


def _cases():
    """(name, build(folder) -> folder, refldm class, run(model) -> output)."""
    from refldm.models.clip import CLIPTextModel
    from refldm.models.flux_transformer import FluxTransformer2DModel, latent_image_ids
    from refldm.models.sd3_transformer import SD3Transformer2DModel
    from refldm.models.t5 import T5EncoderModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    def flux(folder):
        from tests import test_flux_transformer as t
        model, _ = t.build(folder, t.tiny_config())
        return _save(model, folder, "bf16")

    def run_flux(m):
        rng = np.random.default_rng(0)  # the same inputs for both models
        x, c, y = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 3, 12)), rng.standard_normal((1, 10))
        return m(*(a.astype("float32") for a in (x, c, y)), 0.4, latent_image_ids(2, 3), np.zeros((3, 3)),
                 guidance=3.5)

    def sd3(folder):
        from tests import test_sd3_transformer as t
        model, _ = t.build(folder, t.tiny_config(qk_norm="rms_norm"))
        return _save(model, folder, "f16")

    def run_sd3(m):
        rng = np.random.default_rng(0)  # the same inputs for both models
        x, c, y = rng.standard_normal((1, 4, 4, 6)), rng.standard_normal((1, 3, 20)), rng.standard_normal((1, 12))
        return m(*(a.astype("float32") for a in (x, c, y)), 300.0)

    def unet(folder):
        from tests.test_unet import build_diffusers_unet
        config = dict(block_out_channels=[8, 8], norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6,
                      layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
        return _save(build_diffusers_unet(config), folder, "bf16")

    def run_unet(m):
        rng = np.random.default_rng(0)  # the same inputs for both models
        x, c = rng.standard_normal((1, 4, 8, 8)).astype("float32"), rng.standard_normal((1, 5, 6)).astype("float32")
        return m(x, np.array([500.0]), c)

    def vae(folder):
        from tests import test_vae as t
        return _save(t.build(t.TINY, folder), folder, "bf16")

    def run_vae(m):
        rng = np.random.default_rng(0)  # the same inputs for both models
        return m.decode(rng.standard_normal((1, 4, 4, 4)).astype("float32"))

    def clip(folder):
        from tests import test_clip as t
        return _save(t.reference(t.TINY, 0), folder, "bf16")

    def t5(folder):
        from tests import test_t5 as t
        return _save(t.reference(t.TINY), folder, "f16")

    ids = np.array([[3, 7, 11, 2, 1, 1]])
    return [("flux", flux, FluxTransformer2DModel, run_flux), ("sd3", sd3, SD3Transformer2DModel, run_sd3),
            ("unet", unet, UNet2DConditionModel, run_unet), ("vae", vae, AutoencoderKL, run_vae),
            ("clip", clip, CLIPTextModel, lambda m: m(ids).last_hidden_state),
            ("t5", t5, T5EncoderModel, lambda m: m(ids).last_hidden_state)]


@pytest.mark.parametrize("index", range(6), ids=["flux", "sd3", "unet", "vae", "clip", "t5"])
def test_stored_weights_give_the_float32_result_bit_for_bit(tmp_path, index):
    _, build, cls, run = _cases()[index]
    folder = build(tmp_path)
    plain = cls.from_pretrained(folder, dtype="float32")
    stored = cls.from_pretrained(folder, dtype="float32", weights_dtype="stored")
    _stored_layers(stored)
    a, b = run(plain), run(stored)
    assert a.dtype == b.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)


def _write_raw(path, tensors):
    """A safetensors file from {key: (dtype name, shape, raw bytes)} (to write BF16 and F8 without torch)."""
    header, offset, blobs = {}, 0, []
    for key, (dt, shape, raw) in tensors.items():
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_bfloat16_is_the_upper_half_of_float32(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x7F7F, 0x0001, 0x8000, 0x4049], dtype=np.uint16)   # 1, -2, max, tiny, -0, ~pi
    path = _write_raw(tmp_path / "w.safetensors", {"w": ("BF16", (2, 3), bits.tobytes()),
                                                   "h": ("F16", (2,), np.array([1.5, -3], np.float16).tobytes())})
    state = load_file_mapped(path)
    got = state["w"].to_numpy()
    np.testing.assert_array_equal(got.reshape(-1)[:2], [1.0, -2.0])
    assert got.reshape(-1)[3] == np.float32(2.0 ** -133) and np.signbit(got.reshape(-1)[4])
    np.testing.assert_array_equal(got, bf16_to_float32(bits).reshape(2, 3))
    assert got.view(np.uint32).reshape(-1).tolist() == [int(b) << 16 for b in bits]
    np.testing.assert_array_equal(state["h"].bind("float64").to_numpy(), [1.5, -3.0])


def test_a_dtype_the_option_cannot_keep_is_named(tmp_path):
    path = _write_raw(tmp_path / "w.safetensors", {"layer.weight": ("F8_E4M3", (4,), b"\0" * 4)})
    with pytest.raises(WeightsError, match="key 'layer.weight' is stored as F8_E4M3; weights_dtype='stored' keeps"):
        load_file_mapped(path)


def test_unknown_weights_dtype_is_one_line(tmp_path):
    from refldm.models.flux_transformer import FluxTransformer2DModel
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="weights_dtype='bf16'; the only option is 'stored'"):
        FluxTransformer2DModel.from_pretrained(tmp_path, weights_dtype="bf16")


def test_a_delta_added_to_a_kept_weight_gives_an_ordinary_array(tmp_path):
    """A LoRA merge (weight + delta) on a kept weight: the converted weight plus the delta, exactly."""
    bits = np.array([0x3F80, 0xC000, 0x4049, 0x0000], dtype=np.uint16)
    path = _write_raw(tmp_path / "w.safetensors", {"w": ("BF16", (2, 2), bits.tobytes())})
    w = load_file_mapped(path)["w"]
    delta = np.full((2, 2), 0.5, np.float32)
    np.testing.assert_array_equal(w + delta, bf16_to_float32(bits).reshape(2, 2) + delta)
    np.testing.assert_array_equal(delta + w, w + delta)
