"""The KL autoencoder of latent diffusion (diffusers' ``AutoencoderKL``): image <-> latent.

    image (N, 3, H, W) in [-1, 1]
      encoder: conv_in -> down blocks (ResNet blocks, stride-2 conv) -> mid block (ResNet, attention,
               ResNet) -> GroupNorm, SiLU, conv_out                       -> (N, 2*4, H/8, W/8)
      quant_conv (1x1)                                                    -> mean, logvar (N, 4, H/8, W/8)
    latent z = mean (+ std * noise when sampling), then the pipeline multiplies by scaling_factor
      post_quant_conv (1x1)
      decoder: conv_in -> mid block -> up blocks (ResNet blocks, nearest 2x + conv) -> GroupNorm, SiLU,
               conv_out                                                   -> image (N, 3, H, W)

Attribute names are the checkpoint keys (``encoder.down_blocks.1.resnets.0.conv1.weight``...), the
config is diffusers' ``vae/config.json``. docs/vae.md explains the math; refldm/core/images.py converts
images and applies the scaling factor.
"""

from __future__ import annotations

import dataclasses
import os

from refldm import backend
from refldm.core import functional as F
from refldm.checkpoints.config import parse_config
from refldm.models.blocks import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
)
from refldm.core.nn import Module, ModuleList, PretrainedModel

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution", "VAEAttention",
           "convert_legacy_keys", "NonFiniteImageError", "needs_upcast", "upcast", "decode_checked",
           "encode_upcast"]

_EPS = 1e-6  # every GroupNorm of the SD VAE uses eps = 1e-6 (the U-Net uses 1e-5)


@dataclasses.dataclass
class AutoencoderKLConfig:
    """The keys of diffusers' AutoencoderKL config.json that SD 1.x, 2.x and SDXL VAEs use."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list = dataclasses.field(default_factory=lambda: ["DownEncoderBlock2D"])
    up_block_types: list = dataclasses.field(default_factory=lambda: ["UpDecoderBlock2D"])
    block_out_channels: list = dataclasses.field(default_factory=lambda: [64])
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | list = 32           # the training resolution; no effect on the math
    scaling_factor: float = 0.18215        # latents are multiplied by this after encoding (refldm/core/images.py)
    shift_factor: float | None = None      # ... and shifted by this first (SD3, Flux); None for SD 1.x/2.x/XL
    latents_mean: list | None = None       # per-channel normalisation some pipelines apply instead
    latents_std: list | None = None
    force_upcast: bool = True              # a float16 VAE runs in float32 (see `needs_upcast`)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels must name at least one block")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} is not implemented in refldm (only 'silu')")
        for key, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t != want:
                    raise ValueError(f"{key}: block type {t!r} is not implemented in refldm (only {want!r})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.latent_channels:
                raise ValueError(f"{key} has {len(value)} entries but latent_channels is {self.latent_channels}")

    @property
    def downscale_factor(self) -> int:
        """How many pixels per latent pixel along each side: 2 ** (number of blocks - 1), 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), one Gaussian per latent value.

    parameters: (N, 2*C, h, w) from quant_conv; the first C channels are the mean, the last C the log
    variance, clamped to [-30, 20] as diffusers does (so exp never overflows or underflows to 0).
        std = exp(logvar / 2),  var = exp(logvar)
    """

    def __init__(self, parameters):
        xp = backend.array_namespace(parameters)
        c = parameters.shape[1] // 2
        self.parameters = parameters
        self.mean = parameters[:, :c]                               # (N, C, h, w)
        self.logvar = xp.clip(parameters[:, c:], -30.0, 20.0)      # (N, C, h, w)
        self.std = xp.exp(0.5 * self.logvar)
        self.var = xp.exp(self.logvar)

    def mode(self):
        """The most likely latent: the mean (what SD pipelines use for img2img encoding with argmax)."""
        return self.mean

    def sample(self, noise=None, generator=None):
        """A draw z = mean + std * eps, eps ~ N(0, I).

        Give `noise` (an array of mean's shape: eps itself), or `generator`: a `refldm.core.random.Generator`
        (or an int seed for one), whose torch-compatible stream reproduces
        ``posterior.sample(generator=torch.Generator().manual_seed(seed))`` in diffusers.
        """
        if noise is None:
            if generator is None:
                raise ValueError("DiagonalGaussianDistribution.sample: give noise=array or generator="
                                 "refldm.core.random.Generator(seed) (refldm has no hidden global random state)")
            if isinstance(generator, int):
                from refldm.core.random import Generator
                generator = Generator(generator)
            noise = generator.randn(tuple(self.mean.shape), dtype=self.mean.dtype.name)
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"DiagonalGaussianDistribution.sample: noise shape {tuple(noise.shape)} != "
                             f"latent shape {tuple(self.mean.shape)}")
        noise = backend.asarray(noise, dtype=self.mean.dtype) if backend.array_namespace(noise) is not \
            backend.array_namespace(self.mean) else noise.astype(self.mean.dtype, copy=False)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussianDistribution | None = None):
        """KL divergence per sample, summed over (C, h, w): (N,).

        Against the standard normal prior:  KL = 1/2 sum(mean^2 + var - 1 - logvar);
        against another diagonal Gaussian:  KL = 1/2 sum((mean - m2)^2 / var2 + var / var2 - 1 - logvar + logvar2).
        """
        xp = backend.array_namespace(self.mean)
        if other is None:
            terms = self.mean * self.mean + self.var - 1.0 - self.logvar
        else:
            d = self.mean - other.mean
            terms = d * d / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * xp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample):
        """Negative log-likelihood of `sample` per sample: 1/2 sum(log 2 pi + logvar + (z - mean)^2 / var)."""
        import math
        xp = backend.array_namespace(self.mean)
        d = sample - self.mean
        return 0.5 * xp.sum(math.log(2.0 * math.pi) + self.logvar + d * d / self.var, axis=(1, 2, 3))


class VAEAttention(Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection.

        h = GroupNorm(x) viewed as tokens          # (N, C, H, W) -> (N, H*W, C)
        q, k, v = to_q(h), to_k(h), to_v(h)        # (N, H*W, C) each
        a = softmax(q k^T / sqrt(C)) v             # one head of size C (heads = C // head_dim = 1)
        out = x + to_out.0(a) viewed as (N, C, H, W)

    Keys: group_norm, to_q, to_k, to_v, to_out.0 (older checkpoints say query, key, value, proj_attn;
    `convert_legacy_keys` renames them).
    """

    def __init__(self, channels: int, groups: int, eps: float = _EPS, head_dim: int | None = None):
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = ModuleList([Linear(channels, channels)])  # to_out.1 is dropout in diffusers
        self.heads = channels // (head_dim or channels)

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)     # (N, C, H, W) -> (N, HW, C)
        q = F.split_heads(self.to_q(t), self.heads)                          # (N, heads, HW, C/heads)
        k = F.split_heads(self.to_k(t), self.heads)
        v = F.split_heads(self.to_v(t), self.heads)
        a = F.merge_heads(F.scaled_dot_product_attention(q, k, v))           # (N, HW, C)
        out = self.to_out[0](a).transpose(0, 2, 1).reshape(n, c, h, w)       # (N, HW, C) -> (N, C, H, W)
        return out + x


