"""SDXL pipelines: the same 8-bit image as diffusers' StableDiffusionXLPipeline / Img2ImgPipeline.

A tiny random-weight SDXL base and refiner are built by diffusers and transformers here (an SDXL-shaped U-Net
with the "text_time" added embedding, a CLIPTextModel and a CLIPTextModelWithProjection, two tokenizers,
the second padding with "!"), saved with save_pretrained and loaded by both libraries. Same prompt, seed,
steps, guidance: the 8-bit images must agree to 2/255 per pixel (float32 arithmetic in another order moves
a few values by one rounding step, never more). refldm draws the same noise as torch's CPU generator
(refldm/core/random.py), so passing the seed is enough, as in tests/test_pipeline.py.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import _check_not_degenerate, _max_pixel_diff, _rerandomise, gradient_image, \
    write_tiny_tokenizer

PROMPT = "a photo of a red cat on the white background"
SIZE = 32       # pixels; the tiny VAE has 3 levels (4x): latents (B, 4, 8, 8)
STEPS = 6
TEXT1, TEXT2, PROJ, TIME_DIM = 16, 24, 20, 8
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


def _tokenizer_folder(folder, tok_src):
    """Replace what save_pretrained wrote with CLIP's own format (vocab.json + merges.txt), which both read."""
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    for name in os.listdir(tok_src):
        shutil.copy(os.path.join(tok_src, name), os.path.join(folder, name))


