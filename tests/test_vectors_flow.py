"""The porting kit for SD3 / SD3.5 and FLUX.1 (refldm/crosscheck/vectors_flow.py): `refldm vectors --tiny sd3|flux`.

One tiny bundle of each is built per module and shared. refldm's own float32 run passes its float64 bundle;
the same command writes the same bytes in another process; the weights come in both layouts; and (slow, needs
torch) transformers' T5 and CLIP, diffusers' MMDiT / FLUX transformer and VAE decoder with forward hooks pass
the float64 bundle (with diffusers' float32 sinusoid, RMS norm and RoPE steps computed in float64 inside the
test, as tests/test_sd3_transformer.py and tests/test_flux_transformer.py do), transformers' T5 tokenizer
gives every T5 token case, diffusers' flow scheduler every scheduler case, and three planted bugs fail
first at the right case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from refldm.cli import main as cli_main
from refldm.crosscheck import vectors
from refldm.crosscheck.verify import verify
from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files_hash(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors_flow")
    out = {}
    for kind in ("sd3", "flux"):
        out[kind] = str(root / kind)
        assert cli_main(["vectors", "--tiny", kind, "--out", out[kind]]) == 0
    return out


@pytest.fixture(scope="module")
def refldm_f32(bundles):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: vectors.run_refldm(b, dtype="float32") for k, b in bundles.items()}


def test_bundles_hold_every_part_in_data_flow_order_with_original_names(bundles):
    for kind, bundle in bundles.items():
        b = vectors.load(bundle)
        parts = [c.part for c in b]
        assert list(dict.fromkeys(parts)) == [p for p in vectors.PARTS if p != "unet"], kind
        assert b.manifest["options"]["max_sequence_length"] == 32
        names = {c.name for c in b}
        t5 = "text_encoder_3" if kind == "sd3" else "text_encoder_2"
        for want in (f"{t5.replace('text_encoder', 'tokenizer')}.p09/input_ids", f"{t5}.p00/encoder.block.1.layer.0."
                     "SelfAttention", f"{t5}.p00/last_hidden_state", "text_encoder.p00/pooled",
                     "vae.decode/decoder.up_blocks.0.resnets.0", "transformer.t500.cond/time_text_embed.time_proj",
                     "transformer.t999.uncond/output", "scheduler.euler.n3/step2.prev_sample",
                     "scheduler.euler_karras.n25/sigmas", "noise.torch.seed42/randn.float32.avx2",
                     "pipeline.euler/steps.2.prev_sample", "pipeline.euler/image_uint8"):
            assert want in names, (kind, want)
        out = b.case("transformer.t500.cond/output")
        if kind == "sd3":
            assert out.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
            assert out.inputs[1].shape == (1, 77 + 32, 32) and out.inputs[0].shape == (1, 16, 4, 4)
            case = b.case("transformer.t500.cond/transformer_blocks.0.attn.to_k")
            assert case.original == "model.diffusion_model.joint_blocks.0.x_block.attn.qkv[1/3 of the rows]"
            assert b.case("transformer.t500.cond/transformer_blocks.0.attn2").module == "transformer_blocks.0.attn2"
            assert b.case("text_encoder_3.p00/encoder.block.0.layer.1.DenseReluDense.wi_0").original == \
                "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0"
            assert b.case("text_encoder_2.p00/encoder.layers.2").module == "text_model.encoder.layers.2"
            assert {"scheduler.heun.n3/step4.prev_sample", "scheduler.dpmpp2m.n3/step2.prev_sample",
                    "scheduler.euler_exponential.n3/step1.prev_sample",
                    "pipeline.dpmpp2m/image"} <= names
            from refldm.pipelines.sd3 import StableDiffusion3Pipeline
            pipe = StableDiffusion3Pipeline.from_single_file(os.path.join(bundle, "model", "original.safetensors"),
                                                             config=os.path.join(bundle, "model"))
            assert pipe.text_encoder_3 is not None
        else:
            assert out.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                       "img_ids", "txt_ids", "guidance"]
            assert out.inputs[0].shape == (1, 4, 64) and out.inputs[3].tolist() == [0.5]
            assert b.case("transformer.t500.cond/pos_embed").shape == [32 + 4, 8]
            assert b.case("transformer.t500.cond/single_transformer_blocks.0.proj_mlp").original == \
                "single_blocks.0.linear1[rows 48:]"
            from refldm.checkpoints.weights import load_file
            from refldm.models.flux_transformer import FluxTransformer2DModel
            model = FluxTransformer2DModel.from_single_file(os.path.join(bundle, "model", "original.safetensors"),
                                                            config=json.load(open(os.path.join(
                                                                bundle, "model", "transformer", "config.json"))))
            ours = load_file(os.path.join(bundle, "model", "transformer", "diffusion_pytorch_model.safetensors"))
            np.testing.assert_array_equal(model.transformer_blocks[0].attn.to_k.weight,
                                          ours["transformer_blocks.0.attn.to_k.weight"])


def test_refldm_float32_passes_its_float64_bundles(bundles, refldm_f32, tmp_path, capsys):
    for kind, bundle in bundles.items():
        r = verify(bundle, refldm_f32[kind])
        assert r.ok, (kind, r.summary_lines())
        assert r.counts()["pass"] == len(r.results) > 700
        assert 0 < max(x.rel for x in r.results) < 1e-4
    path = tmp_path / "sd3.safetensors"
    vectors.save_candidate(path, refldm_f32["sd3"])
    assert cli_main(["verify", bundles["sd3"], str(path), "--summary"]) == 0
    assert "every case provided passes" in capsys.readouterr().out
    # a weight of the joint attention nudged by 1e-3: the first failure is that projection's output
    models = vectors.Models(os.path.join(bundles["sd3"], "model"), "float32")
    models.get("transformer").transformer_blocks[1].attn.add_v_proj.weight += np.float32(1e-3)
    r = verify(bundles["sd3"], vectors.run_refldm(bundles["sd3"], models=models, parts=["transformer"]))
    assert r.first_failure.name == "transformer.t999.cond/transformer_blocks.1.attn.add_v_proj"


def test_a_folder_without_t5_gets_zeros_in_its_place(tmp_path, capsys):
    """A real SD3 folder may leave T5 out (model_index.json: text_encoder_3 null): the transformer's context
    then holds zeros after the 77 CLIP tokens, as the pipeline's; --max-sequence-length sets their count."""
    from refldm.crosscheck import tiny
    folder = tiny.build("sd3", tmp_path / "model")
    index = json.load(open(os.path.join(folder, "model_index.json")))
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    out = tmp_path / "bundle"
    assert cli_main(["vectors", folder, "--parts", "text_encoder,transformer", "--max-sequence-length", "6",
                     "--out", str(out)]) == 0
    b = vectors.load(out)
    assert not any(c.group.startswith("text_encoder_3") for c in b)
    ctx = b.case("transformer.t500.cond/output").input_dict["encoder_hidden_states"]
    assert ctx.shape == (1, 77 + 6, 32) and not ctx[:, 77:].any() and ctx[:, :77, :28].all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert verify(out, vectors.run_refldm(out, "float32", model=folder)).ok
    assert cli_main(["vectors", folder, "--max-sequence-length", "600", "--out", str(tmp_path / "x")]) == 2
    assert "max_sequence_length 600" in capsys.readouterr().err


