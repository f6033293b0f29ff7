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


# -- the image projections ----------------------------------------------------------------------------------------

def ip_adapter_state(torch, unet, embed_dim: int, seed: int, plus: bool = False, queries: int = 3, depth: int = 4,
                     hidden: int = 64, vision_tokens_dim: int | None = None) -> dict:
    """A random IP-Adapter state dict in the file's layout (image_proj.*, ip_adapter.{2k+1}.*) for `unet`."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    cross = cross if isinstance(cross, int) else cross[0]

    def w(*shape):
        return torch.randn(shape, generator=g) / np.sqrt(shape[-1])

    def v(n, scale=0.1, one=0.0):
        return one + scale * torch.randn(n, generator=g)

    state = {}
    if not plus:
        state.update({"image_proj.proj.weight": w(4 * cross, embed_dim), "image_proj.proj.bias": v(4 * cross),
                      "image_proj.norm.weight": v(cross, one=1), "image_proj.norm.bias": v(cross)})
    else:
        inner = 64  # one head of 64
        state.update({"image_proj.latents": torch.randn((1, queries, hidden), generator=g) / hidden ** 0.5,
                      "image_proj.proj_in.weight": w(hidden, vision_tokens_dim), "image_proj.proj_in.bias": v(hidden),
                      "image_proj.proj_out.weight": w(cross, hidden), "image_proj.proj_out.bias": v(cross),
                      "image_proj.norm_out.weight": v(cross, one=1), "image_proj.norm_out.bias": v(cross)})
        for i in range(depth):
            p = f"image_proj.layers.{i}."
            state.update({p + "0.norm1.weight": v(hidden, one=1), p + "0.norm1.bias": v(hidden),
                          p + "0.norm2.weight": v(hidden, one=1), p + "0.norm2.bias": v(hidden),
                          p + "0.to_q.weight": w(inner, hidden), p + "0.to_kv.weight": w(2 * inner, hidden),
                          p + "0.to_out.weight": w(hidden, inner),
                          p + "1.0.weight": v(hidden, one=1), p + "1.0.bias": v(hidden),
                          p + "1.1.weight": w(4 * hidden, hidden), p + "1.3.weight": w(hidden, 4 * hidden)})
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    k = 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        attn = unet.get_submodule(name[:-len(".processor")])
        inner = attn.to_k.weight.shape[0]
        state[f"ip_adapter.{2 * names.index(name) + 1}.to_k_ip.weight"] = w(inner, cross) * 2
        state[f"ip_adapter.{2 * names.index(name) + 1}.to_v_ip.weight"] = w(inner, cross) * 2
        k += 2
    return state


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
def test_image_projection_agrees_with_diffusers(tmp_path, plus):
    torch = require("torch")
    diffusers = require("diffusers")
    from safetensors.torch import save_file
    from refldm.adapters.ip_adapter import load_ip_adapter_file
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    state = ip_adapter_state(torch, unet, 20, seed=5, plus=plus, vision_tokens_dim=20)
    save_file(state, tmp_path / "ipa.safetensors")
    ref = unet._convert_ip_adapter_image_proj_to_diffusers(
        {k[len("image_proj."):]: t for k, t in state.items() if k.startswith("image_proj.")},
        low_cpu_mem_usage=False).double()
    x = np.random.default_rng(2).normal(size=(3, 7, 20) if plus else (3, 20))
    with torch.no_grad():
        want = ref(torch.from_numpy(x))
    for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
        adapter = load_ip_adapter_file(tmp_path / "ipa.safetensors", dtype=dtype)
        assert adapter.kind == ("plus" if plus else "plain")
        assert rel(adapter.image_proj(backend.asarray(x, dtype=dtype)), want) <= tol


# -- the pipelines ------------------------------------------------------------------------------------------------

SIZE, STEPS, PROMPT = 32, 5, "a photo of a red cat on the white background"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    from refldm.accel import single_threaded_blas
    with single_threaded_blas():
        yield


def _write_adapters(torch, unet, folder, vision_folder, seed):
    """folder/image_encoder (the tiny CLIP ViT) and folder/ip-adapter{,-plus}.safetensors for `unet`."""
    import shutil
    from safetensors.torch import save_file
    shutil.copytree(vision_folder, folder / "image_encoder")
    save_file(ip_adapter_state(torch, unet, VISION["projection_dim"], seed), folder / "ip-adapter.safetensors")
    save_file(ip_adapter_state(torch, unet, VISION["projection_dim"], seed + 1, plus=True,
                               vision_tokens_dim=VISION["hidden_size"]), folder / "ip-adapter-plus.safetensors")
    return folder


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory, vision_folder):
    torch = require("torch")
    diffusers = require("diffusers")
    from tests.test_pipeline import build_tiny_sd
    root = tmp_path_factory.mktemp("ip-adapter-sd")
    sd = build_tiny_sd(root / "sd", kind="sd1", seed=0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    return sd, _write_adapters(torch, unet, root / "ipa", vision_folder, 10)


def _diffusers_image(cls, folder, ipa, weight_name, scale, dtype="float32", **kwargs):
    torch = require("torch")
    diffusers = require("diffusers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = getattr(diffusers, cls).from_pretrained(folder, **({"safety_checker": None} if cls ==
                                                                   "StableDiffusionPipeline" else {}))
        pipe.load_ip_adapter(str(ipa), subfolder="", weight_name=weight_name)
        pipe.set_ip_adapter_scale(scale)
        image = [picture(7), picture(8)] if isinstance(weight_name, list) else picture(7)
        pipe = pipe.to(getattr(torch, dtype))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
                   output_type="latent" if dtype == "float64" else "np", ip_adapter_image=image, **kwargs)
        if dtype == "float64":
            return out.images.numpy()
        return (out.images * 255).round().astype(np.uint8)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("weight_name", ["ip-adapter.safetensors", "ip-adapter-plus.safetensors"],
                         ids=["plain", "plus"])
def test_sd_pipeline_with_ip_adapter_same_image_as_diffusers(sd_folders, weight_name):
    from refldm.pipelines.sd import StableDiffusionPipeline
    from tests.test_pipeline import _max_pixel_diff
    sd, ipa = sd_folders
    want = _diffusers_image("StableDiffusionPipeline", sd, ipa, weight_name, 0.8, height=SIZE, width=SIZE)
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    plain = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False).images
    pipe.load_ip_adapter(ipa, subfolder="", weight_name=weight_name)
    pipe.set_ip_adapter_scale(0.8)
    got = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False,
               ip_adapter_image=picture(7)).images
    assert _max_pixel_diff(got, want) <= 2
    assert _max_pixel_diff(plain, want) > 6          # the adapter changed the image: the test can fail
    pipe.set_ip_adapter_scale(0.0)                   # scale 0: the plain pipeline, bit for bit
    zero = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False,
                ip_adapter_image=picture(7)).images
    assert _max_pixel_diff(zero, np.stack([np.asarray(im) for im in plain])) == 0
    pipe.unload_ip_adapter()
    again = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False).images
    assert _max_pixel_diff(again, np.stack([np.asarray(im) for im in plain])) == 0




def test_two_ip_adapters_at_once_same_image_as_diffusers(sd_folders):
    """The plain and the plus adapter together, each with its own image and scale (a list, as diffusers)."""
    from refldm.pipelines.sd import StableDiffusionPipeline
    from tests.test_pipeline import _max_pixel_diff
    sd, ipa = sd_folders
    names = ["ip-adapter.safetensors", "ip-adapter-plus.safetensors"]
    want = _diffusers_image("StableDiffusionPipeline", sd, ipa, names, [0.5, 0.7], height=SIZE, width=SIZE)
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.load_ip_adapter(ipa, subfolder="", weight_name=names)
    pipe.set_ip_adapter_scale([0.5, 0.7])
    got = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False,
               ip_adapter_image=[picture(7), picture(8)]).images
    assert _max_pixel_diff(got, want) <= 2
    pipe.set_ip_adapter_scale([0.5, 0.0])                                # the second off: the first alone
    first = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False,
                 ip_adapter_image=[picture(7), picture(8)]).images
    assert _max_pixel_diff(first, want) > 6
    with pytest.raises(ValueError, match="1 entry for 2 IP-Adapters") as e:
        pipe(PROMPT, num_inference_steps=1, seed=1, height=SIZE, width=SIZE, progress=False,
             ip_adapter_image=picture(7))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("weight_name", ["ip-adapter.safetensors", "ip-adapter-plus.safetensors"],
                         ids=["plain", "plus"])
def test_unet_decoupled_cross_attention_agrees_with_diffusers(sd_folders, weight_name):
    """The U-Net with the IP-Adapter at scales 0.7 and 0 (two images for one adapter, CFG-sized batch):
    float64 <= 1e-10, float32 <= 1e-4 against diffusers' UNet2DConditionModel with IPAdapterAttnProcessor2_0."""
    torch = require("torch")
    diffusers = require("diffusers")
    from safetensors import safe_open
    from refldm.adapters.ip_adapter import apply_ip_adapters, load_ip_adapter_file, set_ip_adapter_scale
    from refldm.models.unet import UNet2DConditionModel
    from tests.test_unet import float64_timesteps
    sd, ipa = sd_folders
    path = ipa / weight_name
    with safe_open(path, "pt") as f:
        state = {"image_proj": {}, "ip_adapter": {}}
        for key in f.keys():
            group, rest = key.split(".", 1)
            state[group][rest] = f.get_tensor(key)
    ref = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    ref._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    ref = ref.double().eval()
    rng = np.random.default_rng(4)
    plus = "plus" in weight_name
    embeds = rng.normal(size=(2, 2, 17, VISION["hidden_size"]) if plus else (2, 2, VISION["projection_dim"]))
    x, text = rng.normal(size=(2, 4, 8, 8)), rng.normal(size=(2, 77, 32))
    for scale in (0.7, 0.0):
        for name, proc in ref.attn_processors.items():
            if name.endswith("attn2.processor"):
                proc.scale = [scale]
        with torch.no_grad(), float64_timesteps():   # diffusers' sinusoid in float64 too (tests/test_unet.py)
            want = ref(torch.from_numpy(x), 500, torch.from_numpy(text),
                       added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)]}).sample
        for dtype, tol in (("float64", TOL64), ("float32", TOL32)):
            ours = UNet2DConditionModel.from_pretrained(sd, dtype=dtype, subfolder="unet")
            apply_ip_adapters(ours, [load_ip_adapter_file(path, dtype=dtype)])
            set_ip_adapter_scale(ours, scale)
            got = ours(backend.asarray(x, dtype=dtype), 500, backend.asarray(text, dtype=dtype),
                       added_cond_kwargs={"image_embeds": [embeds]})
            assert rel(got, want) <= tol, (scale, dtype)