class UNetMidBlock2D(Module):
    """ResNet block, then (attention, ResNet block): keys resnets.0, attentions.0, resnets.1."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        self.resnets = ModuleList([ResnetBlock2D(channels, channels, groups=groups, eps=_EPS),
                                   ResnetBlock2D(channels, channels, groups=groups, eps=_EPS)])
        self.attentions = ModuleList([VAEAttention(channels, groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(Module):
    """`layers` ResNet blocks, then (except in the last block) a stride-2 conv: keys resnets.i, downsamplers.0."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_downsample: bool):
        self.resnets = ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                 groups=groups, eps=_EPS) for i in range(layers)])
        # padding 0: the asymmetric (0, 1, 0, 1) zero padding of the original LDM encoder
        self.downsamplers = ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (N, C, H, W) -> (N, C, H/2, W/2)
        return x


class UpDecoderBlock2D(Module):
    """`layers` ResNet blocks, then (except in the last block) nearest 2x + conv: keys resnets.i, upsamplers.0."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_upsample: bool):
        self.resnets = ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                 groups=groups, eps=_EPS) for i in range(layers)])
        self.upsamplers = ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (N, C, h, w) -> (N, C, 2h, 2w)
        return x


class Encoder(Module):
    """Image (N, 3, H, W) -> Gaussian parameters (N, 2*latent_channels, H/f, W/f), f = 2**(blocks - 1)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                      # (N, 3, H, W) -> (N, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)                         # ... -> (N, ch[-1], H/f, W/f)
        x = self.mid_block(x)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)                  # (N, 2*latent_channels, H/f, W/f)


class Decoder(Module):
    """Latent (N, latent_channels, h, w) -> image (N, 3, h*f, w*f); each up block has layers_per_block + 1 ResNets."""

    def __init__(self, cfg: AutoencoderKLConfig):
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = ModuleList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)                      # (N, 4, h, w) -> (N, ch[-1] of the encoder, h, w)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)                         # ... -> (N, ch[0], h*f, w*f)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)                  # (N, 3, H, W)


