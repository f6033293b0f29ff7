"""AutoencoderKL against diffusers: random-weight models that diffusers builds and saves, loaded by refldm.

Tolerances (relative error max|a - b| / max|b|): <= 1e-10 in float64, <= 1e-4 in float32. Nothing in
the VAE comes from a float32-only computation in diffusers, so both sides compute in the same dtype.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import backend
from refldm.core import images
from refldm.checkpoints.config import ConfigError
from refldm.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from refldm.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    convert_legacy_keys,
)
from refldm.core.nn import Module
from refldm.checkpoints.weights import WeightsError, load_file, load_into, save_file
from tests.conftest import require

F64, F32 = 1e-10, 1e-4

# four blocks like SD (8x downscaling) with few channels, so that 512x384 images stay cheap
TINY = dict(block_out_channels=[8, 16, 16, 32], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
            sample_size=64)
# the SD 1.x VAE (stabilityai/sd-vae-ft-mse, CompVis/stable-diffusion-v1-4/vae)
SD1 = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, norm_num_groups=32, latent_channels=4,
           sample_size=512, act_fn="silu", in_channels=3, out_channels=3)


def rel(a, b):
    a, b = np.asarray(backend.to_numpy(a), np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def randomise(model, seed=0):
    """Re-draw every parameter (diffusers zero-initialises none here, but the norms start at 1 / 0)."""
    torch = require("torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * noise)
            else:
                p.copy_(noise / float(np.sqrt(p[0].numel())))
    return model.eval()


def build(config, folder, seed=0, **save):
    """diffusers AutoencoderKL with random weights, saved into folder; returns the (float32) torch model."""
    require("torch")
    diffusers = require("diffusers")
    model = randomise(diffusers.AutoencoderKL(**config), seed)
    model.save_pretrained(folder, **save)
    return model


def reference(model, x, z, dtype):
    """diffusers' posterior mean, logvar and decode(z) in `dtype` (a copy of the model is cast)."""
    torch = require("torch")
    tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    m = copy.deepcopy(model).to(tdt)
    with torch.no_grad():
        post = m.encode(torch.from_numpy(x.astype(dtype))).latent_dist
        dec = m.decode(torch.from_numpy(z.astype(dtype))).sample
    return post.mean.numpy(), post.logvar.numpy(), dec.numpy()


