"""The pipeline core (refldm/pipelines/common.py) seen through every pipeline: SD txt2img, SD img2img, SDXL,
SDXL img2img, inpainting, SD3 txt2img and img2img. The same bad argument gets the same one-line message from
each; every pipeline fills in the parameters text; the core's record formats the web UIs' text.

No torch: SD and inpainting run the model shipped with refldm; the SDXL pipelines are built from its parts
plus a second text encoder and an SDXL U-Net (or an SD3 transformer) with random weights (a few seconds in all).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

import refldm
from refldm.pipelines import common

SIZE = 64  # the default model's VAE has 4 levels: latents (B, 4, 8, 8)


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    state = {key: (rng.standard_normal(value.shape) * 0.05).astype(np.float32)
             for key, _, _, value in model.params()}
    return model.load_state_dict(state)


@pytest.fixture(scope="module")
def pipes():
    from refldm.models.clip import CLIPTextModelWithProjection
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.tokenizer import CLIPTokenizer
    from refldm.pipelines.inpaint import StableDiffusionInpaintPipeline
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from refldm.pipelines.sd3 import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
    from refldm.checkpoints.weights import read_config
    import os

    sd = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
    inpaint = StableDiffusionInpaintPipeline(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.scheduler_config,
                                             sd.configs, name=sd.name)
    text_config = read_config(os.path.join(refldm.DEFAULT_MODEL, "text_encoder"))
    encoder_2 = _randomise(CLIPTextModelWithProjection.from_config(text_config), 1)
    unet_config = dict(read_config(os.path.join(refldm.DEFAULT_MODEL, "unet")), cross_attention_dim=128,
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=text_config["projection_dim"] + 6 * 8,
                       use_linear_projection=True)
    unet = _randomise(UNet2DConditionModel.from_config(unet_config), 2)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(refldm.DEFAULT_MODEL, "tokenizer"))
    scheduler = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                 "timestep_spacing": "leading"}
    parts = (sd.vae, sd.text_encoder, encoder_2, tokenizer, tokenizer, unet, scheduler, {"unet": unet_config})
    xl = StableDiffusionXLPipeline(*parts, name="tiny-xl")
    xl_img = StableDiffusionXLImg2ImgPipeline(*parts, name="tiny-xl")
    sd3 = _tiny_sd3(sd, encoder_2, tokenizer)
    sd3_img = StableDiffusion3Img2ImgPipeline(*sd3, name="tiny-sd3")
    sd3 = StableDiffusion3Pipeline(*sd3, name="tiny-sd3")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    return {
        "sd": lambda *a, **k: sd(*a, **k),
        "sd img2img": lambda *a, **k: sd(*a, image=image, **k),
        "sdxl": lambda *a, **k: xl(*a, **k),
        "sdxl img2img": lambda *a, **k: xl_img(*a, image=image, **k),
        "inpaint": lambda *a, **k: inpaint(*a, image=image, mask_image=mask, **k),
        "sd3": lambda *a, **k: sd3(*a, **k),  # default size: sample_size 8 x 8 = SIZE
        "sd3 img2img": lambda *a, **k: sd3_img(*a, image=image, **k),
    }


def _tiny_sd3(sd, encoder, tokenizer):
    """The parts of a tiny SD3 pipeline (without T5): an SD3 transformer with random weights over the default
    model's 4-channel VAE, the projecting CLIP encoder as both CLIP-L and CLIP-G (pooled 2 x 64)."""
    from refldm.models.sd3_transformer import SD3Transformer2DModel
    config = dict(sample_size=SIZE // 8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=16,
                  pooled_projection_dim=128, pos_embed_max_size=8)
    transformer = _randomise(SD3Transformer2DModel.from_config(config), 3)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    return (transformer, sd.vae, encoder, tokenizer, encoder, tokenizer, None, None, scheduler,
            {"transformer": config})


ALL = ["sd", "sd img2img", "sdxl", "sdxl img2img", "inpaint", "sd3", "sd3 img2img"]
SIZED = ["sd", "sdxl", "inpaint", "sd3"]            # the pipelines that take height / width
STRENGTH = ["sd img2img", "sdxl img2img", "inpaint", "sd3 img2img"]

