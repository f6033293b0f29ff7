"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
a trainable copy of the U-Net's encoder that reads a control image and adds to the U-Net's skips.

Given the U-Net's inputs (x_t, t, c) and a control image y (B, 3, H, W) at the *pixel* size (8x the latent's):

    e     = E(y)                                     conditioning embedding: convs down to the latent's size,
                                                     (B, C0, h, w); its last conv starts at zero
    x     = conv_in(x_t) + e                         the copy's input: the latent plus the control
    d_0..d_n, m = down blocks and mid block of the copy, run as in the U-Net (same time and text inputs)
    r_k   = s_k Z_k(d_k),   r_mid = s_mid Z_mid(m)   Z: 1x1 "zero convolutions" (initialised at zero)

where s is `conditioning_scale` for every residual, or in guess mode s_k = scale * 10^(k/n - 1)
(0.1 for the first skip rising to 1 for the mid block). The U-Net then adds them (its forward's
``down_block_additional_residuals`` and ``mid_block_additional_residual``, as diffusers names them):

    skip_k <- skip_k + r_k          (each encoder output the decoder will concatenate)
    mid    <- mid + r_mid           (the mid block's output, before the first up block)

At initialisation every Z is 0, so r = 0 and the U-Net is unchanged: training starts from the base model.
With several ControlNets (`MultiControlNetModel`) the residuals are summed. docs/control.md has a figure.

Key names are diffusers' (``controlnet_cond_embedding.blocks.3.weight``, ``controlnet_down_blocks.5.bias``,
``controlnet_mid_block.weight``, and the U-Net's own ``down_blocks.*``, ``mid_block.*``), so
``ControlNetModel.from_pretrained`` loads a diffusers ``controlnet/`` folder as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy

from refldm.checkpoints.config import parse_config
from refldm.core import functional as F
from refldm.core import record
from refldm.core.nn import ModuleList, Module
from refldm.models.blocks import Conv2d
from refldm.models.unet import (CrossAttnDownBlock2D, DownBlock2D, TimestepEmbedding, UNet2DConditionConfig,
                                UNet2DConditionModel, UNetMidBlock2DCrossAttn)

__all__ = ["ControlNetModel", "ControlNetConfig", "ControlNetConditioningEmbedding", "ControlNetOutput",
           "MultiControlNetModel", "check_compatible", "family"]


@dataclass
class ControlNetConfig(UNet2DConditionConfig):
    """The ControlNet's config.json: the U-Net's keys for its encoder (see `UNet2DConditionConfig`), and:"""

    conditioning_channels: int = 3                      # channels of the control image
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the image's channels are reversed first
    conditioning_embedding_out_channels: list = field(default_factory=lambda: [16, 32, 96, 256])
    global_pool_conditions: bool = False                # residuals averaged over H, W (the "shuffle" models)

    def __post_init__(self):
        # a ControlNet has no decoder; the U-Net's checks want up_block_types, so mirror the down ones
        self.up_block_types = [t.replace("Down", "Up") for t in reversed(self.down_block_types)]
        super().__post_init__()
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r} must be 'rgb' or 'bgr'")
        ch = self.conditioning_embedding_out_channels
        if not ch or not all(isinstance(c, int) and c > 0 for c in ch):
            raise ValueError(f"conditioning_embedding_out_channels must be a non-empty list of positive ints, "
                             f"got {ch!r}")


_IGNORED = ("addition_embed_type_num_heads", "sample_size", "dropout")
_FIXED = {"mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None, "class_embed_type": None,
          "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
          "resnet_time_scale_shift": "default"}
# U-Net keys that a ControlNet config never has; a file with them is not a ControlNet's config
_NOT_CONTROLNET = ("up_block_types", "out_channels", "center_input_sample", "conv_in_kernel", "conv_out_kernel",
                   "time_embedding_dim", "reverse_transformer_layers_per_block")


@dataclass
class ControlNetOutput:
    """diffusers' names: the residuals for the U-Net's skips (one per skip, in order) and for its mid block."""

    down_block_res_samples: list
    mid_block_res_sample: object


class ControlNetConditioningEmbedding(Module):
    """E(y): the control image (B, 3, H, W) -> (B, C0, H/2^k, W/2^k), k = len(channels) - 1 (3: the latent size).

        h = silu(conv_in(y));  per level: h = silu(conv(h)); h = silu(conv_stride2(h));  E(y) = conv_out(h)

    conv_out is zero at initialisation (keys conv_in, blocks.0..2k-1, conv_out)."""

    def __init__(self, out_channels: int, conditioning_channels: int, channels: list):
        self.conv_in = Conv2d(conditioning_channels, channels[0], kernel_size=3, padding=1)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            blocks.append(Conv2d(cin, cin, kernel_size=3, padding=1))
            blocks.append(Conv2d(cin, cout, kernel_size=3, padding=1, stride=2))
        self.blocks = ModuleList(blocks)
        self.conv_out = Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, y):
        h = F.silu(self.conv_in(y))                       # (B, 16, H, W)
        for block in self.blocks:
            h = F.silu(block(h))                          # halved at every second conv
        return self.conv_out(h)                             # (B, C0, H/8, W/8)


