"""Settings read back from an image (refldm/core/pnginfo.py, ``refldm png-info``): parameters texts written
by hand in AUTOMATIC1111's and Forge's formats, ComfyUI prompt graphs in its API format, the checkpoint
hashes, and every kind of bad input refused in one line."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm.cli import main
from refldm.core import pnginfo
from refldm.core.images import save_pil
from refldm.pipelines.common import parameters_text
from tests.conftest import require

A1111_TEXT = """masterpiece, a castle on a hill, <lora:add_detail:0.6>, (sunset:1.2)
<lora:film grain:0.35:0.8>
Negative prompt: blurry, lowres
bad hands
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3417337185, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, \
Denoising strength: 0.45, Clip skip: 2, RNG: NV, ENSD: 31337, Variation seed: 1234, Variation seed strength: 0.3, \
Seed resize from: 512x512, Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent (nearest-exact), \
Lora hashes: "add_detail: 7c6bad76eb54, film grain: 0123456789ab", Template: "a, b: c", Version: v1.10.1"""

FORGE_TEXT = """1girl, solo
Negative prompt: bad quality
Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 42, Size: 1024x1024, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: f2.0.1v1.10.1-previous-313-g8a042934, Module 1: sdxl_vae"""

OLD_A1111_TEXT = """a cat
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 7460a6fa, ENSD: 31337"""

# ComfyUI's default workflow, as its PNGs carry it in the "prompt" chunk (API format)
COMFY_DEFAULT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle landscape",
                                                     "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def comfy_hires():
    """Two passes (ComfyUI's hires fix): LoRA, clip skip 2, a latent upscale, KSamplerAdvanced, a custom node."""
    g = json.loads(json.dumps(COMFY_DEFAULT))
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "strength_model": 0.7,
                                                      "strength_clip": 0.5, "model": ["4", 0], "clip": ["4", 1]}}
    g["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["10", 1]}}
    g["3"]["inputs"]["model"] = ["10", 0]
    g["6"]["inputs"]["clip"] = ["11", 0]
    g["7"]["inputs"]["clip"] = ["11", 0]
    g["12"] = {"class_type": "LatentUpscaleBy", "inputs": {"upscale_method": "nearest-exact", "scale_by": 1.5,
                                                           "samples": ["3", 0]}}
    g["13"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "add_noise": "enable", "noise_seed": 7, "steps": 14, "cfg": 6.5, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "start_at_step": 7, "end_at_step": 10000, "return_with_leftover_noise": "disable",
        "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["12", 0]}}
    g["8"]["inputs"]["samples"] = ["13", 0]
    g["14"] = {"class_type": "FaceDetailer", "inputs": {"image": ["8", 0]}}
    return g


# --------------------------------------------------------------------------------------------------
# The parameters text

def test_a1111_text_parses_every_field():
    s = pnginfo.parse_parameters(A1111_TEXT)
    assert s["prompt"] == ("masterpiece, a castle on a hill, <lora:add_detail:0.6>, (sunset:1.2)\n"
                           "<lora:film grain:0.35:0.8>")
    assert s["negative_prompt"] == "blurry, lowres\nbad hands"
    assert (s["steps"], s["sampler"], s["schedule_type"], s["cfg_scale"]) == (30, "DPM++ 2M", "Karras", 7.0)
    assert (s["seed"], s["width"], s["height"]) == (3417337185, 512, 768)
    assert (s["model_hash"], s["model"], s["clip_skip"]) == ("6ce0161689", "v1-5-pruned-emaonly", 2)
    assert s["vae"] == "vae-ft-mse-840000-ema-pruned.safetensors" and s["vae_hash"] == "735e4c3a44"
    assert (s["denoising_strength"], s["rng"], s["ensd"]) == (0.45, "NV", 31337)
    assert (s["variation_seed"], s["variation_seed_strength"], s["seed_resize_from"]) == (1234, 0.3, [512, 512])
    assert (s["hires_upscale"], s["hires_steps"], s["hires_upscaler"]) == (2.0, 15, "Latent (nearest-exact)")
    assert s["lora_hashes"] == {"add_detail": "7c6bad76eb54", "film grain": "0123456789ab"}
    assert s["loras"] == [{"name": "add_detail", "weight": 0.6},
                          {"name": "film grain", "weight": 0.35, "unet_weight": 0.8}]
    assert s["other"] == {"Template": "a, b: c"}  # quoted, with a comma and a colon
    assert s["version"] == "v1.10.1" and s["defaults"] == []


def test_missing_fields_take_the_web_uis_defaults():
    s = pnginfo.parse_parameters(OLD_A1111_TEXT)
    assert (s["rng"], s["clip_skip"], s["ensd"]) == ("GPU", 1, 31337)
    assert s["defaults"] == ["clip_skip", "rng"] and s["negative_prompt"] == "" and s["loras"] == []
    assert s["model_hash"] == "7460a6fa"  # the legacy 8-digit hash


def test_forge_text_and_its_extra_fields():
    s = pnginfo.parse_parameters(FORGE_TEXT)
    assert (s["sampler"], s["schedule_type"], s["width"], s["seed"]) == ("Euler a", "Automatic", 1024, 42)
    assert s["other"] == {"Module 1": "sdxl_vae"}


def test_refldms_own_parameters_text_reads_back():
    text = parameters_text("a red circle, b", "blurry", 20, "Euler", 7.5, 1, 512, 384, "v1-5", strength=0.7)
    s = pnginfo.parse_parameters(text)
    assert (s["prompt"], s["negative_prompt"], s["steps"], s["sampler"]) == ("a red circle, b", "blurry", 20, "Euler")
    assert (s["cfg_scale"], s["seed"], s["width"], s["height"], s["model"]) == (7.5, 1, 512, 384, "v1-5")
    assert s["denoising_strength"] == 0.7 and s["version"].startswith("refldm")


@settings(max_examples=30, deadline=None)
@given(prompt=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30),
       negative=st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
       model=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(str.strip),
       steps=st.integers(1, 150), seed=st.integers(0, 2**64 - 1), cfg=st.sampled_from([1.0, 7.0, 7.5, 12.25]),
       size=st.tuples(st.integers(1, 256), st.integers(1, 256)), rng=st.sampled_from(["CPU", "NV", "GPU"]),
       strength=st.sampled_from([0.0, 0.05, 0.5, 1.0]))
def test_format_then_parse_gives_the_settings_back(prompt, negative, model, steps, seed, cfg, size, rng, strength):
    prompt = prompt.replace("Negative prompt:", "").strip()
    s = {"prompt": prompt, "negative_prompt": negative.strip(), "steps": steps, "sampler": "DPM++ 2M",
         "cfg_scale": cfg, "seed": seed, "width": size[0] * 8, "height": size[1] * 8, "model": model.strip(),
         "rng": rng, "variation_seed": seed // 3, "variation_seed_strength": strength, "clip_skip": 2, "ensd": 31337}
    back = pnginfo.parse_parameters(pnginfo.format_parameters(s))
    for key, value in s.items():
        assert back[key] == value, key


# --------------------------------------------------------------------------------------------------
# ComfyUI graphs

def test_comfyui_default_workflow():
    s = pnginfo.parse_comfyui_prompt(json.dumps(COMFY_DEFAULT))
    assert s["prompt"] == "beautiful scenery nature glass bottle landscape" and s["negative_prompt"] == "text, watermark"
    assert (s["seed"], s["steps"], s["cfg_scale"], s["sampler"], s["scheduler"]) == (156680208700286, 20, 8.0,
                                                                                     "euler", "normal")
    assert (s["width"], s["height"], s["batch_size"], s["denoising_strength"]) == (512, 512, 1, 1.0)
    assert s["model"] == "v1-5-pruned-emaonly.safetensors" and s["clip_skip"] == 1 and s["rng"] == "CPU"
    assert s["unsupported"] == [] and len(s["passes"]) == 1 and s["loras"] == []


def test_comfyui_two_passes_loras_clip_skip_and_unknown_nodes():
    s = pnginfo.parse_comfyui_prompt(comfy_hires())
    assert [p["node"] for p in s["passes"]] == ["3", "13"]  # ordered along the latent links
    first, second = s["passes"]
    assert s["loras"] == [{"name": "detail.safetensors", "strength_model": 0.7, "strength_clip": 0.5}]
    assert s["clip_skip"] == 2 and s["model"] == "v1-5-pruned-emaonly.safetensors"
    assert second["upscale"] == {"method": "nearest-exact", "scale_by": 1.5}
    assert (second["seed"], second["steps"], second["start_at_step"], second["add_noise"]) == (7, 14, 7, True)
    assert second["latent_from"] == "12: LatentUpscaleBy" and first["latent_from"] == "5: EmptyLatentImage"
    assert s["unsupported"] == ["14: FaceDetailer"]


def test_a_linked_value_is_followed_through_a_value_node_and_else_named():
    g = json.loads(json.dumps(COMFY_DEFAULT))
    g["20"] = {"class_type": "Seed (rgthree)", "inputs": {"seed": 99}}
    g["3"]["inputs"]["seed"] = ["20", 0]
    s = pnginfo.parse_comfyui_prompt(g)
    assert s["seed"] == 99 and s["unsupported"] == ["20: Seed (rgthree)"]
    g["20"]["inputs"] = {"a": 1, "b": 2}
    with pytest.raises(ValueError, match=r"node 3 input 'seed' comes from node 20 \(Seed \(rgthree\)\)"):
        pnginfo.parse_comfyui_prompt(g)


# --------------------------------------------------------------------------------------------------
# Files and the command line

def _png(tmp_path, name, **chunks):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    path = tmp_path / name
    Image.fromarray(numpy.zeros((8, 8, 3), numpy.uint8)).save(path, pnginfo=info)
    return path


def test_png_info_prints_json_for_each_source(tmp_path, capsys):
    cases = [(_png(tmp_path, "a.png", parameters=A1111_TEXT), "a1111"),
             (_png(tmp_path, "f.png", parameters=FORGE_TEXT), "forge"),
             (_png(tmp_path, "c.png", prompt=json.dumps(comfy_hires()), workflow="{}"), "comfyui")]
    for path, source in cases:
        assert main(["png-info", str(path)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["source"] == source and out["file"] == str(path)
    assert out["unsupported"] == ["14: FaceDetailer"] and out["settings"]["clip_skip"] == 2


def test_png_info_reads_the_exif_comment_of_a_jpeg(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "x.jpg"
    save_pil(Image.fromarray(numpy.zeros((8, 8, 3), numpy.uint8)), path, parameters=FORGE_TEXT)
    assert main(["png-info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["model_hash"] == "31e35c80fc"


def test_model_hashes_as_the_web_ui_computes_them(tmp_path, capsys):
    blob = bytes(range(256)) * 5000  # 1.28 MB: past the legacy hash's window at 1 MiB
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(blob)
    assert pnginfo.model_hash(ckpt) == hashlib.sha256(blob).hexdigest()[:10]
    assert pnginfo.legacy_model_hash(ckpt) == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert pnginfo.hash_matches(ckpt, pnginfo.model_hash(ckpt).upper())
    assert pnginfo.hash_matches(ckpt, pnginfo.legacy_model_hash(ckpt))
    assert not pnginfo.hash_matches(ckpt, "0000000000")
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00\x00\x80\x3f")
    assert pnginfo.lora_hash(lora) == hashlib.sha256(b"\x00\x00\x80\x3f").hexdigest()[:12]
    image = _png(tmp_path, "h.png", parameters=OLD_A1111_TEXT.replace("7460a6fa", pnginfo.model_hash(ckpt)))
    assert main(["png-info", str(image), "--model", str(ckpt)]) == 0
    assert json.loads(capsys.readouterr().out)["model_hash_matches"] is True
    other = tmp_path / "o.ckpt"
    other.write_bytes(b"other")
    assert main(["png-info", str(image), "--model", str(other)]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and json.loads(captured.out)["model_hash_matches"] is False


def _fields(**change):
    fields = {"Steps": "20", "Sampler": "Euler", "CFG scale": "7", "Seed": "1", "Size": "512x512"}
    fields.update(change)
    return "a cat\n" + ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)


@pytest.mark.parametrize("text,match", [
    ("", "the text is empty"),
    ("just a prompt, no settings", "no fields line"),
    (_fields(Steps="twenty"), "Steps: 'twenty' is not an integer"),
    (_fields(Steps="0"), r"Steps: 0 is out of range \(1..10000\)"),
    (_fields(Seed=None), "no Seed field"),
    (_fields(Seed="-5"), "Seed: -5 is out of range"),
    (_fields(Size="512"), "Size: '512' is not WIDTHxHEIGHT"),
    (_fields(**{"CFG scale": "-1"}), r"CFG scale: -1 is out of range"),
    (_fields(**{"Denoising strength": "1.5"}), r"Denoising strength: 1.5 is out of range \[0.0, 1.0\]"),
    (_fields(**{"Variation seed": "3", "Variation seed strength": "2"}), "Variation seed strength: 2 is out of range"),
    (_fields(**{"Variation seed strength": "0.5"}), "without a 'Variation seed'"),
    (_fields(RNG="mps"), "RNG: unknown source 'MPS'; the web UI writes one of GPU, CPU, NV"),
    (_fields(**{"Clip skip": "0"}), "Clip skip: 0 is out of range"),
    (_fields() + ", Seed: 2", "the field 'Seed' is given twice"),
    (_fields(**{"Lora hashes": '"nohash"'}), "Lora hashes: 'nohash' is not 'name: hash'"),
])
def test_bad_parameters_text_is_one_clear_error(text, match):
    with pytest.raises(ValueError, match=match):
        pnginfo.parse_parameters(text)


def _bad_graph(edit):
    g = json.loads(json.dumps(COMFY_DEFAULT))
    edit(g)
    return g


@pytest.mark.parametrize("graph,match", [
    ("not json", "prompt: not JSON"),
    ([], "not a JSON object of nodes"),
    ({"1": {"inputs": {}}}, "node 1 has no class_type"),
    ({"1": {"class_type": "SaveImage", "inputs": {}}}, "no KSampler or KSamplerAdvanced node"),
    (_bad_graph(lambda g: g["3"]["inputs"].update(steps=0)), r"node 3 \(KSampler\) steps = 0 is out of range"),
    (_bad_graph(lambda g: g["3"]["inputs"].update(denoise=1.5)), r"denoise = 1.5 is out of range"),
    (_bad_graph(lambda g: g["5"]["inputs"].update(width=500)), "width = 500 is not a positive multiple of 8"),
    (_bad_graph(lambda g: g["3"]["inputs"].update(positive=["42", 0])), "links to node 42, which the graph does not"),
    (_bad_graph(lambda g: g["3"]["inputs"].update(cfg="high")), "input 'cfg' = 'high' is not a float"),
    (_bad_graph(lambda g: g["3"]["inputs"].pop("scheduler")), "node 3 \\(KSampler\\) has no input 'scheduler'"),
])
def test_bad_comfyui_graph_is_one_clear_error(graph, match):
    with pytest.raises(ValueError, match=match):
        pnginfo.parse_comfyui_prompt(graph)


def test_png_info_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        (tmp_path / "missing.png", "no such image file"),
        (_png(tmp_path, "none.png", Software="GIMP"), "no generation parameters (no 'parameters' text, no ComfyUI "
                                                      "'prompt' graph; text chunks: Software)"),
        (_png(tmp_path, "bad.png", parameters=_fields(Steps="0")), "bad.png: Steps: 0 is out of range"),
    ]
    text_file = tmp_path / "t.png"
    text_file.write_text("not an image")
    cases.append((text_file, "not a readable image"))
    for path, message in cases:
        assert main(["png-info", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    comfy = _png(tmp_path, "c.png", prompt=json.dumps(comfy_hires()))
    assert main(["png-info", str(comfy), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "nodes refldm does not run: 14: FaceDetailer" in err and len(err.strip().splitlines()) == 1


def test_sd_parsers_reads_every_field_refldm_writes(tmp_path):
    """A real metadata reader (the sd-parsers package) reads refldm's parameters text with the values refldm
    meant: the prompts, the sampler, the model and its hash, and every other field. (sd-parsers splits the
    fields line at every comma and does not unquote, so values holding a comma are outside this check.)"""
    sd_parsers = require("sd_parsers")
    from PIL import Image

    base = pnginfo.parse_parameters(parameters_text("a red circle", "blurry", 20, "DPM++ 2M", 7.5, 12345, 512, 384,
                                                    "v1-5", strength=0.7))
    base.update(schedule_type="Karras", model_hash="6ce0161689", clip_skip=2, rng="NV", ensd=31337,
                variation_seed=9, variation_seed_strength=0.25, seed_resize_from=[512, 448], hires_upscale=2.0,
                hires_steps=10, hires_upscaler="Latent (nearest-exact)", defaults=[])
    text = pnginfo.format_parameters(base)
    path = tmp_path / "r.png"
    save_pil(Image.fromarray(numpy.zeros((8, 8, 3), numpy.uint8)), path, parameters=text)
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    theirs = dict(info.metadata)
    back = {"scheduler": "Schedule type", "cfg_scale": "CFG scale", "seed": "Seed", "steps": "Steps", "ensd": "ENSD"}
    theirs.update({back[k]: v for k, v in sampler.parameters.items()})
    theirs.update({"Sampler": sampler.name, "Model": sampler.model.name, "Model hash": sampler.model.hash})
    ours = {name.strip(): value.strip() for name, value in pnginfo._FIELD.findall(text.splitlines()[-1])}
    assert len(ours) == 19 and theirs == ours
    assert [p.value for p in sampler.prompts] == ["a red circle"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]


def test_parameters_text_writes_the_hash_and_the_noise_fields_the_reader_reads():
    text = parameters_text("p", None, 20, "Euler a", 7.0, 5, 512, 512, "m", model_hash="6ce0161689",
                           fields={"RNG": "NV", "ENSD": 31337, "Variation seed": 6, "Variation seed strength": 0.25,
                                   "Seed resize from": "448x448", "Hires upscaler": "x, y", "Clip skip": None})
    assert "Size: 512x512, Model hash: 6ce0161689, Model: m" in text and 'Hires upscaler: "x, y"' in text
    s = pnginfo.parse_parameters(text)
    assert (s["model_hash"], s["rng"], s["ensd"], s["variation_seed"]) == ("6ce0161689", "NV", 31337, 6)
    assert (s["variation_seed_strength"], s["seed_resize_from"], s["hires_upscaler"]) == (0.25, [448, 448], "x, y")
    assert s["defaults"] == ["clip_skip"]
