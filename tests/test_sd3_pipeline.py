"""SD3 pipelines: the same 8-bit image as diffusers' StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline.

A tiny random-weight SD3 is built by diffusers and transformers here (an SD3Transformer2DModel, two
CLIPTextModelWithProjection encoders with their tokenizers, the second padding with "!", a 16-channel VAE without
quant convs and with a shift_factor, FlowMatchEulerDiscreteScheduler with shift 3) and saved without the T5
encoder (model_index.json: text_encoder_3 = null), which both libraries then replace by zeros. Same prompt,
seed, steps, guidance: the 8-bit images agree to 2/255 per pixel.

float64: diffusers' flow schedulers cast the sample to float32 in every step (``sample.to(torch.float32)``) and
round their t grid to float32, so a float64 diffusers pipeline is float32-precise in its loop. The float64
comparison is therefore split: the text conditioning (CLIP-L, CLIP-G, padding, concatenation) and one
transformer call on it agree to 1e-10; the final latents agree to float32 precision (1e-5 relative).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import _check_not_degenerate, _max_pixel_diff, _rerandomise, write_tiny_tokenizer
from tests.test_sdxl_pipeline import _tokenizer_folder

PROMPT = "a photo of a red cat on the white background"
SIZE = 32           # pixels; the tiny VAE has 3 levels (4x) and the transformer patches of 2: 4 x 4 tokens
STEPS = 5
SEQ = 8             # max_sequence_length: T5's (zero) tokens, kept short here
TEXT1, TEXT2, PROJ1, PROJ2 = 12, 16, 12, 12  # CLIP-L projects to its own width, as SD3's (768)


T5 = dict(d_model=32, d_kv=8, d_ff=24, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=8, relative_attention_max_distance=20)  # d_model = joint_attention_dim


def build_tiny_sd3(folder, seed=0, scheduler_config=None, t5=False):
    """Write a tiny random-weight SD3 folder in diffusers' layout; return its path. t5: with a tiny
    T5EncoderModel (tests/test_t5.py's `reference`) and a T5TokenizerFast over a unigram model trained by
    sentencepiece (tests/test_t5_tokenizer.py's `train`) as text_encoder_3 / tokenizer_3; else without T5."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    folder = os.fspath(folder)
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=PROJ1 + PROJ2, out_channels=16,
        pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=[0])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False)
    work = folder + "_tok"
    vocab_size = write_tiny_tokenizer(os.path.join(work, "t1"))
    write_tiny_tokenizer(os.path.join(work, "t2"), pad_token="!")
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1, intermediate_size=20, num_attention_heads=2, hidden_act="gelu")
    enc1 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=TEXT1, num_hidden_layers=2, projection_dim=PROJ1, **common))
    enc2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=TEXT2, num_hidden_layers=3, projection_dim=PROJ2, **common))
    for i, m in enumerate((transformer, vae, enc1, enc2)):
        _rerandomise(torch, m, seed * 10 + i)
        m.eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**(scheduler_config or {"shift": 3.0}))
    tok1 = transformers.CLIPTokenizer.from_pretrained(os.path.join(work, "t1"))
    tok2 = transformers.CLIPTokenizer.from_pretrained(os.path.join(work, "t2"))
    enc3 = tok3 = None
    if t5:
        from tests.test_t5 import reference as tiny_t5
        from tests.test_t5_tokenizer import train
        os.makedirs(os.path.join(work, "t3"))
        with open(os.path.join(work, "t3", "spiece.model"), "wb") as f:
            f.write(train(byte_fallback=False))
        tok3 = transformers.T5TokenizerFast.from_pretrained(os.path.join(work, "t3"))
        enc3 = tiny_t5(dict(T5, vocab_size=len(tok3)), seed=seed * 10 + 4)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc1, tokenizer=tok1,
        text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(folder)
    _tokenizer_folder(os.path.join(folder, "tokenizer"), os.path.join(work, "t1"))
    _tokenizer_folder(os.path.join(folder, "tokenizer_2"), os.path.join(work, "t2"))
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
def folder(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny")


@pytest.fixture(scope="module")
def folder_t5(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3t5") / "tiny_t5", seed=2, t5=True)


@pytest.fixture(scope="module")
def reference(folder):
    diffusers = require("diffusers")
    p = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    p.set_progress_bar_config(disable=True)
    i2i = diffusers.StableDiffusion3Img2ImgPipeline(**p.components)
    i2i.set_progress_bar_config(disable=True)
    return {"txt2img": p, "img2img": i2i}


@pytest.fixture(scope="module")
def pipes(folder):
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    return {"txt2img": StableDiffusion3Pipeline.from_pretrained(folder),
            "img2img": StableDiffusion3Img2ImgPipeline.from_pretrained(folder)}


def run_diffusers(reference, which="txt2img", seed=1, output_type="np", scheduler=None, scheduler_kwargs=None,
                  **kwargs):
    torch = require("torch")
    diffusers = require("diffusers")
    p = reference[which]
    original = p.scheduler
    if scheduler is not None:
        p.scheduler = getattr(diffusers, scheduler).from_config(p.scheduler.config, **(scheduler_kwargs or {}))
    try:
        out = p(generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs)
    finally:
        p.scheduler = original
    if output_type == "latent":
        return out.images.double().numpy()
    return (out.images * 255).round().astype(np.uint8)


def test_txt2img_same_image_as_diffusers(pipes, reference):
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                  max_sequence_length=SEQ)
    ref = run_diffusers(reference, **kwargs)
    _check_not_degenerate(ref)
    out = pipes["txt2img"](**kwargs, seed=1, progress=False)
    assert out.images[0].size == (SIZE, SIZE) and out.latents.shape == (1, 16, 8, 8)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_txt2img_batch_prompts_2_3_negatives_clip_skip_non_square_heun(pipes, reference):
    """Every conditioning knob at once: two prompts with prompt_2 / prompt_3 and negatives, clip_skip, a
    non-square image, the Heun flow sampler."""
    kwargs = dict(prompt=[PROMPT, "a green dog"], prompt_2=["a blue square", "a small horse"],
                  prompt_3=["a cat", "a cow"],
                  negative_prompt=["a black horse", ""], negative_prompt_2="white background", height=SIZE,
                  width=SIZE + 16, num_inference_steps=3, guidance_scale=6.0, clip_skip=1, max_sequence_length=SEQ)
    ref = run_diffusers(reference, seed=3, scheduler="FlowMatchHeunDiscreteScheduler", **kwargs)
    out = pipes["txt2img"](**kwargs, seed=3, sampler="heun", progress=False)
    assert out.images[0].size == (SIZE + 16, SIZE) and len(out.images) == 2
    assert _max_pixel_diff(out.images, ref) <= 2


def test_no_guidance_and_custom_sigmas(pipes, reference):
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, guidance_scale=1.0, max_sequence_length=SEQ,
                  sigmas=[1.0, 0.7, 0.3])
    ref = run_diffusers(reference, seed=5, num_inference_steps=3, **kwargs)
    out = pipes["txt2img"](**kwargs, num_inference_steps=3, seed=5, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_dpmpp_2m_in_flow_mode_same_image_as_diffusers(pipes, reference):
    """sampler="DPM++ 2M" on a flow model: DPMSolverMultistepScheduler with use_flow_sigmas, flow_shift = the
    folder's shift (3.0) and prediction_type "flow_prediction"."""
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
                  max_sequence_length=SEQ)
    ref = run_diffusers(reference, seed=8, scheduler="DPMSolverMultistepScheduler",
                        scheduler_kwargs=dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
                        **kwargs)
    out = pipes["txt2img"](**kwargs, seed=8, sampler="DPM++ 2M", progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_img2img_same_image_as_diffusers(pipes, reference):
    from tests.test_pipeline import gradient_image
    kwargs = dict(prompt="a blue square", image=gradient_image(SIZE), strength=0.75, num_inference_steps=6,
                  guidance_scale=5.0, max_sequence_length=SEQ)
    ref = run_diffusers(reference, "img2img", seed=2, **kwargs)
    _check_not_degenerate(ref)
    out = pipes["img2img"](**kwargs, seed=2, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_float64_conditioning_tight_and_latents_at_float32_precision(folder, reference):
    """See the module docstring: the conditioning and a transformer call to 1e-10, the loop to 1e-5."""
    torch = require("torch")
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_unet import float64_timesteps
    ours = StableDiffusion3Pipeline.from_pretrained(folder, dtype="float64")
    p = reference["txt2img"]
    p.to(torch.float64)
    try:
        with torch.no_grad():
            embeds, neg, pooled, neg_pooled = p.encode_prompt(
                PROMPT, None, None, negative_prompt="a dog", do_classifier_free_guidance=True,
                max_sequence_length=SEQ)
        context, pooled_ours = ours._conditioning([PROMPT], [PROMPT], [PROMPT], (["a dog"],) * 3, True, None, SEQ)
        ref_context = torch.cat([neg, embeds]).numpy()
        ref_pooled = torch.cat([neg_pooled, pooled]).numpy()
        assert context.dtype == np.float64 and context.shape == ref_context.shape == (2, 77 + SEQ, 32)
        assert np.abs(context - ref_context).max() <= 1e-10 * np.abs(ref_context).max()
        assert np.abs(pooled_ours - ref_pooled).max() <= 1e-10 * np.abs(ref_pooled).max()
        x = np.random.default_rng(0).standard_normal((2, 16, 8, 8))
        with torch.no_grad(), float64_timesteps():
            ref_v = p.transformer(torch.from_numpy(x), torch.from_numpy(ref_context), torch.from_numpy(ref_pooled),
                                  torch.tensor([700.0, 700.0], dtype=torch.float64)).sample.numpy()
        v = ours.transformer(x, context, pooled_ours, 700.0)
        # diffusers' RMSNorm takes its mean of squares in float32 (tests/test_sd3_transformer.py)
        assert np.abs(v - ref_v).max() <= 1e-5 * np.abs(ref_v).max()
        kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=4.0,
                      max_sequence_length=SEQ)
        ref = run_diffusers(reference, seed=7, output_type="latent", **kwargs)
    finally:
        p.to(torch.float32)
    out = ours(**kwargs, seed=7, progress=False)
    assert out.latents.dtype == np.float64
    assert np.abs(out.latents - ref).max() <= 1e-5 * np.abs(ref).max()


def test_dynamic_shifting_mu_from_the_token_count(tmp_path):
    """A scheduler with use_dynamic_shifting: the pipeline computes mu from (H/16)(W/16) as diffusers does."""
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    folder = build_tiny_sd3(tmp_path / "dyn", seed=1, scheduler_config={"use_dynamic_shifting": True,
                                                                          "base_image_seq_len": 4,
                                                                          "max_image_seq_len": 64})
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE + 32, num_inference_steps=4, guidance_scale=3.0,
                  max_sequence_length=SEQ)
    expected = (ref(generator=torch.Generator().manual_seed(4), output_type="np", **kwargs).images * 255).round()
    out = StableDiffusion3Pipeline.from_pretrained(folder)(**kwargs, seed=4, progress=False)
    assert _max_pixel_diff(out.images, expected.astype(np.uint8)) <= 2


