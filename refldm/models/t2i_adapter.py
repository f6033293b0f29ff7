"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models"): a small convolutional network that reads a control image once and hands the
U-Net one feature map per encoder level.

Unlike a ControlNet it sees neither the latents, nor the timestep, nor the text: its features are computed once
per image, before the loop, and added inside the U-Net's encoder at every step. For a control image y
(B, C_in, H, W) in [0, 1] and r = downscale_factor:

    x   = unshuffle_r(y)                      (B, C_in r^2, H/r, W/r)   pixel unshuffle: each r x r patch -> channels
    x   = conv_in(x)                          (B, c_0, H/r, W/r)        (full adapters; the light one has none)
    F_k = body_k(x);  x = F_k                 one feature per level k
    body_k(x) = resnets(in_conv(avgpool_2(x)))          (full; the pool from level 1 on, in_conv where widths change)
    resnet(x) = x + conv_1x1(relu(conv_3x3(x)))         (full;  light: x + conv_3x3(relu(conv_3x3(x))))

The U-Net adds F_k, times the scale s, inside its k-th down block (``down_intrablock_additional_residuals``,
refldm/models/unet.py; docs/control.md). At initialisation nothing is zero here: the adapter is trained
against a frozen U-Net, and s = 0 gives back the plain U-Net.

Three layouts, diffusers' ``adapter_type``:

- ``full_adapter`` (SD 1.x / 2.x): conv_in, then len(channels) levels, halving from the second on;
  total_downscale_factor = r 2^(len - 1). With r = 8 the first feature has the latent's size.
- ``light_adapter`` (SD 1.x / 2.x): no conv_in; each level is in_conv (1x1) to a width c/4, resnets with two
  3x3 convs, out_conv (1x1) to c; len(channels) + 1 levels (the last one repeats the last width).
- ``full_adapter_xl`` (SDXL, r = 16): conv_in at 1/16 (the latent halved, where SDXL's first DownBlock2D
  ends), levels 0 and 1 at that size, level 2 halved, level 3 the same size (it goes to the mid block);
  total_downscale_factor = 2 r.

Key names are diffusers' (``adapter.conv_in.weight``, ``adapter.body.1.in_conv.weight``,
``adapter.body.0.resnets.1.block2.bias``), so ``T2IAdapter.from_pretrained`` loads a diffusers folder as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from refldm import backend
from refldm.checkpoints.config import MAX_LAYERS, parse_config
from refldm.core.nn import Module, ModuleList, PretrainedModel
from refldm.models.blocks import Conv2d, relu

__all__ = ["T2IAdapter", "T2IAdapterConfig", "MultiAdapter", "ADAPTER_TYPES", "pixel_unshuffle", "avg_pool2x2",
           "check_adapter_compatible", "adapter_family"]

ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")


@dataclass
class T2IAdapterConfig:
    """diffusers' T2IAdapter config.json keys and defaults (the SD 1.x full adapter)."""

    in_channels: int = 3                      # channels of the control image (1: a grey one)
    channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    num_res_blocks: int = 2                   # resnets per level
    downscale_factor: int = 8                 # r of the first pixel unshuffle
    adapter_type: str = "full_adapter"

    RULES = [(r"downscale_factor$", (1, 64), False), (r"num_res_blocks$", (0, MAX_LAYERS), False)]

    def __post_init__(self):
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type={self.adapter_type!r} is not implemented in refldm (only "
                             f"{', '.join(repr(t) for t in ADAPTER_TYPES)})")
        if not self.channels:
            raise ValueError("channels must be a non-empty list of widths")
        if self.adapter_type == "light_adapter" and any(c < 4 for c in self.channels):
            raise ValueError(f"channels={self.channels}: a light adapter works at a quarter of each width, so "
                             "every width must be >= 4")
        if self.adapter_type == "full_adapter_xl" and any(c != self.channels[2] for c in self.channels[3:]):
            raise ValueError(f"channels={self.channels}: full_adapter_xl keeps the width from level 2 on, so "
                             "channels[3:] must equal channels[2]")


# -- the three weightless ops of the adapter ------------------------------------------------------------------

