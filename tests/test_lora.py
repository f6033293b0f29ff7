"""LoRA (refldm/adapters/lora.py): the same outputs as diffusers' load_lora_weights + set_adapters / fuse_lora.

The tiny random-weight SD folder of tests/test_pipeline.py gets two LoRA files written here:
- diffusers / PEFT format: peft's LoraConfig adapters (random A and B, init_lora_weights=False) on the
  U-Net (attention, GEGLU, 3x3 and 1x1 convolutions, time_emb_proj) and the text encoder, saved with
  diffusers' ``save_lora_weights`` with the LoraConfig as metadata (lora_alpha != r, an alpha_pattern);
- kohya / A1111 format: ``lora_unet_*`` / ``lora_te_*`` tensors written directly, LoCon with 3x3 and 1x1
  down kernels, ranks 2 and 3, one ``.alpha`` for all modules. (diffusers 0.42 gives every module of a
  kohya file the most common alpha: its alpha_pattern keys for the others match no module, and peft
  warns and ignores them. refldm uses each module's own alpha, as kohya and the web UI do;
  test_alpha_rules checks that rule.) Its text-encoder layers are the MLP's: diffusers 0.42 renames
  kohya's ``self_attn_k_proj`` to ``self_attn.to_k_lora``, which matches nothing in transformers 5's
  model, and drops those weights with a load report; test_kohya_and_diffusers_names_agree covers them.
Tolerances: float64 U-Net and text-encoder outputs within 1e-10 relative (max |a - b| / max |b|); the
float32 8-bit image identical to diffusers' within the pipeline tests' 2/255 (here it must be equal in
at least 99% of the values and never more than 2 apart).

peft >= 0.22 is not on this machine's package index; transformers 5.24 checks for it before loading a
text-encoder adapter, although peft 0.21 does the work correctly (checked: scale 0 gives the base
output bit for bit). The test lifts that version check only when an older peft is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import build_tiny_sd

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv_shortcut", "time_emb_proj"]
TE_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1"]
SCALES = (0.7, -0.4)  # the two files' scales in set_adapters / apply_loras
PROMPT_IDS = [[300, 301, 302, 303, 304]]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("lora") / "tiny-sd", kind="sd1", seed=0)


def _allow_old_peft():
    peft = require("peft")
    if tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22):
        import transformers.integrations.peft as tpeft
        tpeft.check_peft_version = lambda min_version: None


@pytest.fixture(scope="module")
def files(folder, tmp_path_factory):
    """{"diffusers": path, "kohya": path} of two LoRA files for the tiny folder."""
    torch = require("torch")
    diffusers = require("diffusers")
    peft = require("peft")
    from peft.utils import get_peft_model_state_dict
    out = tmp_path_factory.mktemp("lora-files")
    torch.manual_seed(5)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ucfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False,
                           alpha_pattern={"time_emb_proj": 2})
    tcfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(ucfg)
    peft.inject_adapter_in_model(tcfg, pipe.text_encoder)
    with torch.no_grad():  # peft's random init of B is small; make each LoRA change the outputs visibly
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape) * 0.3 / p.shape[1] ** 0.5)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out / "dif", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())

    # kohya: module names from the refldm models, "." -> "_"
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.adapters.lora import _layers_of
    unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet")
    te = CLIPTextModel.from_pretrained(f"{folder}/text_encoder")
    rng = np.random.default_rng(7)
    tensors = {}
    chosen = [k for k in _layers_of(unet) if k.endswith(("attn1.to_k", "attn2.to_v", "to_out.0", "ff.net.0.proj",
                                                        "conv2", "conv_shortcut", "proj_out"))]
    for i, key in enumerate(chosen + ["te:" + k for k in _layers_of(te) if k.endswith(("fc1", "fc2"))]):
        model, key = (te, key[3:]) if key.startswith("te:") else (unet, key)
        w = dict(_layers_of(model))[key].weight
        rank = 3 if i % 2 else 2
        if w.ndim == 2:
            down, up = rng.normal(size=(rank, w.shape[1])) / w.shape[1] ** 0.5, rng.normal(size=(w.shape[0], rank))
        else:  # LoCon: a down kernel of the layer's size (3x3 or 1x1), a 1x1 up kernel
            down = rng.normal(size=(rank,) + w.shape[1:]) / (w[0].size ** 0.5)
            up = rng.normal(size=(w.shape[0], rank, 1, 1))
        name = ("lora_te_text_model_" if model is te else "lora_unet_") + key.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down.astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (0.3 * up / rank ** 0.5).astype(np.float32)
        tensors[f"{name}.alpha"] = np.asarray(1.5, dtype=np.float32)  # one alpha for all (see below)
    from refldm.checkpoints.weights import save_file
    save_file(tensors, out / "kohya.safetensors")
    return {"diffusers": str(out / "dif" / "pytorch_lora_weights.safetensors"), "kohya": str(out / "kohya.safetensors")}


@pytest.fixture(scope="module")
def reference64(folder, files):
    """diffusers in float64 with both LoRAs loaded as adapters "d" and "k"."""
    torch = require("torch")
    diffusers = require("diffusers")
    _allow_old_peft()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.load_lora_weights(files["diffusers"], adapter_name="d")
    pipe.load_lora_weights(files["kohya"], adapter_name="k")
    pipe.to(torch.float64)  # after loading, so that the LoRA weights are float64 too
    for model in (pipe.unet, pipe.text_encoder):
        assert all(p.dtype == torch.float64 for p in model.parameters())
    return pipe


def _inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 8, 8))
    ctx_ids = np.asarray(PROMPT_IDS)
    return x, ctx_ids


def _torch_outputs(pipe, x, ids):
    """diffusers' text encoder and U-Net outputs; the U-Net's sinusoid in float64 (diffusers computes it in
    float32 whatever the model's dtype; tests/test_unet.py explains the same patch)."""
    torch = require("torch")
    from tools.trace_diffusers import float64_timestep_embedding
    with torch.no_grad(), float64_timestep_embedding():
        hidden = pipe.text_encoder(torch.from_numpy(ids))[0]
        eps = pipe.unet(torch.from_numpy(x), 500, encoder_hidden_states=hidden.expand(2, -1, -1)).sample
    return hidden.numpy(), eps.numpy()


def _refldm_outputs(pipe, x, ids):
    hidden = pipe.text_encoder(ids).last_hidden_state
    eps = pipe.unet(x, 500, np.concatenate([hidden, hidden]))
    return np.asarray(hidden), np.asarray(eps)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("which, merge", [("diffusers", False), ("kohya", False), ("both", False),
                                          ("both", True)])
def test_lora_matches_diffusers_in_float64(folder, files, reference64, which, merge):
    """Adapters at their scales: text encoder and U-Net outputs within 1e-10 relative of diffusers'."""
    from refldm.adapters.lora import apply_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    names = {"diffusers": ["d"], "kohya": ["k"], "both": ["d", "k"]}[which]
    scales = [SCALES[0] if n == "d" else SCALES[1] for n in names]
    reference64.set_adapters(names, scales)
    x, ids = _inputs()
    ref_h, ref_eps = _torch_outputs(reference64, x, ids)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    base_h, base_eps = _refldm_outputs(pipe, x, ids)
    apply_loras(pipe, [(files["diffusers" if n == "d" else "kohya"], s) for n, s in zip(names, scales)],
                merge=merge)
    h, eps = _refldm_outputs(pipe, x, ids)
    assert _rel(base_eps, ref_eps) > 1e-3 and _rel(base_h, ref_h) > 1e-3  # the LoRAs change both outputs
    assert _rel(h, ref_h) <= 1e-10
    assert _rel(eps, ref_eps) <= 1e-10


def test_fuse_lora_matches_merge(folder, files, reference64):
    """diffusers' fuse_lora(lora_scale=s) on one adapter equals apply_loras(merge=True) at scale s."""
    from refldm.adapters.lora import apply_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    reference64.set_adapters(["d"], [1.0])
    reference64.fuse_lora(lora_scale=0.5, adapter_names=["d"])
    try:
        reference64.set_adapters(["d"], [0.0])  # the fused weights alone
        x, ids = _inputs()
        ref_h, ref_eps = _torch_outputs(reference64, x, ids)
    finally:
        reference64.unfuse_lora()
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    apply_loras(pipe, [(files["diffusers"], 0.5)], merge=True)
    h, eps = _refldm_outputs(pipe, x, ids)
    assert _rel(h, ref_h) <= 1e-10 and _rel(eps, ref_eps) <= 1e-10


def test_unmerge_restores_every_weight_bit_for_bit(folder, files):
    from refldm.adapters.lora import adapted_layers, apply_loras, remove_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    before = {p: {k: v.copy() for k, v in getattr(pipe, p).state_dict().items()} for p in ("unet", "text_encoder")}
    apply_loras(pipe, [(files["diffusers"], 0.7), (files["kohya"], -0.4)], merge=True)
    apply_loras(pipe, [(files["kohya"], 0.3)], merge=False)
    changed = sum(not np.array_equal(v, before["unet"][k]) for k, v in pipe.unet.state_dict().items())
    assert changed > 10
    n = len(adapted_layers(pipe))
    assert remove_loras(pipe) == n and not adapted_layers(pipe)
    for part in before:
        after = getattr(pipe, part).state_dict()
        assert after.keys() == before[part].keys()
        for k, v in after.items():
            assert v.tobytes() == before[part][k].tobytes(), k


def test_same_image_as_diffusers_with_two_loras(folder, files):
    """float32, 4 Euler steps with guidance: the 8-bit image as diffusers draws it with both adapters."""
    torch = require("torch")
    diffusers = require("diffusers")
    _allow_old_peft()
    from refldm.adapters.lora import apply_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(files["diffusers"], adapter_name="d")
    ref.load_lora_weights(files["kohya"], adapter_name="k")
    ref.set_adapters(["d", "k"], list(SCALES))
    kwargs = dict(prompt="a photo of a red cat", height=32, width=32, num_inference_steps=4, guidance_scale=7.5)
    want = (ref(generator=torch.Generator().manual_seed(1), output_type="np", **kwargs).images * 255).round()
    want = want.astype(np.uint8)[0]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    plain = np.asarray(pipe(**kwargs, seed=1, scheduler="euler", progress=False).images[0])
    apply_loras(pipe, [(files["diffusers"], SCALES[0]), (files["kohya"], SCALES[1])], merge=False)
    got = np.asarray(pipe(**kwargs, seed=1, scheduler="euler", progress=False).images[0])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert np.abs(plain.astype(int) - want.astype(int)).max() > 10  # the LoRAs change the image
    assert want.std() > 20
    assert diff.max() <= 2 and np.mean(diff == 0) >= 0.99


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, the model unchanged


@pytest.fixture
def pipe32(folder):
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder)