def test_sdxl_pipeline_with_ip_adapter_same_image_as_diffusers(tmp_path, vision_folder):
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.pipelines.sdxl import StableDiffusionXLPipeline
    from tests.test_pipeline import _max_pixel_diff
    from tests.test_sdxl_pipeline import build_tiny_sdxl
    sd = build_tiny_sdxl(tmp_path / "xl", seed=0)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    ipa = _write_adapters(torch, unet, tmp_path / "ipa", vision_folder, 20)
    del unet
    want = _diffusers_image("StableDiffusionXLPipeline", sd, ipa, "ip-adapter-plus.safetensors", 0.9,
                            height=SIZE, width=SIZE)
    pipe = StableDiffusionXLPipeline.from_pretrained(sd)
    pipe.load_ip_adapter(ipa, subfolder="", weight_name="ip-adapter-plus.safetensors")
    pipe.set_ip_adapter_scale(0.9)
    got = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False,
               ip_adapter_image=picture(7)).images
    pipe.unload_ip_adapter()
    plain = pipe(PROMPT, num_inference_steps=STEPS, seed=1, height=SIZE, width=SIZE, progress=False).images
    assert _max_pixel_diff(got, want) <= 2
    assert _max_pixel_diff(plain, want) > 6


# -- bad input (NumPy only: refldm's own tiny model and a NumPy-written adapter) ------------------------------------