def inputs(batch, height, width, latent=4, f=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, 3, height, width))
    z = rng.standard_normal((batch, latent, height // f, width // f))
    return x, z


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    return str(folder), build(TINY, folder)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1_vae")
    return str(folder), build(SD1, folder, seed=1)


# --------------------------------------------------------------------------------------------------
# Agreement with diffusers
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, height, width", [(1, 512, 384), (3, 64, 64)], ids=["64x48-latents", "square-batch3"])
def test_tiny_matches_diffusers_float64(tiny, batch, height, width):
    folder, model = tiny
    x, z = inputs(batch, height, width)
    mean, logvar, dec = reference(model, x, z, "float64")
    vae = AutoencoderKL.from_pretrained(folder, dtype="float64")
    post = vae.encode(x)
    assert post.mean.shape == (batch, 4, height // 8, width // 8)
    assert rel(post.mean, mean) <= F64 and rel(post.logvar, logvar) <= F64
    out = vae.decode(z)
    assert out.shape == (batch, 3, height, width)
    assert rel(out, dec) <= F64


def test_tiny_matches_diffusers_float32_on_every_backend(tiny, on_backend):
    folder, model = tiny
    x, z = inputs(2, 96, 64, seed=1)
    mean, logvar, dec = reference(model, x, z, "float32")
    vae = AutoencoderKL.from_pretrained(folder)  # float32 by default
    post = vae.encode(backend.asarray(x, "float32"))
    out = vae.decode(backend.asarray(z, "float32"))
    for a in (post.mean, post.logvar, post.std, out):
        assert backend.array_namespace(a) is backend.xp() and a.dtype == np.float32
    assert rel(post.mean, mean) <= F32 and rel(post.logvar, logvar) <= F32
    assert rel(out, dec) <= F32


def test_sd1_has_83_65m_parameters(sd1):
    folder, model = sd1
    assert AutoencoderKL(SD1).num_parameters() == 83_653_863
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_sd1_matches_diffusers_float64(sd1):
    """The full SD 1.x VAE on a non-square 128x192 image (16x24 latents), kept small for CI time."""
    folder, model = sd1
    x, z = inputs(1, 128, 192, seed=2)
    mean, logvar, dec = reference(model, x, z, "float64")
    vae = AutoencoderKL.from_pretrained(folder, dtype="float64")
    post = vae.encode(x)
    assert rel(post.mean, mean) <= F64 and rel(post.logvar, logvar) <= F64
    assert rel(vae.decode(z), dec) <= F64


def test_sd1_matches_diffusers_float32_batch(sd1):
    folder, model = sd1
    x, z = inputs(2, 64, 96, seed=3)
    mean, logvar, dec = reference(model, x, z, "float32")
    vae = AutoencoderKL.from_pretrained(folder, dtype="float32")
    post = vae.encode(x)
    assert rel(post.mean, mean) <= F32 and rel(post.logvar, logvar) <= F32
    assert rel(vae.decode(z), dec) <= F32


@pytest.mark.parametrize("variant", [
    dict(mid_block_add_attention=False),
    dict(use_quant_conv=False, use_post_quant_conv=False, latent_channels=16),
    dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
         up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=2, in_channels=1, out_channels=2),
], ids=["no-mid-attention", "no-quant-conv-16ch", "2-blocks-gray"])
def test_config_variants_match_diffusers(tmp_path, variant):
    config = {**TINY, **variant}
    model = build(config, tmp_path)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (1, config.get("in_channels", 3), 32, 48))
    z = rng.standard_normal((1, config["latent_channels"], 32 // f, 48 // f))
    mean, logvar, dec = reference(model, x, z, "float64")
    vae = AutoencoderKL.from_pretrained(tmp_path, dtype="float64")
    post = vae.encode(x)
    assert rel(post.mean, mean) <= F64 and rel(post.logvar, logvar) <= F64
    assert rel(vae.decode(z), dec) <= F64


def test_intermediate_activations_match_diffusers(tiny):
    """refldm.crosscheck.trace records each module's output under its checkpoint key: compare two with diffusers' hooks."""
    torch = require("torch")
    from refldm.crosscheck.trace import record

    folder, model = tiny
    m = copy.deepcopy(model).double()
    seen = {}
    for name in ("decoder.mid_block", "decoder.up_blocks.1"):
        m.get_submodule(name).register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, out.numpy()))
    _, z = inputs(1, 64, 48)
    with torch.no_grad():
        m.decode(torch.from_numpy(z))
    vae = AutoencoderKL.from_pretrained(folder, dtype="float64")
    with record() as trace:
        vae.decode(z)
    for name, want in seen.items():
        assert rel(trace.activations[name], want) <= F64


# --------------------------------------------------------------------------------------------------
# Weights: fp16 / bf16 files, shards, legacy key names, mismatches
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_files_load_and_upcast(tiny, tmp_path, half):
    """A fp16 / bf16 checkpoint computes in float64 exactly like diffusers' model with those weights."""
    torch = require("torch")
    _, model = tiny
    low = copy.deepcopy(model).to(getattr(torch, half))
    low.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert stored["encoder.conv_in.weight"].dtype == (np.float16 if half == "float16" else np.float32)
    x, z = inputs(1, 64, 48, seed=5)
    mean, logvar, dec = reference(low.float(), x, z, "float64")  # the rounded weights, upcast by torch
    vae = AutoencoderKL.from_pretrained(tmp_path, dtype="float64")
    assert vae.encoder.conv_in.weight.dtype == np.float64
    post = vae.encode(x)
    assert rel(post.mean, mean) <= F64 and rel(vae.decode(z), dec) <= F64


def test_sharded_checkpoint_loads_the_same_weights(tiny, tmp_path):
    folder, model = tiny
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    a = AutoencoderKL.from_pretrained(folder).state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_legacy_attention_key_names_load(tiny, tmp_path):
    """Older diffusers VAEs name the attention weights query/key/value/proj_attn; they load the same."""
    folder, _ = tiny
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for new, old in renames.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert convert_legacy_keys(legacy).keys() == state.keys()
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    a, b = AutoencoderKL.from_pretrained(folder).state_dict(), AutoencoderKL.from_pretrained(tmp_path).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_weights_that_do_not_fit_name_the_keys(tiny, tmp_path):
    folder, _ = tiny
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    del state["decoder.conv_out.bias"]
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:4]
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(WeightsError, match=r"missing: decoder\.conv_out\.bias.*wrong shape: encoder\.conv_in\.weight"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_pipeline_folder_with_vae_subfolder(tiny, tmp_path):
    folder, _ = tiny
    os.symlink(folder, tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path).num_parameters() == AutoencoderKL(TINY).num_parameters()


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

# the config.json files of the public checkpoints, as on the Hub
SD1_HUB = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
           "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
           "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD2_HUB = {**SD1_HUB, "_diffusers_version": "0.10.0.dev0", "sample_size": 768}
SDXL_HUB = {**SD1_HUB, "_diffusers_version": "0.20.0.dev0", "force_upcast": True, "sample_size": 1024,
            "scaling_factor": 0.13025}


@pytest.mark.parametrize("config, factor", [(SD1_HUB, 0.18215), (SD2_HUB, 0.18215), (SDXL_HUB, 0.13025)],
                         ids=["sd1", "sd2", "sdxl"])
def test_hub_configs_parse(config, factor):
    vae = AutoencoderKL(config)
    assert vae.config.scaling_factor == factor
    assert vae.downscale_factor == 8
    assert vae.num_parameters() == 83_653_863


@pytest.mark.parametrize("change, named", [
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "AttnDownEncoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"norm_type": "spatial"}, "norm_type"),
    ({"block_out_channels": [128, 256, 500, 512]}, "500"),
    ({"latents_mean": [0.0, 0.0]}, "latents_mean"),
], ids=["act_fn", "block-type", "block-count", "unknown-key", "groups", "latents_mean"])
def test_unsupported_config_is_an_error_naming_the_key(tmp_path, change, named):
    with pytest.raises(ConfigError, match=named):
        AutoencoderKL({**SD1_HUB, **change})
    (tmp_path / "config.json").write_text(json.dumps({**SD1_HUB, **change}))
    with pytest.raises(ConfigError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------------

def test_diagonal_gaussian_matches_diffusers():
    torch = require("torch")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Ref

    rng = np.random.default_rng(6)
    params = rng.standard_normal((2, 8, 5, 3)) * 4
    params[0, 4, 0, 0], params[1, 5, 0, 0] = -45.0, 33.0  # outside the clamp range [-30, 20]
    other = rng.standard_normal((2, 8, 5, 3))
    ours, ref = DiagonalGaussianDistribution(params), Ref(torch.from_numpy(params))
    ours2, ref2 = DiagonalGaussianDistribution(other), Ref(torch.from_numpy(other))
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for a, b in ((ours.mean, ref.mean), (ours.mode(), ref.mode()), (ours.logvar, ref.logvar), (ours.std, ref.std),
                 (ours.var, ref.var), (ours.kl(), ref.kl()), (ours.kl(ours2), ref.kl(ref2)),
                 (ours.nll(other[:, :4]), ref.nll(torch.from_numpy(other[:, :4])))):
        assert rel(a, b.numpy()) <= F64
    noise = rng.standard_normal((2, 4, 5, 3))
    np.testing.assert_allclose(ours.sample(noise), params[:, :4] + np.exp(0.5 * ours.logvar) * noise, rtol=1e-15)


def test_sample_with_a_seed_matches_diffusers_generator():
    torch = require("torch")
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Ref

    from refldm.core.random import Generator

    params = np.random.default_rng(7).standard_normal((1, 8, 16, 12)).astype(np.float32)
    want = Ref(torch.from_numpy(params)).sample(generator=torch.Generator().manual_seed(42)).numpy()
    ours = DiagonalGaussianDistribution(params)
    assert rel(ours.sample(generator=Generator(42)), want) <= 1e-6
    assert rel(ours.sample(generator=42), want) <= 1e-6
    with pytest.raises(ValueError, match="noise"):
        ours.sample()
    with pytest.raises(ValueError, match="shape"):
        ours.sample(noise=np.zeros((1, 4, 16, 11), np.float32))


# --------------------------------------------------------------------------------------------------
# Shared blocks (the U-Net uses them too)
# --------------------------------------------------------------------------------------------------

def _load_block(ours: Module, theirs):
    ours.assign_names()
    return load_into(ours, {k: v.numpy() for k, v in theirs.state_dict().items()}, dtype="float64")


@pytest.mark.parametrize("norm", ["default", "scale_shift"])
def test_resnet_block_with_time_embedding_matches_diffusers(norm):
    torch = require("torch")
    from diffusers.models.resnet import ResnetBlock2D as Ref

    ref = randomise(Ref(in_channels=16, out_channels=24, temb_channels=20, groups=4, eps=1e-5,
                        time_embedding_norm=norm)).double()
    ours = _load_block(ResnetBlock2D(16, 24, temb_channels=20, groups=4, eps=1e-5, time_embedding_norm=norm), ref)
    rng = np.random.default_rng(8)
    x, t = rng.standard_normal((2, 16, 7, 5)), rng.standard_normal((2, 20))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    assert rel(ours(x, t), want) <= F64
    with pytest.raises(ValueError, match="temb"):
        ours(x)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("size", [(8, 6), (7, 5)], ids=["even", "odd"])
def test_downsample_matches_diffusers(padding, size):
    torch = require("torch")
    from diffusers.models.downsampling import Downsample2D as Ref

    ref = randomise(Ref(8, use_conv=True, out_channels=12, padding=padding, name="op")).double()
    ours = _load_block(Downsample2D(8, 12, padding=padding), ref)
    x = np.random.default_rng(9).standard_normal((2, 8) + size)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert rel(ours(x), want) <= F64


@pytest.mark.parametrize("output_size", [None, (9, 7), (8, 6)])
def test_upsample_matches_diffusers(output_size):
    torch = require("torch")
    from diffusers.models.upsampling import Upsample2D as Ref

    ref = randomise(Ref(8, use_conv=True, out_channels=6)).double()
    ours = _load_block(Upsample2D(8, 6), ref)
    x = np.random.default_rng(10).standard_normal((2, 8, 4, 3))
    with torch.no_grad():
        want = ref(torch.from_numpy(x), output_size=output_size).numpy()
    assert rel(ours(x, output_size=output_size), want) <= F64


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(tiny):
    folder, _ = tiny
    vae = AutoencoderKL.from_pretrained(folder)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(np.zeros((1, 3, 64, 60), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        vae.encode(np.zeros((1, 3, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(np.zeros((1, 4, 64, 64), np.float32))
    with pytest.raises(ValueError, match="4 channels"):
        vae.decode(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        vae.decode(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="no weights"):
        AutoencoderKL(TINY).decode(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(WeightsError, match="nowhere"):
        AutoencoderKL.from_pretrained(os.path.join(folder, "nowhere"))


# --------------------------------------------------------------------------------------------------
# Images and the scaling convention
# --------------------------------------------------------------------------------------------------

@settings(max_examples=20)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_uint8_roundtrip_is_exact(batch, h, w, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    x = images.to_tensor(pixels)
    assert x.shape == (batch, 3, h, w) and x.dtype == np.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(images.to_uint8(x), pixels)


def test_image_conversion_matches_diffusers_image_processor():
    torch = require("torch")
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(11)
    pil = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    proc = VaeImageProcessor(vae_scale_factor=8)
    np.testing.assert_array_equal(images.to_tensor(pil), proc.preprocess(pil).numpy())
    x = rng.uniform(-1.3, 1.3, (2, 3, 16, 24)).astype(np.float32)  # includes values to clip
    want = [np.asarray(im) for im in proc.postprocess(torch.from_numpy(x), output_type="pil")]
    np.testing.assert_array_equal(images.to_uint8(x), np.stack(want))
    assert [im.size for im in images.to_pil(x)] == [(24, 16)] * 2


def test_to_tensor_rejects_bad_pixels():
    with pytest.raises(ValueError, match="uint8"):
        images.to_tensor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="different sizes"):
        images.to_tensor([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        images.to_tensor(np.zeros((8, 8), np.uint8))


@pytest.mark.parametrize("extra", [{}, {"scaling_factor": 0.13025}, {"shift_factor": 0.0609, "scaling_factor": 1.5305},
                                   {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 1.5, 1.0, 0.5]}],
                         ids=["sd1", "sdxl", "shift", "per-channel"])
def test_scale_and_unscale_are_inverse(extra):
    cfg = AutoencoderKLConfig(**extra)
    z = np.random.default_rng(12).standard_normal((2, 4, 3, 5))
    scaled = images.scale_latents(z, cfg)
    np.testing.assert_allclose(images.unscale_latents(scaled, cfg), z, rtol=1e-13, atol=1e-13)
    if not extra or "latents_mean" not in extra:
        shift = extra.get("shift_factor", 0.0)
        np.testing.assert_allclose(scaled, (z - shift) * cfg.scaling_factor, rtol=1e-15)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def test_cli_encode_then_decode(tiny, tmp_path, capsys):
    from PIL import Image

    from refldm.cli import main

    folder, _ = tiny
    pixels = np.random.default_rng(13).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    assert main(["encode", str(tmp_path / "in.png"), "-m", folder, "-o", str(tmp_path / "z.npy")]) == 0
    z = np.load(tmp_path / "z.npy", allow_pickle=False)
    vae = AutoencoderKL.from_pretrained(folder)
    want = vae.encode(images.to_tensor(pixels)).mode() * vae.config.scaling_factor
    assert z.shape == (1, 4, 6, 8) and rel(z, want) <= 1e-6
    assert main(["decode", str(tmp_path / "z.npy"), "-m", folder, "-o", str(tmp_path / "out.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(out, images.to_uint8(vae.decode(z / vae.config.scaling_factor))[0])
    # --sample with a seed, --unscaled
    assert main(["encode", str(tmp_path / "in.png"), "-m", folder, "-o", str(tmp_path / "s.npy"), "--sample",
                 "--seed", "3", "--unscaled"]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == z.shape and not np.allclose(s, z / vae.config.scaling_factor)


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    from PIL import Image

    from refldm.cli import main

    folder, _ = tiny
    Image.fromarray(np.zeros((60, 64, 3), np.uint8)).save(tmp_path / "odd.png")
    assert main(["encode", str(tmp_path / "odd.png"), "-m", folder, "-o", str(tmp_path / "z.npy")]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["decode", str(tmp_path / "obj.npy"), "-m", folder, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "obj.npy" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 4, 4), np.float32))
    assert main(["decode", str(tmp_path / "bad.npy"), "-m", folder, "-o", str(tmp_path / "o.png")]) == 2
    assert "(N, 4, h, w)" in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "missing.npy"), "-m", folder, "-o", str(tmp_path / "o.png")]) == 2
    assert "missing.npy" in capsys.readouterr().err


def test_cli_help_states_the_scaling_convention(capsys):
    from refldm.cli import build_parser

    for command in ("encode", "decode"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "scaling_factor" in text and "0.18215" in text and "0.13025" in text
