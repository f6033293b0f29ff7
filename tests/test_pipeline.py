"""StableDiffusionPipeline: the same 8-bit image as diffusers, from a tiny random-weight SD folder.

The folder is built here by diffusers and transformers (tiny U-Net, VAE and CLIP text encoder, every
parameter re-randomised so each weight matters, and a small CLIP BPE vocabulary written by hand), saved
with ``save_pretrained``, and loaded by both libraries. Both run the same prompt, seed and steps; the
8-bit images must agree to 2/255 per pixel (the issue's criterion: float32 arithmetic in a different
order moves a few pixel values by one step of rounding, never more).

`build_tiny_sd` is also used by tests/test_convert.py and tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import require

# ---------------------------------------------------------------------------------------------------------------
# The tiny SD folder

WORDS = ("a photo of red blue green circle square triangle cat dog on the white black background small "
         "large astronaut riding horse").split()


def bytes_to_unicode_chars():
    """CLIP's byte -> printable character table (the 256 base symbols of its byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder, pad_token="<|endoftext|>"):
    """A CLIP-format BPE vocabulary (vocab.json + merges.txt) with merges for a few words."""
    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while len(syms) > 1:
            pair = f"{syms[0]} {syms[1]}"
            if pair not in merges:
                merges.append(pair)
            syms = [syms[0] + syms[1]] + syms[2:]
    for m in merges:
        tok = m.replace(" ", "")
        if tok not in vocab:
            vocab.append(tok)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    return len(vocab)


def _rerandomise(torch, model, seed):
    """Give every parameter a random value: weights ~ N(0, 1/fan_in), norms' scales near 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_tiny_sd(folder, kind="sd1", seed=0, conventional=False, as_saved=False):
    """Write a random-weight tiny Stable Diffusion folder in diffusers' layout; return its path.

    The shapes follow SD's pattern at a toy size: a 3-level U-Net (cross-attention in the two upper
    levels, two resnets per block), a 3-level VAE (4x downsampling, 4 latent channels), a 3-layer CLIP
    text encoder. kind="sd2" gives SD 2.x's variants: linear proj_in/proj_out, heads of fixed width,
    gelu text encoder, "!" as the padding token. conventional=True keeps SD's conventions that a single
    file's shapes do not record (32 groups per GroupNorm; 8 heads in SD 1.x, 64 channels per head in
    SD 2.x and in the text encoder), so that a single file of it loads without a config folder.
    as_saved=True keeps the tokenizer/ folder exactly as transformers' save_pretrained writes it
    (tokenizer.json + tokenizer_config.json in transformers 5); otherwise it holds CLIP's own files.
    """
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    folder = os.fspath(folder)
    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    if conventional:
        channels = (64, 64, 128) if sd2 else (32, 64, 64)
        heads = [c // 64 for c in channels] if sd2 else 8
        groups, text_width, text_heads = 32, 64, 1
    else:
        channels, heads, groups, text_width, text_heads = (16, 32, 32), ([2, 4, 4] if sd2 else 2), 8, 32, 4
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=heads, norm_num_groups=groups,
        use_linear_projection=sd2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64) if conventional else (16, 32, 32),
        layers_per_block=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=groups, sample_size=32)
    tok_dir = os.path.join(folder, "_tok")
    vocab_size = write_tiny_tokenizer(tok_dir, pad_token="!" if sd2 else "<|endoftext|>")
    text_config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=text_width, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=text_heads,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1, projection_dim=32)
    text_encoder = transformers.CLIPTextModel(text_config)
    for i, m in enumerate((unet, vae, text_encoder)):
        _rerandomise(torch, m, seed * 10 + i)
        m.eval()
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if as_saved:
        shutil.rmtree(tok_dir)
        return folder
    # the tokenizer folder in CLIP's own format (vocab.json + merges.txt), which both libraries read
    out = os.path.join(folder, "tokenizer")
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    for name in os.listdir(tok_dir):
        os.replace(os.path.join(tok_dir, name), os.path.join(out, name))
    os.rmdir(tok_dir)
    return folder


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The tiny models' matrices are small: one BLAS thread is fastest, and robust on a shared machine."""
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny folder, loaded once by each library

