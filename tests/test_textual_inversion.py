"""Textual inversion (refldm/adapters/textual_inversion.py): the same token ids and text embeddings as diffusers'
``load_textual_inversion`` + ``encode_prompt``, for the three file formats and multi-vector embeddings.

Tolerance: the text embeddings in float64 within 1e-10 relative (max |a - b| / max |b|); the ids equal.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import build_tiny_sd

WIDTH = 32  # the tiny text encoder's hidden size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("ti") / "tiny-sd", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: (path, token for diffusers, tensors to hand diffusers)} in the three formats."""
    from refldm.checkpoints.weights import save_file
    out = tmp_path_factory.mktemp("ti-files")
    rng = np.random.default_rng(1)
    made = {}
    one = rng.normal(size=(WIDTH,)).astype(np.float32)
    save_file({"<cat-toy>": one}, out / "learned_embeds.safetensors")
    made["diffusers"] = (out / "learned_embeds.safetensors", None)
    three = rng.normal(size=(3, WIDTH)).astype(np.float32)
    save_file({"<style>": three}, out / "style.safetensors")
    made["multi"] = (out / "style.safetensors", None)
    webui = rng.normal(size=(2, WIDTH)).astype(np.float32)
    save_file({"emb_params": webui}, out / "badhands.safetensors")
    made["webui"] = (out / "badhands.safetensors", "badhands")
    sdxl = {"clip_l": rng.normal(size=(2, WIDTH)).astype(np.float32),
            "clip_g": rng.normal(size=(2, 48)).astype(np.float32)}
    save_file(sdxl, out / "xlemb.safetensors")
    made["sdxl"] = (out / "xlemb.safetensors", "xlemb")
    return made


PROMPTS = ["a photo of <cat-toy> on the white background", "<style> cat, <style>", "badhands red dog",
           "xlemb<cat-toy>astronaut", "a photo of a cat"]


def test_same_ids_and_embeddings_as_diffusers(folder, files):
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.adapters.textual_inversion import load_textual_inversion
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.checkpoints.weights import load_file
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype="float64")
    before = len(pipe.tokenizer)
    for name, (path, token) in files.items():
        if name == "sdxl":
            ref.load_textual_inversion(torch.from_numpy(load_file(path)["clip_l"]), token=token)
        else:
            ref.load_textual_inversion(str(path), token=token)
        load_textual_inversion(pipe, path)
    assert len(pipe.tokenizer) == len(ref.tokenizer) == before + 1 + 3 + 2 + 2
    assert pipe.tokenizer.added_tokens_encoder == {t: ref.tokenizer.convert_tokens_to_ids(t)
                                                   for t in pipe.tokenizer.added_tokens_encoder}
    ref.text_encoder.to(torch.float64)
    for prompt in PROMPTS:
        converted = ref.maybe_convert_prompt(prompt, ref.tokenizer)
        want_ids = ref.tokenizer(converted, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(pipe.tokenize([prompt]), want_ids)
        with torch.no_grad():
            want = ref.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
        got = np.asarray(pipe.encode_prompt([prompt]))
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-10, prompt
    # the new vectors are the file's: row id of "<style>_2" is the third vector
    table = np.asarray(pipe.text_encoder.embeddings.token_embedding.weight)
    np.testing.assert_array_equal(table[pipe.tokenizer.vocab["<style>_2"]],
                                  load_file(files["multi"][0])["<style>"][2].astype(np.float64))


def test_multi_vector_token_takes_n_positions(folder, files):
    from refldm.adapters.textual_inversion import load_textual_inversion
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert load_textual_inversion(pipe, files["multi"][0]) == ["<style>", "<style>_1", "<style>_2"]
    ids = pipe.tokenize(["<style> cat"])[0].tolist()
    v = pipe.tokenizer.vocab
    assert ids[1:4] == [v["<style>"], v["<style>_1"], v["<style>_2"]]


def _state(pipe):
    return (len(pipe.tokenizer), pipe.text_encoder.config.vocab_size,
            np.asarray(pipe.text_encoder.embeddings.token_embedding.weight).copy())


def _same(pipe, state):
    n, v, table = state
    assert len(pipe.tokenizer) == n and pipe.text_encoder.config.vocab_size == v
    np.testing.assert_array_equal(np.asarray(pipe.text_encoder.embeddings.token_embedding.weight), table)


def test_bad_embeddings_are_refused_and_change_nothing(folder, files, tmp_path):
    from refldm.adapters.textual_inversion import TextualInversionError, load_textual_inversion
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.checkpoints.weights import WeightsError, save_file
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    state = _state(pipe)
    save_file({"<wide>": np.ones((2, 768), np.float32)}, tmp_path / "wide.safetensors")
    with pytest.raises(TextualInversionError, match="is 768 wide but the text encoder is 32 wide"):
        load_textual_inversion(pipe, tmp_path / "wide.safetensors")
    _same(pipe, state)
    save_file({"cat</w>": np.ones((WIDTH,), np.float32)}, tmp_path / "cat.safetensors")
    with pytest.raises(TextualInversionError, match="token 'cat</w>' is already in the vocabulary"):
        load_textual_inversion(pipe, tmp_path / "cat.safetensors")
    _same(pipe, state)
    (tmp_path / "emb.pt").write_bytes(b"\x80\x04 never opened")
    with pytest.raises(WeightsError, match="refusing a pickle-based checkpoint"):
        load_textual_inversion(pipe, tmp_path / "emb.pt")
    save_file({"clip_g": np.ones((2, 48), np.float32)}, tmp_path / "g.safetensors")
    with pytest.raises(TextualInversionError, match="no entry fits this text encoder's width 32"):
        load_textual_inversion(pipe, tmp_path / "g.safetensors")
    _same(pipe, state)
    load_textual_inversion(pipe, files["multi"][0])
    state = _state(pipe)
    with pytest.raises(TextualInversionError, match="token '<style>' is already in the vocabulary"):
        load_textual_inversion(pipe, files["multi"][0])
    _same(pipe, state)


def test_cli_embedding_and_webui_syntax(folder, files, tmp_path):
    from PIL import Image

    from refldm.cli import main
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.adapters.textual_inversion import load_textual_inversion
    prompt = "a (<style>:1.2) cat BREAK [dog]"
    assert main(["txt2img", "-m", folder, "--steps", "2", "-W", "32", "-H", "32", "--seed", "2", "-q",
                 "-p", prompt, "--embedding", str(files["multi"][0]), "--prompt-syntax", "webui", "--clip-skip", "1",
                 "-o", str(tmp_path / "ti.png")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    load_textual_inversion(pipe, files["multi"][0])
    want = pipe(prompt, height=32, width=32, num_inference_steps=2, seed=2, progress=False, prompt_syntax="webui",
                clip_skip=1).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ti.png")), np.asarray(want))