class AutoencoderKL(PretrainedModel):
    """The SD VAE. ``vae.encode(images)`` -> `DiagonalGaussianDistribution`; ``vae.decode(latents)`` -> images.

    Neither applies ``config.scaling_factor``: as in diffusers, the pipeline multiplies the encoded
    latent by it and divides before decoding (`refldm.core.images.scale_latents` / `unscale_latents`).
    """

    def __init__(self, config: AutoencoderKLConfig | dict | None = None):
        if config is None:
            config = AutoencoderKLConfig()
        elif isinstance(config, dict):
            config = parse_config(AutoencoderKLConfig, config, where="AutoencoderKL config")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> AutoencoderKLConfig:
        """config.json dict -> AutoencoderKLConfig; unsupported keys and values raise ConfigError."""
        return parse_config(AutoencoderKLConfig, config, where=where)

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", subfolder: str | None = None,
                        weights_dtype: str | None = None) -> AutoencoderKL:
        """Load config.json and diffusion_pytorch_model.safetensors (or its shards) from a VAE folder.

        A pipeline folder (one with a ``vae/`` subfolder and no config.json of its own) works too.
        Weights of any float dtype (fp32, fp16, bf16) are cast to `dtype` and put on the active backend.
        """
        folder = os.fspath(folder)
        if subfolder is None and not os.path.isfile(os.path.join(folder, "config.json")) and \
                os.path.isfile(os.path.join(folder, "vae", "config.json")):
            subfolder = "vae"
        return super().from_pretrained(folder, dtype=dtype, subfolder=subfolder, weights_dtype=weights_dtype)

    def convert_keys(self, state: dict, source: str) -> dict:
        """Older diffusers VAEs name the attention weights query/key/value/proj_attn: rename them."""
        return convert_legacy_keys(state)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple:
        """The latent shape (B, latent_channels, H/f, W/f) for images of (height, width); f = 8 for SD."""
        f = self.config.downscale_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of {f} on each side; "
                             f"this VAE needs height and width divisible by {f} (e.g. "
                             f"{max(f, height // f * f)}x{max(f, width // f * f)})")
        return (batch, self.config.latent_channels, height // f, width // f)

    def _input(self, x, channels: int, what: str):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"AutoencoderKL.{what}: expected a (N, {channels}, H, W) array, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected {channels} channels, got shape {tuple(x.shape)}")
        if x.dtype.kind != "f":
            raise ValueError(f"AutoencoderKL.{what}: expected a float array, got {x.dtype} (convert uint8 "
                             "images with refldm.core.images.to_tensor, which maps [0, 255] to [-1, 1])")
        if self.dtype is None:
            raise ValueError(f"AutoencoderKL.{what}: no weights loaded; use AutoencoderKL.from_pretrained")
        if backend.array_namespace(x) is not backend.xp():
            return backend.asarray(x, dtype=self.dtype)
        return x.astype(self.dtype, copy=False)

    def encode(self, images) -> DiagonalGaussianDistribution:
        """images (N, in_channels, H, W) in [-1, 1], H and W divisible by f -> posterior over (N, 4, H/f, W/f)."""
        x = self._input(images, self.config.in_channels, "encode")
        self.latent_shape(x.shape[0], x.shape[2], x.shape[3])  # H and W must be multiples of f
        tile = self.tile_sample_min_size
        if self.use_tiling and (x.shape[2] > tile or x.shape[3] > tile):
            return DiagonalGaussianDistribution(self._tiled(x, tile, self.tile_latent_min_size, self._encode_tile))
        return DiagonalGaussianDistribution(self._encode_tile(x))

    def _encode_tile(self, x):
        h = self.encoder(x)                      # (N, 2*latent_channels, H/f, W/f)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h

    def _decode_tile(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)                   # (N, 3, h*f, w*f)

    # -- tiling (diffusers' enable_tiling): bounded memory for large images ---------------------------------

    use_tiling = False
    tile_overlap_factor = 0.25

    def enable_tiling(self, use_tiling: bool = True):
        """Encode and decode large inputs tile by tile (as diffusers' ``enable_tiling``): the activations
        then take the memory of one tile (sample_size pixels a side, 1024 for SDXL's VAE) whatever the
        image size. The result differs slightly from the untiled one: each tile sees only its own
        neighbourhood, and the overlapping borders are cross-faded (see `_tiled`)."""
        self.use_tiling = bool(use_tiling)
        return self

    def disable_tiling(self):
        return self.enable_tiling(False)

    @property
    def tile_sample_min_size(self) -> int:
        """The tile side in pixels: the config's sample_size (its first entry when it is a list)."""
        size = self.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tile_latent_min_size(self) -> int:
        """The tile side in latent pixels: sample_size / f."""
        return int(self.tile_sample_min_size / self.config.downscale_factor)

    def _tiled(self, x, tile_in: int, tile_out: int, run):
        """diffusers' tiled encode/decode. Input tiles of side tile_in start every
        stride = int(tile_in * (1 - 0.25)) positions; each is run through `run` (side tile_out out).
        Then, in row-major order, each output tile is cross-faded with the tile above over its first
        e = int(tile_out * 0.25) rows, and with the tile on its left over its first e columns:

            b[y] = a[-e + y] * (1 - y/e) + b[y] * (y/e),   y = 0..e-1   (in place, as diffusers)

        and its top-left (tile_out - e)^2 corner is kept. The kept pieces are put together.
        """
        xp = backend.array_namespace(x)
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        extent = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - extent
        rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
                for i in range(0, x.shape[2], stride)]
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, t in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], t, extent, axis=2)
                if j > 0:
                    _blend(row[j - 1], t, extent, axis=3)
                kept.append(t[:, :, :keep, :keep])
            out_rows.append(xp.concatenate(kept, axis=3))
        return xp.concatenate(out_rows, axis=2)

    def decode(self, latents):
        """latents (N, latent_channels, h, w), already divided by scaling_factor -> images (N, 3, h*f, w*f).

        The output is what the decoder computes: nominally in [-1, 1], not clipped (`refldm.core.images`
        clips when converting to uint8).
        """
        z = self._input(latents, self.config.latent_channels, "decode")
        tile = self.tile_latent_min_size
        if self.use_tiling and (z.shape[2] > tile or z.shape[3] > tile):
            return self._tiled(z, tile, self.tile_sample_min_size, self._decode_tile)
        return self._decode_tile(z)

    def forward(self, images, sample_posterior: bool = False, generator=None):
        """Reconstruct: decode(encode(images).mode()) (or a sample of the posterior)."""
        posterior = self.encode(images)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z)