def numpy_ip_adapter(unet, embed_dim=12, seed=0) -> dict:
    """A random plain IP-Adapter state for a refldm U-Net, in the file's layout."""
    from refldm.adapters.ip_adapter import cross_attentions
    rng = np.random.default_rng(seed)
    cross = unet.config.cross_attention_dim[0]
    state = {"image_proj.proj.weight": rng.normal(size=(4 * cross, embed_dim)) / embed_dim ** 0.5,
             "image_proj.proj.bias": rng.normal(size=4 * cross) * 0.1,
             "image_proj.norm.weight": 1 + rng.normal(size=cross) * 0.1, "image_proj.norm.bias": np.zeros(cross)}
    for k, attn in enumerate(cross_attentions(unet)):
        inner = attn.to_k.weight.shape[0]
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = rng.normal(size=(inner, cross))
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = rng.normal(size=(inner, cross))
    return {k: v.astype(np.float32) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from refldm.crosscheck.tiny import build
    from refldm.pipelines.sd import StableDiffusionPipeline
    folder = build("sd15", tmp_path_factory.mktemp("tiny") / "sd15")
    return StableDiffusionPipeline.from_pretrained(folder)


def _save(tmp_path, state, name="ipa.safetensors"):
    from refldm.checkpoints.weights import save_file
    save_file(state, tmp_path / name)
    return tmp_path / name


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_ip_adapter_embeds_steer_the_image_and_scale_zero_is_plain(tiny_pipe, tmp_path):
    pipe = tiny_pipe
    path = _save(tmp_path, numpy_ip_adapter(pipe.unet))
    kwargs = dict(num_inference_steps=3, seed=2, progress=False, output_type="latent")
    plain = pipe("a cat", **kwargs).latents
    embeds = [np.random.default_rng(1).normal(size=(2, 1, 12))]          # [negative; positive], one image
    pipe.load_ip_adapter(path, image_encoder_folder=None)
    try:
        steered = pipe("a cat", ip_adapter_image_embeds=embeds, **kwargs).latents
        assert np.abs(steered - plain).max() > 1e-3
        image = Image.new("RGB", (64, 64), (120, 30, 200))                # img2img takes it too
        img2img = dict(image=image, strength=0.7, **kwargs)
        steered_i2i = pipe("a cat", ip_adapter_image_embeds=embeds, **img2img).latents
        pipe.set_ip_adapter_scale(0)
        assert np.array_equal(pipe("a cat", ip_adapter_image_embeds=embeds, **kwargs).latents, plain)
        plain_i2i = pipe("a cat", ip_adapter_image_embeds=embeds, **img2img).latents
        assert np.abs(steered_i2i - plain_i2i).max() > 1e-3
        with pytest.raises(ValueError, match="needs an image encoder") as e:
            pipe("a cat", ip_adapter_image=picture(0), **kwargs)
        _one_line(e)
        with pytest.raises(ValueError, match="give ip_adapter_image=") as e:
            pipe("a cat", **kwargs)
        _one_line(e)
    finally:
        pipe.unload_ip_adapter()
    assert np.array_equal(pipe("a cat", **kwargs).latents, plain)


@pytest.mark.parametrize("scale", [float("nan"), -0.5, float("inf"), "1", {"up": 1.0}])
def test_bad_scale_is_one_line(tiny_pipe, tmp_path, scale):
    pipe = tiny_pipe
    pipe.load_ip_adapter(_save(tmp_path, numpy_ip_adapter(pipe.unet)), image_encoder_folder=None)
    try:
        with pytest.raises(ValueError, match="scale") as e:
            pipe.set_ip_adapter_scale(scale)
        _one_line(e)
    finally:
        pipe.unload_ip_adapter()


def _renamed(state, old, new):
    return {(new if k == old else k): v for k, v in state.items()}


@pytest.mark.parametrize("change, message", [
    (lambda s: {**s, "image_proj.extra.weight": np.zeros((2, 2), np.float32)}, "image_proj.extra.weight"),
    (lambda s: {**s, "something.else": np.zeros(2, np.float32)}, "something.else"),
    (lambda s: _renamed(s, "ip_adapter.3.to_k_ip.weight", "ip_adapter.3.to_q_ip.weight"), "ip_adapter.3.to_q_ip"),
    (lambda s: {k: v for k, v in s.items() if k != "ip_adapter.5.to_v_ip.weight"}, "ip_adapter.5"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("ip_adapter.")}, "no ip_adapter"),
    (lambda s: {**{k: v for k, v in s.items() if not k.startswith("image_proj.proj")},
                "image_proj.proj.3.weight": np.zeros((2, 2), np.float32)}, "Full Face"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("image_proj.proj")}, "FaceID"),
    (lambda s: {k: v for k, v in s.items() if k not in ("ip_adapter.1.to_k_ip.weight",
                                                         "ip_adapter.1.to_v_ip.weight")}, "ip_adapter.1"),
], ids=["extra-proj-key", "foreign-key", "renamed", "missing-v", "no-attention", "full-face", "faceid", "hole"])
def test_unknown_layout_is_one_line_naming_the_keys(tiny_pipe, tmp_path, change, message):
    from refldm.adapters.ip_adapter import IPAdapterError
    path = _save(tmp_path, change(numpy_ip_adapter(tiny_pipe.unet)))
    with pytest.raises(IPAdapterError) as e:
        tiny_pipe.load_ip_adapter(path, image_encoder_folder=None)
    assert message in _one_line(e)
    assert tiny_pipe.unet.encoder_hid_proj is None                      # nothing changed


