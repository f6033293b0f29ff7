"""CLIP's image encoder (Radford et al., 2021), as transformers' ``CLIPVisionModelWithProjection``: a ViT.

IP-Adapter encodes its reference image with it (SD 1.5's adapters: OpenCLIP ViT-H/14, 1280 wide, 32 layers,
projection 1024; SDXL's: ViT-bigG/14 or ViT-H/14). The image is cut into P x P patches; each patch becomes a
token, a learned class token goes in front, and a pre-LN transformer runs over them, *without* a causal mask:

    x_0 = [class_embedding; patch_embedding * pixels] + position_embedding[0..N]   # (B, 3, S, S) -> (B, 1+N, D)
                                                                         # N = (S / P)^2, the conv has stride P
    x_0 = pre_layrnorm(x_0)                                              # (sic: transformers' spelling)
    for each layer l = 1..L:  x = x + out_proj(Attention(layer_norm1(x)));  x = x + fc2(act(fc1(layer_norm2(x))))
    last_hidden_state = x_L                                              # (B, 1+N, D), no final norm
    image_embeds      = visual_projection(post_layernorm(x_L[:, 0]))    # (B, projection_dim), no bias

``hidden_states`` is (x_0, x_1, ..., x_L): x_0 after pre_layrnorm. IP-Adapter uses ``image_embeds`` (the
plain adapter) or ``hidden_states[-2]`` (the "plus" adapters: every token of the penultimate layer).
The encoder layers are refldm/models/clip.py's, built with ``causal=False``.

Keys: ``vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}``,
``vision_model.pre_layrnorm.*``, ``vision_model.encoder.layers.N.*`` (as the text encoder's),
``vision_model.post_layernorm.*``, ``visual_projection.weight`` (transformers 4 and 5 alike).

`CLIPImageProcessor` is transformers' preprocessing by hand (Pillow + NumPy): resize the shortest side to
224 with bicubic resampling, centre crop 224 x 224, x / 255, then (x - mean) / std with CLIP's mean and std.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from refldm import backend
from refldm.checkpoints.config import parse_config
from refldm.core import functional as F
from refldm.core.nn import Module, Param, PretrainedModel
from refldm.models.blocks import Conv2d, Embedding, LayerNorm, Linear
from refldm.models.clip import ACTIVATIONS, IGNORED_KEYS, CLIPEncoder

__all__ = ["CLIPVisionConfig", "CLIPVisionModelWithProjection", "CLIPVisionModelOutput", "CLIPImageProcessor",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # the per-channel mean and std CLIP was trained with
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POSITION_IDS = "vision_model.embeddings.position_ids"   # the constant 0..N buffer older transformers saved


@dataclass
class CLIPVisionConfig:
    """The keys of a transformers ``CLIPVisionConfig`` that the forward pass reads (transformers' defaults:
    ViT-B/32). IP-Adapter SD 1.5's encoder: hidden_size 1280, intermediate_size 5120, 32 layers of 16 heads,
    patch_size 14, image_size 224, gelu, projection_dim 1024."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented in refldm "
                             f"(only {', '.join(repr(a) for a in ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class CLIPVisionModelOutput:
    """What `CLIPVisionModelWithProjection` returns (transformers' CLIPVisionModelOutput, same field names).

    image_embeds: (B, projection_dim). last_hidden_state: (B, 1 + N, D), the last layer's output (no norm).
    hidden_states: None, or (x_0 after pre_layrnorm, x_1, ..., x_L), L + 1 arrays of (B, 1 + N, D).
    """

    image_embeds: object
    last_hidden_state: object
    hidden_states: tuple | None = None

    def __getitem__(self, i):
        """Index like transformers' output tuple: [0] image_embeds, [1] last_hidden_state."""
        return (self.image_embeds, self.last_hidden_state)[i]


class CLIPVisionEmbeddings(Module):
    """x_0 = [class_embedding; conv_P(pixels) as tokens] + position_embedding: (B, C, S, S) -> (B, 1 + N, D)."""

    def __init__(self, c: CLIPVisionConfig):
        self.class_embedding = Param(c.hidden_size)
        self.patch_embedding = Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values):
        xp = backend.array_namespace(pixel_values)
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)                        # (B, D, S/P, S/P)
        d = patches.shape[1]
        patches = xp.swapaxes(patches.reshape(b, d, -1), 1, 2)              # (B, N, D), row-major patches
        cls = xp.broadcast_to(self.class_embedding.reshape(1, 1, d), (b, 1, d))
        tokens = xp.concatenate([cls, patches], axis=1)                     # (B, 1 + N, D)
        return tokens + self.position_embedding.weight                      # positions 0..N


class CLIPVisionTransformer(Module):
    """Embeddings, pre_layrnorm, the non-causal encoder, and post_layernorm (applied to the class token only)."""

    def __init__(self, c: CLIPVisionConfig):
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.encoder = CLIPEncoder(c, causal=False)
        self.post_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))               # (B, 1 + N, D)
        last, layers = self.encoder(x)                                      # no mask: all tokens see all
        pooled = self.post_layernorm(last[:, 0])                            # (B, D), the class token
        return last, pooled, tuple([x] + layers)


