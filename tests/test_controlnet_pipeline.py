"""StableDiffusionControlNetPipeline (refldm/pipelines/controlnet.py) against diffusers' on a tiny random
SD folder with tiny random ControlNets: the 8-bit images within 2/255, one and two ControlNets, guess mode,
control_guidance_start/end; scale 0 gives the plain pipeline's image exactly; bad input one line each."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from refldm.models.controlnet import ControlNetModel
from refldm.pipelines.controlnet import StableDiffusionControlNetPipeline, control_keep
from refldm.pipelines.sd import StableDiffusionPipeline
from tests.conftest import require
from tests.test_pipeline import _max_pixel_diff, _rerandomise, build_tiny_sd

SIZE = 32     # pixels; the tiny VAE is 4x, so latents (B, 4, 8, 8) and control embeddings 4x down
STEPS = 6
PROMPT = "a photo of a red cat on the white background"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def control_picture(seed):
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, SIZE - 8, 2))
        d.rectangle([x, y, x + int(rng.integers(4, 16)), y + int(rng.integers(4, 16))], outline=(255, 255, 255))
    return im


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD folder and two tiny random ControlNets of its U-Net's shape."""
    torch = require("torch")
    diffusers = require("diffusers")
    root = tmp_path_factory.mktemp("controlnet-pipeline")
    sd = build_tiny_sd(root / "sd", kind="sd1", seed=0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    nets = []
    for j in range(2):
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16))
        _rerandomise(torch, cn, 100 + j)
        with torch.no_grad():      # the zero convolutions at a scale that steers but does not swamp the U-Net
            for name, p in cn.named_parameters():
                if name.startswith("controlnet_down_blocks") or name.startswith("controlnet_mid_block"):
                    p.mul_(0.3)
        cn.save_pretrained(root / f"cn{j}", safe_serialization=True)
        nets.append(root / f"cn{j}")
    return sd, nets


@pytest.fixture(scope="module")
def reference(folders):
    torch = require("torch")
    diffusers = require("diffusers")
    sd, nets = folders
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cns = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
    sd_pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)

    def run(n_nets, **kwargs):
        cn = cns[0] if n_nets == 1 else cns[:n_nets]       # a list: diffusers makes its MultiControlNetModel
        pipe = diffusers.StableDiffusionControlNetPipeline(**sd_pipe.components, controlnet=cn)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="np",
                   **kwargs)
        return (out.images * 255).round().astype(np.uint8)

    yield run
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(folders):
    sd, nets = folders
    base = StableDiffusionPipeline.from_pretrained(sd)
    cns = [ControlNetModel.from_pretrained(n) for n in nets]
    return base, StableDiffusionControlNetPipeline(base, cns[0]), StableDiffusionControlNetPipeline(base, cns)


def _ours(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs).images


@pytest.mark.parametrize("kwargs", [
    dict(controlnet_conditioning_scale=0.8),
    dict(controlnet_conditioning_scale=1.0, guess_mode=True),
    dict(controlnet_conditioning_scale=1.2, control_guidance_start=0.2, control_guidance_end=0.7),
], ids=["scale", "guess-mode", "start-end"])
def test_one_controlnet_same_image_as_diffusers(pipes, reference, kwargs):
    image = control_picture(0)
    ref = reference(1, image=image, **kwargs)
    assert ref.std() > 10
    assert _max_pixel_diff(_ours(pipes[1], image=image, **kwargs), ref) <= 2


def test_two_controlnets_same_image_as_diffusers_multi_controlnet(pipes, reference):
    kwargs = dict(image=[control_picture(0), control_picture(1)], controlnet_conditioning_scale=[0.6, 1.1],
                  control_guidance_start=[0.0, 0.3], control_guidance_end=[0.8, 1.0])
    ref = reference(2, **kwargs)
    assert _max_pixel_diff(_ours(pipes[2], **kwargs), ref) <= 2
    # and the second ControlNet matters: without it the image differs
    single = reference(1, image=kwargs["image"][0], controlnet_conditioning_scale=0.6, control_guidance_end=0.8)
    assert np.abs(single.astype(int) - ref.astype(int)).max() > 2


def test_conditioning_scale_zero_is_the_plain_pipeline(pipes):
    base, one, _ = pipes
    plain = np.asarray(base(PROMPT, num_inference_steps=STEPS, seed=1, progress=False).images[0])
    zero = np.asarray(_ours(one, image=control_picture(0), controlnet_conditioning_scale=0.0)[0])
    assert np.array_equal(zero, plain)
    steered = np.asarray(_ours(one, image=control_picture(0))[0])
    assert np.abs(steered.astype(int) - plain.astype(int)).max() > 2


def test_control_keep_follows_diffusers_rule():
    keep = control_keep(10, [0.0, 0.25], [0.5, 1.0])
    assert [k[0] for k in keep] == [1.0] * 5 + [0.0] * 5
    assert [k[1] for k in keep] == [0.0] * 3 + [1.0] * 7