def test_pickle_and_other_family_are_refused_in_one_line(tiny_pipe, tmp_path):
    from refldm.adapters.ip_adapter import IPAdapterError
    (tmp_path / "ip-adapter_sd15.bin").write_bytes(b"\x80\x04not opened")
    with pytest.raises(Exception, match="pickle") as e:
        tiny_pipe.load_ip_adapter(tmp_path / "ip-adapter_sd15.bin", image_encoder_folder=None)
    _one_line(e)
    state = numpy_ip_adapter(tiny_pipe.unet)
    state = {k: v for k, v in state.items() if not k.startswith("ip_adapter.") or int(k.split(".")[1]) < 5}
    with pytest.raises(IPAdapterError, match="cross-attentions") as e:
        tiny_pipe.load_ip_adapter(_save(tmp_path, state), image_encoder_folder=None)
    _one_line(e)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded") as e:
        tiny_pipe("a cat", num_inference_steps=2, seed=1, progress=False, output_type="latent",
                  ip_adapter_image_embeds=[np.zeros((2, 1, 12))])
    _one_line(e)


# -- the command line ---------------------------------------------------------------------------------------------

def numpy_image_encoder(folder, seed=0):
    """A random tiny CLIP image encoder folder written by refldm alone (config.json + model.safetensors)."""
    from refldm.checkpoints.weights import save_file
    config = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", **VISION,
              "projection_dim": 12}
    model = CLIPVisionModelWithProjection.from_config(config)
    rng = np.random.default_rng(seed)
    state = {}
    for key, _, _, p in model.params():
        shape = p.shape
        state[key] = (rng.normal(size=shape) / np.sqrt(np.prod(shape[1:])) if len(shape) >= 2 else
                      1 + 0.1 * rng.normal(size=shape) if "norm" in key and key.endswith("weight") else
                      0.1 * rng.normal(size=shape)).astype(np.float32)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")
    return folder