class ControlNetModel(UNet2DConditionModel):
    """The ControlNet: the U-Net's conv_in, time embedding, down blocks and mid block (the same classes,
    refldm/models/unet.py), plus the conditioning embedding and the zero convolutions.

    ``controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
    guess_mode=False, added_cond_kwargs=None) -> ControlNetOutput``; it shares the U-Net's input checks
    (`UNet2DConditionModel._inputs`) and SDXL's added embedding."""

    def __init__(self, config: ControlNetConfig):
        cfg = self.config = config
        ch = cfg.block_out_channels
        levels = len(ch)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embedding_dim)
        if cfg.addition_embed_type == "text_time":                  # SDXL
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                   cfg.time_embedding_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)

        # the encoder, and one zero conv per skip it produces: conv_in's, then each level's
        zero = lambda c: Conv2d(c, c, kernel_size=1)
        blocks, zeros, cout = [], [zero(ch[0])], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            cls = CrossAttnDownBlock2D if kind == "CrossAttnDownBlock2D" else DownBlock2D
            blocks.append(cls(cfg, i, cin, cout, add_downsample=i < levels - 1))
            zeros += [zero(cout) for _ in range(cfg.layers_per_block[i] + (i < levels - 1))]
        self.down_blocks = ModuleList(blocks)
        self.controlnet_down_blocks = ModuleList(zeros)
        self.controlnet_mid_block = zero(ch[-1])
        self.mid_block = UNetMidBlock2DCrossAttn(cfg)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> ControlNetConfig:
        """config.json dict -> ControlNetConfig; unsupported keys and values raise ConfigError."""
        from refldm.errors import ConfigError
        found = [k for k in _NOT_CONTROLNET if k in config]
        if found:
            raise ConfigError(f"{where}: has {found[0]!r}, a U-Net key: this is not a ControlNet's config")
        return parse_config(ControlNetConfig, config, ignored=_IGNORED, fixed=_FIXED, where=where)

    @classmethod
    def from_single_file(cls, path, config=None, dtype="float32", weights_dtype: str | None = None
                         ) -> "ControlNetModel":
        """Load an original single-file ControlNet (``control_v11p_sd15_canny.safetensors``: ``control_model.*``
        or bare ``input_blocks.*`` / ``input_hint_block.*`` keys; the table is in refldm/checkpoints/convert.py).

        config: a config dict, a folder holding config.json, or None to read it off the shapes
        (`convert.infer_controlnet_config`; global_pool_conditions and the "bgr" channel order cannot be
        seen there: give config= for those models). Pickle files (.pth, .ckpt) are refused, never opened.
        weights_dtype="stored": the file's tensors stay mapped, converted per layer when it runs."""
        import os
        from refldm.checkpoints import convert
        from refldm.checkpoints.stored import load_checkpoint
        from refldm.checkpoints.weights import read_config
        path = os.fspath(path)
        state = load_checkpoint(path, weights_dtype)              # refuses pickles; validates the file
        if config is None:
            config = convert.infer_controlnet_config(state)
        elif not isinstance(config, dict):
            config = read_config(os.fspath(config))
        model = cls.from_config(config, where=f"{path} (config)")
        hint_blocks = len(model.controlnet_cond_embedding.blocks)
        expected = [key for key, *_ in model.params()]
        weights = convert.controlnet_from_original(state, expected, model.config.layers_per_block[0], hint_blocks,
                                                   source=path)
        return model.load_state_dict(weights, dtype=dtype, source=path)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale: float = 1.0,
                guess_mode: bool = False, added_cond_kwargs: dict | None = None) -> ControlNetOutput:
        """The residuals r_k, r_mid (module docstring) for latents `sample` (B, 4, h, w) at `timestep`, text
        `encoder_hidden_states` (B, S, D) and control image `controlnet_cond` (B, 3, 8h, 8w) in [0, 1]."""
        cfg = self.config
        check_scale(conditioning_scale)
        sample, t, context, added = self._inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        b, _, h, w = sample.shape
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[0] != b \
                or controlnet_cond.shape[1] != cfg.conditioning_channels \
                or tuple(controlnet_cond.shape[2:]) != (f * h, f * w):
            raise ValueError(f"controlnet: controlnet_cond must be ({b}, {cfg.conditioning_channels}, {f * h}, "
                             f"{f * w}) for a latent {tuple(sample.shape)}, got {tuple(controlnet_cond.shape)}")
        if controlnet_cond.dtype != sample.dtype:
            controlnet_cond = controlnet_cond.astype(sample.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[:, ::-1]

        # 1. time (and SDXL's added) embedding, as in the U-Net
        t_emb = F.timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                       downscale_freq_shift=cfg.freq_shift)     # (B, C0)
        emb = self.time_embedding(t_emb.astype(sample.dtype, copy=False))       # (B, 4*C0)
        if added is not None:
            emb = emb + self.added_embedding(*added, dtype=sample.dtype)

        # 2. the latent plus the embedded control image, then the encoder; every output kept
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)   # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, context)
            skips.extend(res)
        x = self.mid_block(x, emb, context)                                     # (B, C_last, h/f, w/f)

        # 3. zero convolutions, then the scales
        down = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not cfg.global_pool_conditions:
            # 0.1 ... 1, times the scale; in float32, as diffusers' (a float32 tensor times a Python float)
            scales = (guess_mode_scales(len(down)).astype(numpy.float32) * numpy.float32(conditioning_scale))
            down = [d * float(s) for d, s in zip(down, scales)]
            mid = mid * float(scales[-1])
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if cfg.global_pool_conditions:                                          # one value per channel
            down = [d.mean(axis=(2, 3), keepdims=True) for d in down]
            mid = mid.mean(axis=(2, 3), keepdims=True)
        return ControlNetOutput(down, mid)


