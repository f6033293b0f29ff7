"""TAESD, the tiny autoencoder used for previews (diffusers' ``AutoencoderTiny``; Bohan Ollin Boer Bohan 2023).

A conv-only stand-in for the SD VAE, trained to match its latent space, with no normalisation and no attention,
so that decoding costs a small fraction of the KL VAE's:

    decode(z):  z' = 3 tanh(z / 3)                                   soft clamp to (-3, 3)
                conv 3x3 -> act -> [blocks, nearest 2x, conv 3x3 (no bias)] x (levels - 1)
                -> blocks -> conv 3x3 (with bias) -> y;  image = 2 y - 1          (N, 3, 8h, 8w) for 4 levels
    encode(x):  conv 3x3 on (x + 1) / 2 -> blocks -> [conv 3x3 stride 2 (no bias) -> blocks] x (levels - 1)
                -> conv 3x3                                                        (N, 4, H/8, W/8)
    block(x) = relu(conv(act(conv(act(conv(x))))) + skip(x))        skip: 1x1 conv without bias, or identity

TAESD's latents are the SD VAE's *scaled* latents (z = scaling_factor * mean), so a pipeline hands the
sampler's latents to ``decode`` as they are (diffusers' AutoencoderTiny config says scaling_factor = 1.0).
The layers sit in one flat list per half, numbered as the checkpoint's ``nn.Sequential`` numbers them
(``decoder.layers.3.conv.0.weight``); the activations and upsamplings hold no weights but keep their numbers.
"""

from __future__ import annotations

import dataclasses
import os

from refldm import backend
from refldm.checkpoints.config import parse_config
from refldm.core import ops
from refldm.core.nn import Module, ModuleList, PretrainedModel
from refldm.models.blocks import Conv2d, relu

__all__ = ["AutoencoderTiny", "AutoencoderTinyConfig", "AutoencoderTinyBlock"]


@dataclasses.dataclass
class AutoencoderTinyConfig:
    """The keys of diffusers' AutoencoderTiny config.json (TAESD and TAESDXL use the defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: list = dataclasses.field(default_factory=lambda: [64, 64, 64, 64])
    decoder_block_out_channels: list = dataclasses.field(default_factory=lambda: [64, 64, 64, 64])
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: list = dataclasses.field(default_factory=lambda: [1, 3, 3, 3])
    num_decoder_blocks: list = dataclasses.field(default_factory=lambda: [3, 3, 3, 1])
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    block_out_channels: list | None = None  # diffusers writes the decoder's channels here too

    def __post_init__(self):
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not implemented in refldm (only {', '.join(_ACTIVATIONS)})")
        if self.upsample_fn != "nearest" or self.upsampling_scaling_factor != 2:
            raise ValueError("AutoencoderTiny: refldm implements upsample_fn='nearest' with "
                             "upsampling_scaling_factor=2 only")
        for chans, blocks, side in ((self.encoder_block_out_channels, self.num_encoder_blocks, "encoder"),
                                    (self.decoder_block_out_channels, self.num_decoder_blocks, "decoder")):
            if len(chans) != len(blocks) or not chans:
                raise ValueError(f"{side}_block_out_channels and num_{side}_blocks must have the same length (>= 1)")


_ACTIVATIONS = {"relu": relu, "silu": ops.silu}


class _Act(Module):
    """A weightless activation layer (keeps its place in the numbering)."""

    def __init__(self, name: str):
        self.fn = _ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)


class _Upsample(Module):
    """Nearest-neighbour 2x upsampling, weightless."""

    def forward(self, x):
        return ops.upsample_nearest2x(x)


class _Identity(Module):
    def forward(self, x):
        return x


class AutoencoderTinyBlock(Module):
    """out = relu(conv.4(act(conv.2(act(conv.0(x))))) + skip(x)); skip is a 1x1 conv (no bias) when the
    channel count changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        self.conv = ModuleList([Conv2d(in_channels, out_channels, 3, padding=1), _Act(act_fn),
                                Conv2d(out_channels, out_channels, 3, padding=1), _Act(act_fn),
                                Conv2d(out_channels, out_channels, 3, padding=1)])
        self.skip = Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else _Identity()

    def forward(self, x):
        h = x
        for layer in self.conv:
            h = layer(h)
        h += self.skip(x)
        return relu(h)