def test_cli_txt2img_with_ip_adapter_writes_the_field(tiny_pipe, tmp_path, capsys):
    from refldm.cli import main
    folder = tiny_pipe.checkpoint_path                                  # the tiny model's folder
    ipa = tmp_path / "ipa"
    numpy_image_encoder(ipa / "image_encoder")
    _save(ipa, numpy_ip_adapter(tiny_pipe.unet), "ip-adapter_tiny.safetensors")
    picture(4).save(tmp_path / "ref.png")
    base = ["txt2img", "-m", folder, "-p", "a cat", "--steps", "2", "--seed", "3", "-q"]
    assert main(base + ["-o", str(tmp_path / "plain.png")]) == 0
    assert main(base + ["-o", str(tmp_path / "ip.png"), "--ip-adapter", str(ipa / "ip-adapter_tiny.safetensors"),
                        "--ip-image", str(tmp_path / "ref.png"), "--ip-scale", "0.7"]) == 0
    ip = Image.open(tmp_path / "ip.png")
    assert 'IP-Adapter: "Model: ip-adapter_tiny, Weight: 0.7, Image: ref.png"' in ip.info["parameters"]
    assert np.abs(np.asarray(ip, np.int16) - np.asarray(Image.open(tmp_path / "plain.png"), np.int16)).max() > 0
    capsys.readouterr()
    again = ["txt2img", "-m", folder, "--from-png", str(tmp_path / "ip.png"), "-q", "-o", str(tmp_path / "again.png"),
             "--ip-adapter", str(ipa / "ip-adapter_tiny.safetensors"), "--ip-image", str(tmp_path / "ref.png")]
    assert main(again) == 0                                            # the weight 0.7 read back from the PNG
    assert "cannot honour" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(ip))
    for argv, needle in ((["--ip-image", str(tmp_path / "ref.png")], "--ip-image needs --ip-adapter"),
                         (["--ip-adapter", str(ipa / "ip-adapter_tiny.safetensors")], "needs --ip-image"),
                         (["--ip-adapter", str(ipa / "ip-adapter_tiny.safetensors"), "--ip-image",
                           str(tmp_path / "ref.png"), "--ip-scale", "nan"], "--ip-scale"),
                         (["--ip-adapter", str(ipa / "ip-adapter_tiny.safetensors"), "--ip-image",
                           str(tmp_path / "ref.png"), "--image-encoder", str(tmp_path / "nowhere")], "nowhere"),
                         (["--ip-adapter", str(tmp_path / "ref.png"), "--ip-image", str(tmp_path / "ref.png")],
                          "image_encoder/")):
        assert main(base + ["-o", str(tmp_path / "x.png")] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