def test_control_image_of_another_size_is_resized_with_a_warning(pipes):
    small = control_picture(0).resize((24, 24))
    with pytest.warns(UserWarning, match="control image 0 is 24x24; resized to 32x32"):
        out = pipes[1](PROMPT, image=small, height=SIZE, width=SIZE, num_inference_steps=1, seed=1, progress=False)
    assert out.images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale=nan"),
    (dict(controlnet_conditioning_scale=-0.5), "controlnet_conditioning_scale=-0.5"),
    (dict(image=[None, None]), "2 control images for 1 ControlNet: give one per ControlNet"),
    (dict(control_guidance_start=0.8, control_guidance_end=0.2), "control_guidance_start=0.8"),
    (dict(image=None), "needs a control image"),
])
def test_bad_input_is_one_line_naming_it(pipes, kwargs, message):
    args = dict(image=control_picture(0), num_inference_steps=1, seed=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as e:
        pipes[1](PROMPT, **args)
    assert "\n" not in str(e.value)


# -- SDXL ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl_folders(tmp_path_factory):
    """A tiny SDXL base folder and two tiny random SDXL ControlNets of its U-Net's shape."""
    torch = require("torch")
    diffusers = require("diffusers")
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    root = tmp_path_factory.mktemp("controlnet-sdxl")
    sd = build_tiny_sdxl(root / "base", seed=0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    nets = []
    for j in range(2):
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16))
        _rerandomise(torch, cn, 200 + j)
        with torch.no_grad():
            for name, p in cn.named_parameters():
                if name.startswith("controlnet_down_blocks") or name.startswith("controlnet_mid_block"):
                    p.mul_(0.3)
        cn.save_pretrained(root / f"cn{j}", safe_serialization=True)
        nets.append(root / f"cn{j}")
    return sd, nets


def test_sdxl_one_and_two_controlnets_same_image_as_diffusers(xl_folders, folders):
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.controlnet import StableDiffusionXLControlNetPipeline
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    sd, nets = xl_folders
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d_base = diffusers.StableDiffusionXLPipeline.from_pretrained(sd, add_watermarker=False)
        d_cns = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
        base = StableDiffusionXLPipeline.from_pretrained(sd)
        cns = [ControlNetModel.from_pretrained(n) for n in nets]
        images = [control_picture(2), control_picture(3)]
        runs = [(1, dict(image=images[0], controlnet_conditioning_scale=0.9, control_guidance_end=0.8)),
                (1, dict(image=images[0], guess_mode=True, negative_prompt="blurry")),
                (2, dict(image=images, controlnet_conditioning_scale=[0.5, 1.0], control_guidance_start=[0.0, 0.4]))]
        for n, kwargs in runs:
            d_pipe = diffusers.StableDiffusionXLControlNetPipeline(
                **d_base.components, controlnet=d_cns[0] if n == 1 else d_cns, add_watermarker=False)
            d_pipe.set_progress_bar_config(disable=True)
            ref = d_pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                         output_type="np", **kwargs).images
            ref = (ref * 255).round().astype(np.uint8)
            assert ref.std() > 10
            ours = StableDiffusionXLControlNetPipeline(base, cns[0] if n == 1 else cns)
            diff = _max_pixel_diff(_ours(ours, **kwargs), ref)
            assert diff <= 2, kwargs
        # img2img: one ControlNet, and two in guess mode
        from refldm.pipelines.controlnet import StableDiffusionXLControlNetImg2ImgPipeline
        from tests.test_pipeline import gradient_image
        init = gradient_image(SIZE)
        for n, kwargs in [(1, dict(control_image=images[0], strength=0.7)),
                          (2, dict(control_image=images, strength=0.9, guess_mode=True,
                                   controlnet_conditioning_scale=[1.0, 0.7]))]:
            d_pipe = diffusers.StableDiffusionXLControlNetImg2ImgPipeline(
                **d_base.components, controlnet=d_cns[0] if n == 1 else d_cns, add_watermarker=False)
            d_pipe.set_progress_bar_config(disable=True)
            ref = d_pipe(PROMPT, image=init, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                         output_type="np", **kwargs).images
            ref = (ref * 255).round().astype(np.uint8)
            assert ref.std() > 10
            ours = StableDiffusionXLControlNetImg2ImgPipeline(base, cns[0] if n == 1 else cns)
            assert _max_pixel_diff(_ours(ours, image=init, **kwargs), ref) <= 2, kwargs
        # the families are checked: an SD 1.x ControlNet does not go with an SDXL U-Net, nor the other way
        sd1_cn = ControlNetModel.from_pretrained(folders[1][0])
        with pytest.raises(ValueError, match="ControlNet with an SDXL U-Net"):
            StableDiffusionXLControlNetPipeline(base, sd1_cn)
        with pytest.raises(ValueError, match="SDXL ControlNet with a "):
            StableDiffusionControlNetPipeline(StableDiffusionPipeline.from_pretrained(folders[0]), cns[0])
    finally:
        torch.set_num_threads(before)