PROMPT = "a photo of a red cat on the white background"
SIZE = 32  # pixels; the tiny VAE has 3 levels (4x), so the latents are (B, 4, 8, 8)
STEPS = 8
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                        "dpm++2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("pipeline") / "tiny-sd", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models run fastest on one thread, and the CI machine is shared by the test processes."""
    torch = require("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_folder, torch_one_thread):
    """diffusers' txt2img and img2img pipelines on the tiny folder."""
    diffusers = require("diffusers")
    txt2img = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    txt2img.set_progress_bar_config(disable=True)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return diffusers, txt2img, img2img


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(tiny_folder)


def _diffusers_run(reference, scheduler, img2img=False, callback=None, seed=1, **kwargs):
    """Run diffusers with scheduler `scheduler` (refldm's short name); return uint8 images (B, H, W, 3)."""
    diffusers, txt2img, i2i = reference
    torch = require("torch")
    p = i2i if img2img else txt2img
    p.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(txt2img.scheduler.config)
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    out = p(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return (out.images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding


def _max_pixel_diff(images, ref):
    got = np.stack([np.asarray(im) for im in images])
    assert got.shape == ref.shape
    return int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())


def _check_not_degenerate(ref):
    """An agreement on a flat or saturated image would prove little: the reference must have detail."""
    assert ref.std() > 20
    assert np.mean((ref == 0) | (ref == 255)) < 0.5


def gradient_image(size=SIZE):
    from PIL import Image
    yy, xx = np.mgrid[0:size, 0:size]
    scale = 256 // size
    return Image.fromarray(np.stack([xx * scale, yy * scale, (xx + yy) * scale // 2], -1).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# The same image as diffusers (issue 6, part 4): max pixel difference <= 2/255


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_txt2img_same_image_as_diffusers(pipe, reference, scheduler):
    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5)
    ref = _diffusers_run(reference, scheduler, **kwargs)
    _check_not_degenerate(ref)
    out = pipe(**kwargs, seed=1, scheduler=scheduler, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_img2img_same_image_as_diffusers(pipe, reference, scheduler):
    """Encode (posterior sample from the generator), noise to the strength's timestep, denoise the rest."""
    kwargs = dict(prompt="a blue square", image=gradient_image(), strength=0.6, num_inference_steps=STEPS,
                  guidance_scale=7.5)
    ref = _diffusers_run(reference, scheduler, img2img=True, **kwargs)
    _check_not_degenerate(ref)
    out = pipe(**kwargs, seed=1, scheduler=scheduler, progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_img2img_batch_of_prompts_matches_diffusers(pipe, reference):
    """One image, two prompts: the image is encoded once (one posterior draw), then repeated, as diffusers."""
    kwargs = dict(prompt=["a blue square", "a red cat"], image=gradient_image(), strength=0.75,
                  num_inference_steps=4, guidance_scale=7.5)
    with pytest.warns(FutureWarning, match="initial images"):  # diffusers deprecates this; refldm follows it
        ref = _diffusers_run(reference, "euler", img2img=True, seed=9, **kwargs)
    out = pipe(**kwargs, seed=9, scheduler="euler", progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2

def test_negative_prompt_batch_and_no_guidance_match_diffusers(pipe, reference):
    """Two prompts with negatives in one batch (CFG order [uncond, cond]); and guidance_scale=1 (no CFG)."""
    prompts = [PROMPT, "a green dog"]
    kwargs = dict(prompt=prompts, negative_prompt=["a black horse", ""], height=SIZE, width=SIZE + 8,
                  num_inference_steps=4, guidance_scale=5.0)
    ref = _diffusers_run(reference, "euler", seed=3, **kwargs)
    out = pipe(**kwargs, seed=3, scheduler="euler", progress=False)
    assert len(out.images) == 2 and out.images[0].size == (SIZE + 8, SIZE)
    assert _max_pixel_diff(out.images, ref) <= 2
    kwargs.update(guidance_scale=1.0, negative_prompt=None)
    ref = _diffusers_run(reference, "ddim", seed=4, **kwargs)
    out = pipe(**kwargs, seed=4, scheduler="ddim", progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_empty_prompt_is_unconditional_and_matches_diffusers(pipe, reference):
    kwargs = dict(prompt="", height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=7.5)
    ref = _diffusers_run(reference, "ddim", seed=5, **kwargs)
    out = pipe(**kwargs, seed=5, scheduler="ddim", progress=False)
    assert _max_pixel_diff(out.images, ref) <= 2


def test_latents_at_every_step_match_diffusers(pipe, reference):
    """The callback sees the latents after each step; they agree with diffusers' to float32 precision
    (relative error <= 1e-4, max |a - b| / max |b|)."""
    torch = require("torch")
    ref_steps, got_steps = [], []

    def ref_callback(p, i, t, kw):
        ref_steps.append(kw["latents"].to(torch.float64).numpy().copy())
        return {}

    kwargs = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5)
    _diffusers_run(reference, "dpm++2m", callback=ref_callback, **kwargs)
    out = pipe(**kwargs, seed=1, scheduler="dpm++2m", progress=False,
               callback=lambda i, t, latents: got_steps.append(np.asarray(latents, np.float64).copy()))
    assert len(got_steps) == len(ref_steps) == STEPS
    for i, (a, b) in enumerate(zip(got_steps, ref_steps)):
        assert np.abs(a - b).max() / np.abs(b).max() <= 1e-4, f"step {i}"
    np.testing.assert_array_equal(np.asarray(out.latents, np.float64), got_steps[-1])
    assert out.latents.shape == (1, 4, SIZE // 4, SIZE // 4)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour


def test_seed_fixes_the_image_and_prompt_changes_it(pipe):
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=7.5, scheduler="ddim",
                  progress=False)
    a = pipe(PROMPT, seed=7, **kwargs)
    b = pipe(PROMPT, seed=7, **kwargs)
    c = pipe("a green dog", seed=7, **kwargs)
    d = pipe(PROMPT, seed=8, **kwargs)
    assert a.seed == 7
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert np.abs(np.asarray(a.latents) - np.asarray(c.latents)).max() > 1e-3  # the text matters
    assert np.abs(np.asarray(a.latents) - np.asarray(d.latents)).max() > 1e-1  # the noise matters
    assert set(a.timings) == {"text encode", "denoise", "decode"}
    unseeded = pipe(PROMPT, **kwargs)
    assert isinstance(unseeded.seed, int)


def test_given_latents_are_used(pipe):
    from refldm.core.random import randn
    noise = randn((1, 4, SIZE // 4, SIZE // 4), seed=11)
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, scheduler="euler", progress=False)
    a = pipe(PROMPT, latents=noise, **kwargs)
    b = pipe(PROMPT, seed=11, **kwargs)  # the same noise, drawn by the pipeline
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))


def test_long_prompt_warns_and_is_truncated(pipe):
    long_prompt = " ".join(["red cat"] * 60)
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, scheduler="ddim", seed=1, progress=False)
    with pytest.warns(UserWarning, match="truncated"):
        a = pipe(long_prompt, **kwargs)
    with pytest.warns(UserWarning, match="truncated"):
        ids = pipe.tokenize([long_prompt])
    assert ids.shape == (1, 77)
    cut = pipe.tokenizer.decode(ids[0, 1:76])
    np.testing.assert_array_equal(pipe.tokenize([cut]), ids)  # the image is the cut prompt's image
    assert a.images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("size", [(33, 32), (32, 20), (0, 32)])
def test_size_not_multiple_of_8_is_refused(pipe, size):
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(PROMPT, height=size[0], width=size[1], num_inference_steps=1, progress=False)


def test_nan_latents_stop_naming_the_step(pipe):
    from refldm.pipelines.sd import NonFiniteLatentsError
    bad = np.zeros((1, 4, SIZE // 4, SIZE // 4), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteLatentsError, match=r"after step 1 of 3") as e:
        pipe(PROMPT, latents=bad, height=SIZE, width=SIZE, num_inference_steps=3, progress=False)
    assert "\n" not in str(e.value)


def test_img2img_strength_bounds(pipe):
    image = gradient_image()
    with pytest.raises(ValueError, match="strength"):
        pipe(PROMPT, image=image, strength=1.5, num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match="no step"):
        pipe(PROMPT, image=image, strength=0.1, num_inference_steps=4, progress=False)
    steps = []
    pipe(PROMPT, image=image, strength=0.5, num_inference_steps=8, scheduler="ddim", progress=False,
         callback=lambda i, t, x: steps.append(int(t)))
    assert len(steps) == 4  # int(8 * 0.5) of the 8 steps run: the last half of the schedule
    with pytest.raises(ValueError, match="multiple"):
        pipe(PROMPT, image=gradient_image(28), strength=0.5, num_inference_steps=4, progress=False)


def test_folder_missing_a_part_is_named(tiny_folder, tmp_path):
    from refldm.pipelines.sd import StableDiffusionPipeline
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_folder):
        if name != "vae":
            os.symlink(os.path.join(tiny_folder, name), broken / name)
    with pytest.raises(ValueError, match=r"no vae/") as e:
        StableDiffusionPipeline.from_pretrained(broken)
    assert "\n" not in str(e.value)


def test_pickle_checkpoints_are_refused_unopened(tmp_path):
    from refldm.pipelines.sd import StableDiffusionPipeline
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="safetensors"):
        StableDiffusionPipeline.from_single_file(path)


def test_truncated_weights_are_named(tiny_folder, tmp_path):
    from refldm.pipelines.sd import StableDiffusionPipeline
    broken = tmp_path / "truncated"
    broken.mkdir()
    for name in os.listdir(tiny_folder):
        if name != "unet":
            os.symlink(os.path.join(tiny_folder, name), broken / name)
    (broken / "unet").mkdir()
    src = os.path.join(tiny_folder, "unet")
    os.symlink(os.path.join(src, "config.json"), broken / "unet" / "config.json")
    data = open(os.path.join(src, "diffusion_pytorch_model.safetensors"), "rb").read()
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        StableDiffusionPipeline.from_pretrained(broken)


def test_fake_device_gives_the_same_pixels(tiny_folder, pipe):
    """On the fake GPU (arrays that refuse implicit host conversion) the pipeline runs and agrees."""
    from refldm import backend
    from refldm.pipelines.sd import StableDiffusionPipeline
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, scheduler="euler", seed=2, progress=False)
    ref = pipe(PROMPT, **kwargs)
    ref_i2i = pipe(PROMPT, image=gradient_image(), strength=0.5, num_inference_steps=4, scheduler="dpm++2m",
                   seed=2, progress=False)
    with backend.use("fakegpu"):
        gpu_pipe = StableDiffusionPipeline.from_pretrained(tiny_folder)
        out = gpu_pipe(PROMPT, **kwargs)
        out_i2i = gpu_pipe(PROMPT, image=gradient_image(), strength=0.5, num_inference_steps=4,
                           scheduler="dpm++2m", seed=2, progress=False)
        assert backend.array_namespace(out.latents).__name__ != "numpy"
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))
    np.testing.assert_array_equal(np.asarray(out_i2i.images[0]), np.asarray(ref_i2i.images[0]))


# ---------------------------------------------------------------------------------------------------------------
# The embedded default model (issue 7): diffusers reads the same folder and draws the same image

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "refldm",
                             "default_model")


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")),
                    reason="refldm/default_model is not there yet")