def test_the_same_command_writes_the_same_bytes(tmp_path):
    """In two processes with other hash seeds, thread counts and speed-layer settings."""
    outs = []
    for i, accel in enumerate(("0", "1")):
        out = tmp_path / f"b{i}"
        env = dict(os.environ, PYTHONHASHSEED=str(i + 7), OPENBLAS_NUM_THREADS=str(i + 1), REFLDM_ACCEL=accel)
        subprocess.run([sys.executable, "-m", "refldm", "vectors", "--tiny", "flux", "--parts",
                        "text_encoder,transformer,pipeline", "--out", str(out)], check=True, env=env, cwd=ROOT,
                       capture_output=True)
        outs.append(_files_hash(out))
    assert outs[0] == outs[1] and len(outs[0]) > 10


# ---------------------------------------------------------------------------------------------------
# Independent implementations: transformers' CLIP, T5 and tokenizer, diffusers' transformers, VAE and scheduler


@contextlib.contextmanager
def _float64_references():
    """diffusers' and transformers' float32 steps (sinusoid, RMS norms, RoPE, T5's norm) in float64."""
    from tests.test_flux_transformer import float64_rope
    from tests.test_sd3_transformer import float64_rms_norm
    from tests.test_t5 import wide_norm
    from tests.test_unet import float64_timesteps, torch_threads
    with torch_threads(1), float64_timesteps(), float64_rms_norm(), float64_rope(), wide_norm():
        yield


