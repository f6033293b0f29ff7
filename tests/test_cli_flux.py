"""The CLI with FLUX.1 and --low-memory: `refldm txt2img -m FLUX_FOLDER` (and a FLUX transformer single file with
--config), its options (--guidance for dev, a warning for schnell, --max-sequence-length), `refldm info` on a FLUX
folder, and the memory estimate before the work: --low-memory counts the 16-bit weights as mapped (read from the
files as the layers run) and one layer's float32 copy, and a run too large even so is refused with the estimate.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import _one_blas_thread, one_error_line, run, tiny_folder  # noqa: F401
from tests.test_stored_pipelines import to_16_bit

FLAGS = ["-p", "a red cat", "-W", "32", "-H", "32", "--steps", "2", "--max-sequence-length", "8", "--seed", "1", "-q"]


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    from tests.test_flux_pipeline import build_tiny_flux
    root = tmp_path_factory.mktemp("cli-flux")
    return {"dev": to_16_bit(build_tiny_flux(root / "dev"), "bf16"),
            "schnell": to_16_bit(build_tiny_flux(root / "schnell", guidance=False, seed=1), "bf16")}


def _pixels(path):
    return np.asarray(Image.open(path))


def test_txt2img_on_a_flux_folder_is_the_pipelines_image_with_and_without_low_memory(flux_folders, tmp_path,
                                                                                     capsys):
    from refldm.pipelines.flux import FluxPipeline
    folder = flux_folders["dev"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    rc, out, err = run(capsys, "txt2img", "-m", str(folder), *FLAGS, "--guidance", "4", "-o", str(a))
    assert rc == 0, err
    rc, out, err = run(capsys, "txt2img", "-m", str(folder), *FLAGS, "--guidance", "4", "--low-memory", "-o", str(b))
    assert rc == 0, err
    want = FluxPipeline.from_pretrained(folder)("a red cat", height=32, width=32, num_inference_steps=2, seed=1,
                                                guidance_scale=4.0, max_sequence_length=8, progress=False)
    np.testing.assert_array_equal(_pixels(a), np.asarray(want.images[0]))
    np.testing.assert_array_equal(_pixels(b), _pixels(a))
    text = Image.open(a).info["parameters"]
    assert "Steps: 2" in text and "Distilled CFG Scale: 4" in text


def test_schnell_given_a_guidance_warns_as_the_reference_and_runs(flux_folders, tmp_path, capsys):
    rc, _, err = run(capsys, "txt2img", "-m", str(flux_folders["schnell"]), *FLAGS, "--guidance", "3.5",
                     "-o", str(tmp_path / "s.png"))
    assert rc == 0, err
    assert "guidance_scale=3.5 is ignored" in err and "no guidance embedding" in err


def test_a_flux_single_file_with_config_gives_the_folders_image(flux_folders, tmp_path, capsys):
    from refldm.checkpoints import convert
    from refldm.checkpoints.weights import save_file
    from refldm.models.flux_transformer import FluxTransformer2DModel
    folder = flux_folders["dev"]
    model = FluxTransformer2DModel.from_pretrained(f"{folder}/transformer")
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(convert.flux_to_original(model.state_dict(), dim), path)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run(capsys, "txt2img", "-m", str(folder), *FLAGS, "-o", str(a))[0] == 0
    rc, _, err = run(capsys, "txt2img", "-m", str(path), "--config", str(folder), "--low-memory", *FLAGS, "-o", str(b))
    assert rc == 0, err
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    rc, _, err = run(capsys, "txt2img", "-m", str(path), *FLAGS, "-o", str(b))
    assert rc == 2
    one_error_line(err, "FLUX.1 transformer file", "--config FLUX_FOLDER")


def test_flux_options_on_another_model_are_one_line(tiny_folder, tmp_path, capsys):  # noqa: F811
    rc, _, err = run(capsys, "txt2img", "-m", tiny_folder, "-p", "x", "--guidance", "3", "-o", str(tmp_path / "o.png"))
    assert rc == 2
    one_error_line(err, "--guidance", "FLUX.1 option")


def test_flux_refuses_what_it_does_not_run(flux_folders, tmp_path, capsys):
    rc, _, err = run(capsys, "txt2img", "-m", str(flux_folders["dev"]), *FLAGS, "--sampler", "euler",
                     "-o", str(tmp_path / "o.png"))
    assert rc == 2
    one_error_line(err, "--sampler", "not supported for FLUX")


def test_info_on_a_flux_folder(flux_folders, capsys):
    rc, out, err = run(capsys, "info", str(flux_folders["dev"]))
    assert rc == 0, err
    assert "transformer: FluxTransformer2DModel" in out and "stored as BF16" in out
    assert "text_encoder_2: T5EncoderModel" in out and "text_encoder_3" not in out


def test_low_memory_estimate_counts_mapped_weights_and_one_layer(flux_folders):
    """weight_bytes: default load, every tensor resident in float32; stored, the kept weights are mapped and the
    resident part is what was converted plus the largest kept weight's float32 copy and its stored bytes."""
    from refldm.analysis.cost import estimate_pipeline, weight_bytes
    from refldm.checkpoints.stored import StoredTensor
    from refldm.pipelines.flux import FluxPipeline
    plain = FluxPipeline.from_pretrained(flux_folders["dev"])
    stored = FluxPipeline.from_pretrained(flux_folders["dev"], weights_dtype="stored")
    models = [stored.transformer, stored.vae, stored.text_encoder, stored.text_encoder_2]
    values = [v for m in models for _, _, _, v in m.params()]
    kept = [v for v in values if isinstance(v, StoredTensor)]
    converted = sum(int(np.prod(v.shape)) * 4 for v in values if not isinstance(v, StoredTensor))
    largest = max(int(np.prod(v.shape)) * 4 + v.nbytes for v in kept)
    assert weight_bytes(models, 4) == (converted + largest, sum(v.nbytes for v in kept))
    total = sum(int(np.prod(v.shape)) for v in values)
    assert weight_bytes([plain.transformer, plain.vae, plain.text_encoder, plain.text_encoder_2], 4) == (4 * total, 0)
    a, b = estimate_pipeline(plain, 1, 32, 32, 2, 1.0), estimate_pipeline(stored, 1, 32, 32, 2, 1.0)
    assert a["flops"] == b["flops"] and a["bytes"] - b["bytes"] == 4 * total - converted - largest
    assert b["mapped"] == sum(v.nbytes for v in kept)


