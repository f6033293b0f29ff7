"""StableDiffusionAdapterPipeline and StableDiffusionXLAdapterPipeline (refldm/pipelines/t2i_adapter.py) against
diffusers' on tiny random folders with tiny random T2I-Adapters: the 8-bit images within 2/255; scale 0 gives the
plain pipeline's image bit for bit; bad input one line each."""

from __future__ import annotations

import numpy as np
import pytest

from refldm.models.t2i_adapter import T2IAdapter
from refldm.pipelines.sd import StableDiffusionPipeline
from refldm.pipelines.t2i_adapter import StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline
from tests.conftest import require
from tests.test_controlnet_pipeline import PROMPT, SIZE, STEPS, control_picture
from tests.test_pipeline import _max_pixel_diff, _rerandomise, build_tiny_sd

SD_ADAPTER = dict(channels=[16, 32, 32], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter")
XL_ADAPTER = dict(channels=[16, 32, 32, 32], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter_xl")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def _adapter(root, name, cfg, seed):
    torch = require("torch")
    diffusers = require("diffusers")
    a = diffusers.T2IAdapter(**cfg)
    _rerandomise(torch, a, seed)
    a.save_pretrained(root / name, safe_serialization=True)
    return root / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD folder and two tiny random adapters (full and light) fitting its U-Net."""
    root = tmp_path_factory.mktemp("t2i-pipeline")
    sd = build_tiny_sd(root / "sd", kind="sd1", seed=0)
    light = dict(channels=[16, 32], num_res_blocks=1, downscale_factor=4, adapter_type="light_adapter")
    return sd, [_adapter(root, "full", SD_ADAPTER, 300), _adapter(root, "light", light, 301)]


def _diffusers_images(pipe_cls, base, adapters, torch, **kwargs):
    import inspect
    takes = inspect.signature(pipe_cls).parameters
    parts = {k: v for k, v in base.components.items() if k in takes}     # the SD one takes no image_encoder
    pipe = pipe_cls(**parts, adapter=adapters[0] if len(adapters) == 1 else adapters)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="np",
               **kwargs)
    ref = (out.images * 255).round().astype(np.uint8)
    assert ref.std() > 10
    return ref


def _ours(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, **kwargs).images


def test_one_and_two_adapters_same_image_as_diffusers_and_scale_zero_is_the_plain_pipeline(folders):
    torch = require("torch")
    diffusers = require("diffusers")
    sd, paths = folders
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d_base = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
        d_adapters = [diffusers.T2IAdapter.from_pretrained(p) for p in paths]
        base = StableDiffusionPipeline.from_pretrained(sd)
        adapters = [T2IAdapter.from_pretrained(p) for p in paths]
        images = [control_picture(4), control_picture(5)]
        plain = base(PROMPT, num_inference_steps=STEPS, seed=1, progress=False, height=SIZE, width=SIZE).images
        for n, kwargs in [(1, dict(image=images[0], adapter_conditioning_scale=0.9)),
                          (2, dict(image=images, adapter_conditioning_scale=[0.6, 1.1], negative_prompt="blurry"))]:
            ref = _diffusers_images(diffusers.StableDiffusionAdapterPipeline, d_base, d_adapters[:n], torch, **kwargs)
            pipe = StableDiffusionAdapterPipeline(base, adapters[0] if n == 1 else adapters)
            ours = _ours(pipe, **kwargs)
            assert _max_pixel_diff(ours, ref) <= 2, kwargs
            assert _max_pixel_diff(ours, np.stack([np.asarray(im) for im in plain])) > 10   # the adapter steers
        pipe = StableDiffusionAdapterPipeline(base, adapters[0])
        zero = _ours(pipe, image=images[0], adapter_conditioning_scale=0.0)
        assert np.array_equal(np.asarray(zero[0]), np.asarray(plain[0]))
        off = _ours(pipe, image=images[0], adapter_conditioning_factor=0.0)    # no step with the features
        assert np.array_equal(np.asarray(off[0]), np.asarray(plain[0]))
    finally:
        torch.set_num_threads(before)


def test_bad_input_is_one_line_naming_it(folders):
    sd, paths = folders
    base = StableDiffusionPipeline.from_pretrained(sd)
    pipe = StableDiffusionAdapterPipeline(base, T2IAdapter.from_pretrained(paths[0]))
    image = control_picture(1)
    cases = [(dict(image=image, adapter_conditioning_scale=float("nan")), "adapter_conditioning_scale=nan"),
             (dict(image=image, adapter_conditioning_scale=-1.0), "must be a finite number >= 0"),
             (dict(image=[image, image]), "2 adapter images for 1 adapter"),
             (dict(image=image, adapter_conditioning_factor=1.5), "adapter_conditioning_factor=1.5"),
             (dict(image=image, height=30), "height=30: must be a positive multiple"),
             (dict(image=None), "needs a control image"),
             (dict(image=image, hires_scale=2.0), "hires_scale: not with a T2I-Adapter")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            _ours(pipe, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="adapter image 0 is 40x36; resized to 32x32"):
        _ours(pipe, image=image.resize((40, 36)), height=SIZE, width=SIZE, num_images_per_prompt=1)
    cfg = dict(SD_ADAPTER, adapter_type="full_adapter_xl", channels=[16, 32, 32, 32], downscale_factor=8)
    xl = T2IAdapter.from_config(cfg)
    with pytest.raises(ValueError, match="SDXL T2I-Adapter with a cross_attention_dim-32 U-Net"):
        StableDiffusionAdapterPipeline(base, xl)
    wrong = T2IAdapter.from_config(dict(SD_ADAPTER, channels=[16, 16, 32]))
    with pytest.raises(ValueError, match=r"feature widths \[16, 16, 32\] do not fit"):
        StableDiffusionAdapterPipeline(base, wrong)


def test_sdxl_adapter_same_image_as_diffusers_with_the_mid_block_feature_and_factor(tmp_path):
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    sd = build_tiny_sdxl(tmp_path / "base", seed=0)
    path = _adapter(tmp_path, "xl", XL_ADAPTER, 400)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d_base = diffusers.StableDiffusionXLPipeline.from_pretrained(sd, add_watermarker=False)
        d_adapter = diffusers.T2IAdapter.from_pretrained(path)
        base = StableDiffusionXLPipeline.from_pretrained(sd)
        pipe = StableDiffusionXLAdapterPipeline(base, T2IAdapter.from_pretrained(path))
        for kwargs in (dict(image=control_picture(6), adapter_conditioning_scale=0.8),
                       dict(image=control_picture(7), adapter_conditioning_factor=0.5, negative_prompt="blurry")):
            ref = _diffusers_images(diffusers.StableDiffusionXLAdapterPipeline, d_base, [d_adapter], torch, **kwargs)
            assert _max_pixel_diff(_ours(pipe, **kwargs), ref) <= 2, kwargs
        with pytest.raises(ValueError, match="T2I-Adapter with an SDXL U-Net"):
            StableDiffusionXLAdapterPipeline(base, T2IAdapter.from_config(SD_ADAPTER))
    finally:
        torch.set_num_threads(before)