def test_bad_sizes_and_folders_are_one_clear_line(pipes, folder, tmp_path):
    from refldm.checkpoints.weights import WeightsError
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    with pytest.raises(ValueError, match=r"^height and width must be positive multiples of 8, got 36x32$"):
        pipes["txt2img"](PROMPT, height=32, width=36, num_inference_steps=1, progress=False)  # the core's check
    config = pipes["txt2img"].transformer.config
    config.patch_size = 4  # then a patch is 4 x 4 latent pixels = 16 x 16 pixels: 40 passes the core, not SD3
    try:
        with pytest.raises(ValueError, match=r"multiples of 16 \(vae_scale_factor 4 x patch_size 4\), got 40x32; "
                                             "for example 32x32"):
            pipes["txt2img"](PROMPT, height=32, width=40, num_inference_steps=1, progress=False)
    finally:
        config.patch_size = 2
    with pytest.raises(ValueError, match="max_sequence_length=600 must be an integer in"):
        pipes["txt2img"](PROMPT, max_sequence_length=600, progress=False)
    broken = tmp_path / "no_clip_g"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="lists no text_encoder_2; SD3 needs both CLIP encoders"):
        StableDiffusion3Pipeline.from_pretrained(broken)
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"no text_encoder_3/ .*use_t5=False"):
        StableDiffusion3Pipeline.from_pretrained(broken)
    assert StableDiffusion3Pipeline.from_pretrained(broken, use_t5=False).text_encoder_3 is None