def _blend(a, b, extent: int, axis: int):
    """Cross-fade b's first rows (axis 2) or columns (axis 3) from a's last ones, in place in b."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    for y in range(extent):
        w = y / extent
        if axis == 2:
            b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - w) + b[:, :, y, :] * w
        else:
            b[:, :, :, y] = a[:, :, :, -extent + y] * (1 - w) + b[:, :, :, y] * w


_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_keys(state: dict) -> dict:
    """Rename the attention keys of older diffusers VAE checkpoints (query, key, value, proj_attn) to
    today's names (to_q, to_k, to_v, to_out.0), as diffusers does when loading them; other keys are kept."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in _LEGACY:
            key = ".".join(parts[:-2] + [_LEGACY[parts[-2]], parts[-1]])
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# float16: force_upcast, and the check of the decoded image


class NonFiniteImageError(RuntimeError):
    """The VAE's decoded image holds NaN or inf."""


def needs_upcast(vae: AutoencoderKL) -> bool:
    """True when the VAE was loaded in float16 (or another sub-32-bit float) and its config says
    ``force_upcast``: then pipelines run it in float32, as diffusers' ``upcast_vae`` does.

    Why: the SD and SD-XL decoders' activations exceed float16's range (65504) in the mid block and the
    last up blocks (the GroupNorm variance and the attention logits), giving inf, then NaN: a black image.
    """
    return vae.dtype is not None and vae.dtype.itemsize < 4 and bool(vae.config.force_upcast)


def upcast(vae: AutoencoderKL) -> AutoencoderKL:
    """A float32 copy of `vae` (its float16 weights widened exactly), or `vae` itself when
    `needs_upcast` is false. The copy is built per call and freed after it (SDXL's VAE: 335 MB)."""
    if not needs_upcast(vae):
        return vae
    copy = AutoencoderKL(vae.config).load_state_dict(vae.state_dict(), dtype="float32",
                                                     source="the float16 VAE (force_upcast)")
    return copy.enable_tiling(vae.use_tiling)


def decode_checked(vae: AutoencoderKL, latents):
    """vae.decode(latents), in float32 when `needs_upcast` (latents widened too), and checked:
    a decoded image with NaN or inf raises NonFiniteImageError instead of becoming a black PNG.
    latents: (N, C, h, w), already divided by the scaling factor -> image (N, 3, H, W)."""
    model = upcast(vae)
    image = model.decode(latents)                       # _input casts the latents to the model's dtype
    xp = backend.array_namespace(image)
    if not bool(xp.all(xp.isfinite(image))):
        raise NonFiniteImageError(
            f"the decoded image holds NaN or inf (VAE in {model.dtype}, force_upcast="
            f"{vae.config.force_upcast}); decode in float32 (set force_upcast true in the VAE's config.json "
            "or load in float32)")
    return image


def encode_upcast(vae: AutoencoderKL, images) -> DiagonalGaussianDistribution:
    """vae.encode(images), in float32 when `needs_upcast` (as diffusers' SDXL img2img encodes); the
    posterior's arrays are float32 then, and the caller casts the sampled latents back."""
    return upcast(vae).encode(images)
