"""The cross-checking toolkit: recording (`refldm.core.record`), trace files and tracing (`refldm.crosscheck.trace`),
comparison (`refldm.crosscheck.compare`), and refldm-vs-diffusers layer by layer.

Agreement tests: a random-weight tiny VAE and UNet are built in diffusers, saved, traced in refldm
(float64) and in diffusers with forward hooks (tools/trace_diffusers.py) on the same inputs; every
layer must agree to relative error max|a-b|/max|b| <= 1e-10 (float64). Then one weight of one layer
is corrupted in the saved checkpoint and the comparison must name exactly that layer as the first
one over tolerance.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.core import record
from refldm.crosscheck import trace
from refldm.cli import main as cli_main
from refldm.crosscheck.compare import compare, layer_error
from refldm.core.nn import Module, ModuleList
from refldm.checkpoints.weights import load_file, save_file
from tests.conftest import require

F64_RTOL = 1e-10  # float64 agreement: max|a-b| / max|b|


# ---------------------------------------------------------------------------------------------------
# recording


class Scale(Module):
    def __init__(self, k):
        self.k = k

    def forward(self, x):
        return x * self.k


class Pair(Module):
    def forward(self, x):
        return (x + 1, x - 1)  # a tuple: the first element stands for the output


class Net(Module):
    def __init__(self):
        self.layers = ModuleList([Scale(2.0), Scale(3.0)])
        self.pair = Pair()
        self.assign_names()

    def forward(self, x):
        x = self.layers[0](x)
        x = self.layers[1](x)
        x = self.layers[0](x)  # called again: recorded as layers.0#2
        return self.pair(x)[0]


def test_recorder_names_are_key_prefixes_in_execution_order_with_call_counts():
    net, x = Net(), np.arange(3.0)
    with trace.record() as t:
        net(x)
    assert list(t.activations) == ["layers.0", "layers.1", "layers.0#2", "pair", "<root>"]
    np.testing.assert_array_equal(t.activations["layers.0#2"], x * 12)
    np.testing.assert_array_equal(t.activations["pair"], x * 12 + 1)
    assert record.recorder is None  # switched off again on exit


def test_recorded_arrays_are_copies_not_views():
    class InPlace(Module):
        def __init__(self):
            self.s = Scale(1.0)
            self.assign_names()

        def forward(self, x):
            y = self.s(x)
            y += 100  # a later in-place update must not change what was recorded
            return y

    with trace.record() as t:
        InPlace()(np.zeros(2))
    np.testing.assert_array_equal(t.activations["s"], np.zeros(2))


def test_tracing_off_records_nothing_and_nested_recorders_restore():
    net, x = Net(), np.ones(2)
    net(x)
    assert record.recorder is None
    with trace.record() as outer:
        with trace.record() as inner:
            net(x)
        assert record.recorder is outer
        net(x)
    assert record.recorder is None
    assert len(inner.activations) == 5 and len(outer.activations) == 5
    with outer:  # the same recorder entered twice
        with outer:
            pass
        assert record.recorder is outer
    assert record.recorder is None


def test_include_scope_and_note():
    net, x = Net(), np.ones(2)
    with trace.record(include=["unet.layers.*", "steps.*"]) as t:
        with record.scope("unet"):
            net(x)
        for i in range(2):
            record.value(f"steps.{i}.latents", x * i)
            record.value("dropped", x)  # does not match include
    assert list(t.activations) == ["unet.layers.0", "unet.layers.1", "unet.layers.0#2",
                                   "steps.0.latents", "steps.1.latents"]
    with record.scope("free"):  # no recorder: a no-op
        record.value("nothing", x)


def test_trace_keeps_the_recording_names_it_always_exported():
    """`refldm.crosscheck.trace` started recordings before the hook moved to `refldm.core.record`; its names still work."""
    assert trace.Recorder is record.Recorder and trace.note is record.value and trace.scope is record.scope
    assert trace.main_array is record.main_array and trace.ROOT == record.ROOT == "<root>"
    assert trace.recorder is None
    with trace.record() as t:
        assert trace.recorder is t is record.recorder and record.active()
    assert trace.recorder is None and not record.active()
    with pytest.raises(AttributeError):
        trace.no_such_name


def test_main_array_picks_the_array_that_stands_for_an_output():
    class Out:
        def __init__(self, a):
            self.last_hidden_state = a

    a = np.zeros(3)
    assert record.main_array(a) is a
    assert record.main_array((a, np.ones(2))) is a
    assert record.main_array(Out(a)) is a
    assert record.main_array("text") is None and record.main_array(()) is None and record.main_array(None) is None
    assert record.main_array(7).dtype == np.float64 and record.main_array(True) is None  # a timestep; not a flag


# ---------------------------------------------------------------------------------------------------
# trace files


def test_trace_file_round_trips_and_is_readable_without_refldm(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    acts = {"z.last": np.arange(4.0).reshape(2, 2), "a.first": np.ones(3, np.float32), "m#2": np.zeros(1)}
    inputs = {"sample": np.full((1, 2), 0.5), "input_ids": np.arange(3, dtype=np.int64)}
    path = tmp_path / "t.safetensors"
    trace.save(path, acts, inputs, part="unet", dtype="float64", config={"in_channels": 4})

    plain = safetensors_numpy.load_file(str(path))  # the safetensors package alone reads it
    assert set(plain) == {"z.last", "a.first", "m#2", "input/sample", "input/input_ids"}
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert json.loads(meta["order"]) == ["z.last", "a.first", "m#2"]
    assert json.loads(meta["config"]) == {"in_channels": 4} and meta["dtype"] == "float64"

    back = trace.load(path)
    assert list(back.activations) == ["z.last", "a.first", "m#2"]  # execution order, not sorted
    assert back.activations["a.first"].dtype == np.float32
    np.testing.assert_array_equal(back.inputs["input_ids"], inputs["input_ids"])
    assert back.config() == {"in_channels": 4} and back.metadata["part"] == "unet"


def test_trace_file_rejects_an_order_naming_a_missing_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"a": np.zeros(1)}, path, {"order": json.dumps(["a", "b"])})
    with pytest.raises(ValueError, match="'b'"):
        trace.load(path)


# ---------------------------------------------------------------------------------------------------
# comparison


def _chain(n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"layer.{i}": rng.standard_normal((2, 3)) for i in range(n)}


def test_compare_identical_traces_is_exact():
    a = _chain(5)
    r = compare(a, {k: v.copy() for k, v in a.items()}, rtol=0.0)
    assert r.ok and len(r.rows) == 5 and all(row.rel == 0 for row in r.rows)
    assert r.first_bad is None and r.fastest_growth is None
    assert "0 over tolerance" in r.summary()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), data=st.data(), size=st.floats(1e-8, 1e3))
def test_compare_finds_the_first_perturbed_layer(n, data, size):
    k = data.draw(st.integers(0, n - 1))
    ref = _chain(n, seed=n)
    bad = {name: v.copy() for name, v in ref.items()}
    names = list(ref)
    for name in names[k:]:  # the error enters at layer k and is carried on
        bad[name] = bad[name] + size * np.abs(ref[name]).max() * (1 + names.index(name))
    r = compare(bad, ref, rtol=size / 2)
    assert r.first_bad.name == names[k] and r.first_bad.index == k
    assert r.worst.name == names[-1]
    assert all(not row.over for row in r.rows[:k])
    if k > 0:
        assert r.fastest_growth.name == names[k] and math.isinf(r.fastest_growth.growth)


def test_compare_relative_error_is_max_abs_over_max_reference():
    max_abs, max_ref, rel, _ = layer_error(np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    assert (max_abs, max_ref, rel) == (0.5, 2.0, 0.25)
    assert layer_error(np.zeros(2), np.zeros(2))[2] == 0.0
    assert math.isinf(layer_error(np.ones(2), np.zeros(2))[2])


def test_compare_flags_shapes_non_finite_values_and_missing_layers():
    a = {"x": np.zeros((2, 3)), "y": np.array([1.0, np.nan]), "v": np.arange(6.0).reshape(1, 2, 3),
         "only_a": np.zeros(1)}
    b = {"x": np.zeros((3, 3)), "y": np.array([1.0, 2.0]), "v": np.arange(6.0).reshape(1, 2, 1, 3),
         "only_b": np.zeros(1)}
    r = compare(a, b)
    rows = {row.name: row for row in r.rows}
    assert rows["x"].over and "shape" in rows["x"].note
    assert rows["y"].over and "non-finite" in rows["y"].note
    assert not rows["v"].over and "compared flat" in rows["v"].note  # same values, another view
    assert r.only_a == ["only_a"] and r.only_b == ["only_b"]
    assert r.first_bad.name == "x"
    with pytest.raises(ValueError, match="traces vae-decode but .* traces unet"):
        compare(trace.Trace(a, metadata={"part": "vae-decode"}), trace.Trace(b, metadata={"part": "unet"}))
    same_nan = compare({"y": np.array([np.nan, 1.0])}, {"y": np.array([np.nan, 1.0])}, rtol=0)
    assert same_nan.ok


# ---------------------------------------------------------------------------------------------------
# refldm against diffusers, layer by layer, in float64


def _rerandomise(torch, model, seed, std):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16)
    _rerandomise(torch, vae, 1, 0.1)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    torch = require("torch")
    diffusers = require("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    _rerandomise(torch, unet, 2, 0.1)
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder)
    return str(folder)


def _diffusers_tool():
    require("torch")
    require("diffusers")
    from tools import trace_diffusers

    return trace_diffusers


def _corrupt_copy(folder, key, dst):
    """Copy a model folder, nudging one element of weight `key` by a relative 1e-6."""
    shutil.copytree(folder, dst)
    path = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    w = state[key].copy()
    w.flat[0] += 1e-6 * float(np.abs(w).max())
    state[key] = w
    save_file(state, path)
    return dst


def _assert_layers_agree(ours, theirs, min_layers):
    r = compare(ours, theirs, rtol=F64_RTOL)
    assert not r.only_a, f"refldm records layers diffusers does not have: {r.only_a[:5]}"
    assert len(r.rows) >= min_layers, r.summary()
    assert r.ok, r.summary()
    return r


@pytest.mark.parametrize("part", ["vae-encode", "vae-decode"])
def test_vae_trace_matches_diffusers_layer_by_layer_in_float64(tiny_vae, part):
    tool = _diffusers_tool()
    ours = trace.trace_part(tiny_vae, part, dtype="float64", seed=3, height=16 if part == "vae-encode" else 4,
                            width=16 if part == "vae-encode" else 4)
    theirs = tool.trace_like(ours, folder=tiny_vae)
    r = _assert_layers_agree(ours, theirs, min_layers=30)
    prefix = "encoder." if part == "vae-encode" else "decoder."
    assert sum(row.name.startswith(prefix) for row in r.rows) >= 25


def test_corrupted_vae_weight_is_found_at_exactly_that_layer(tiny_vae, tmp_path, capsys):
    tool = _diffusers_tool()
    layer = "decoder.up_blocks.0.resnets.1.conv1"
    bad = _corrupt_copy(tiny_vae, layer + ".weight", tmp_path / "bad_vae")
    golden, mine = tmp_path / "golden.safetensors", tmp_path / "mine.safetensors"
    assert cli_main([  # the reference: diffusers' trace on refldm's inputs, written by the tool
        "trace", tiny_vae, "--part", "vae-decode", "--dtype", "float64", "--height", "4", "--width", "4",
        "-o", str(mine)]) == 0
    assert tool.main([str(mine), tiny_vae, "-o", str(golden), "--summary"]) == 0  # clean: all agree
    assert cli_main(["trace", str(bad), "--part", "vae-decode", "--dtype", "float64", "--inputs", str(golden),
                     "-o", str(mine)]) == 0
    capsys.readouterr()
    assert cli_main(["compare", str(mine), str(golden), "--rtol", str(F64_RTOL)]) == 1
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "<-- first over tolerance" in line]
    assert len(marked) == 1 and marked[0].split()[4] == layer
    r = compare(mine, golden, rtol=F64_RTOL)
    assert r.first_bad.name == layer
    assert f"first over tolerance: #{r.first_bad.index} {layer} " in out


def test_unet_trace_matches_diffusers_layer_by_layer_in_float64(tiny_unet):
    tool = _diffusers_tool()
    ours = trace.trace_part(tiny_unet, "unet", dtype="float64", seed=4, seq_len=5, timestep=421.0)
    theirs = tool.trace_like(ours, folder=tiny_unet)  # diffusers' timestep embedding patched to float64
    r = _assert_layers_agree(ours, theirs, min_layers=60)
    names = {row.name for row in r.rows}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in names
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in names
    assert "up_blocks.1.attentions.1.transformer_blocks.0.ff" in names
    assert "<root>" in names
    # the transformer's proj_in / proj_out are recorded on their own and match (docs/crosscheck.md, section 4)
    assert {"down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.1.proj_out"} <= names


def test_corrupted_unet_weight_is_found_at_exactly_that_layer(tiny_unet, tmp_path):
    tool = _diffusers_tool()
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    bad = _corrupt_copy(tiny_unet, layer + ".weight", tmp_path / "bad_unet")
    theirs = tool.trace_like(trace.trace_part(tiny_unet, "unet", dtype="float64", seq_len=5, model=None),
                             folder=tiny_unet)
    ours = trace.trace_part(bad, "unet", dtype="float64", inputs=theirs.inputs)
    r = compare(ours, theirs, rtol=F64_RTOL)
    assert r.first_bad is not None and r.first_bad.name == layer, r.summary()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch = require("torch")
    transformers = require("transformers")
    config = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=98,
                                         eos_token_id=99, pad_token_id=1)
    model = transformers.CLIPTextModel(config)
    _rerandomise(torch, model, 3, 0.1)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return str(folder)


def test_text_encoder_trace_matches_transformers_layer_by_layer_in_float64(tiny_clip):
    tool = _diffusers_tool()
    require("transformers")
    ours = trace.trace_part(tiny_clip, "text-encoder", dtype="float64", seed=5, batch=2)
    theirs = tool.trace_like(ours, folder=tiny_clip)
    r = _assert_layers_agree(ours, theirs, min_layers=25)
    names = [row.name for row in r.rows]
    assert "encoder.layers.1.self_attn.out_proj" in names and "encoder" in names and "final_layer_norm" in names


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["trace", str(tmp_path / "nope"), "--part", "unet", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refldm: error:") and "nope" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 2


# ---------------------------------------------------------------------------------------------------
# per-step pipeline traces: a wrong U-Net and a wrong scheduler show at different names


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from tests.test_pipeline import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp("sd"))
    from refldm.pipelines.sd import StableDiffusionPipeline

    return folder, StableDiffusionPipeline.from_pretrained(folder, dtype="float64")


STEP_NAMES = ["timestep", "model_input", "noise_pred", "latents", "guided", "prev_sample", "pred_original_sample"]


def test_pipeline_trace_records_every_step_and_reloads(tiny_pipeline, tmp_path):
    folder, _ = tiny_pipeline
    out = tmp_path / "pipe.safetensors"
    assert cli_main(["trace", folder, "--part", "pipeline", "--dtype", "float64", "--steps", "3", "--height", "32",
                     "--width", "32", "--prompt", "a red circle", "-o", str(out)]) == 0
    t = trace.load(out)
    expected = ["text_encoder", "text_encoder#2"] + [f"steps.{i}.{n}" for i in range(3) for n in STEP_NAMES]
    assert [n for n in t.activations if n != "vae.decoder"] == expected
    assert t.activations["steps.0.model_input"].shape[0] == 2  # the CFG batch [uncond; cond]
    assert t.activations["steps.0.guided"].shape[0] == 1
    np.testing.assert_array_equal(t.activations["steps.1.latents"], t.activations["steps.0.prev_sample"])
    assert t.metadata["prompt"] == "a red circle" and t.inputs["noise"].shape == (1, 4, 8, 8)


def _layers(run) -> set:
    """The names a model records when run on its own (its layers; its own output, <root>, left out)."""
    with trace.record() as rec:
        run()
    return {record.base_name(n) for n in rec.activations} - {record.ROOT}


def _under(names, prefix):
    """The names recorded under `prefix.`, without it and without the ``#n`` suffix."""
    return {record.base_name(n)[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")}


def test_a_plain_recording_of_a_pipeline_call_names_every_part_and_step(tiny_pipeline):
    """The sampler and the pipeline name what they record themselves (`refldm.core.record` calls in
    refldm/pipelines/sampling.py and refldm/pipelines/sd.py): a plain recording around an ordinary call, with no
    `trace_pipeline`, gives every step's values and every layer of every part, under the names that
    tools/trace_diffusers.py gives diffusers' modules. A renamed scope or value fails here."""
    _, pipe = tiny_pipeline
    with trace.record(include=["*"]) as rec:
        pipe("a red circle", height=32, width=32, num_inference_steps=2, seed=0, progress=False)
    names, acts = list(rec.activations), rec.activations
    context = np.concatenate([acts["text_encoder#2"], acts["text_encoder"]])  # [uncond; cond]
    for i in range(2):
        step = [n[len(f"steps.{i}."):] for n in names if n.startswith(f"steps.{i}.")]
        assert [n for n in step if not n.startswith("unet")] == STEP_NAMES
        assert "unet" in step  # the U-Net's own output, under the scope's name
        unet_alone = _layers(lambda: pipe.unet(acts[f"steps.{i}.model_input"], acts[f"steps.{i}.timestep"], context))
        assert _under(names, f"steps.{i}.unet") == unet_alone and len(unet_alone) > 100
    assert not [n for n in names if not n.startswith(("text_encoder", "steps.", "vae."))], names
    assert "text_encoder" in names and "text_encoder#2" in names  # the prompt's pass, then the negative's
    assert _under(names, "text_encoder") == _layers(lambda: pipe.text_encoder(pipe.tokenize(["a red circle"])))
    decoder_alone = _layers(lambda: pipe.vae.decode(acts["steps.1.prev_sample"]))
    assert _under(names, "vae") == decoder_alone and "decoder.conv_out" in decoder_alone

    # trace_pipeline records exactly what the plain recording does: it adds no names of its own
    traced = trace.trace_pipeline(pipe=pipe, prompt="a red circle", steps=2, height=32, width=32, include=["*"])
    assert list(traced.activations) == names

    # image to image: the encoder's layers under vae. too, and only the steps that strength leaves
    image = np.zeros((32, 32, 3), np.uint8)
    with trace.record(include=["vae.*", "steps.*.guided"]) as rec:
        pipe("a red circle", image=image, strength=0.5, num_inference_steps=4, seed=0, progress=False)
    encoder_alone = _layers(lambda: pipe.vae.encode(pipe.preprocess_image(image)))
    assert "encoder.conv_out" in encoder_alone and not encoder_alone & decoder_alone
    assert _under(rec.activations, "vae") == encoder_alone | decoder_alone  # encode, then the final decode
    assert [n for n in rec.activations if n.startswith("steps.")] == ["steps.0.guided", "steps.1.guided"]


def test_tracing_never_swaps_a_pipeline_attribute(tiny_pipeline, monkeypatch):
    """Tracing runs the pipeline as it is: no attribute of it is set, replaced or deleted, before, during
    or after (the pipeline of old had its unet, text_encoder, vae and make_scheduler swapped for wrappers)."""
    _, pipe = tiny_pipeline
    cls = type(pipe)
    changes = []

    def setattr_(self, key, value):
        changes.append(("set", key))
        object.__setattr__(self, key, value)

    def delattr_(self, key):
        changes.append(("del", key))
        object.__delattr__(self, key)

    before = dict(vars(pipe))
    seen = []  # what the pipeline's parts are while its U-Net runs
    unet_forward = type(pipe.unet).forward

    def forward(self, *args, **kwargs):
        seen.append((pipe.unet, pipe.text_encoder, pipe.vae, type(pipe).make_scheduler, "make_scheduler" in vars(pipe)))
        return unet_forward(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__setattr__", setattr_)
    monkeypatch.setattr(cls, "__delattr__", delattr_)
    monkeypatch.setattr(type(pipe.unet), "forward", forward)
    t = trace.trace_pipeline(pipe=pipe, prompt="a red circle", steps=2, height=32, width=32)
    assert changes == []
    assert vars(pipe).keys() == before.keys() and all(vars(pipe)[k] is v for k, v in before.items())
    assert len(seen) == 2
    assert all(s == (before["unet"], before["text_encoder"], before["vae"], cls.make_scheduler, False) for s in seen)
    assert "steps.1.noise_pred" in t.activations


def test_the_sampler_records_its_steps_without_a_pipeline():
    """`refldm.pipelines.sampling.sample` alone, with a plain function for a model, records the step names."""
    from refldm.pipelines.sampling import sample
    from refldm.schedulers import get_scheduler

    def run():
        sched = get_scheduler("ddim", {"num_train_timesteps": 1000})
        sched.set_timesteps(3)
        return sample(lambda x, t: 0.1 * x, sched, np.ones((1, 4, 2, 2)), guidance_scale=2.0, progress=False), sched

    with trace.record() as rec:
        out, sched = run()
    assert list(rec.activations) == [f"steps.{i}.{n}" for i in range(3) for n in STEP_NAMES]
    np.testing.assert_array_equal(rec.activations["steps.2.prev_sample"], out)
    assert rec.activations["steps.0.timestep"] == float(sched.timesteps[0])
    assert rec.activations["steps.0.timestep"].dtype == np.float64
    assert rec.activations["steps.0.model_input"].shape == (2, 4, 2, 2)  # the CFG batch
    assert record.recorder is None
    np.testing.assert_array_equal(run()[0], out)  # recording changes nothing


def test_pipeline_trace_tells_a_wrong_unet_from_a_wrong_scheduler(tiny_pipeline, monkeypatch):
    _, pipe = tiny_pipeline
    kwargs = {"prompt": "a red circle", "steps": 2, "height": 32, "width": 32, "seed": 1}
    clean = trace.trace_pipeline(pipe=pipe, **kwargs)

    w = pipe.unet.up_blocks[1].resnets[0].conv1.weight
    saved = w.copy()
    w[0, 0, 0, 0] += 1e-6
    try:
        wrong_unet = compare(trace.trace_pipeline(pipe=pipe, **kwargs), clean, rtol=F64_RTOL)
    finally:
        w[...] = saved
    assert wrong_unet.first_bad.name == "steps.0.noise_pred", wrong_unet.summary()

    make = type(pipe).make_scheduler

    class OffByOne:  # a scheduler whose update is wrong by a relative 1e-6
        def __init__(self, inner):
            self.inner = inner

        def step(self, *args, **kw):
            out = self.inner.step(*args, **kw)
            out.prev_sample = out.prev_sample * (1 + 1e-6)
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(type(pipe), "make_scheduler", lambda self, *a, **k: OffByOne(make(self, *a, **k)))
    wrong_scheduler = compare(trace.trace_pipeline(pipe=pipe, **kwargs), clean, rtol=F64_RTOL)
    rows = {r.name: r for r in wrong_scheduler.rows}
    assert wrong_scheduler.first_bad.name == "steps.0.prev_sample", wrong_scheduler.summary()
    assert rows["steps.0.noise_pred"].rel == 0 and rows["steps.0.guided"].rel == 0
    assert rows["steps.1.noise_pred"].over  # the next step's U-Net sees the wrong latents


def test_tracing_works_on_every_backend_and_gives_host_arrays(tiny_vae, on_backend):
    from refldm import backend

    t = trace.trace_part(tiny_vae, "vae-decode", dtype="float64", height=4, width=4)
    assert all(type(a) is np.ndarray for a in t.activations.values())
    assert t.metadata["backend"] == on_backend
    with backend.use("numpy"):
        reference = trace.trace_part(tiny_vae, "vae-decode", dtype="float64", height=4, width=4)
    assert list(t.activations) == list(reference.activations)
    assert compare(t, reference, rtol=F64_RTOL).ok


def test_pipeline_trace_matches_diffusers_step_by_step_in_float64(tiny_pipeline):
    """Every text-encoder layer, every U-Net layer at every step, every scheduler output and the decode.

    diffusers builds its DDIM tables and timestep embedding in float32; the tool recomputes both in
    float64 (the same formulas), so the comparison measures the implementations at float64 precision.
    """
    tool = _diffusers_tool()
    require("transformers")
    folder, pipe = tiny_pipeline
    ours = trace.trace_pipeline(pipe=pipe, prompt="a red circle", negative_prompt="a blue square", steps=2,
                                height=32, width=32, seed=7, include=["*"])
    theirs = tool.trace_pipeline_like(ours, folder)
    r = _assert_layers_agree(ours, theirs, min_layers=500)
    names = {row.name for row in r.rows}
    for i in range(2):
        assert {f"steps.{i}.{n}" for n in STEP_NAMES} <= names
    assert "steps.1.unet.mid_block.attentions.0.transformer_blocks.0.attn2" in names
    assert "text_encoder#2" in names and "vae.decoder.conv_out" in names
