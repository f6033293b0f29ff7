"""UNet2DConditionModel: agreement with diffusers on random-weight models, configs, and errors.

Every agreement test builds a diffusers UNet2DConditionModel, re-randomises *all* its parameters (diffusers
zero-initialises nothing here, but its defaults leave norms at exactly 1 / 0; we want every weight to
matter), saves it with ``save_pretrained`` and loads the folder with refldm. Tolerances, as relative
error max|a - b| / max|b|: <= 1e-10 in float64, <= 1e-4 in float32.

float64 and the timestep embedding: diffusers computes the sinusoidal embedding in float32 whatever the
model's dtype (``get_timestep_embedding`` builds its frequencies with dtype=torch.float32 and calls
``timesteps.float()``), so a float64 diffusers model carries a ~1e-7 relative error from its very first
layer. For the float64 comparisons the tests replace that helper, inside the test only, with the same
formula evaluated in float64 (tools/trace_diffusers.py's `float64_timestep_embedding`), which makes the reference honest; refldm's
float64 path computes the embedding in float64 on its own.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import accel, backend
from refldm.checkpoints.config import ConfigError
from refldm.models.unet import UNet2DConditionModel
from refldm.checkpoints.weights import WeightsError
from tests.conftest import require

TOL64 = 1e-10
TOL32 = 1e-4

SD1 = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the keys that differ from the defaults)
    sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2 = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json
    sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True, upcast_attention=True)
SD1_PARAMETERS = 859_520_964
SD2_PARAMETERS = 865_910_724


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def float64_timesteps():
    """Within the block, diffusers' Timesteps module computes its sinusoid in float64 (see module doc);
    the patch is tools/trace_diffusers.py's, so the tests and the tracing tool share one reference."""
    require("torch")
    require("diffusers")
    from tools.trace_diffusers import float64_timestep_embedding

    return float64_timestep_embedding()


@contextlib.contextmanager
def torch_threads(n):
    """Run torch on n threads: tiny models are dominated by thread start-up and spinning on a busy
    machine (a 10 ms conv2d of a few hundred values), so the tiny-config tests use one thread."""
    torch = require("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_diffusers_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel with every parameter drawn afresh: weights ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2), so nothing is zero and activations stay O(1)."""
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**config)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    return model


def make_inputs(rng, batch, in_channels, height, width, seq, cross_dim, per_element=True):
    sample = rng.standard_normal((batch, in_channels, height, width))
    context = rng.standard_normal((batch, seq, cross_dim))
    if per_element:
        t = np.round(rng.uniform(0, 1000, size=batch), 1)  # fractional timesteps, one per element
    else:
        t = 981
    return sample, t, context


def diffusers_forward(model, sample, t, context, dtype):
    torch = require("torch")
    td = {"float32": torch.float32, "float64": torch.float64}[dtype]
    tt = torch.tensor(t, dtype=torch.float64) if isinstance(t, np.ndarray) else t
    with torch.no_grad():
        out = model(torch.from_numpy(sample).to(td), tt, torch.from_numpy(context).to(td)).sample
    return out.numpy().astype(np.float64)


def refldm_forward(unet, sample, t, context, dtype):
    return backend.to_numpy(unet(backend.asarray(sample, dtype), t, backend.asarray(context, dtype)))


def reference_outputs(dmodel, cases):
    """diffusers' outputs on each (sample, t, context) case in float32, then in float64 (the model is
    converted to float64 in place, and the sinusoid computed in float64: see the module docstring)."""
    ref32 = [diffusers_forward(dmodel, *case, "float32") for case in cases]
    dmodel.double()
    with float64_timesteps():
        ref64 = [diffusers_forward(dmodel, *case, "float64") for case in cases]
    return ref32, ref64


def refldm_errors(folder, cases, ref32, ref64, free=False):
    """Load the folder in refldm in float64, then float32, and assert the relative errors are within
    1e-10 and 1e-4. With free=True each model is freed as soon as it is done with (the quarter-width
    full configs); gc.collect is slow enough to leave out for the tiny ones.
    Returns the worst (float32, float64) relative errors."""
    worst = {}
    for dtype, refs, tol in (("float64", ref64, TOL64), ("float32", ref32, TOL32)):
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype)
        errs = []
        for case, ref in zip(cases, refs):
            out = refldm_forward(unet, *case, dtype)
            assert out.shape == ref.shape
            errs.append(rel_err(out, ref))
        del unet
        if free:
            gc.collect()
        assert max(errs) <= tol, f"{dtype}: relative errors {errs} exceed {tol}"
        worst[dtype] = max(errs)
    return worst["float32"], worst["float64"]