def guess_mode_scales(n_down: int):
    """Guess mode's per-residual scales: 10^(-1 + k/n_down), k = 0..n_down (the last for the mid block),
    rising log-evenly from 0.1 to 1 so that the deep residuals weigh most; rounded to float32 as
    diffusers' ``torch.logspace(-1, 0, n + 1)`` makes them. Returns float64 values of those float32s."""
    k = numpy.arange(n_down + 1, dtype=numpy.float64)
    return (10.0 ** (-1.0 + k / n_down)).astype(numpy.float32).astype(numpy.float64)


def check_scale(scale, what: str = "controlnet_conditioning_scale") -> None:
    """A conditioning scale must be a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, numpy.floating, numpy.integer)) \
            or not math.isfinite(float(scale)) or scale < 0:
        raise ValueError(f"{what}={scale!r}: must be a finite number >= 0")


def family(config) -> str:
    """The model family a U-Net or ControlNet config belongs to, for messages: SDXL, SD 1.x, SD 2.x."""
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "SDXL"
    dim = config.cross_attention_dim[0] if isinstance(config.cross_attention_dim, list) else config.cross_attention_dim
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(dim, f"cross_attention_dim-{dim}")


def check_compatible(controlnet, unet) -> None:
    """Refuse a ControlNet whose residuals cannot enter `unet`: another family, or other encoder widths."""
    c, u = controlnet.config, unet.config
    fc, fu = family(c), family(u)
    if fc != fu:
        article = "an" if fu.startswith("SD") else "a"
        raise ValueError(f"{fc} ControlNet with {article} {fu} U-Net: use a ControlNet made for the U-Net's family")
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if getattr(c, key) != getattr(u, key):
            raise ValueError(f"the ControlNet's {key} {getattr(c, key)} differs from the U-Net's "
                             f"{getattr(u, key)}: its residuals cannot enter this U-Net")
    if c.in_channels > u.in_channels:   # an inpainting U-Net (9) takes 4-channel ControlNets: they read the latents
        raise ValueError(f"the ControlNet reads {c.in_channels} latent channels, the U-Net has {u.in_channels}")


class MultiControlNetModel:
    """Several ControlNets at once (diffusers' ``MultiControlNetModel``): each gets its own control image and
    scale, and their residuals are summed:  r_k = sum_j r_k^(j),  r_mid = sum_j r_mid^(j)."""

    def __init__(self, controlnets):
        self.nets = list(controlnets)
        if not self.nets:
            raise ValueError("MultiControlNetModel needs at least one ControlNet")

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond: list, conditioning_scale: list,
                 guess_mode: bool = False, added_cond_kwargs: dict | None = None) -> ControlNetOutput:
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"{len(controlnet_cond)} control images and {len(conditioning_scale)} scales for "
                             f"{len(self.nets)} ControlNets: give one of each per ControlNet")
        total = None
        for j, (net, image, scale) in enumerate(zip(self.nets, controlnet_cond, conditioning_scale)):
            with record.scope(f"nets.{j}"):                      # trace names as diffusers': nets.<j>.<layer>
                out = net(sample, timestep, encoder_hidden_states, image, scale, guess_mode, added_cond_kwargs)
            if total is None:
                total = out
            else:
                total = ControlNetOutput([a + b for a, b in zip(total.down_block_res_samples,
                                                                out.down_block_res_samples)],
                                         total.mid_block_res_sample + out.mid_block_res_sample)
        return total