def test_default_model_same_image_as_diffusers(torch_one_thread):
    torch = torch_one_thread
    diffusers = require("diffusers")
    from refldm.pipelines.sd import StableDiffusionPipeline
    prompts = ["a large red circle in the center on a white background",
               "a small blue square in the top left on a black background"]
    # the folder stores float16 weights; both libraries compute in float32 here
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None,
                                                                 dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(prompts, num_inference_steps=12, guidance_scale=5.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    ref = (ref * 255).round().astype(np.uint8)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    out = pipe(prompts, num_inference_steps=12, guidance_scale=5.0, seed=0, scheduler="dpm++2m", progress=False)
    assert out.images[0].size == (64, 64)
    assert _max_pixel_diff(out.images, ref) <= 2



# ---------------------------------------------------------------------------------------------------------------
# Folders saved by today's libraries (issue 12, item 0)


def test_folder_saved_by_current_diffusers_loads_with_the_same_ids(tmp_path, torch_one_thread):
    """transformers 5 saves tokenizer.json (no vocab.json / merges.txt): refldm reads it, same ids."""
    transformers = require("transformers")
    from refldm import CLIPTokenizer
    from refldm.pipelines.sd import StableDiffusionPipeline
    folder = build_tiny_sd(tmp_path / "saved", as_saved=True)
    files = set(os.listdir(os.path.join(folder, "tokenizer")))
    assert "tokenizer.json" in files and "vocab.json" not in files and "merges.txt" not in files
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ours = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    prompts = [PROMPT, "A Large BLUE square, riding a horse!!", "", "cat's dog 123 café"]
    want = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(pipe.tokenize(prompts), want)
    np.testing.assert_array_equal(ours(prompts)["input_ids"], want)
    out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, seed=1, progress=False)
    assert out.images[0].size == (SIZE, SIZE)