def _snapshot(pipe):
    return {p: {k: v.copy() for k, v in getattr(pipe, p).state_dict().items()} for p in ("unet", "text_encoder")}


def _unchanged(pipe, snap):
    from refldm.adapters.lora import adapted_layers
    assert not adapted_layers(pipe)
    for part, state in snap.items():
        for k, v in getattr(pipe, part).state_dict().items():
            assert np.array_equal(v, state[k]), k


def _write(path, tensors, metadata=None):
    from refldm.checkpoints.weights import save_file
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, path, metadata=metadata)
    return str(path)


def test_keys_matching_no_layer_are_named_and_refused(pipe32, files, tmp_path):
    from refldm.adapters.lora import LoRAError, apply_loras
    bad = _write(tmp_path / "sdxl.safetensors", {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((2, 16)),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((16, 2)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((2, 16, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((16, 2, 1, 1))})
    snap = _snapshot(pipe32)
    with pytest.raises(LoRAError, match=r"1 of 2 LoRA layers match no layer.*input_blocks_4_1_proj_in"):
        apply_loras(pipe32, [(files["diffusers"], 1.0), (bad, 1.0)])  # the good first file is not applied
    _unchanged(pipe32, snap)


def test_shape_mismatch_is_refused(pipe32, tmp_path):
    from refldm.adapters.lora import LoRAError, apply_loras
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    bad = _write(tmp_path / "shape.safetensors", {f"{key}.lora_A.weight": np.ones((4, 17)),
                                                  f"{key}.lora_B.weight": np.ones((16, 4))})
    snap = _snapshot(pipe32)
    with pytest.raises(LoRAError, match=r"to_q: down \(4, 17\) and up \(16, 4\) do not fit the weight \(16, 16\)"):
        apply_loras(pipe32, [(bad, 1.0)], merge=False)
    _unchanged(pipe32, snap)
    rank = _write(tmp_path / "rank.safetensors", {f"{key}.lora_A.weight": np.ones((4, 16)),
                                                  f"{key}.lora_B.weight": np.ones((16, 3))})
    with pytest.raises(LoRAError, match="not a rank-r pair"):
        apply_loras(pipe32, [(rank, 1.0)])
    _unchanged(pipe32, snap)


def test_second_text_encoder_is_refused(pipe32, tmp_path):
    from refldm.adapters.lora import LoRAError, apply_loras
    bad = _write(tmp_path / "te2.safetensors", {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 32)),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 2))})
    snap = _snapshot(pipe32)
    with pytest.raises(LoRAError, match="adapts the text_encoder_2, which this model has not"):
        apply_loras(pipe32, [(bad, 1.0)])
    _unchanged(pipe32, snap)