def build_tiny_sdxl(folder, refiner=False, seed=0):
    """Write a tiny random-weight SDXL base (or refiner) folder in diffusers' layout; return its path."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    folder = os.fspath(folder)
    torch.manual_seed(seed)
    n_ids = 5 if refiner else 6
    cross = TEXT2 if refiner else TEXT1 + TEXT2
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2],
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=PROJ + n_ids * TIME_DIM)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=32, scaling_factor=0.13025, force_upcast=True)
    work = folder + "_tok"
    vocab_size = write_tiny_tokenizer(os.path.join(work, "t1"))
    write_tiny_tokenizer(os.path.join(work, "t2"), pad_token="!")
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1)
    enc2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=TEXT2, intermediate_size=30, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
        projection_dim=PROJ, **common))
    models = [unet, vae, enc2]
    enc1 = None
    if not refiner:
        enc1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            hidden_size=TEXT1, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
            hidden_act="quick_gelu", projection_dim=PROJ, **common))
        models.append(enc1)
    for i, m in enumerate(models):
        _rerandomise(torch, m, seed * 10 + i)
        m.eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False)
    tok2 = transformers.CLIPTokenizer.from_pretrained(os.path.join(work, "t2"))
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=enc2, tokenizer=None, tokenizer_2=tok2, unet=unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    else:
        tok1 = transformers.CLIPTokenizer.from_pretrained(os.path.join(work, "t1"))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
            scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder)
    _tokenizer_folder(os.path.join(folder, "tokenizer_2"), os.path.join(work, "t2"))
    if not refiner:
        _tokenizer_folder(os.path.join(folder, "tokenizer"), os.path.join(work, "t1"))
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
    root = tmp_path_factory.mktemp("sdxl")
    return build_tiny_sdxl(root / "base", seed=0), build_tiny_sdxl(root / "refiner", refiner=True, seed=1)


@pytest.fixture(scope="module")
def reference(folders):
    diffusers = require("diffusers")
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folders[0], add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False)
    i2i.set_progress_bar_config(disable=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1], add_watermarker=False)
    refiner.set_progress_bar_config(disable=True)
    return {"base": base, "img2img": i2i, "refiner": refiner}


@pytest.fixture(scope="module")
def pipes(folders):
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    base = StableDiffusionXLPipeline.from_pretrained(folders[0])
    i2i = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[0])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1])
    return {"base": base, "img2img": i2i, "refiner": refiner}


def run_diffusers(reference, which, scheduler="euler", seed=1, output_type="np", **kwargs):
    torch = require("torch")
    diffusers = require("diffusers")
    p = reference[which]
    p.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(p.scheduler.config)
    out = p(generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs)
    if output_type == "latent":
        return out.images.double().numpy()
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_txt2img_same_image_as_diffusers(pipes, reference, scheduler):
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0)
    ref = run_diffusers(reference, "base", scheduler, **kwargs)
    _check_not_degenerate(ref)
    out = pipes["base"](**kwargs, seed=1, scheduler=scheduler, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_txt2img_batch_prompt_2_negatives_sizes_rescale_clip_skip_non_square(pipes, reference):
    """Every conditioning knob at once: two prompts with prompt_2 and negative prompts for both encoders,
    micro-conditioning sizes and crop, guidance_rescale, clip_skip, a non-square image."""
    kwargs = dict(prompt=[PROMPT, "a green dog"], prompt_2=["a blue square", "a small horse"],
                  negative_prompt=["a black horse", ""], negative_prompt_2="white background",
                  height=SIZE, width=SIZE + 16, num_inference_steps=4, guidance_scale=6.0, guidance_rescale=0.7,
                  original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(256, 384), clip_skip=1)
    ref = run_diffusers(reference, "base", "euler", seed=3, **kwargs)
    out = pipes["base"](**kwargs, seed=3, scheduler="euler", progress=False)
    assert out.images[0].size == (SIZE + 16, SIZE) and len(out.images) == 2
    assert _max_pixel_diff(out.images, ref) <= 2


def test_txt2img_negative_time_ids_and_no_guidance(pipes, reference):
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=4.0,
                  negative_original_size=(128, 128), negative_crops_coords_top_left=(8, 0),
                  negative_target_size=(64, 64))
    ref = run_diffusers(reference, "base", "ddim", seed=4, **kwargs)
    assert _max_pixel_diff(pipes["base"](**kwargs, seed=4, scheduler="ddim", progress=False).images, ref) <= 2
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0)
    ref = run_diffusers(reference, "base", "ddim", seed=5, **kwargs)
    assert _max_pixel_diff(pipes["base"](**kwargs, seed=5, scheduler="ddim", progress=False).images, ref) <= 2


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_img2img_same_image_as_diffusers(pipes, reference, scheduler):
    kwargs = dict(prompt="a blue square", image=gradient_image(), strength=0.6, num_inference_steps=STEPS,
                  guidance_scale=5.0)
    ref = run_diffusers(reference, "img2img", scheduler, seed=2, **kwargs)
    _check_not_degenerate(ref)
    out = pipes["img2img"](**kwargs, seed=2, scheduler=scheduler, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_base_plus_refiner_denoising_end_0_8_same_image_as_diffusers(pipes, reference, scheduler):
    """The ensemble of experts: the base stops at 80% of the schedule with latents, the refiner (5 time ids,
    aesthetic scores, encoder 2 only) continues from them without adding noise."""
    torch = require("torch")
    steps = 10
    ref_latents = run_diffusers(reference, "base", scheduler, seed=6, output_type="latent", prompt=PROMPT,
                                height=SIZE, width=SIZE, num_inference_steps=steps, denoising_end=0.8)
    base = pipes["base"](PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, denoising_end=0.8, seed=6,
                         scheduler=scheduler, output_type="latent", progress=False)
    got = np.asarray(base.latents, np.float64)
    assert got.shape == ref_latents.shape
    assert np.abs(got - ref_latents).max() / np.abs(ref_latents).max() <= 1e-4
    ref = run_diffusers(reference, "refiner", scheduler, seed=7, prompt=PROMPT,
                        image=torch.from_numpy(ref_latents.astype(np.float32)), num_inference_steps=steps,
                        denoising_start=0.8, aesthetic_score=7.0)
    _check_not_degenerate(ref)
    steps_run = []
    out = pipes["refiner"](PROMPT, image=base.latents, num_inference_steps=steps, denoising_start=0.8,
                           aesthetic_score=7.0, seed=7, scheduler=scheduler, progress=False,
                           callback=lambda i, t, x: steps_run.append(float(t)))
    assert _max_pixel_diff(out.images, ref) <= 2
    assert len(steps_run) == 2  # the last 20% of 10 steps


# ---------------------------------------------------------------------------------------------------------------
# tokenizers, loading, bad input


def test_both_tokenizers_give_transformers_ids(pipes, folders):
    transformers = require("transformers")
    for sub, tok in (("tokenizer", pipes["base"].tokenizer), ("tokenizer_2", pipes["base"].tokenizer_2)):
        theirs = transformers.CLIPTokenizer.from_pretrained(os.path.join(folders[0], sub))
        texts = [PROMPT, "", "a small astronaut riding a horse"]
        want = theirs(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
        got = tok(texts, padding="max_length", truncation=True, return_tensors="np")["input_ids"]
        np.testing.assert_array_equal(got, want)
    assert pipes["base"].tokenizer_2.pad_token == "!"


def test_force_zeros_for_empty_prompt_gives_zero_unconditional_embeddings(pipes):
    base = pipes["base"]
    context, pooled = base._conditioning([PROMPT], None, None, None, True, None)
    assert context.shape == (2, 77, TEXT1 + TEXT2) and pooled.shape == (2, PROJ)
    assert not np.any(context[0]) and not np.any(pooled[0]) and np.any(context[1])
    context, _ = base._conditioning([PROMPT], None, [""], None, True, None)
    assert np.any(context[0])  # an explicit "" is encoded


def test_long_prompt_2_warns_and_is_truncated(pipes):
    with pytest.warns(UserWarning, match="truncated"):
        out = pipes["base"](PROMPT, prompt_2=" ".join(["red cat"] * 60), height=SIZE, width=SIZE,
                            num_inference_steps=1, seed=1, progress=False)
    assert out.images[0].size == (SIZE, SIZE)


def test_folder_with_text_encoder_2_but_no_tokenizer_2_is_refused(folders, tmp_path):
    import json
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    broken = tmp_path / "broken"
    shutil.copytree(folders[0], broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["tokenizer_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists text_encoder_2 but no tokenizer_2") as e:
        StableDiffusionXLPipeline.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_refiner_as_base_and_sd_folder_are_refused(folders, tmp_path):
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    with pytest.raises(ValueError, match="refiner.*StableDiffusionXLImg2ImgPipeline"):
        StableDiffusionXLPipeline.from_pretrained(folders[1])
    from tests.test_pipeline import build_tiny_sd
    sd = build_tiny_sd(tmp_path / "sd", kind="sd1")
    with pytest.raises(ValueError, match="not an SDXL folder"):
        StableDiffusionXLPipeline.from_pretrained(sd)


@pytest.mark.parametrize("kwargs, match", [
    (dict(denoising_end=1.0), "denoising_end=1.0 must lie strictly between 0 and 1"),
    (dict(denoising_end=0.0), "denoising_end=0.0 must lie"),
    (dict(height=36), "multiples of 8"),
    (dict(original_size=(1, 2, 3)), "original_size must be a pair"),
    (dict(crops_coords_top_left=5), "crops_coords_top_left must be a pair"),
    (dict(prompt_2=["a", "b"]), "prompt_2: give one string, or a list of 1 strings"),
])
def test_bad_arguments_are_one_line_errors(pipes, kwargs, match):
    args = dict(height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as e:
        pipes["base"](PROMPT, **args)
    assert "\n" not in str(e.value)


def test_refiner_denoising_start_bounds_and_base_time_ids_on_refiner(pipes):
    latents = np.zeros((1, 4, 8, 8), np.float32)
    for bad in (1.5, -0.1, 0):
        with pytest.raises(ValueError, match="denoising_start"):
            pipes["refiner"](PROMPT, image=latents, denoising_start=bad, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        pipes["refiner"](PROMPT, image=latents, denoising_start=0.8, denoising_end=0.5, progress=False)
    # a base U-Net given a refiner's 5 time ids: the pipeline names the mismatch
    pipes["refiner"].requires_aesthetics_score = False
    try:
        with pytest.raises(ValueError, match="takes 5 time ids but this pipeline makes 6.*refiner"):
            pipes["refiner"](PROMPT, image=latents, denoising_start=0.8, num_inference_steps=2, progress=False)
    finally:
        pipes["refiner"].requires_aesthetics_score = True


def test_float16_pipeline_decodes_in_float32_and_stays_close_to_float32(folders):
    """The VAE says force_upcast: the float16 pipeline decodes in float32. From the same starting noise the
    float16 image stays near the float32 one (a sanity bound for float16 arithmetic, not an agreement test)."""
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from refldm.core.random import randn
    noise = randn((1, 4, 8, 8), seed=5)
    p16 = StableDiffusionXLPipeline.from_pretrained(folders[0], dtype="float16")
    p32 = StableDiffusionXLPipeline.from_pretrained(folders[0])
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, scheduler="euler", progress=False)
    a = np.asarray(p16(PROMPT, latents=noise, **kwargs).images[0]).astype(np.float64)
    b = np.asarray(p32(PROMPT, latents=noise, **kwargs).images[0]).astype(np.float64)
    assert a.std() > 20 and np.abs(a - b).mean() < 3


def test_sd_pipeline_points_sdxl_folders_to_the_xl_pipeline(folders):
    from refldm.pipelines.sd import StableDiffusionPipeline
    for folder in folders:
        with pytest.raises(ValueError, match="an SDXL folder.*StableDiffusionXLPipeline") as e:
            StableDiffusionPipeline.from_pretrained(folder)
        assert "\n" not in str(e.value)


def test_step_callback_sees_diffusers_tensors_and_can_replace_latents(pipes, reference):
    """callback_on_step_end: per step the same latents, prompt_embeds and add_text_embeds as diffusers' (float32,
    max |a - b| / max |b| <= 1e-4), with the latents halved after step 1 in both."""
    torch = require("torch")
    names = ["latents", "prompt_embeds", "add_text_embeds"]
    ref, got = [], []

    def ref_cb(p, i, t, kw):
        ref.append([kw[k].double().numpy().copy() for k in names])
        return {"latents": kw["latents"] * 0.5} if i == 1 else {}

    def our_cb(p, i, t, kw):
        got.append([np.asarray(kw[k], np.float64).copy() for k in names])
        return {"latents": kw["latents"] * 0.5} if i == 1 else {}

    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0)
    run_diffusers(reference, "base", "euler", callback_on_step_end=ref_cb,
                  callback_on_step_end_tensor_inputs=names, output_type="latent", **kwargs)
    pipes["base"](**kwargs, seed=1, scheduler="euler", progress=False, output_type="latent",
                  callback_on_step_end=our_cb, callback_on_step_end_tensor_inputs=names)
    assert len(got) == len(ref) == STEPS
    for i, (ours, theirs) in enumerate(zip(got, ref)):
        for k, a, b in zip(names, ours, theirs):
            assert a.shape == b.shape and np.abs(a - b).max() / np.abs(b).max() <= 1e-4, (i, k)
    with pytest.raises(ValueError, match="'negative_pooled' is not one of"):
        pipes["base"](**kwargs, callback_on_step_end=our_cb, callback_on_step_end_tensor_inputs=["negative_pooled"])