BAD = [  # (argument, the one line every pipeline says), each over ALL unless restricted
    (dict(prompt=5), "prompt must be a string or a non-empty list of strings, got 5", ALL),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings, got []", ALL),
    (dict(prompt=["a", 3]), "prompt must be a string or a non-empty list of strings, got ['a', 3]", ALL),
    (dict(negative_prompt=["a", "b"]),
     "negative_prompt: give one string, or a list of 1 strings (one per prompt), got ['a', 'b']", ALL),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0", ALL),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5", ALL),
    (dict(num_inference_steps=True), "num_inference_steps must be an integer >= 1, got True", ALL),
    (dict(num_inference_steps="3"), "num_inference_steps must be an integer >= 1, got '3'", ALL),
    (dict(guidance_scale=math.nan), "guidance_scale must be finite, got nan", ALL),
    (dict(guidance_scale=-math.inf), "guidance_scale must be finite, got -inf", ALL),
    (dict(seed=-1), "seed -1 is outside 0..2**64-1 (18446744073709551615), the range torch and diffusers take",
     ALL),
    (dict(seed=2 ** 64), "seed 18446744073709551616 is outside 0..2**64-1", ALL),
    (dict(seed=1.5), "seed must be an integer, got 1.5", ALL),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0", ALL),
    (dict(output_type="np"), "output_type='np': only 'pil' and 'latent'", ALL),
    (dict(height=36, width=64), "height and width must be positive multiples of 8, got 64x36", SIZED),
    (dict(height=64, width=0), "height and width must be positive multiples of 8, got 0x64", SIZED),
    (dict(strength=1.5), "strength=1.5 must lie in [0, 1]", STRENGTH),
    (dict(strength=-0.1), "strength=-0.1 must lie in [0, 1]", STRENGTH),
]
CASES = [pytest.param(which, kwargs, message, id=f"{which}-{'-'.join(f'{k}={v!r}' for k, v in kwargs.items())}")
         for kwargs, message, where in BAD for which in where]


@pytest.mark.parametrize("which, kwargs, message", CASES)
def test_the_same_bad_argument_gets_the_same_one_line_message_from_every_pipeline(pipes, which, kwargs, message):
    args = dict(prompt="a red circle", num_inference_steps=2, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipes[which](**args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ALL)
def test_every_pipeline_fills_in_the_parameters_and_takes_integral_float_steps(pipes, which):
    extra = dict(strength=0.75) if which in STRENGTH else {}
    out = pipes[which](["a red circle", "a blue square"], negative_prompt="blurry", num_inference_steps=2.0,
                       guidance_scale=4.0, seed=7, sampler="euler", progress=False, **extra)
    assert len(out.images) == len(out.parameters) == len(out.generation) == 2
    for k, (image, text) in enumerate(zip(out.images, out.parameters)):
        assert image.info["parameters"] == text == out.generation[k].text()
        lines = text.split("\n")
        assert lines[0] == ["a red circle", "a blue square"][k] and lines[1] == "Negative prompt: blurry"
        for part in ("Steps: 2,", "Sampler: Euler,", "CFG scale: 4,", "Seed: 7,", f"Size: {SIZE}x{SIZE},"):
            assert part in lines[2], (part, lines[2])
        assert ("Denoising strength:" in lines[2]) == (which in STRENGTH)
        assert ("Original size: 64x64, Target size: 64x64, Crop: 0x0" in lines[2]) == which.startswith("sdxl")


@pytest.mark.parametrize("which", ["sd", "sdxl", "inpaint", "sd3"])
def test_num_images_per_prompt_repeats_each_prompt(pipes, which):
    kwargs = dict(num_inference_steps=1, seed=3, progress=False, output_type="latent")
    repeated = pipes[which](["a", "b"], num_images_per_prompt=2, **kwargs)
    listed = pipes[which](["a", "a", "b", "b"], **kwargs)
    np.testing.assert_array_equal(repeated.latents, listed.latents)
    assert [g.prompt for g in repeated.generation] == ["a", "a", "b", "b"] and repeated.images == []


def test_the_nan_guard_names_the_step_in_every_pipeline():
    guard = common.nan_guard(3)
    guard(0, 981, np.zeros((1, 4, 2, 2)))
    bad = np.zeros((1, 4, 2, 2))
    bad[0, 1, 1, 1] = np.inf
    with pytest.raises(common.NonFiniteLatentsError, match=r"after step 2 of 3 \(timestep 500\)"):
        guard(1, 500.0, bad)


def test_the_parameters_record_writes_the_web_uis_text():
    made = common.GenerationParameters("a cat", "", 20, "DPM++ 2M Karras", 7.5, None, 512, 768, "v1-5",
                                       strength=0.7, extra={"Refiner": "r"})
    assert made.text() == ("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: unknown, "
                           "Size: 512x768, Model: v1-5, Denoising strength: 0.7, "
                           f"Version: refldm {refldm.__version__}, Refiner: r")
    assert made.replace(negative_prompt="blur", seed=3).text().startswith("a cat\nNegative prompt: blur\nSteps: 20")


def test_sdxl_shares_the_core_not_the_sd_pipeline():
    """SDXL's encode_prompt has its own signature: it takes the shared parts from the core, not from SD."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    assert not issubclass(StableDiffusionXLPipeline, StableDiffusionPipeline)
    assert issubclass(StableDiffusionXLPipeline, common.DiffusionPipeline)
    assert issubclass(StableDiffusionPipeline, common.DiffusionPipeline)
