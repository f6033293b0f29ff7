"""StableDiffusionInpaintPipeline: the same 8-bit image as diffusers' on tiny random-weight models, for a
9-channel inpainting U-Net and for an ordinary 4-channel one (masked blending), strength 1 and below.

Both pipelines draw from one seeded generator in the same order (image posterior, noise, masked-image
posterior), so they start from the same numbers; the images must agree within 2/255 per value, the
criterion of tests/test_pipeline.py.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import _rerandomise, build_tiny_sd, gradient_image

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"4": the tiny SD folder, "9": the same with a 9-channel inpainting U-Net}."""
    torch = require("torch")
    diffusers = require("diffusers")
    base = tmp_path_factory.mktemp("inpaint")
    four = build_tiny_sd(base / "tiny-sd", kind="sd1", seed=0)
    nine = str(base / "tiny-inpaint")
    shutil.copytree(four, nine)
    config = dict(diffusers.UNet2DConditionModel.load_config(os.path.join(four, "unet")))
    config["in_channels"] = 9
    unet = diffusers.UNet2DConditionModel.from_config(config)
    _rerandomise(torch, unet, 77)
    unet.save_pretrained(os.path.join(nine, "unet"))
    return {"4": four, "9": nine}


def mask_image(size=SIZE, mode="L"):
    from PIL import Image
    m = np.zeros((size, size), np.uint8)
    k = size // SIZE
    m[8 * k:24 * k, 12 * k:28 * k] = 255      # repaint a rectangle
    im = Image.fromarray(m)
    return im if mode == "L" else im.convert(mode)


_LOADED = {}


def _diffusers_pipe(folder, scheduler):
    diffusers = require("diffusers")
    if folder not in _LOADED:
        _LOADED[folder] = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
        _LOADED[folder].set_progress_bar_config(disable=True)
    pipe = _LOADED[folder]
    name = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}[scheduler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    return pipe


def _diffusers(folder, scheduler, seed, **kwargs):
    torch = require("torch")
    pipe = _diffusers_pipe(folder, scheduler)
    out = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", height=SIZE, width=SIZE, **kwargs)
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("channels, scheduler, strength", [("9", "euler", 1.0), ("9", "ddim", 0.75),
                                                           ("4", "euler", 1.0), ("4", "ddim", 0.75)])
def test_same_image_as_diffusers(folders, channels, scheduler, strength):
    from refldm import StableDiffusionInpaintPipeline
    kwargs = dict(prompt="a red cat", image=gradient_image(), mask_image=mask_image(), strength=strength,
                  num_inference_steps=6, guidance_scale=7.5)
    want = _diffusers(folders[channels], scheduler, 4, **kwargs)
    assert want.std() > 20
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folders[channels])
    got = np.stack([np.asarray(im) for im in pipe(**kwargs, seed=4, scheduler=scheduler, progress=False).images])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    if channels == "4":  # blending: outside the hole, the image comes back from its own latents
        keep = np.asarray(mask_image()) == 0
        drift = np.abs(got[0].astype(int) - np.asarray(gradient_image()).astype(int))[keep].mean()
        hole = np.abs(got[0].astype(int) - np.asarray(gradient_image()).astype(int))[~keep].mean()
        assert drift < hole


def test_padding_mask_crop_same_image_as_diffusers(folders):
    """Inpaint only the masked area: a 48x40 image, its mask's box grown by 3 pixels and to a square, scaled
    to 32x32, inpainted, scaled back and pasted (diffusers' output_type "pil": the overlay needs PIL)."""
    torch = require("torch")
    from PIL import Image

    from refldm import StableDiffusionInpaintPipeline
    from refldm.pipelines.inpaint import crop_region
    yy, xx = np.mgrid[0:40, 0:48]
    image = Image.fromarray(np.stack([xx * 5, yy * 6, (xx + yy) * 2], -1).astype(np.uint8))
    m = np.zeros((40, 48), np.uint8)
    m[10:22, 20:30] = 255
    mask = Image.fromarray(m)
    # mask columns 20..29, rows 10..21; grown by 3: x 17..33, y 7..25 (16 x 18); widened to a square: 18 x 18
    assert crop_region(mask, 32, 32, 3) == (16, 7, 34, 25)
    diffusers = require("diffusers")
    for pad, size in ((3, (32, 32)), (0, (32, 16)), (9, (16, 32)), (20, (32, 24))):
        assert crop_region(mask, *size, pad) == diffusers.image_processor.VaeImageProcessor.get_crop_region(
            mask, *size, pad=pad)
    kwargs = dict(prompt="a red cat", image=image, mask_image=mask, padding_mask_crop=3, num_inference_steps=4,
                  guidance_scale=7.5, height=32, width=32)
    pipe = _diffusers_pipe(folders["9"], "euler")
    want = np.asarray(pipe(generator=torch.Generator().manual_seed(6), **kwargs).images[0])
    ours = StableDiffusionInpaintPipeline.from_pretrained(folders["9"])
    got = np.asarray(ours(**kwargs, seed=6, scheduler="euler", progress=False).images[0])
    assert got.shape == want.shape == (40, 48, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    outside = np.ones((40, 48), bool)
    outside[7:25, 16:34] = False
    np.testing.assert_array_equal(got[outside], np.asarray(image)[outside])   # outside the box: untouched


def test_mask_of_another_size_or_colour_is_converted_and_said(folders):
    from refldm import StableDiffusionInpaintPipeline
    from refldm.pipelines.inpaint import prepare_mask
    with pytest.warns(UserWarning, match="resized to the image"):
        big = prepare_mask(mask_image(64), (SIZE, SIZE))
    with pytest.warns(UserWarning, match="RGB, not single-channel; converted to grey"):
        rgb = prepare_mask(mask_image(mode="RGB"), (SIZE, SIZE))
    np.testing.assert_array_equal(rgb, prepare_mask(mask_image(), (SIZE, SIZE)))
    assert big.shape == (1, 1, SIZE, SIZE) and set(np.unique(big)) == {0.0, 1.0}
    assert np.mean(big != rgb) < 0.05                           # the same rectangle, up to its edges
    assert big.sum() > 0.9 * rgb.sum()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folders["4"])
    with pytest.raises(ValueError, match="padding_mask_crop: the mask is empty"):
        pipe("a", image=gradient_image(), mask_image=mask_image(size=SIZE) .point(lambda v: 0), padding_mask_crop=4)


def test_cli_inpaint_writes_the_pipelines_image(folders, tmp_path):
    from PIL import Image

    from refldm import StableDiffusionInpaintPipeline
    from refldm.cli import main
    gradient_image().save(tmp_path / "in.png")
    mask_image(64).convert("RGB").save(tmp_path / "mask.png")   # another size, three channels: warned, converted
    assert main(["inpaint", "-m", folders["9"], "-i", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "-p", "a red cat", "--steps", "3", "--seed", "5", "--sampler", "euler", "-q",
                 "-o", str(tmp_path / "out.png")]) == 0
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folders["9"])
    with pytest.warns(UserWarning):
        want = pipe("a red cat", image=gradient_image(), mask_image=mask_image(64).convert("RGB"),
                    num_inference_steps=3, seed=5, scheduler="euler", progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want))
    assert main(["inpaint", "-m", folders["9"], "-i", str(tmp_path / "in.png"), "--mask", str(tmp_path / "no.png"),
                 "-p", "a"]) == 2
