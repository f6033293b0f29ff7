"""The porting kit: conformance bundles (refldm vectors), scoring a port against one (refldm verify).

One tiny SD 1.5 bundle is built per module (about 1 s) and shared. refldm's own float32 run must pass its
float64 bundle; a weight nudged by 1e-4 must fail first at its layer; every bad input is one line; the same
command writes the same bytes; and (slow, needs torch) diffusers / transformers with forward hooks pass,
while four planted bugs fail first at the right case.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.cli import main as cli_main
from refldm.crosscheck import vectors
from refldm.crosscheck.verify import verify
from tests.conftest import require


def _files_hash(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "tiny-sd15"
    assert cli_main(["vectors", "--tiny", "sd15", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def refldm_f32(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vectors.run_refldm(bundle, dtype="float32")


def test_bundle_lists_every_part_in_data_flow_order_with_what_a_porter_needs(bundle):
    m = json.load(open(os.path.join(bundle, "manifest.json"), encoding="utf-8"))
    assert m["format"] == vectors.FORMAT and m["model"]["tiny"] == "sd15"
    parts = [c["part"] for c in m["cases"]]
    seen = list(dict.fromkeys(parts))
    assert seen == [p for p in vectors.PARTS if p != "transformer"]  # every part of SD 1.x, in data-flow order
    assert parts == sorted(parts, key=vectors.PARTS.index)
    by_name = {c["name"]: c for c in m["cases"]}
    c = by_name["unet.t999.cond/down_blocks.0.resnets.0"]
    assert c["module"] == "down_blocks.0.resnets.0"
    assert c["original"] == "model.diffusion_model.input_blocks.1.0"
    assert c["inputs"] == ["unet.t999.cond/input/sample", "unet.t999.cond/input/timestep",
                           "unet.t999.cond/input/encoder_hidden_states"]
    assert c["tolerance"] == {"float32": 1e-4, "float16": 2e-2, "float64": 1e-10} and c["dtype"] == "float64"
    assert c["provenance"]["refldm"] and len(c["provenance"]["config_sha256"]) == 64
    assert c["docs"] == "docs/unet.md" and c["description"]
    assert by_name["vae.decode/decoder.mid_block.attentions.0.to_q"]["original"] == \
        "first_stage_model.decoder.mid.attn_1.q"
    assert by_name["text_encoder.p00/encoder.layers.1"]["original"] == \
        "cond_stage_model.transformer.text_model.encoder.layers.1"
    names = set(by_name)
    for want in ("tokenizer.p03/input_ids", "tokenizer.p03/attention_mask", "tokenizer.webui.p10/weights",
                 "text_encoder.p00/penultimate_hidden_state", "text_encoder.p00/pooled", "vae.encode/quant_conv",
                 "unet.t1.uncond/time_proj", "unet.t500.cond/output", "scheduler.dpmpp_2m_karras.n3/sigmas",
                 "scheduler.dpmpp_2m_karras.n25/timesteps", "scheduler.heun.n3/step4.prev_sample",
                 "scheduler.euler_a.n3/step2.prev_sample",
                 "noise.torch.seed42/randn.float32.avx2", "noise.torch.seed42/randn.small.then",
                 "pipeline.euler/steps.2.prev_sample", "pipeline.ddim/image_uint8"):
        assert want in names, want
    # the over-long prompt is cut to 77 tokens, and the empty prompt is bos, eos, padding
    b = vectors.load(bundle)
    ids = b.case("tokenizer.p01/input_ids").expected
    assert ids.shape == (1, 77) and ids[0, 0] == ids[0, 1] - 1 and (b.case("tokenizer.p01/attention_mask").expected[0]
                                                                  .tolist() == [1, 1] + [0] * 75)
    # the weights come in both layouts, and the original file loads as a single-file checkpoint
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(os.path.join(bundle, "model", "original.safetensors"),
                                                    config=os.path.join(bundle, "model"))
    assert pipe.unet.conv_in.weight.shape == (8, 4, 3, 3)


def test_the_same_command_writes_the_same_bytes(bundle, tmp_path):
    """Again, in another process with another hash seed, BLAS thread count and speed-layer setting."""
    import subprocess
    import sys
    again = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="12345", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               REFLDM_ACCEL="1" if os.environ.get("REFLDM_ACCEL") == "0" else "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "refldm", "vectors", "--tiny", "sd15", "--out", str(again)], check=True,
                   env=env, cwd=root, capture_output=True)
    assert _files_hash(again) == _files_hash(bundle)


def test_refldm_float32_passes_its_float64_bundle(bundle, refldm_f32, tmp_path, capsys):
    out = tmp_path / "refldm.safetensors"
    assert cli_main(["vectors", "--candidate", bundle, "--parts", "vae", "--out", str(out)]) == 0
    assert cli_main(["verify", bundle, str(out), "--summary"]) == 0
    printed = capsys.readouterr().out
    assert "every case provided passes" in printed and "vae.decode/decoder.conv_in" not in printed
    r = verify(bundle, refldm_f32)
    assert r.ok, r.summary_lines()
    assert r.counts()["pass"] == len(r.results) > 1000
    worst = max(x.rel for x in r.results)
    assert 0 < worst < 1e-5  # float32 arithmetic: far inside the 1e-4 tolerance, and not bit-identical


def test_a_layer_nudged_by_1e_4_fails_first_at_that_layer(bundle, tmp_path, capsys):
    models = vectors.Models(os.path.join(bundle, "model"), "float32")
    layer = "up_blocks.1.resnets.0.conv1"
    models.get("unet").up_blocks[1].resnets[0].conv1.weight += np.float32(1e-4)
    cand = vectors.run_refldm(bundle, models=models, parts=["unet"])
    path = tmp_path / "nudged.safetensors"
    vectors.save_candidate(path, cand)
    assert cli_main(["verify", bundle, str(path)]) == 1
    out = capsys.readouterr().out
    first = f"unet.t999.cond/{layer}"
    assert f"first failing: #" in out and f" {first}: rel " in out
    assert "last passing before it: #" in out and "unet.t999.cond/up_blocks.1.resnets.0.norm1" in out
    r = verify(bundle, path)
    assert r.first_failure.name == first and r.last_pass_before_failure.name.endswith("resnets.0.norm1")
    assert r.counts()["not provided"] > 0


def test_python_loop_checks_a_port_case_by_case(bundle, refldm_f32):
    b = vectors.load(bundle)
    group = b.cases_of("text_encoder.p00")
    assert [n for n in group[0].input_names] == ["input_ids"] and group[0].inputs[0].dtype == np.int64
    for case in group:
        r = case.check(refldm_f32[case.name])
        assert r.ok and r.rel < case.tolerance["float32"]
    case = b.case("tokenizer.p02/input_ids")
    assert case.inputs == ["Café crème, naïve façade — Ångström ÉCOLE"]
    step = b.case("scheduler.euler.n3/step1.prev_sample")
    assert step.input_names == ["sample.1", "model_output.1"]
    assert b.case("scheduler.euler.n3/sigmas").inputs == []
    assert b.case("scheduler.euler_a.n3/step0.prev_sample").input_names == ["sample.0", "model_output.0", "noise.0"]
    bad = refldm_f32["unet.t500.cond/mid_block"] * (1 + 1e-3)
    with pytest.raises(vectors.VectorMismatch, match=r"unet.t500.cond/mid_block: rel 1.0\d*e-03 > tolerance"):
        b.case("unet.t500.cond/mid_block").check(bad)


def test_candidate_formats_and_original_names(bundle, refldm_f32, tmp_path):
    group = {k: v for k, v in refldm_f32.items() if k.startswith("vae.decode/")}
    np.savez(tmp_path / "c.npz", **group)
    folder = tmp_path / "npy"
    for name, arr in group.items():
        path = folder / (name + ".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, arr)
    for cand in (tmp_path / "c.npz", folder):
        r = verify(bundle, cand)
        assert r.ok and len(r.provided) == len(group)
    b = vectors.load(bundle)
    original = {f"{b.case(k).group}/{b.case(k).original}": v for k, v in group.items()
                if b.case(k).original == "first_stage_model.decoder.conv_in"}
    r = verify(bundle, original, names="original")
    assert [x.name for x in r.provided] == ["vae.decode/decoder.conv_in"] and r.ok
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"mine/*": "vae.decode/*"}))
    r = verify(bundle, {"mine/" + k.split("/", 1)[1]: v for k, v in group.items()}, mapping=str(mapping))
    assert r.ok and len(r.provided) == len(group)


def test_json_and_html_report(bundle, refldm_f32, tmp_path, capsys):
    cand = dict(refldm_f32)
    cand["unet.t1.cond/conv_out"] = cand["unet.t1.cond/conv_out"] + 1.0
    path = tmp_path / "c.safetensors"
    vectors.save_candidate(path, cand)
    report = tmp_path / "r.html"
    assert cli_main(["verify", bundle, str(path), "--json", "--report", str(report)]) == 1
    j = json.loads(capsys.readouterr().out)
    assert j["ok"] is False and j["first_failing"] == "unet.t1.cond/conv_out"
    assert j["last_passing_before"] == "unet.t1.cond/conv_norm_out" and j["counts"]["FAIL"] >= 1
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "unet.t1.cond/conv_out" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_bad_inputs_are_one_line_each_and_the_bundle_is_never_modified(bundle, refldm_f32, tmp_path, capsys):
    before = _files_hash(bundle)
    good = tmp_path / "good.safetensors"
    vectors.save_candidate(good, refldm_f32)

    def run(*argv):
        capsys.readouterr()
        rc = cli_main(["verify", *map(str, argv)])
        out = capsys.readouterr()
        return rc, out.out, out.err

    def one_error(rc, out, err, *words):
        assert rc == 2 and err.startswith("refldm: error:") and len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in err, (w, err)

    one_error(*run(tmp_path / "nope", good), "nope", "no such bundle")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(*run(empty, good), "no manifest.json")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken, ignore=shutil.ignore_patterns("model"))
    (broken / "manifest.json").write_text("{not json")
    one_error(*run(broken, good), "manifest.json", "not valid JSON")
    m = json.load(open(os.path.join(bundle, "manifest.json"), encoding="utf-8"))
    m["format"] = "refldm-vectors/99"
    (broken / "manifest.json").write_text(json.dumps(m))
    one_error(*run(broken, good), "refldm-vectors/99", "reads 'refldm-vectors/1'")
    shutil.copy(os.path.join(bundle, "manifest.json"), broken / "manifest.json")
    (broken / "unet.safetensors").write_bytes(b"\x10\x00\x00")
    one_error(*run(broken, good), "unet.safetensors")
    (broken / "unet.safetensors").unlink()
    one_error(*run(broken, good), "unet.safetensors", "missing")
    one_error(*run(bundle, tmp_path / "none.safetensors"), "none.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    one_error(*run(bundle, tmp_path / "junk.npz"), "junk.npz")
    (tmp_path / "empty.json").write_text("{}")
    one_error(*run(bundle, good, "--map", tmp_path / "empty.json"), "empty.json", "names nothing")
    (tmp_path / "wrong.json").write_text(json.dumps({"x/*": "y/*"}))
    one_error(*run(bundle, good, "--map", tmp_path / "wrong.json"), "wrong.json", "maps no candidate tensor")
    unknown = tmp_path / "unknown.safetensors"
    vectors.save_candidate(unknown, {"nothing/here": np.zeros(3)})
    one_error(*run(bundle, unknown), "provides none of the bundle's")

    # per-case problems: failures named in the table (exit 1), extra names listed, not an error
    cand = dict(refldm_f32)
    cand["unet.t500.cond/conv_in"] = np.zeros((1, 8, 3, 3))
    cand["vae.decode/decoder.conv_in"] = cand["vae.decode/decoder.conv_in"].copy()
    cand["vae.decode/decoder.conv_in"][0, 1, 2, 3] = np.nan
    cand["text_encoder.p00/embeddings"] = cand["text_encoder.p00/embeddings"].astype(np.complex64)
    cand["my_extra_tensor"] = np.ones(2)
    path = tmp_path / "bad.safetensors"
    np.savez(tmp_path / "bad.npz", **cand)
    rc, out, err = run(bundle, tmp_path / "bad.npz")
    assert rc == 1 and not err
    assert "FAIL" in out and "shape (1, 8, 3, 3), expected (1, 8, 4, 4)" in out
    assert "NaN at index (0, 1, 2, 3)" in out
    assert "dtype complex64 is not a real number type (expected float64, shape (1, 77, 16))" in out
    assert "candidate names the bundle does not know (1, ignored): my_extra_tensor" in out
    assert "first failing: #" in out and "text_encoder.p00/embeddings" in out.split("first failing:")[1]
    assert _files_hash(bundle) == before


def test_vectors_cli_errors_and_options(tmp_path, capsys):
    assert cli_main(["vectors", "--out", str(tmp_path / "x")]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert cli_main(["vectors", "--tiny", "sd15", "--parts", "unet,bogus", "--out", str(tmp_path / "x")]) == 2
    assert "bogus" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("one red circle\n\nüñí 🐱\n", encoding="utf-8")
    out = tmp_path / "small"
    assert cli_main(["vectors", "--tiny", "sd2-v", "--parts", "tokenizer,scheduler", "--prompts", str(prompts),
                     "--steps", "2", "--dtype", "float32", "--out", str(out)]) == 0
    b = vectors.load(out)
    assert {c.part for c in b} == {"tokenizer", "scheduler"}
    assert b.case("tokenizer.p02/input_ids").inputs == ["üñí 🐱"]
    assert b.case("scheduler.ddim.n2/step1.prev_sample").expected.dtype == np.float32
    assert b.manifest["configs"]["scheduler"]["prediction_type"] == "v_prediction"
    # --detail blocks: modules at most four names deep, and only those tensors are stored
    out = tmp_path / "blocks"
    assert cli_main(["vectors", "--tiny", "sd15", "--parts", "unet", "--detail", "blocks", "--out", str(out)]) == 0
    b = vectors.load(out)
    layers = {c.layer for c in b}
    assert "down_blocks.0.resnets.0" in layers and "time_proj" in layers and "output" in layers
    assert max(len(x.split(".")) for x in layers) == 4
    stored = [k for k in b.tensors("unet") if "/input/" not in k]
    assert sorted(stored) == sorted(c.name for c in b)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner", "inpaint"])
def test_every_tiny_kind_builds_and_refldm_float32_passes(kind, tmp_path):
    out = tmp_path / kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vectors.generate_tiny(kind, out, parts=["text_encoder", "unet"], timesteps=(500,))
        r = verify(out, vectors.run_refldm(out, "float32"))
    assert r.ok and len(r.provided) == len(r.results)
    names = {c.name for c in r.bundle}
    if kind.startswith("sdxl"):
        assert "text_encoder_2.p00/text_projection" in names and "unet.t500.cond/add_embedding" in names
        sample = r.bundle.case("unet.t500.cond/output")
        assert sample.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
        assert sample.inputs[-1].shape == (1, 5 if kind == "sdxl-refiner" else 6)
    else:
        assert r.bundle.case("unet.t500.cond/conv_in").inputs[0].shape[1] == 9


# ---------------------------------------------------------------------------------------------------
# An independent implementation: diffusers / transformers with forward hooks, and four planted bugs


GROUPS = {"text_encoder.p00": ("text-encoder", "text_encoder"), "vae.decode": ("vae-decode", "vae"),
          "unet.t500.cond": ("unet", "unet")}


def _diffusers_candidate(bundle, bug=None, groups=tuple(GROUPS)) -> dict:
    """Run transformers' text encoder, diffusers' VAE decoder and U-Net (float64) on the bundle's inputs with
    forward hooks on the modules the cases name; {case name: array}. `bug` plants one mistake."""
    torch = require("torch")
    require("diffusers")
    from tools import trace_diffusers as tool

    b = vectors.load(bundle)
    folder = os.path.join(bundle, "model")
    out = {}
    for gid in groups:
        part, folder_part = GROUPS[gid]
        model = tool.load_model(os.path.join(folder, folder_part), part, "float64")
        cases = [c for c in b.cases_of(gid) if c.module]
        if bug == "groupnorm_eps" and part == "vae-decode":
            for m in model.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.eps = 1e-5  # the U-Net's eps; the VAE's is 1e-6
        if bug == "attention_scale" and part == "text-encoder":
            model.encoder.layers[1].self_attn.scale = 1.0  # softmax(q k^T) without 1/sqrt(d)
        if bug == "transposed_weight" and part == "unet":
            w = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
            with torch.no_grad():
                w.copy_(w.T.clone())
        if bug == "timestep_off_by_one" and part == "unet":
            model.time_proj.downscale_freq_shift = 1.0  # exp(-ln(1e4) i / (half - 1)): SD uses half
        inputs = b.case(cases[0].name).input_dict
        with tool.float64_timestep_embedding(True):
            acts = tool.hook_trace(model, lambda: tool.run_part(model, part, inputs, "float64"),
                                   names=[c.module for c in cases])
        for c in cases:
            key = c.module.removeprefix("text_model.")
            if key in acts:
                out[c.name] = acts[key]
    return out


def test_diffusers_with_forward_hooks_passes_and_planted_bugs_fail_first_at_the_right_case(bundle):
    clean = _diffusers_candidate(bundle)
    r = verify(bundle, clean, precision="float64")
    assert r.ok, r.summary_lines()
    assert len(r.provided) > 150
    assert {"text_encoder.p00/encoder.layers.1.self_attn", "vae.decode/decoder.mid_block.attentions.0",
            "unet.t500.cond/time_proj", "unet.t500.cond/up_blocks.1.attentions.0"} <= {x.name for x in r.provided}
    expected = {
        "groupnorm_eps": "vae.decode/decoder.mid_block.resnets.0.norm1",
        # the attention core is no module: the first output after it is out_proj's
        "attention_scale": "text_encoder.p00/encoder.layers.1.self_attn.out_proj",
        "transposed_weight": "unet.t500.cond/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "timestep_off_by_one": "unet.t500.cond/time_proj",
    }
    for bug, first in expected.items():
        group = first.split("/")[0]
        r = verify(bundle, _diffusers_candidate(bundle, bug, groups=[group]), precision="float64")
        assert r.first_failure is not None and r.first_failure.name == first, (bug, r.summary_lines())
        # and in float32 terms too: each is far above float32's tolerance, except the eps (see docs/porting.md)
        if bug != "groupnorm_eps":
            assert r.first_failure.rel > 1e-4, (bug, r.first_failure)


def test_the_worked_example_port_passes_and_its_planted_bug_is_found(bundle, tmp_path):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "port_vae_decoder.py")
    spec = importlib.util.spec_from_file_location("port_vae_decoder", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([bundle, str(tmp_path / "mine")]) == 0
    r = verify(bundle, tmp_path / "mine", precision="float64")
    assert r.ok and len(r.provided) == len(vectors.load(bundle).cases_of("vae.decode"))
    assert example.main([bundle, str(tmp_path / "bad"), "--bug"]) == 0
    assert cli_main(["verify", bundle, str(tmp_path / "bad"), "--precision", "float64"]) == 1
    r = verify(bundle, tmp_path / "bad", precision="float64")
    assert r.first_failure.name == "vae.decode/decoder.mid_block.attentions.0.to_out.0"
    assert r.last_pass_before_failure.name == "vae.decode/decoder.mid_block.attentions.0.to_v"


def test_a_refldm_trace_on_a_groups_inputs_is_a_candidate(bundle, tmp_path, capsys):
    from refldm.crosscheck import trace
    b = vectors.load(bundle)
    case = b.case("unet.t500.uncond/output")
    t = trace.trace_part(os.path.join(bundle, "model"), "unet", dtype="float32", inputs=case.input_dict)
    path = tmp_path / "trace.safetensors"
    trace.save_trace(path, t)
    assert cli_main(["verify", bundle, str(path), "--group", "unet.t500.uncond"]) == 0
    out = capsys.readouterr().out
    assert "unet.t500.uncond/output" in out and "does not know" not in out
    r = verify(bundle, path, group="unet.t500.uncond")
    assert len(r.provided) == len(b.cases_of("unet.t500.uncond")) - 1  # all but time_proj, which no module returns
    assert cli_main(["verify", bundle, str(path), "--group", "unet.t7.cond"]) == 2
    assert "no group 'unet.t7.cond'" in capsys.readouterr().err


def test_transformers_tokenizer_passes_every_token_case(bundle):
    transformers = require("transformers")
    b = vectors.load(bundle)
    tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(bundle, "model", "tokenizer"))
    cand = {}
    for c in b:
        if c.part == "tokenizer" and c.layer in ("input_ids", "attention_mask"):
            out = tok([c.inputs[0]], padding="max_length", max_length=77, truncation=True, return_tensors="np")
            cand[c.name] = out[c.layer]
    r = verify(bundle, cand)
    assert r.ok and len(r.provided) == 2 * len(vectors.PROMPTS)
    cand["tokenizer.p03/input_ids"] = cand["tokenizer.p03/input_ids"].copy()
    cand["tokenizer.p03/input_ids"][0, 5] += 1  # one token off: tokens are exact
    assert verify(bundle, cand).first_failure.name == "tokenizer.p03/input_ids"


@settings(max_examples=8)
@given(data=st.data())
def test_any_case_perturbed_beyond_its_tolerance_is_the_first_failure(bundle, refldm_f32, data):
    b = vectors.load(bundle)
    floats = [c for c in b if c.tolerance["float32"] > 0 and c.part != "pipeline"]
    case = data.draw(st.sampled_from(floats))
    scale = data.draw(st.floats(2.0, 1e3))
    golden = case.expected.astype(np.float64)
    bad = np.array(refldm_f32[case.name], dtype=np.float64)
    i = data.draw(st.integers(0, bad.size - 1))
    bad.flat[i] += scale * case.tolerance["float32"] * float(np.max(np.abs(golden)))
    r = verify(b, {**refldm_f32, case.name: bad})
    assert r.first_failure.name == case.name
    assert r.first_failure.rel == pytest.approx(scale * case.tolerance["float32"], rel=0.1)