class CLIPVisionModelWithProjection(PretrainedModel):
    """CLIP's vision transformer and its projection into the joint image-text space; IP-Adapter's encoder.

        encoder = CLIPVisionModelWithProjection.from_pretrained("ip-adapter/image_encoder")
        pixels = CLIPImageProcessor(encoder.config.image_size)(pil_image)["pixel_values"]   # (1, 3, 224, 224)
        out = encoder(pixels, output_hidden_states=True)
        out.image_embeds; out.hidden_states[-2]
    """

    weights_stem = "model"

    def __init__(self, config: CLIPVisionConfig):
        if isinstance(config, dict):
            config = self.parse_config(config, "image encoder config")
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, bias=False)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> CLIPVisionConfig:
        return parse_config(CLIPVisionConfig, config, ignored=IGNORED_KEYS, where=where)

    def convert_keys(self, state: dict, source: str) -> dict:
        """Drop a stored ``position_ids`` buffer (transformers 5 does), warning if it is not 0..N."""
        state = dict(state)
        ids = state.pop(POSITION_IDS, None)
        if ids is not None:
            flat = np.asarray(backend.to_numpy(ids)).reshape(-1)
            if not np.array_equal(flat, np.arange(flat.size)):
                warnings.warn(f"{source}: {POSITION_IDS} is not 0..{flat.size - 1}; it is ignored, as "
                              "transformers 5 ignores it", stacklevel=3)
        return state

    def forward(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionModelOutput:
        """pixel_values: (B, num_channels, image_size, image_size), normalised as `CLIPImageProcessor` makes them."""
        c = self.config
        weights = self.visual_projection.weight
        if isinstance(weights, Param):
            raise ValueError("CLIPVisionModelWithProjection: the weights are not loaded (use from_pretrained)")
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"CLIPVisionModelWithProjection: pixel_values must be (B, {c.num_channels}, "
                             f"{c.image_size}, {c.image_size}), got {shape}")
        if isinstance(pixel_values, np.ndarray) and backend.array_namespace(weights) is not np:
            pixel_values = backend.asarray(pixel_values)
        pixel_values = pixel_values.astype(weights.dtype, copy=False)
        last, pooled, hidden = self.vision_model(pixel_values)
        image_embeds = self.visual_projection(pooled)                       # (B, D) -> (B, projection_dim)
        return CLIPVisionModelOutput(image_embeds=image_embeds, last_hidden_state=last,
                                     hidden_states=hidden if output_hidden_states else None)


class CLIPImageProcessor:
    """transformers' ``CLIPImageProcessor`` (its Pillow backend) by hand: PIL image(s) -> pixel_values.

        1. resize so that the shortest side is `size`: (h, w) -> (size, int(size * w / h)) for h <= w,
           Pillow's bicubic filter on the 8-bit RGB image (what transformers' Pillow backend calls);
        2. centre crop crop_size x crop_size: top = (H - crop) // 2, left = (W - crop) // 2;
        3. x = float32(float64(x) / 255);  x = (x - mean) / std in float32, per channel.

    The same numbers as transformers' Pillow backend, bit for bit (tests/test_ip_adapter.py). transformers'
    default backend when torchvision is installed resizes with torchvision's antialiased bicubic on tensors
    instead, which differs from Pillow's by up to about one 8-bit level per pixel after rounding. An image
    smaller than the crop after resizing is refused (transformers pads it with zeros).
    """

    def __init__(self, size: int = 224, crop_size: int | None = None, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD):
        self.size = int(size)
        self.crop_size = int(size if crop_size is None else crop_size)
        if self.size < 1 or self.crop_size < 1:
            raise ValueError(f"CLIPImageProcessor: size={size} and crop_size={crop_size} must be positive")
        self.image_mean = np.asarray(image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.image_std = np.asarray(image_std, dtype=np.float32).reshape(3, 1, 1)

    def preprocess_one(self, image) -> np.ndarray:
        """One PIL image (or uint8 (H, W, 3) array) -> (3, crop, crop) float32."""
        from PIL import Image
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"CLIPImageProcessor: an array image must be uint8 (H, W, 3), got {image.dtype} "
                                 f"{tuple(image.shape)}")
            image = Image.fromarray(image)
        if not hasattr(image, "convert"):
            raise TypeError(f"CLIPImageProcessor: expected a PIL image or a uint8 array, got {type(image).__name__}")
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)          # 1. shortest side -> size
        crop = self.crop_size
        if new_h < crop or new_w < crop:
            raise ValueError(f"CLIPImageProcessor: the resized image is {new_w}x{new_h}, smaller than the "
                             f"{crop}x{crop} crop; give crop_size <= size")
        top, left = (new_h - crop) // 2, (new_w - crop) // 2                      # 2. centre crop
        x = np.asarray(image).transpose(2, 0, 1)[:, top:top + crop, left:left + crop]  # (3, crop, crop) uint8
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)               # 3. [0, 1]
        return (x - self.image_mean) / self.image_std                           # normalised, float32

    def __call__(self, images, return_tensors: str | None = "np") -> dict:
        """A PIL image or a list of them -> {"pixel_values": (B, 3, crop, crop) float32 NumPy}."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("CLIPImageProcessor: no image given")
        return {"pixel_values": np.stack([self.preprocess_one(im) for im in images])}