def test_t5_states_follow_the_clip_states_along_the_sequence(pipes):
    """The T5 path of encode_prompt with stand-ins for T5 (the real encoder is tested with its own module): the
    tokenizer is asked for max_sequence_length ids with truncation, and its encoder's states follow the padded CLIP
    states along the sequence; without T5 the same place holds zeros."""
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    calls = []

    class Tokenizer:
        def __call__(self, prompts, **kwargs):
            calls.append(kwargs)
            return {"input_ids": np.arange(len(prompts) * kwargs["max_length"]).reshape(len(prompts), -1)}

    class Encoder:
        def __call__(self, ids):
            return type("Out", (), {"last_hidden_state": np.sin(ids[..., None] * np.arange(1, 33)).astype("float32")})

    base = pipes["txt2img"]
    with_t5 = StableDiffusion3Pipeline(base.transformer, base.vae, base.text_encoder, base.tokenizer,
                                       base.text_encoder_2, base.tokenizer_2, Encoder(), Tokenizer(),
                                       base.scheduler_config)
    embeds, pooled = with_t5.encode_prompt([PROMPT, "a dog"], max_sequence_length=SEQ)
    plain, plain_pooled = base.encode_prompt([PROMPT, "a dog"], max_sequence_length=SEQ)
    assert calls == [dict(padding="max_length", max_length=SEQ, truncation=True, add_special_tokens=True,
                          return_tensors="np")]
    assert embeds.shape == plain.shape == (2, 77 + SEQ, 32)
    np.testing.assert_array_equal(embeds[:, :77], plain[:, :77])
    t5 = np.sin(np.arange(2 * SEQ).reshape(2, SEQ, 1) * np.arange(1, 33)).astype("float32")
    np.testing.assert_array_equal(embeds[:, 77:], t5)
    assert not plain[:, 77:].any() and not plain[:, :, TEXT1 + TEXT2:].any()  # zeros: no T5, CLIP padding
    np.testing.assert_array_equal(pooled, plain_pooled)
    with pytest.raises(ValueError, match="give text_encoder_3 and tokenizer_3 together"):
        StableDiffusion3Pipeline(base.transformer, base.vae, base.text_encoder, base.tokenizer, base.text_encoder_2,
                                 base.tokenizer_2, Encoder(), None)


