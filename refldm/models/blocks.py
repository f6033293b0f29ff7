"""Building blocks shared by the VAE and the U-Net, keyed exactly like diffusers' checkpoints.

Leaves (each holds its checkpoint tensors under the PyTorch names ``weight`` / ``bias``):

    Conv2d(in, out, kernel, stride=1, padding=0)     weight (out, in, k, k), bias (out,)
    Linear(in, out, bias=True)                       weight (out, in), bias (out,)
    GroupNorm(groups, channels, eps)                 weight (channels,), bias (channels,)
    RMSNorm(dim, eps)                                weight (dim,)

Blocks:

    ResnetBlock2D(in, out, temb_channels=None)  norm1, conv1, [time_emb_proj], norm2, conv2, [conv_shortcut]
    Downsample2D(channels, padding)             conv (3x3, stride 2)
    Upsample2D(channels)                        conv (3x3), after nearest 2x upsampling

A model builds a tree of these and calls ``assign_names()`` on its root; `refldm.checkpoints.weights.load_into`
then fills every ``Param`` from the checkpoint. See docs/vae.md and docs/unet.md for the math.
"""

from __future__ import annotations

from refldm.core import functional as F
from refldm.backend import array_namespace
from refldm.checkpoints.stored import materialize
from refldm.core.nn import Module, Param

__all__ = ["Conv2d", "Linear", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding", "ResnetBlock2D", "Downsample2D",
           "Upsample2D", "relu", "upsample_nearest"]


class Conv2d(Module):
    """A 2-D convolution layer: y = conv2d(x, weight) + bias (see `refldm.core.ops.conv2d`).

    padding: an int, or ((top, bottom), (left, right)) for asymmetric zero padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=0,
                 bias: bool = True):
        self.weight = Param(out_channels, in_channels, kernel_size, kernel_size)
        self.bias = Param(out_channels) if bias else None
        self.stride = stride
        self.padding = padding

    keeps_stored = ("weight",)  # weights_dtype="stored": converted here, per call (refldm.checkpoints.stored)

    def forward(self, x):
        return F.conv2d(x, materialize(self.weight), self.bias, stride=self.stride, padding=self.padding)


class Linear(Module):
    """A fully connected layer on the last axis: y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.weight = Param(out_features, in_features)
        self.bias = Param(out_features) if bias else None

    keeps_stored = ("weight",)  # weights_dtype="stored": converted here, per call (refldm.checkpoints.stored)

    def forward(self, x):
        return F.linear(x, materialize(self.weight), self.bias)