def _load(folder, part, family):
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    path = os.path.join(folder, part)
    if part == "transformer":
        cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
        return cls.from_pretrained(path, torch_dtype=torch.float64).eval()
    if part == "vae":
        return diffusers.AutoencoderKL.from_pretrained(path, torch_dtype=torch.float64).eval()
    if (family, part) in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2")):
        return transformers.T5EncoderModel.from_pretrained(path).to(torch.float64).eval()
    cls = transformers.CLIPTextModelWithProjection if family == "sd3" else transformers.CLIPTextModel
    return cls.from_pretrained(path).to(torch.float64).eval()


def _hooked_candidate(bundle, family, groups, bug=None) -> dict:
    """{case name: array} of the torch models run with forward hooks on the bundle's inputs (float64)."""
    torch = require("torch")
    from tools.trace_diffusers import hook_trace
    b = vectors.load(bundle)
    folder = os.path.join(bundle, "model")
    out = {}
    for gid in groups:
        cases = [c for c in b.cases_of(gid) if c.module]
        part = {"transformer": "transformer", "vae": "vae"}.get(gid.split(".")[0], gid.split(".")[0])
        model = _load(folder, part, family)
        if bug == "rope_theta" and part == "transformer":
            model.pos_embed.theta = 1000              # FLUX's RoPE base is 10000
        if bug == "t5_buckets" and part.startswith("text_encoder"):
            model.encoder.block[0].layer[0].SelfAttention.relative_attention_max_distance = 10
        if bug == "sinusoid_order" and part == "transformer":
            model.time_text_embed.time_proj.flip_sin_to_cos = False   # [sin, cos] instead of [cos, sin]
        x = b.case(cases[0].name).input_dict
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()}
        if part == "transformer":
            run = lambda: model(**t)  # noqa: E731
        elif part == "vae":
            run = lambda: model.decode(t["latents"])  # noqa: E731
        else:
            run = lambda: model(t["input_ids"])  # noqa: E731
        with _float64_references():
            acts = hook_trace(model, run, names=[c.module.removeprefix("text_model.") for c in cases])
        for c in cases:
            key = c.module.removeprefix("text_model.")
            if key in acts:
                out[c.name] = acts[key]
    return out