def test_with_t5_same_image_and_float64_conditioning_as_diffusers(folder_t5):
    """The real T5 classes in the pipeline: refldm's T5EncoderModel and T5TokenizerFast read text_encoder_3/ and
    tokenizer_3/ (tokenizer.json as transformers writes it). The T5 states (prompt truncated to SEQ tokens, with a
    warning naming the limit) agree in float64 to 1e-10 (transformers' T5 norm widened to float64 as in
    tests/test_t5.py), and the 8-bit image to 2/255."""
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.models.t5 import T5EncoderModel
    from refldm.models.t5_tokenizer import T5TokenizerFast
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_t5 import wide_norm
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder_t5)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.text_encoder_3).__name__ == "T5EncoderModel"
    kwargs = dict(prompt=PROMPT, negative_prompt="a dog", height=SIZE, width=SIZE, num_inference_steps=3,
                  guidance_scale=5.0, max_sequence_length=SEQ)
    expected = run_diffusers({"txt2img": ref}, seed=6, **kwargs)
    _check_not_degenerate(expected)
    ours = StableDiffusion3Pipeline.from_pretrained(folder_t5)
    assert isinstance(ours.text_encoder_3, T5EncoderModel) and isinstance(ours.tokenizer_3, T5TokenizerFast)
    with pytest.warns(UserWarning, match=f"max_length={SEQ}"):
        out = ours(**kwargs, seed=6, progress=False)
    assert _max_pixel_diff(out.images, expected) <= 2
    # without T5 (zeros in its place) the image is another one: the T5 states do reach the transformer
    assert _max_pixel_diff(StableDiffusion3Pipeline.from_pretrained(folder_t5, use_t5=False)(
        **kwargs, seed=6, progress=False).images, expected) > 2

    ours64 = StableDiffusion3Pipeline.from_pretrained(folder_t5, dtype="float64")
    ref.to(torch.float64)
    with torch.no_grad(), wide_norm():
        embeds, neg, pooled, neg_pooled = ref.encode_prompt(PROMPT, None, None, negative_prompt="a dog",
                                                            do_classifier_free_guidance=True,
                                                            max_sequence_length=SEQ)
    with pytest.warns(UserWarning, match=f"max_length={SEQ}"):
        context, pooled_ours = ours64._conditioning([PROMPT], [PROMPT], [PROMPT], (["a dog"],) * 3, True, None,
                                                    SEQ)
    ref_context = torch.cat([neg, embeds]).numpy()
    ref_pooled = torch.cat([neg_pooled, pooled]).numpy()
    assert context.dtype == np.float64 and context.shape == ref_context.shape == (2, 77 + SEQ, 32)
    assert np.abs(ref_context[:, 77:]).max() > 0.1  # the T5 part is not zeros
    assert np.abs(context - ref_context).max() <= 1e-10 * np.abs(ref_context).max()
    assert np.abs(pooled_ours - ref_pooled).max() <= 1e-10 * np.abs(ref_pooled).max()