class _Sequential(Module):
    def __init__(self, layers):
        self.layers = ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class EncoderTiny(_Sequential):
    """(x + 1)/2 -> [conv (stride 2 after the first level, no bias) -> blocks] per level -> conv to latents."""

    def __init__(self, cfg: AutoencoderTinyConfig):
        layers = []
        for i, (channels, n) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            if i == 0:
                layers.append(Conv2d(cfg.in_channels, channels, 3, padding=1))
            else:
                layers.append(Conv2d(channels, channels, 3, stride=2, padding=1, bias=False))
            layers += [AutoencoderTinyBlock(channels, channels, cfg.act_fn) for _ in range(n)]
        layers.append(Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3, padding=1))
        super().__init__(layers)

    def forward(self, x):
        return super().forward((x + 1) / 2)                    # images in [-1, 1] -> [0, 1]


class DecoderTiny(_Sequential):
    """3 tanh(z/3) -> conv -> act -> per level: blocks, [nearest 2x], conv (bias only on the last) -> 2y - 1."""

    def __init__(self, cfg: AutoencoderTinyConfig):
        chans = cfg.decoder_block_out_channels
        layers = [Conv2d(cfg.latent_channels, chans[0], 3, padding=1), _Act(cfg.act_fn)]
        for i, (channels, n) in enumerate(zip(chans, cfg.num_decoder_blocks)):
            last = i == len(chans) - 1
            layers += [AutoencoderTinyBlock(channels, channels, cfg.act_fn) for _ in range(n)]
            if not last:
                layers.append(_Upsample())
            layers.append(Conv2d(channels, cfg.out_channels if last else channels, 3, padding=1, bias=last))
        super().__init__(layers)

    def forward(self, z):
        xp = backend.array_namespace(z)
        y = super().forward(xp.tanh(z / 3) * 3)                # the soft clamp of the latents to (-3, 3)
        return y * 2 - 1                                       # [0, 1] -> [-1, 1]


class AutoencoderTiny(PretrainedModel):
    """``taesd.decode(latents)`` -> images in about [-1, 1]; ``taesd.encode(images)`` -> latents (already scaled:
    the sampler's latent space). Load a diffusers TAESD folder with ``AutoencoderTiny.from_pretrained``."""

    def __init__(self, config: AutoencoderTinyConfig | dict | None = None):
        if config is None:
            config = AutoencoderTinyConfig()
        elif isinstance(config, dict):
            config = parse_config(AutoencoderTinyConfig, config, where="AutoencoderTiny config")
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> AutoencoderTinyConfig:
        return parse_config(AutoencoderTinyConfig, config, where=where)

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", subfolder: str | None = None) -> "AutoencoderTiny":
        """Load config.json + diffusion_pytorch_model.safetensors (a TAESD folder, or a pipeline's ``vae/``)."""
        folder = os.fspath(folder)
        if subfolder is None and not os.path.isfile(os.path.join(folder, "config.json")) and \
                os.path.isfile(os.path.join(folder, "vae", "config.json")):
            subfolder = "vae"
        return super().from_pretrained(folder, dtype=dtype, subfolder=subfolder)

    def encode(self, x):
        """Images (N, 3, H, W) in [-1, 1] -> latents (N, latent_channels, H/8, W/8), as diffusers' ``.latents``."""
        return self.encoder(x)

    def decode(self, z):
        """Latents (N, latent_channels, h, w) -> images (N, 3, 8h, 8w) in about [-1, 1], as diffusers' ``.sample``."""
        return self.decoder(z)