def test_pickles_and_other_adapter_kinds_are_refused(pipe32, tmp_path):
    from refldm.adapters.lora import LoRAError, load_lora
    from refldm.checkpoints.weights import WeightsError
    (tmp_path / "x.pt").write_bytes(b"\x80\x04not opened")
    with pytest.raises(WeightsError, match="refusing a pickle-based checkpoint"):
        load_lora(tmp_path / "x.pt")
    loha = _write(tmp_path / "loha.safetensors", {"lora_unet_conv_in.hada_w1_a": np.ones((2, 2))})
    with pytest.raises(LoRAError, match="LoHa, which refldm does not implement"):
        load_lora(loha)
    meta = {"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.lora_alpha": 4})}
    key = "unet.conv_in"
    dora = _write(tmp_path / "dora.safetensors", {f"{key}.lora_A.weight": np.ones((2, 4, 3, 3)),
                                                  f"{key}.lora_B.weight": np.ones((16, 2, 1, 1))}, meta)
    with pytest.raises(LoRAError, match="DoRA"):
        load_lora(dora)


def test_kohya_and_diffusers_names_agree(pipe32, tmp_path):
    """The same tensors under kohya and diffusers names (attention and MLP of the text encoder, a U-Net
    conv) give the same weights bit for bit: the two key schemes reach the same layers."""
    from refldm.adapters.lora import apply_loras, remove_loras
    rng = np.random.default_rng(0)
    layers = {"text_encoder": ["encoder.layers.0.self_attn.q_proj", "encoder.layers.2.self_attn.out_proj",
                               "encoder.layers.1.mlp.fc2"],
              "unet": ["down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]}
    kohya, dif = {}, {}
    for target, keys in layers.items():
        model = getattr(pipe32, target)
        from refldm.adapters.lora import _layers_of
        table = _layers_of(model)
        for key in keys:
            w = table[key].weight
            down = rng.normal(size=(2,) + w.shape[1:])
            up = rng.normal(size=(w.shape[0], 2) + (1, 1) * (w.ndim == 4))
            name = ("lora_unet_" if target == "unet" else "lora_te_text_model_") + key.replace(".", "_")
            kohya |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": 2.0}
            prefix = "unet." if target == "unet" else "text_encoder.text_model."
            dif |= {f"{prefix}{key}.lora_A.weight": down, f"{prefix}{key}.lora_B.weight": up}
    weights = []
    for path in (_write(tmp_path / "k.safetensors", kohya), _write(tmp_path / "d.safetensors", dif)):
        apply_loras(pipe32, [(path, 0.5)])
        weights.append({p: getattr(pipe32, p).state_dict() for p in ("unet", "text_encoder")})
        assert remove_loras(pipe32) == 5
    for part in ("unet", "text_encoder"):
        for k, v in weights[0][part].items():
            assert np.array_equal(v, weights[1][part][k]), k


def test_alpha_rules(tmp_path):
    """kohya: factor alpha / r, alpha = r when absent; diffusers: metadata lora_alpha, alpha_pattern, rsLoRA."""
    from refldm.adapters.lora import load_lora
    k = _write(tmp_path / "k.safetensors", {"lora_unet_conv_in.lora_down.weight": np.ones((4, 4, 3, 3)),
                                            "lora_unet_conv_in.lora_up.weight": np.ones((16, 4, 1, 1)),
                                            "lora_unet_conv_in.alpha": np.asarray(2.0),
                                            "lora_unet_conv_out.lora_down.weight": np.ones((4, 16, 3, 3)),
                                            "lora_unet_conv_out.lora_up.weight": np.ones((4, 4, 1, 1))})
    factors = {layer.key: layer.factor for layer in load_lora(k).layers}
    assert factors == {"conv_in": 0.5, "conv_out": 1.0}
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.alpha_pattern": {"conv_out": 2},
                                                 "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True})}
    d = _write(tmp_path / "d.safetensors", {
        "unet.conv_in.lora_A.weight": np.ones((4, 4, 3, 3)), "unet.conv_in.lora_B.weight": np.ones((16, 4, 1, 1)),
        "unet.conv_out.lora_A.weight": np.ones((4, 16, 3, 3)), "unet.conv_out.lora_B.weight": np.ones((4, 4, 1, 1)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": np.ones((4, 32)),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": np.ones((37, 4))}, meta)
    factors = {layer.key: layer.factor for layer in load_lora(d).layers}
    assert factors == {"conv_in": 2.0, "conv_out": 0.5, "encoder.layers.0.mlp.fc1": 2.0}


# ---------------------------------------------------------------------------------------------------------------
# The command line: --lora FILE:SCALE and <lora:NAME:SCALE> with --lora-dir


def test_cli_lora_flag_and_prompt_tag_give_the_merged_image(folder, files, tmp_path):
    import shutil

    from PIL import Image

    from refldm.cli import main
    from refldm.cli.adapters import extract_lora_tags, parse_lora_flag
    from refldm.adapters.lora import apply_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    assert parse_lora_flag("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_flag("C:/x.safetensors") == ("C:/x.safetensors", 1.0)
    assert extract_lora_tags("a cat <lora:style:0.6> on <lora:b:0.5:1.2>") == \
        ("a cat  on ", [("style", 0.6, 0.6), ("b", 0.5, 1.2)])
    shutil.copy(files["kohya"], tmp_path / "style.safetensors")
    common = ["txt2img", "-m", folder, "--steps", "2", "-W", "32", "-H", "32", "--seed", "3", "-q",
              "--sampler", "euler"]
    assert main(common + ["-p", "a red cat", "--lora", f"{files['diffusers']}:0.7", "-o",
                          str(tmp_path / "flag.png")]) == 0
    assert main(common + ["-p", "a red cat<lora:style:-0.4>", "--lora-dir", str(tmp_path), "-o",
                          str(tmp_path / "tag.png")]) == 0
    for name, path, scale in (("flag", files["diffusers"], 0.7), ("tag", files["kohya"], -0.4)):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        apply_loras(pipe, [(path, scale)], merge=True)
        want = pipe("a red cat", height=32, width=32, num_inference_steps=2, seed=3, scheduler="euler",
                    progress=False).images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), np.asarray(want))
    assert main(common + ["-p", "a <lora:style:1>", "-o", str(tmp_path / "x.png")]) == 2   # no --lora-dir
    assert main(common + ["-p", "a <hypernet:x:1>", "-o", str(tmp_path / "x.png")]) == 2


def test_fake_device_gives_the_same_outputs(folder, files):
    """On the fake GPU (arrays that refuse implicit host conversion) LoRAs apply, run and come off."""
    from refldm import backend
    from refldm.adapters.lora import apply_loras, remove_loras
    from refldm.pipelines.sd import StableDiffusionPipeline
    x, ids = _inputs()
    x = x.astype(np.float32)
    outputs = []
    for name in ("numpy", "fakegpu"):
        with backend.use(name):
            pipe = StableDiffusionPipeline.from_pretrained(folder)
            apply_loras(pipe, [(files["diffusers"], 0.7)], merge=False)
            apply_loras(pipe, [(files["kohya"], -0.4)], merge=True)
            hidden = pipe.text_encoder(ids).last_hidden_state
            eps = pipe.unet(backend.asarray(x), 500, backend.xp().concatenate([hidden, hidden]))
            outputs.append((backend.to_numpy(hidden), backend.to_numpy(eps)))
            assert remove_loras(pipe) > 0
    for a, b in zip(*outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