# -- the CLI on the tiny folders: `refldm txt2img -m SD3_FOLDER`, `refldm img2img`, `refldm info` ----------------


def test_cli_txt2img_on_an_sd3_folder_is_the_python_apis_image(folder_t5, tmp_path, capsys):
    """-m SD3_FOLDER loads StableDiffusion3Pipeline (T5 included); --sampler names resolve to the flow samplers;
    without --steps / --cfg, diffusers' SD3 defaults (28, 7) apply. Same image as the Python API, bit for bit."""
    from PIL import Image
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_cli import parse_parameters, run
    out = tmp_path / "sd3.png"
    rc, stdout, err = run(capsys, "txt2img", "-m", str(folder_t5), "-p", "a cat", "--negative", "blurry", "--seed",
                          "4", "-W", "48", "-H", "32", "--sampler", "Heun", "-q", "-o", str(out))
    assert rc == 0, err
    image = Image.open(out)
    meta = parse_parameters(image.info["parameters"])
    assert (meta["Steps"], meta["Sampler"], meta["CFG scale"], meta["Size"]) == ("28", "Heun", "7", "48x32")
    want = StableDiffusion3Pipeline.from_pretrained(folder_t5)(
        "a cat", negative_prompt="blurry", height=32, width=48, num_inference_steps=28, guidance_scale=7.0,
        seed=4, sampler="heun", progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want))


def test_cli_img2img_on_an_sd3_folder(folder, tmp_path, capsys):
    from PIL import Image
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline
    from tests.test_cli import parse_parameters, run
    from tests.test_pipeline import gradient_image
    source = tmp_path / "in.png"
    gradient_image(SIZE).save(source)
    out = tmp_path / "out.png"
    rc, stdout, err = run(capsys, "img2img", "-m", str(folder), "-i", str(source), "--strength", "0.5", "-p",
                          "a blue square", "--steps", "4", "--cfg", "4", "--seed", "9", "--sampler", "euler", "-q",
                          "-o", str(out))
    assert rc == 0, err
    image = Image.open(out)
    assert parse_parameters(image.info["parameters"])["Denoising strength"] == "0.5"
    want = StableDiffusion3Img2ImgPipeline.from_pretrained(folder)(
        "a blue square", image=Image.open(source), strength=0.5, num_inference_steps=4, guidance_scale=4.0,
        seed=9, sampler="euler", progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want))


def test_cli_info_describes_the_sd3_parts(folder, folder_t5, capsys):
    import re
    from refldm.pipelines.sd3 import StableDiffusion3Pipeline
    from tests.test_cli import run
    rc, stdout, err = run(capsys, "info", str(folder_t5))
    assert rc == 0, err
    pipe = StableDiffusion3Pipeline.from_pretrained(folder_t5)
    for part, cls in (("transformer", "SD3Transformer2DModel"), ("vae", "AutoencoderKL"),
                      ("text_encoder", "CLIPTextModelWithProjection"),
                      ("text_encoder_2", "CLIPTextModelWithProjection"), ("text_encoder_3", "T5EncoderModel")):
        n = getattr(pipe, part).num_parameters()
        if part == "transformer":  # info counts what the file stores: the fixed position table too (a buffer)
            c = pipe.transformer.config
            n += c.pos_embed_max_size ** 2 * c.num_attention_heads * c.attention_head_dim
        assert re.search(rf"^{part}: {cls}, {n:,} parameters, stored as F32$", stdout, re.M), (part, stdout)
    # (transformers 5 names its one T5 tokenizer class T5Tokenizer; diffusers records that name)
    assert re.search(rf"^tokenizer_3: class T5Tokenizer(Fast)?, vocabulary {len(pipe.tokenizer_3)}$", stdout, re.M)
    rc, stdout, err = run(capsys, "info", str(folder))  # no T5: said so
    assert rc == 0, err
    assert re.search(r"^text_encoder_3: class None, note left out \(no T5\)", stdout, re.M), stdout
    assert not re.search(r"^tokenizer_3", stdout, re.M)