# ---------------------------------------------------------------------------------------------------------------
# Hardening (issue 12)


def test_four_threads_on_one_pipeline_give_the_sequential_latents(pipe):
    """A pipeline object keeps no per-call state (scheduler, generator and arrays are made per call), so
    four threads calling it at once get exactly what the same calls in sequence get. (BLAS is held to one
    thread in this module: OpenBLAS's own split under contention is the thread-count question, tested in
    tests/test_backend.py.)"""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [dict(prompt=PROMPT, seed=s, scheduler=sch, guidance_scale=g)
            for s, sch, g in ((1, "euler", 7.5), (2, "ddim", 5.0), (3, "dpm++2m", 1.0), (4, "euler", 3.0))]
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=3, progress=False)
    sequential = [np.asarray(pipe(**job, **kwargs).latents) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: np.asarray(pipe(**job, **kwargs).latents), jobs))
    for a, b in zip(sequential, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_is_refused(pipe, scale):
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        pipe(PROMPT, guidance_scale=scale, height=SIZE, width=SIZE, num_inference_steps=1, progress=False)


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 2 ** 100])
def test_seed_outside_torch_range_is_refused(pipe, seed):
    with pytest.raises(ValueError, match=r"outside 0..2\*\*64-1"):
        pipe(PROMPT, seed=seed, height=SIZE, width=SIZE, num_inference_steps=1, progress=False)