def test_trace_names_the_controlnets_layers_apart_from_the_unets(pipes):
    from refldm.crosscheck.trace import record
    with record() as rec:
        pipes[2](PROMPT, image=[control_picture(0), control_picture(1)], num_inference_steps=1, seed=1,
                 progress=False)
    names = set(rec.activations)
    assert "steps.0.unet.controlnet.nets.1.controlnet_mid_block" in names
    assert "steps.0.unet.controlnet.nets.0.controlnet_cond_embedding" in names
    assert "steps.0.unet.mid_block" in names and "steps.0.noise_pred" in names


def test_img2img_with_one_and_two_controlnets_same_image_as_diffusers(folders, pipes):
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.controlnet import StableDiffusionControlNetImg2ImgPipeline
    from tests.test_pipeline import gradient_image
    sd, nets = folders
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d_sd = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
        d_cns = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
        base = pipes[0]
        cns = [ControlNetModel.from_pretrained(n) for n in nets]
        init = gradient_image(SIZE)
        runs = [(1, dict(control_image=control_picture(0), strength=0.7)),
                (1, dict(control_image=control_picture(0), strength=1.0, guess_mode=True,
                         controlnet_conditioning_scale=1.3)),
                (2, dict(control_image=[control_picture(0), control_picture(1)], strength=0.6,
                         controlnet_conditioning_scale=[0.7, 1.0], control_guidance_end=[1.0, 0.5]))]
        for n, kwargs in runs:
            d_pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(
                **d_sd.components, controlnet=d_cns[0] if n == 1 else d_cns)
            d_pipe.set_progress_bar_config(disable=True)
            ref = d_pipe(PROMPT, image=init, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                         output_type="np", **kwargs).images
            ref = (ref * 255).round().astype(np.uint8)
            assert ref.std() > 10
            ours = StableDiffusionControlNetImg2ImgPipeline(base, cns[0] if n == 1 else cns)
            assert _max_pixel_diff(_ours(ours, image=init, **kwargs), ref) <= 2, kwargs
        # scale 0: the plain img2img pipeline's image, bit for bit
        zero = StableDiffusionControlNetImg2ImgPipeline(base, cns[0])
        plain = base(PROMPT, image=init, strength=0.7, num_inference_steps=STEPS, seed=1, progress=False).images
        assert _max_pixel_diff(_ours(zero, image=init, control_image=control_picture(0), strength=0.7,
                                     controlnet_conditioning_scale=0.0),
                               np.stack([np.asarray(im) for im in plain])) == 0
        with pytest.raises(ValueError, match="strength=0 must lie in"):
            ours(PROMPT, image=init, control_image=[control_picture(0)] * 2, strength=0)
    finally:
        torch.set_num_threads(before)


def test_nan_latents_stop_naming_the_step(pipes):
    from refldm.pipelines.sd import NonFiniteLatentsError
    latents = np.full((1, 4, 8, 8), np.nan, np.float32)
    with pytest.raises(NonFiniteLatentsError, match="after step 1 of 2"):
        pipes[1](PROMPT, image=control_picture(0), latents=latents, num_inference_steps=2, seed=1, progress=False)


def test_inpaint_with_controlnets_same_image_as_diffusers_4_and_9_channels(folders, pipes, tmp_path):
    import shutil
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.controlnet import StableDiffusionControlNetInpaintPipeline
    from tests.test_inpaint import mask_image
    from tests.test_pipeline import gradient_image
    sd, nets = folders
    nine = tmp_path / "nine"
    shutil.copytree(sd, nine)
    config = dict(diffusers.UNet2DConditionModel.load_config(str(nine / "unet")), in_channels=9)
    unet9 = diffusers.UNet2DConditionModel.from_config(config)
    _rerandomise(torch, unet9, 78)
    unet9.save_pretrained(nine / "unet")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d_cns = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
        cns = [ControlNetModel.from_pretrained(n) for n in nets]
        init, mask = gradient_image(SIZE), mask_image()
        runs = [(sd, 1, dict(control_image=control_picture(0), controlnet_conditioning_scale=1.0)),
                (sd, 2, dict(control_image=[control_picture(0), control_picture(1)], strength=0.75,
                             controlnet_conditioning_scale=[0.8, 0.6], control_guidance_start=[0.0, 0.3])),
                (nine, 1, dict(control_image=control_picture(1), guess_mode=True, controlnet_conditioning_scale=1.2))]
        for folder, n, kwargs in runs:
            d_sd = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
            d_pipe = diffusers.StableDiffusionControlNetInpaintPipeline(
                **d_sd.components, controlnet=d_cns[0] if n == 1 else d_cns)
            d_pipe.set_progress_bar_config(disable=True)
            ref = d_pipe(PROMPT, image=init, mask_image=mask, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(1), output_type="np", **kwargs).images
            ref = (ref * 255).round().astype(np.uint8)
            assert ref.std() > 10
            base = pipes[0] if folder == sd else StableDiffusionPipeline.from_pretrained(folder)
            ours = StableDiffusionControlNetInpaintPipeline(base, cns[0] if n == 1 else cns)
            diff = _max_pixel_diff(_ours(ours, image=init, mask_image=mask, **kwargs), ref)
            assert diff <= 2, (folder, kwargs)
    finally:
        torch.set_num_threads(before)
