"""FLUX pipelines: the same 8-bit image as diffusers' FluxPipeline / FluxImg2ImgPipeline.

A tiny random-weight FLUX is built here by diffusers and transformers (a FluxTransformer2DModel with or without
the guidance embedding, a CLIPTextModel and its BPE tokenizer, a T5EncoderModel and a unigram tokenizer.json,
a 16-channel VAE with a shift_factor, FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting) and saved
with save_pretrained. Same prompt, seed, steps, guidance: the 8-bit images agree to 2/255 per pixel.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import _check_not_degenerate, _max_pixel_diff, _rerandomise, gradient_image, \
    write_tiny_tokenizer
from tests.test_sdxl_pipeline import _tokenizer_folder

PROMPT = "a photo of a red cat on the white background"
SIZE = 32           # pixels; the tiny VAE has 3 levels (4x), packing 2x2: 4 x 4 = 16 image tokens
STEPS = 4
SEQ = 8             # max_sequence_length (T5 tokens), kept short here
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def write_t5_tokenizer(path):
    """A unigram tokenizer.json over single letters and '▁' + letter (ids: <pad> 0, </s> 1, <unk> 2)."""
    os.makedirs(path, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["\u2581", -2.0]]
    vocab += [[c, -3.0 - i / 10] for i, c in enumerate(letters)] + [["\u2581" + c, -2.5 - i / 10]
                                                                    for i, c in enumerate(letters)]
    data = {"version": "1.0", "added_tokens": [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for i, t in enumerate(["<pad>", "</s>", "<unk>"])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                          {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                               "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 0}},
                                        {"Sequence": {"id": "B", "type_id": 0}},
                                        {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                               "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
            "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": False}}
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 512, "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>"}, f)
    return len(vocab)


def build_tiny_flux(folder, guidance=True, seed=0):
    """Write a tiny random-weight FLUX folder in diffusers' layout; return its path."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    folder = os.fspath(folder)
    torch.manual_seed(seed)
    work = folder + "_tok"
    clip_vocab = write_tiny_tokenizer(os.path.join(work, "clip"))
    t5_vocab = write_t5_tokenizer(os.path.join(work, "t5"))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=guidance, axes_dims_rope=[2, 4, 2])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=12, num_hidden_layers=2, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, intermediate_size=20, num_attention_heads=2,
        hidden_act="quick_gelu"))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=t5_vocab, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=20))
    for i, m in enumerate((transformer, vae, clip, t5)):
        _rerandomise(torch, m, seed * 10 + i)
        m.eval()
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=clip,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(work, "clip")), text_encoder_2=t5,
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(os.path.join(work, "t5")), transformer=transformer)
    pipe.save_pretrained(folder)
    _tokenizer_folder(os.path.join(folder, "tokenizer"), os.path.join(work, "clip"))
    shutil.rmtree(work)
    return folder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from refldm.accel import single_threaded_blas
    torch = require("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with single_threaded_blas():
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": build_tiny_flux(root / "dev"), "schnell": build_tiny_flux(root / "schnell", guidance=False, seed=1)}


def run_diffusers(folder, which="txt2img", seed=1, **kwargs):
    torch = require("torch")
    diffusers = require("diffusers")
    cls = diffusers.FluxPipeline if which == "txt2img" else diffusers.FluxImg2ImgPipeline
    p = cls.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    out = p(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return (out.images * 255).round().astype(np.uint8)


def test_t5_tokenizer_of_the_tiny_folder_equals_transformers(folders):
    transformers = require("transformers")
    from refldm.models.t5_tokenizer import T5TokenizerFast
    path = os.path.join(folders["dev"], "tokenizer_2")
    ref = transformers.T5TokenizerFast.from_pretrained(path)
    ids = T5TokenizerFast.from_pretrained(path)([PROMPT], padding="max_length", max_length=SEQ, truncation=True,
                                                 return_tensors="np")["input_ids"]
    want = ref([PROMPT], padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, want)


def test_dev_txt2img_same_image_as_diffusers(folders):
    from refldm.pipelines.flux import FluxPipeline
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0,
                  max_sequence_length=SEQ)
    ref = run_diffusers(folders["dev"], **kwargs)
    _check_not_degenerate(ref)
    out = FluxPipeline.from_pretrained(folders["dev"])(**kwargs, seed=1, progress=False)
    assert out.images[0].size == (SIZE, SIZE) and out.latents.shape == (1, 16, 64)
    assert "Steps: 4, Sampler: Euler, CFG scale: 1, Seed: 1, Size: 32x32" in out.parameters[0]
    assert "Distilled CFG Scale: 4," in out.images[0].info["parameters"]
    assert _max_pixel_diff(out.images, ref) <= 2


def test_schnell_true_cfg_batch_non_square_same_image_as_diffusers(folders):
    from refldm.pipelines.flux import FluxPipeline
    kwargs = dict(prompt=[PROMPT, "a dog"], height=24, width=40, num_inference_steps=3, max_sequence_length=SEQ,
                  negative_prompt="blurry", true_cfg_scale=2.5)
    ref = run_diffusers(folders["schnell"], **kwargs)
    out = FluxPipeline.from_pretrained(folders["schnell"])(**kwargs, seed=1, progress=False)
    assert out.images[1].size == (40, 24)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_img2img_same_image_as_diffusers(folders):
    from refldm.pipelines.flux import FluxImg2ImgPipeline
    kwargs = dict(prompt=PROMPT, num_inference_steps=5, strength=0.7, guidance_scale=3.0, max_sequence_length=SEQ)
    image = gradient_image(SIZE)
    ref = run_diffusers(folders["dev"], "img2img", image=image, height=SIZE, width=SIZE, **kwargs)
    out = FluxImg2ImgPipeline.from_pretrained(folders["dev"])(image=image, **kwargs, seed=1, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_time_shift_mu_is_linear_in_the_token_count(folders):
    from refldm.pipelines.flux import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folders["schnell"])
    assert pipe.time_shift_mu(256) == pytest.approx(0.5) and pipe.time_shift_mu(4096) == pytest.approx(1.15)
    assert pipe.time_shift_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def test_schnell_warns_on_guidance_and_bad_input_is_one_line(folders, tmp_path):
    from refldm.checkpoints.weights import WeightsError
    from refldm.pipelines.flux import FluxPipeline
    pipe = FluxPipeline.from_pretrained(folders["schnell"])
    with pytest.warns(UserWarning, match="guidance_scale=3.5 is ignored"):
        pipe(PROMPT, height=16, width=16, num_inference_steps=1, guidance_scale=3.5, max_sequence_length=4, seed=0,
             progress=False)
    with pytest.raises(ValueError, match="height and width must be positive multiples of 8"):
        pipe(PROMPT, height=20, width=16, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"max_sequence_length=600 must be an integer in \[1, 512\]"):
        pipe(PROMPT, height=16, width=16, max_sequence_length=600, progress=False)
    with pytest.raises(WeightsError, match="not a FLUX folder"):
        (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
        FluxPipeline.from_pretrained(tmp_path)


def test_weights_kept_as_stored_give_the_same_image(folders):
    """weights_dtype="stored" on every part (float32 files here: mapped, copied per layer call): the same pixels
    and latents as the default loading, exactly."""
    from refldm.checkpoints.stored import StoredTensor
    from refldm.pipelines.flux import FluxPipeline
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, max_sequence_length=SEQ, seed=3,
                  progress=False)
    stored = FluxPipeline.from_pretrained(folders["dev"], weights_dtype="stored")
    assert isinstance(stored.transformer.x_embedder.weight, StoredTensor)
    assert isinstance(stored.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight, StoredTensor)
    a, b = FluxPipeline.from_pretrained(folders["dev"])(**kwargs), stored(**kwargs)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert _max_pixel_diff(b.images, np.stack([np.asarray(im) for im in a.images])) == 0