def test_largest_seed_gives_torchs_noise():
    torch = require("torch")
    from refldm.core.random import randn
    seed = 2 ** 64 - 1
    ref = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).numpy()
    np.testing.assert_array_equal(randn((1, 4, 8, 8), seed=seed), ref)


def test_too_many_steps_for_the_schedule_is_a_clear_error(pipe):
    """DDIM with steps_offset=1 and 1000 steps would start at t = 1000 (an IndexError inside the loop)."""
    with pytest.raises(ValueError, match="at most 999 steps"):
        pipe(PROMPT, scheduler="ddim", num_inference_steps=1000, height=SIZE, width=SIZE, progress=False)


def test_images_carry_their_parameters_and_save_writes_them(pipe, tmp_path):
    from PIL import Image
    out = pipe([PROMPT, "a green dog"], negative_prompt="blurry", seed=5, scheduler="euler", guidance_scale=6.0,
               height=SIZE, width=SIZE, num_inference_steps=2, progress=False)
    text = out.images[0].info["parameters"]
    assert text.startswith(PROMPT + "\nNegative prompt: blurry\n")
    for field in ("Steps: 2", "Sampler: Euler", "CFG scale: 6", "Seed: 5", f"Size: {SIZE}x{SIZE}", "Model: tiny-sd"):
        assert field in text
    paths = out.save(tmp_path / "batch.png")
    assert [os.path.basename(p) for p in paths] == ["batch-0.png", "batch-1.png"]
    with Image.open(paths[1]) as im:
        assert im.info["parameters"].startswith("a green dog\n")
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(out.images[1]))
    assert out.save(tmp_path / "one.png", index=0) == [str(tmp_path / "one.png")]


def test_float64_run_can_start_from_the_float32_noise(tiny_folder):
    """The noise is drawn per dtype (as torch does): one seed gives float64 other noise than float32.
    noise_dtype="float32" draws the float32 noise and upcasts it, so a float64 golden run starts from
    exactly the float32 run's noise."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.core.random import randn
    pipe64 = StableDiffusionPipeline.from_pretrained(tiny_folder, dtype="float64")
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=2, scheduler="euler", progress=False)
    noise32 = randn((1, 4, SIZE // 4, SIZE // 4), seed=9, dtype="float32")
    assert np.abs(randn(noise32.shape, seed=9, dtype="float64") - noise32).max() > 0.1  # really other noise
    golden = pipe64(PROMPT, seed=9, noise_dtype="float32", **kwargs)
    given = pipe64(PROMPT, latents=noise32.astype(np.float64), **kwargs)
    native = pipe64(PROMPT, seed=9, **kwargs)
    assert golden.latents.dtype == np.float64
    np.testing.assert_array_equal(golden.latents, given.latents)
    assert np.abs(golden.latents - native.latents).max() > 1e-2


def test_default_model_folder_is_public_and_loads():
    import refldm
    from refldm.pipelines.sd import StableDiffusionPipeline
    assert os.path.isfile(os.path.join(refldm.DEFAULT_MODEL, "model_index.json"))
    pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
    assert pipe.default_size == 64 and pipe.name == "refldm-default"