def test_cli_sd3_bad_input_is_one_line(folder, tmp_path, capsys):
    from tests.test_cli import run
    out = str(tmp_path / "x.png")
    common = ("-m", str(folder), "-p", "a cat", "--steps", "1", "-W", "32", "-H", "32", "-q", "-o", out)
    rc, _, err = run(capsys, "txt2img", *common, "--sampler", "DPM++ SDE")
    assert rc == 2 and "sampler 'DPM++ SDE' has no rectified-flow version in refldm" in err
    assert err.count("\n") == 1
    rc, _, err = run(capsys, "txt2img", *common, "--prompt-syntax", "webui")
    assert rc == 2 and "--prompt-syntax: not supported for SD3 models" in err and err.count("\n") == 1


def test_cli_trace_and_compare_on_an_sd3_folder(folder, tmp_path, capsys):
    """refldm trace --part transformer (names: diffusers' module paths) in float32 and float64, then compare;
    --part pipeline on an SD3 folder runs the SD3 pipeline with a flow sampler."""
    diffusers = require("diffusers")
    from refldm.crosscheck.trace import load
    from tests.test_cli import run
    paths = {}
    for dtype in ("float32", "float64"):
        paths[dtype] = str(tmp_path / f"mmdit_{dtype}.safetensors")
        rc, _, err = run(capsys, "trace", str(folder), "--part", "transformer", "--height", "8", "--width", "12",
                         "--seq-len", "20", "--dtype", dtype, "-o", paths[dtype])
        assert rc == 0, err
    rc, stdout, err = run(capsys, "compare", paths["float32"], paths["float64"], "--summary")
    assert rc == 0 and "0 over tolerance" in stdout, (stdout, err)
    names = set(load(paths["float32"]).activations)
    modules = {n for n, _ in diffusers.SD3Transformer2DModel.from_pretrained(
        os.path.join(folder, "transformer")).named_modules()}
    assert {"pos_embed", "context_embedder", "transformer_blocks.0.attn", "transformer_blocks.0.attn2",
            "proj_out"} <= names and not names - modules - {"<root>"}, sorted(names - modules)  # <root>: the output
    rc, stdout, err = run(capsys, "trace", str(folder), "--part", "pipeline", "--height", "32", "--width", "32",
                          "--steps", "2", "--sampler", "heun", "-o", str(tmp_path / "pipe.safetensors"))
    assert rc == 0, err
    t = load(str(tmp_path / "pipe.safetensors"))
    assert "steps.1.noise_pred" in t.activations and t.metadata["scheduler"] == "heun"


def test_the_resource_estimate_walks_the_mmdit(pipes):
    """refldm txt2img's memory / time check on an SD3 pipeline: the weights of its networks, `steps` MMDiT calls
    of batch 2B with 77 + 256 text tokens (count_sd3) and one decode."""
    import dataclasses
    from refldm.analysis.cost import count_sd3, estimate_decode, estimate_pipeline
    pipe = pipes["txt2img"]
    est = estimate_pipeline(pipe, 1, 32, 48, 3, 5.0)
    call = count_sd3(dataclasses.asdict(pipe.transformer.config), 8, 12, batch=2, text_tokens=77 + 256)
    decode = estimate_decode(pipe.vae.config, (1, 16, 8, 12))
    assert est["flops"] == 3 * call.flops + decode["flops"]
    weights = 4 * sum(getattr(pipe, p).num_parameters() for p in ("transformer", "vae", "text_encoder",
                                                                    "text_encoder_2"))
    assert est["bytes"] > weights and est["bytes"] - weights >= decode["bytes"]
    assert estimate_pipeline(pipe, 1, 32, 48, 3, 1.0)["flops"] < est["flops"]  # no guidance: batch B