@pytest.mark.parametrize("low", [False, True], ids=["float32", "low-memory"])
def test_too_large_is_refused_before_the_work_with_the_estimate(flux_folders, tiny_folder, tmp_path, capsys,  # noqa: F811
                                                               monkeypatch, low):
    from refldm.cli import resources
    monkeypatch.setattr(resources, "available_memory", lambda: 2 ** 20)
    extra = ["--low-memory"] if low else []
    for model, flags in ((str(flux_folders["dev"]), FLAGS), (tiny_folder, ["-p", "x", "--steps", "2", "-q"])):
        out = tmp_path / "o.png"
        rc, _, err = run(capsys, "txt2img", "-m", model, *flags, *extra, "-o", str(out))
        assert rc == 2 and not out.exists()
        one_error_line(err, "of memory", "estimated", "1 MiB available")


def test_weights_that_cannot_fit_as_float32_are_refused_before_loading(flux_folders, tmp_path, capsys, monkeypatch):
    """Counted from the headers before anything is read; the message points to --low-memory."""
    from refldm.checkpoints.inspect import describe_model
    from refldm.cli import generate, resources
    from refldm.core import nn
    params = sum(d.get("parameters", 0) for d in describe_model(str(flux_folders["dev"])).values())
    monkeypatch.setattr(resources, "available_memory", lambda: 4 * params - 1)  # bf16 fits, float32 does not
    loads = []
    monkeypatch.setattr(nn.PretrainedModel, "load_state_dict", lambda *a, **k: loads.append(1))
    rc, _, err = run(capsys, "txt2img", "-m", str(flux_folders["dev"]), *FLAGS, "-o", str(tmp_path / "o.png"))
    assert rc == 2 and not loads
    one_error_line(err, f"its {params:,} weights need about", "as float32", "Use --low-memory")
    assert generate.weights_dtype_of(types.SimpleNamespace(low_memory=True)) == "stored"
