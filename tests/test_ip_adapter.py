"""IP-Adapter: refldm/models/clip_vision.py (CLIP's ViT) against transformers, refldm/models/ip_adapter.py (the
image projections) and the decoupled cross-attention against diffusers, the SD and SDXL pipelines with
``load_ip_adapter`` / ``ip_adapter_image`` against diffusers' on tiny random folders.

Tolerances: the vision model and the projections in float64 <= 1e-10 (relative, max|a - b| / max|b|), in
float32 <= 1e-4; the pipelines' 8-bit images within 2/255 (float32) and the final latents within 1e-10 in
float64; scale 0 gives the plain pipeline's image bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from refldm import backend
from refldm.models.clip_vision import CLIPImageProcessor, CLIPVisionModelWithProjection
from tests.conftest import require

TOL64, TOL32 = 1e-10, 1e-4
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)


def rel(a, b) -> float:
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(b.detach().double().numpy() if hasattr(b, "detach") else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def picture(seed: int, size=(40, 29)) -> Image.Image:
    """A smooth random RGB picture (not square, so the resize and the crop both do something)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    planes = [np.sin(6 * xx * rng.uniform(0.5, 2) + 4 * yy * rng.uniform(0.5, 2) + rng.uniform(0, 6))
              for _ in range(3)]
    noise = rng.normal(0, 0.1, (h, w, 3))
    return Image.fromarray(np.clip((np.stack(planes, -1) * 0.45 + 0.5 + noise) * 255, 0, 255).astype(np.uint8))


def _rerandomise(torch, model, seed):
    """Every weight redrawn: matrices ~ N(0, 1/fan_in), norm scales near 1, vectors 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)).eval()
    _rerandomise(torch, model, 0)
    folder = tmp_path_factory.mktemp("clip-vision")
    model.save_pretrained(folder)
    return folder


def test_clip_vision_agrees_with_transformers_float64_and_float32(vision_folder):
    torch = require("torch")
    transformers = require("transformers")
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(vision_folder, dtype=torch.float64).eval()
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32))
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels), output_hidden_states=True)
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        ours = CLIPVisionModelWithProjection.from_pretrained(vision_folder, dtype=dtype)
        got = ours(pixels, output_hidden_states=True)
        assert rel(got.image_embeds, want.image_embeds) <= tol
        assert rel(got.last_hidden_state, want.last_hidden_state) <= tol
        assert len(got.hidden_states) == len(want.hidden_states) == VISION["num_hidden_layers"] + 1
        for a, b in zip(got.hidden_states, want.hidden_states):
            assert rel(a, b) <= tol


@pytest.mark.parametrize("size", [(40, 29), (29, 40), (32, 32), (300, 200)])
def test_image_processor_equals_transformers_pillow_backend_bit_for_bit(size):
    require("torch")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    image = picture(3, size)
    want = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        image, return_tensors="np")["pixel_values"]
    got = CLIPImageProcessor(32)(image)["pixel_values"]
    assert got.dtype == np.float32 and got.shape == (1, 3, 32, 32)
    assert np.array_equal(got, np.asarray(want))


def test_vision_bad_input_is_one_line(vision_folder):
    ours = CLIPVisionModelWithProjection.from_pretrained(vision_folder)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\), got \(1, 3, 24, 24\)") as e:
        ours(np.zeros((1, 3, 24, 24), np.float32))
    assert "\n" not in str(e.value)