def pixel_unshuffle(x, r: int):
    """Space to depth: y[n, c r^2 + i r + j, h, w] = x[n, c, h r + i, w r + j]   (torch's PixelUnshuffle).

    x: (N, C, H, W) with H, W multiples of r -> (N, C r^2, H/r, W/r)."""
    xp = backend.array_namespace(x)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // r, r, w // r, r)                          # (n, c, h', i, w', j)
    y = xp.transpose(y, (0, 1, 3, 5, 2, 4))                            # (n, c, i, j, h', w')
    return xp.ascontiguousarray(y).reshape(n, c * r * r, h // r, w // r)


def avg_pool2x2(x):
    """2x2 average pooling, stride 2, rounding the size up (torch's AvgPool2d(2, 2, ceil_mode=True)):

        y[n, c, i, j] = mean of x[n, c, 2i + u, 2j + v] over the u, v in {0, 1} that fall inside x

    so an odd side's last window averages the 1 or 2 pixels it has. (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))."""
    xp = backend.array_namespace(x)
    n, c, h, w = x.shape
    ph, pw = h % 2, w % 2
    padded = xp.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw))) if ph or pw else x
    h2, w2 = (h + ph) // 2, (w + pw) // 2
    total = padded.reshape(n, c, h2, 2, w2, 2).sum(axis=(3, 5))        # (N, C, h2, w2) sums of the windows
    if not (ph or pw):
        return total / 4
    count = numpy.full((h2, w2), 4.0)                                  # pixels inside each window
    if ph:
        count[-1, :] /= 2
    if pw:
        count[:, -1] /= 2
    return total / xp.asarray(count.astype(x.dtype))


# -- the blocks -------------------------------------------------------------------------------------------------

class AdapterResnetBlock(Module):
    """x + block2(relu(block1(x))): block1 3x3, block2 1x1 (full adapters)."""

    def __init__(self, channels: int):
        self.block1 = Conv2d(channels, channels, kernel_size=3, padding=1)
        self.block2 = Conv2d(channels, channels, kernel_size=1)

    def forward(self, x):
        return self.block2(relu(self.block1(x))) + x


class LightAdapterResnetBlock(AdapterResnetBlock):
    """x + block2(relu(block1(x))): both 3x3 (the light adapter)."""

    def __init__(self, channels: int):
        self.block1 = Conv2d(channels, channels, kernel_size=3, padding=1)
        self.block2 = Conv2d(channels, channels, kernel_size=3, padding=1)


class AdapterBlock(Module):
    """One level of a full adapter: [avg_pool2x2] -> [in_conv 1x1 where the width changes] -> resnets."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool = False):
        self.down = down
        self.in_conv = Conv2d(cin, cout, kernel_size=1) if cin != cout else None
        self.resnets = ModuleList([AdapterResnetBlock(cout) for _ in range(num_res_blocks)])

    def forward(self, x):
        if self.down:
            x = avg_pool2x2(x)                                          # (B, C_in, ceil(h/2), ceil(w/2))
        if self.in_conv is not None:
            x = self.in_conv(x)                                         # (B, C_out, h, w)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class LightAdapterBlock(Module):
    """One level of the light adapter: [avg_pool2x2] -> in_conv 1x1 to c/4 -> resnets -> out_conv 1x1 to c."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool = False):
        mid = cout // 4
        self.down = down
        self.in_conv = Conv2d(cin, mid, kernel_size=1)
        self.resnets = ModuleList([LightAdapterResnetBlock(mid) for _ in range(num_res_blocks)])
        self.out_conv = Conv2d(mid, cout, kernel_size=1)

    def forward(self, x):
        if self.down:
            x = avg_pool2x2(x)
        x = self.in_conv(x)                                             # (B, c/4, h, w)
        for resnet in self.resnets:
            x = resnet(x)
        return self.out_conv(x)                                         # (B, c, h, w)


class _Adapter(Module):
    """The body shared by the three layouts: unshuffle, [conv_in], the levels, every level's output kept."""

    def __init__(self, cfg: T2IAdapterConfig):
        ch, n, r = cfg.channels, cfg.num_res_blocks, cfg.downscale_factor
        cin = cfg.in_channels * r * r
        if cfg.adapter_type == "light_adapter":
            self.conv_in = None
            widths = [cin] + list(ch) + [ch[-1]]
            self.body = ModuleList([LightAdapterBlock(widths[k], widths[k + 1], n, down=k > 0)
                                    for k in range(len(ch) + 1)])
            self.total_downscale_factor = r * 2 ** len(ch)
        elif cfg.adapter_type == "full_adapter":
            self.conv_in = Conv2d(cin, ch[0], kernel_size=3, padding=1)
            self.body = ModuleList([AdapterBlock(ch[max(k - 1, 0)], ch[k], n, down=k > 0) for k in range(len(ch))])
            self.total_downscale_factor = r * 2 ** (len(ch) - 1)
        else:                                                           # full_adapter_xl: one halving, at level 2
            self.conv_in = Conv2d(cin, ch[0], kernel_size=3, padding=1)
            self.body = ModuleList([AdapterBlock(ch[max(k - 1, 0)], ch[k], n, down=k == 2) for k in range(len(ch))])
            self.total_downscale_factor = r * 2
        self.downscale_factor = r

    def forward(self, y):
        x = pixel_unshuffle(y, self.downscale_factor)                   # (B, C_in r^2, H/r, W/r)
        if self.conv_in is not None:
            x = self.conv_in(x)                                         # (B, c_0, H/r, W/r)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)                                          # F_k (B, c_k, h_k, w_k)
        return features