GROUPS = {"sd3": ("text_encoder_2.p01", "text_encoder_3.p00", "vae.decode", "transformer.t500.cond"),
          "flux": ("text_encoder.p00", "text_encoder_2.p00", "transformer.t999.cond")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformers_and_diffusers_with_forward_hooks_pass_the_float64_bundle(bundles, family):
    cand = _hooked_candidate(bundles[family], family, GROUPS[family])
    r = verify(bundles[family], cand, precision="float64")
    assert r.ok, r.summary_lines()
    provided = {x.name for x in r.provided}
    assert len(provided) == len([c for g in GROUPS[family] for c in r.bundle.cases_of(g) if c.module]) > 100
    want = {"transformer.t500.cond/time_text_embed.time_proj", "transformer.t500.cond/transformer_blocks.0.attn",
            "transformer.t500.cond/proj_out", "text_encoder_3.p00/encoder.block.1.layer.1.DenseReluDense",
            "vae.decode/decoder.mid_block.attentions.0"} if family == "sd3" else \
        {"transformer.t999.cond/pos_embed", "transformer.t999.cond/single_transformer_blocks.1.attn",
         "text_encoder_2.p00/encoder.final_layer_norm", "text_encoder.p00/final_layer_norm"}
    assert want <= provided, want - provided


def test_planted_bugs_fail_first_at_the_right_case(bundles):
    expected = {
        ("flux", "rope_theta", "transformer.t999.cond"): "transformer.t999.cond/pos_embed",
        ("flux", "t5_buckets", "text_encoder_2.p00"):
            "text_encoder_2.p00/encoder.block.0.layer.0.SelfAttention.o",  # q, k, v pass; the scores do not
        ("sd3", "sinusoid_order", "transformer.t500.cond"): "transformer.t500.cond/time_text_embed.time_proj",
    }
    for (family, bug, group), first in expected.items():
        r = verify(bundles[family], _hooked_candidate(bundles[family], family, [group], bug=bug),
                   precision="float64")
        assert r.first_failure is not None and r.first_failure.name == first, (bug, r.summary_lines())
        assert r.first_failure.rel > 1e-4  # far outside float32's tolerance too


def test_transformers_t5_tokenizer_passes_every_t5_token_case(bundles):
    transformers = require("transformers")
    for family, t5 in (("sd3", "tokenizer_3"), ("flux", "tokenizer_2")):
        b = vectors.load(bundles[family])
        tok = transformers.T5TokenizerFast.from_pretrained(os.path.join(bundles[family], "model", t5))
        cand = {}
        for c in b:
            if c.part == "tokenizer" and c.group.startswith(t5 + "."):
                out = tok([c.inputs[0]], padding="max_length", max_length=32, truncation=True, return_tensors="np")
                cand[c.name] = out[c.layer]
        r = verify(b, cand)
        assert r.ok and len(r.provided) == 2 * len(vectors.PROMPTS), r.summary_lines()


def test_diffusers_flow_scheduler_passes_the_scheduler_cases(bundles):
    """diffusers' FlowMatchEulerDiscreteScheduler: its tables and steps (it steps in float32: float32's
    tolerance), SD3's fixed shift and FLUX's dynamic shift (sigmas linspace(1, 1/n, n), mu)."""
    torch = require("torch")
    diffusers = require("diffusers")
    for family, bundle in bundles.items():
        b = vectors.load(bundle)
        for key, opts in (("euler", {}), ("euler_karras", {"use_karras_sigmas": True})):
            group = b.group(f"scheduler.{key}.n3")
            args = group["args"]
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**b.manifest["configs"]["scheduler"],
                                                                           **opts})
            if args.get("sigmas") == "linspace":
                sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=args["mu"])
            else:
                sched.set_timesteps(3)
            cand = {f"{group['id']}/timesteps": sched.timesteps.numpy(), f"{group['id']}/sigmas": sched.sigmas.numpy()}
            inputs = {k: b.tensor("scheduler", v) for k, v in group["inputs"].items()}
            for i, t in enumerate(sched.timesteps):
                out = sched.step(torch.from_numpy(inputs[f"model_output.{i}"]), t,
                                 torch.from_numpy(inputs[f"sample.{i}"])).prev_sample
                cand[f"{group['id']}/step{i}.prev_sample"] = out.numpy()
            r = verify(b, cand)
            assert r.ok and len(r.provided) == 5, (family, key, r.summary_lines())