# ---------------------------------------------------------------------------------------------------
# tiny configs drawn by hypothesis
# ---------------------------------------------------------------------------------------------------

@st.composite
def tiny_configs(draw):
    levels = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([2, 4]))
    # at least 2 channels per group: torch refuses a GroupNorm group of a single value (1x1 latents)
    channels = [groups * draw(st.integers(2, 4)) for _ in range(levels)]
    if draw(st.booleans()):  # one head count for all levels: a common divisor
        common = [h for h in (1, 2, 4) if all(c % h == 0 for c in channels)]
        heads = draw(st.sampled_from(common))
    else:
        heads = [draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0])) for c in channels]
    per_level = lambda strategy: st.one_of(strategy, st.lists(strategy, min_size=levels, max_size=levels))  # noqa: E731
    config = dict(
        block_out_channels=channels,
        norm_num_groups=groups,
        attention_head_dim=heads,
        down_block_types=draw(st.lists(st.sampled_from(["CrossAttnDownBlock2D", "DownBlock2D"]),
                                       min_size=levels, max_size=levels)),
        up_block_types=draw(st.lists(st.sampled_from(["CrossAttnUpBlock2D", "UpBlock2D"]),
                                     min_size=levels, max_size=levels)),
        layers_per_block=draw(per_level(st.integers(1, 2))),
        transformer_layers_per_block=draw(per_level(st.integers(1, 2))),
        only_cross_attention=draw(per_level(st.booleans())),
        cross_attention_dim=draw(st.integers(3, 12)),
        use_linear_projection=draw(st.booleans()),
        upcast_attention=draw(st.booleans()),
        flip_sin_to_cos=draw(st.booleans()),
        freq_shift=draw(st.sampled_from([0, 1])),
        center_input_sample=draw(st.booleans()),
        mid_block_scale_factor=draw(st.sampled_from([1.0, 1.4142135623730951])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        downsample_padding=draw(st.sampled_from([0, 1])),
        in_channels=draw(st.integers(1, 4)),
        out_channels=draw(st.integers(1, 4)),
        time_embedding_dim=draw(st.sampled_from([None, 20])),
        conv_in_kernel=draw(st.sampled_from([1, 3])),
        conv_out_kernel=draw(st.sampled_from([3, 5])),
    )
    if isinstance(config["only_cross_attention"], list) and draw(st.booleans()):
        config["mid_block_only_cross_attention"] = True  # ignored by this mid block type, as in diffusers
    return config


@st.composite
def latent_sizes(draw, config):
    """(batch, height, width): any size >= 1 with symmetric downsampling padding (odd sizes too, which
    exercise the upsampling to the skip's size); multiples of 2**(levels-1) with padding 0."""
    levels = len(config["block_out_channels"])
    if config["downsample_padding"] == 0:
        f = 2 ** (levels - 1)
        h, w = f * draw(st.integers(1, 3)), f * draw(st.integers(1, 3))
    else:
        h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    return draw(st.integers(1, 3)), h, w


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_tiny_unet_matches_diffusers_float64_and_float32(data):
    config = data.draw(tiny_configs(), label="config")
    batch, h, w = data.draw(latent_sizes(config), label="batch, height, width")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    per_element = data.draw(st.booleans(), label="per-element timesteps")
    dmodel = build_diffusers_unet(config, seed)
    rng = np.random.default_rng(seed)
    case = make_inputs(rng, batch, config["in_channels"], h, w, data.draw(st.integers(1, 5)),
                       config["cross_attention_dim"], per_element)
    with tempfile.TemporaryDirectory() as folder, torch_threads(1):
        dmodel.save_pretrained(folder, safe_serialization=True)
        refldm_errors(folder, [case], *reference_outputs(dmodel, [case]))


# ---------------------------------------------------------------------------------------------------
# a fixed small config: non-square 64x48 latents, and every backend
# ---------------------------------------------------------------------------------------------------

SMALL = dict(block_out_channels=[32, 64, 64], norm_num_groups=8, attention_head_dim=[1, 2, 4],
             cross_attention_dim=24, layers_per_block=2, sample_size=64,
             down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    """The small config saved by diffusers, with its float32 reference outputs on a 64x48 case."""
    folder = str(tmp_path_factory.mktemp("small_unet"))
    dmodel = build_diffusers_unet(SMALL, seed=3)
    dmodel.save_pretrained(folder, safe_serialization=True)
    case = make_inputs(np.random.default_rng(3), 2, 4, 64, 48, 7, 24)
    return folder, dmodel, case


def test_small_unet_non_square_64x48_matches_diffusers(small_unet):
    folder, dmodel, case = small_unet
    err32, err64 = refldm_errors(folder, [case], *reference_outputs(copy.deepcopy(dmodel), [case]))
    assert err64 <= TOL64 and err32 <= TOL32


def test_small_unet_runs_on_every_backend(small_unet, on_backend):
    """The same float32 result on NumPy, the fake device (catches host/device mixing) and CuPy
    (on a 32x24 crop of the latents, to keep the test quick)."""
    folder, dmodel, (sample, t, context) = small_unet
    sample = np.ascontiguousarray(sample[:, :, :32, :24])
    ref = diffusers_forward(dmodel, sample, t, context, "float32")
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float32")
    out = unet(backend.asarray(sample, "float32"), backend.asarray(t, "float32"),
               backend.asarray(context, "float32"))
    assert type(out).__module__.split(".")[0] == type(backend.asarray(np.zeros(1))).__module__.split(".")[0]
    assert rel_err(backend.to_numpy(out), ref) <= TOL32


def test_scalar_timestep_equals_repeated_per_element_timestep(small_unet):
    folder, _, (sample, _, context) = small_unet
    sample = np.ascontiguousarray(sample[:, :, :16, :16])
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    a = unet(sample, 500, context)
    b = unet(sample, np.full(sample.shape[0], 500.0), context)
    assert np.array_equal(a, b)
    # and each batch element only sees its own timestep: element 0 alone gives the same answer
    c = unet(sample[:1], np.array([500.0]), context[:1])
    assert rel_err(c, a[:1]) <= TOL64


def test_batch_parallel_path_matches_the_serial_path_and_traces_whole_batches(small_unet):
    """On the host with 2 threads a batch of 2 runs as two halves on the pool; with 1 thread, as one
    batch. Same result; and a recorded trace sees each module once, with the whole batch."""
    from refldm.crosscheck import trace

    folder, _, (sample, t, context) = small_unet
    sample = np.ascontiguousarray(sample[:, :, :16, :16])
    unet = UNet2DConditionModel.from_pretrained(folder, dtype="float64")
    before = accel.num_threads()
    try:
        accel.set_num_threads(2)
        parallel = unet(sample, t, context)
        with trace.record() as rec:
            traced = unet(sample, t, context)
        accel.set_num_threads(1)
        serial = unet(sample, t, context)
    finally:
        accel.set_num_threads(before)
    assert rel_err(parallel, serial) <= TOL64
    assert rel_err(traced, serial) <= TOL64
    assert rec.activations["conv_out"].shape == serial.shape
    assert "conv_out#2" not in rec.activations
    # the 1x1-conv proj_in (SMALL is an SD 1.x-style config) is recorded on the map, as in diffusers
    assert rec.activations["down_blocks.0.attentions.0.proj_in"].shape == (2, 32, 16, 16)


# ---------------------------------------------------------------------------------------------------
# the full-size SD 1.x and SD 2.x configs: their size counted, their arithmetic at a quarter of the width
# ---------------------------------------------------------------------------------------------------

NARROW = 4  # block_out_channels / NARROW for the agreement runs of the full configs


def _full_size_check(config, cases, seed):
    """The full config's parameter count, and its agreement with diffusers at 1/NARROW of the width.

    Counting takes no memory: diffusers builds the full-size model on the meta device and refldm counts
    its declared shapes. The agreement (float64 <= 1e-10, float32 <= 1e-4) runs on the same config with
    block_out_channels divided by NARROW and 8 GroupNorm groups: the same depth, block types, heads per
    level, projections, upcasting and context width, 1/16 of the weights. (At full width the float64
    copies held ~11 GB at once; this keeps the suite under 4 GB, docs/contributing.md.)"""
    torch = require("torch")
    diffusers = require("diffusers")
    with torch.device("meta"):
        full = diffusers.UNet2DConditionModel(**config)
    count = sum(p.numel() for p in full.parameters())
    assert UNet2DConditionModel.from_config(full.config).num_parameters() == count  # declared shapes, no arrays
    narrow = {**config, "block_out_channels": [c // NARROW for c in full.config.block_out_channels],
              "norm_num_groups": 8}
    dmodel = build_diffusers_unet(narrow, seed)
    with tempfile.TemporaryDirectory() as folder:
        dmodel.save_pretrained(folder, safe_serialization=True)
        refs = reference_outputs(dmodel, cases)
        del dmodel
        gc.collect()
        errs = refldm_errors(folder, cases, *refs, free=True)
    return count, errs


def test_sd1_full_config_parameter_count_and_agreement():
    rng = np.random.default_rng(11)
    cases = [make_inputs(rng, 2, 4, 8, 16, 77, 768)]  # small non-square latents keep CI time down
    count, _ = _full_size_check(SD1, cases, seed=11)
    assert count == SD1_PARAMETERS


def test_sd2_full_config_linear_projection_per_level_heads():
    rng = np.random.default_rng(12)
    cases = [make_inputs(rng, 3, 4, 16, 8, 77, 1024), make_inputs(rng, 1, 4, 8, 8, 77, 1024, per_element=False)]
    count, _ = _full_size_check(SD2, cases, seed=12)
    assert count == SD2_PARAMETERS


# ---------------------------------------------------------------------------------------------------
# configs and errors
# ---------------------------------------------------------------------------------------------------

def test_default_config_is_sd1_layout_without_weights():
    unet = UNet2DConditionModel.from_config({"cross_attention_dim": 768})
    assert unet.num_parameters() == SD1_PARAMETERS
    keys = [k for k, *_ in unet.params()]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight" in keys
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.bias" in keys
    assert "mid_block.attentions.0.proj_in.weight" in keys
    assert "up_blocks.0.upsamplers.0.conv.weight" in keys


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("num_attention_heads", 8),
    ("dual_cross_attention", True),
    ("time_cond_proj_dim", 256),
    ("encoder_hid_dim", 1024),
    ("a_key_from_the_future", 1),
])
def test_unimplemented_config_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        UNet2DConditionModel.from_config({key: value})


@pytest.mark.parametrize("key, value", [
    ("attention_head_dim", [8, 8, 7, 8]),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"]),
    ("layers_per_block", [2, 2]),
    ("act_fn", "gelu"),
    ("conv_in_kernel", 4),
])
def test_inconsistent_config_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        UNet2DConditionModel.from_config({key: value})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    config = dict(block_out_channels=[8, 8], norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6,
                  layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], upcast_attention=True,
                  use_linear_projection=True)  # SD 2.x-style: float16 runs the attention in float32
    folder = str(tmp_path_factory.mktemp("tiny_unet"))
    build_diffusers_unet(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_bad_inputs_are_errors_naming_the_input(tiny_folder):
    unet = UNet2DConditionModel.from_pretrained(tiny_folder, dtype="float64")
    x, c = np.zeros((2, 4, 8, 8)), np.zeros((2, 3, 6))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(x, 1, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="timestep"):
        unet(x, np.array([1.0, 2.0, 3.0]), c)
    with pytest.raises(ValueError, match="sample"):
        unet(np.zeros((2, 3, 8, 8)), 1, c)
    with pytest.raises(ValueError, match="float32"):
        unet(x.astype(np.float32), 1, c.astype(np.float32))


def test_missing_weight_is_an_error_naming_the_key(tiny_folder, tmp_path):
    from refldm.checkpoints.weights import load_file, save_file

    state = load_file(os.path.join(tiny_folder, "diffusion_pytorch_model.safetensors"))
    del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(open(os.path.join(tiny_folder, "config.json")).read())
    with pytest.raises(WeightsError, match="attn2.to_v.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_float16_runs_and_stays_close_to_float64(tiny_folder):
    """float16 weights and activations, the sinusoid in float32: a sanity bound, not an agreement test."""
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((1, 4, 8, 8)), rng.standard_normal((1, 3, 6))
    ref = UNet2DConditionModel.from_pretrained(tiny_folder, dtype="float64")(x, 999, c)
    out = UNet2DConditionModel.from_pretrained(tiny_folder, dtype="float16")(
        x.astype(np.float16), 999, c.astype(np.float16))
    assert out.dtype == np.float16
    assert rel_err(out, ref) <= 2e-2