class GroupNorm(Module):
    """Group normalisation with a learned per-channel scale and shift (see `refldm.core.ops.group_norm`)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        self.weight = Param(num_channels)
        self.bias = Param(num_channels)
        self.num_groups = num_groups
        self.eps = float(eps)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps)


class LayerNorm(Module):
    """Layer normalisation over the last axis with a learned scale and shift (see `refldm.core.ops.layer_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.weight = Param(dim)
        self.bias = Param(dim)
        self.eps = float(eps)

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)


class RMSNorm(Module):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019) over the last axis, with a learned scale:

        y = x / sqrt(mean(x^2) + eps) * weight          x: (..., D), weight: (D,)

    No mean is subtracted and there is no bias. The mean of squares is taken in at least float32 (as
    diffusers' and transformers' RMSNorm do for float16 inputs); y is cast back to x's dtype before the scale.
    SD3.5 uses it on each attention head's queries and keys (qk_norm="rms_norm")."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = Param(dim)
        self.eps = float(eps)

    def forward(self, x):
        xp = array_namespace(x)
        wide = x.astype("float32") if x.dtype.itemsize < 4 else x
        ms = xp.mean(wide * wide, axis=-1, keepdims=True)                 # (..., 1)
        y = (wide / xp.sqrt(ms + self.eps)).astype(x.dtype, copy=False)
        return y * self.weight


class Embedding(Module):
    """A lookup table: y = weight[ids]; weight (V, D) (see `refldm.core.ops.embedding`)."""

    def __init__(self, num: int, dim: int):
        self.weight = Param(num, dim)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class ResnetBlock2D(Module):
    """The pre-activation residual block of the SD VAE and U-Net (diffusers' ``ResnetBlock2D``).

        h   = conv1(silu(norm1(x)))                           # (N, C_in, H, W) -> (N, C_out, H, W)
        h   = h + time_emb_proj(silu(temb))[:, :, None, None] # U-Net only ("default" time embedding)
        h   = conv2(silu(norm2(h)))                           # dropout is the identity at inference
        out = (shortcut(x) + h) / output_scale_factor         # shortcut: 1x1 conv when C_in != C_out

    With ``time_embedding_norm="scale_shift"`` the projected embedding has 2*C_out values, split into
    (scale, shift), and ``h = norm2(h) * (1 + scale) + shift`` replaces the addition before norm2.

    Keys: norm1, conv1, time_emb_proj (when temb_channels is given), norm2, conv2, conv_shortcut (when
    C_in != C_out). The VAE uses eps=1e-6 and no time embedding; SD's U-Net uses eps=1e-5 and
    temb_channels = 4 * block_out_channels[0].
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0,
                 time_embedding_norm: str = "default", conv_shortcut_bias: bool = True):
        out_channels = in_channels if out_channels is None else out_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: time_embedding_norm={time_embedding_norm!r} is not implemented "
                             "(only 'default' and 'scale_shift')")
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            proj = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj = Linear(temb_channels, proj)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias)
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = float(output_scale_factor)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_in, H, W) -> (N, C_out, H, W)
        scale_shift = None
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError(f"{self._name or 'ResnetBlock2D'}: this block has a time_emb_proj and needs temb")
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (N, T) -> (N, C_out or 2*C_out, 1, 1)
            if self.time_embedding_norm == "default":
                h = h + t
            else:
                scale_shift = t
        h = self.norm2(h)
        if scale_shift is not None:
            c = h.shape[1]
            h = h * (1.0 + scale_shift[:, :c]) + scale_shift[:, c:]
        h = self.conv2(F.silu(h))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h += shortcut  # h is a fresh array from conv2, so adding in place changes nothing upstream
        if self.output_scale_factor != 1.0:
            h /= self.output_scale_factor
        return h


class Downsample2D(Module):
    """Halve the resolution with a learned 3x3 convolution of stride 2 (key: ``conv``).

    padding=1 (the U-Net): symmetric zero padding of one pixel, H_out = floor((H - 1) / 2) + 1.
    padding=0 (the VAE encoder): pad only the bottom and the right by one pixel, then convolve without
    padding — diffusers' ``F.pad(x, (0, 1, 0, 1))`` — H_out = floor((H - 2) / 2) + 1 = H / 2 for even H.
    """

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        out_channels = channels if out_channels is None else out_channels
        if padding not in (0, 1):
            raise ValueError(f"Downsample2D: padding={padding!r} is not implemented (only 0 and 1)")
        pad = ((0, 1), (0, 1)) if padding == 0 else 1
        self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=pad)

    def forward(self, x):
        return self.conv(x)  # (N, C, H, W) -> (N, C_out, H/2, W/2)


class Upsample2D(Module):
    """Double the resolution: nearest-neighbour 2x upsampling, then a 3x3 convolution (key: ``conv``).

    ``output_size=(H_out, W_out)`` upsamples to that size instead of 2x (the U-Net passes it when the
    skip connection's size is odd), as torch's ``F.interpolate(..., size=..., mode="nearest")``.
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        out_channels = channels if out_channels is None else out_channels
        self.conv = Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x, output_size=None):
        if output_size is None or tuple(output_size) == (2 * x.shape[2], 2 * x.shape[3]):
            x = F.upsample_nearest2x(x)  # (N, C, H, W) -> (N, C, 2H, 2W)
        else:
            x = upsample_nearest(x, output_size)
        return self.conv(x)


def relu(x):
    """relu(x) = max(x, 0), in x's dtype (T5 v1.0's feed-forward, TAESD's and the T2I-Adapter's blocks)."""
    xp = array_namespace(x)
    return xp.maximum(x, xp.zeros((), dtype=x.dtype))


def upsample_nearest(x, size):
    """Nearest-neighbour resize to size (H_out, W_out), as torch's ``mode="nearest"``:

        y[n, c, i, j] = x[n, c, floor(i * H / H_out), floor(j * W / W_out)]

    (torch computes the source index in float32 as floor(i * (H / H_out)); for the sizes used here,
    H_out <= 2H + 1, the two agree.)
    """
    xp = array_namespace(x)
    h, w = x.shape[2:]
    ho, wo = int(size[0]), int(size[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"upsample_nearest: output size must be positive, got {tuple(size)}")
    rows = xp.asarray([(i * h) // ho for i in range(ho)])
    cols = xp.asarray([(j * w) // wo for j in range(wo)])
    return xp.take(xp.take(x, rows, axis=2), cols, axis=3)