class T2IAdapter(PretrainedModel):
    """``adapter(image) -> [F_0, F_1, ...]``: the control image (B, in_channels, H, W) in [0, 1] to one feature
    map per level (module docstring). H and W must be multiples of ``downscale_factor``."""

    def __init__(self, config: T2IAdapterConfig):
        self.config = config
        self.adapter = _Adapter(config)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> T2IAdapterConfig:
        """config.json dict -> T2IAdapterConfig; unsupported keys and values raise ConfigError."""
        return parse_config(T2IAdapterConfig, config, where=where)

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller than the image the deepest feature is (diffusers' property of the same name)."""
        return self.adapter.total_downscale_factor

    @property
    def downscale_factor(self) -> int:
        """The pixel unshuffle's r: the image's sides must be multiples of it."""
        return self.config.downscale_factor

    def forward(self, image) -> list:
        cfg = self.config
        r = cfg.downscale_factor
        if image.ndim != 4 or image.shape[1] != cfg.in_channels or image.shape[2] % r or image.shape[3] % r \
                or image.shape[2] == 0 or image.shape[3] == 0:
            raise ValueError(f"t2i_adapter: the image must be (B, {cfg.in_channels}, H, W) with H and W positive "
                             f"multiples of downscale_factor {r}, got {tuple(image.shape)}")
        if self.dtype is not None and image.dtype != self.dtype:
            image = image.astype(self.dtype)
        return self.adapter(image)


class MultiAdapter:
    """Several T2I-Adapters, one image each, their features summed with weights (diffusers' MultiAdapter):

        F_k = sum_j w_j F_k^(j)           w_j = adapter_weights[j], 1/n each when not given

    (the weights rounded to float32, as diffusers holds them in a float32 tensor).

    ``MultiAdapter(adapters)(images, adapter_weights)``; every adapter must downscale alike."""

    def __init__(self, adapters):
        adapters = list(adapters)
        if len(adapters) < 2:
            raise ValueError("MultiAdapter needs at least two T2IAdapters (use the T2IAdapter itself for one)")
        for k, a in enumerate(adapters):
            if not isinstance(a, T2IAdapter):
                raise ValueError(f"adapters[{k}]: expected a T2IAdapter, got {type(a).__name__}")
            if (a.total_downscale_factor, a.downscale_factor) != (adapters[0].total_downscale_factor,
                                                                   adapters[0].downscale_factor):
                raise ValueError(f"adapters[{k}] downscales by {a.downscale_factor} (total "
                                 f"{a.total_downscale_factor}), adapters[0] by {adapters[0].downscale_factor} "
                                 f"(total {adapters[0].total_downscale_factor}): they must agree")
        self.adapters = adapters
        self.config = adapters[0].config
        self.dtype = adapters[0].dtype

    @property
    def total_downscale_factor(self) -> int:
        return self.adapters[0].total_downscale_factor

    @property
    def downscale_factor(self) -> int:
        return self.adapters[0].downscale_factor

    def __call__(self, images, adapter_weights=None) -> list:
        n = len(self.adapters)
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} adapters: give one per adapter")
        weights = [1.0 / n] * n if adapter_weights is None else list(adapter_weights)
        if len(weights) != n:
            raise ValueError(f"{len(weights)} adapter_weights for {n} adapters")
        weights = [float(numpy.float32(w)) for w in weights]           # as diffusers' torch.tensor(weights)
        total = None
        for image, w, adapter in zip(images, weights, self.adapters):
            feats = adapter(image)
            total = [w * f for f in feats] if total is None else [t + w * f for t, f in zip(total, feats)]
        return total


def adapter_family(config: T2IAdapterConfig) -> str:
    """The U-Net family an adapter is made for, for messages: SDXL (full_adapter_xl) or SD 1.x / 2.x."""
    return "SDXL" if config.adapter_type == "full_adapter_xl" else "SD 1.x/2.x"


def check_adapter_compatible(adapter, unet) -> None:
    """Refuse an adapter whose features cannot enter `unet`: another family, or other widths."""
    from refldm.models.controlnet import family
    c, u = adapter.config, unet.config
    fa, fu = adapter_family(c), family(u)
    if (fa == "SDXL") != (fu == "SDXL"):
        article = "an" if fu.startswith("SD") else "a"
        raise ValueError(f"{fa} T2I-Adapter with {article} {fu} U-Net: use an adapter made for the U-Net's family")
    widths = expected_widths(unet)
    have = list(c.channels) + ([c.channels[-1]] if c.adapter_type == "light_adapter" else [])
    if have != widths[:len(have)] or len(have) not in (len(widths) - 1, len(widths)):
        raise ValueError(f"the T2I-Adapter's feature widths {have} do not fit the U-Net's down blocks "
                         f"{widths[:-1]} (+ mid block {widths[-1]})")


def expected_widths(unet) -> list:
    """The channels of the residual each down block takes, then the mid block's."""
    ch = unet.config.block_out_channels
    return list(ch) + [ch[-1]]

