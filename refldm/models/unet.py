"""The Stable Diffusion U-Net (diffusers' ``UNet2DConditionModel``): the denoiser called at every step.

Given a noisy latent x_t (B, 4, h, w), the timestep t and the text embeddings c (B, S, D_text), it
predicts the noise eps (or v, for v-prediction checkpoints) with the latent's shape:

    emb  = MLP(sinusoid(t))                                     the time embedding, (B, 4*C0)
    x    = conv_in(x_t)                                         (B, C0, h, w)
    down: per level, [ResNet(x, emb) -> Transformer(x, c)] x layers_per_block, then a stride-2 conv;
          every intermediate output is kept as a skip connection
    mid:  ResNet -> Transformer -> ResNet at the coarsest level
    up:   per level, [concat(x, skip) -> ResNet(x, emb) -> Transformer(x, c)] x (layers_per_block + 1),
          then nearest 2x upsampling and a conv
    out   = conv_out(silu(GroupNorm(x)))                        (B, 4, h, w)

The time embedding enters every ResNet block as a per-channel bias; the text enters only through the
cross-attention (``attn2``) of each transformer block. docs/unet.md walks through the shapes for
SD 1.x at 512x512.

SDXL (``addition_embed_type="text_time"``) adds a second embedding to the time one before it reaches
the ResNets: add_embedding([pooled text, sinusoids of the micro-conditioning time ids]), see
`UNet2DConditionModel.added_embedding` and docs/sdxl.md.

Attribute names are the diffusers checkpoint keys (``down_blocks.0.attentions.1.transformer_blocks.0
.attn2.to_k.weight``), so ``from_pretrained`` loads a diffusers ``unet/`` folder as it is.
The ResNet, down- and up-sampling blocks are shared with the VAE (`refldm/models/blocks.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from refldm import backend
from refldm.core import functional as F
from refldm.checkpoints.config import parse_config
from refldm.checkpoints.stored import materialize
from refldm.models.blocks import (Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear, ResnetBlock2D,
                                  Upsample2D)
from refldm.core.nn import Module, ModuleList, PretrainedModel

__all__ = [
    "UNet2DConditionModel", "UNet2DConditionConfig", "TimestepEmbedding", "Transformer2DModel",
    "BasicTransformerBlock", "Attention", "FeedForward", "CrossAttnDownBlock2D", "DownBlock2D",
    "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class UNet2DConditionConfig:
    """The config.json keys refldm implements, with diffusers' defaults (SD 1.x values noted).

    A note on ``attention_head_dim``: in diffusers' UNet2DConditionModel this key holds the number of
    attention *heads* per level, not the size of a head (a naming mistake kept for compatibility;
    ``num_attention_heads`` must be null). SD 1.x has 8 heads everywhere (head size C/8 = 40, 80,
    160); SD 2.x has [5, 10, 20, 20] (head size 64 everywhere).
    """

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False          # x <- 2x - 1 before conv_in
    flip_sin_to_cos: bool = True               # sinusoid order [cos, sin] instead of [sin, cos]
    freq_shift: float = 0                      # frequencies exp(-ln(1e4) i / (half - freq_shift))
    down_block_types: list = field(default_factory=lambda: [
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])
    up_block_types: list = field(default_factory=lambda: [
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    only_cross_attention: bool | list = False  # attn1 attends to the text too (per level or all)
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int | list = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0        # the mid block's ResNets divide their output by it
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list = 1280     # SD 1.x: 768 (CLIP ViT-L), SD 2.x: 1024 (OpenCLIP ViT-H)
    transformer_layers_per_block: int | list = 1
    reverse_transformer_layers_per_block: list | None = None
    attention_head_dim: int | list = 8         # = number of heads (see the class docstring)
    use_linear_projection: bool = False        # proj_in/out as Linear (SD 2.x) instead of 1x1 conv
    upcast_attention: bool = False             # attention in float32 for float16 models (SD 2.x)
    time_embedding_dim: int | None = None      # default 4 * block_out_channels[0]
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding (B, P) and the sinusoids of the
    # time ids (B, n_ids * addition_time_embed_dim) are concatenated, (B, projection_class_embeddings_
    # input_dim), and go through `add_embedding` (an MLP like the time one), added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1 or not all(isinstance(c, int) and c > 0 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be a non-empty list of positive ints, got "
                             f"{self.block_out_channels!r}")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, key)
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"{key}: block type {t!r} is not implemented in refldm "
                                     f"(only {', '.join(allowed)})")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r} is not implemented in refldm (only 'silu')")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, key)
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"{key}={k!r}: only odd kernel sizes keep the latent's size")
        if not isinstance(self.norm_num_groups, int) or self.norm_num_groups < 1:
            raise ValueError(f"norm_num_groups={self.norm_num_groups!r} is not implemented in refldm "
                             "(a positive int is required)")
        # Normalise the per-level options to lists, checking lengths and the channel split.
        self.only_cross_attention = _per_level(self.only_cross_attention, n, "only_cross_attention", bool)
        self.layers_per_block = _per_level(self.layers_per_block, n, "layers_per_block", int)
        self.cross_attention_dim = _per_level(self.cross_attention_dim, n, "cross_attention_dim", int)
        self.transformer_layers_per_block = _per_level(
            self.transformer_layers_per_block, n, "transformer_layers_per_block", int)
        if self.reverse_transformer_layers_per_block is not None:
            self.reverse_transformer_layers_per_block = _per_level(
                self.reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block", int)
        self.attention_head_dim = _per_level(self.attention_head_dim, n, "attention_head_dim", int)
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.attention_head_dim)):
            if h < 1 or c % h:
                raise ValueError(f"attention_head_dim[{i}]={h} (the number of heads) does not divide "
                                 f"block_out_channels[{i}]={c}")
        if self.time_embedding_dim is None:
            self.time_embedding_dim = 4 * self.block_out_channels[0]
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding={self.downsample_padding!r} is not implemented (0 or 1)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not implemented in refldm "
                             "(only None and 'text_time', SDXL's)")
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"addition_embed_type='text_time' needs {key} (a positive int), "
                                     f"got {value!r}")
            if self.addition_time_embed_dim % 2:
                raise ValueError(f"addition_time_embed_dim={self.addition_time_embed_dim} must be even "
                                 "(half sines, half cosines)")


def _per_level(value, n: int, key: str, kind):
    """An int/bool for every level, or a list of one per level -> a list of n values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries but there are {n} levels")
        values = list(value)
    else:
        values = [value] * n
    for v in values:
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"{key}: expected {kind.__name__} values, got {value!r}")
    return values


# Keys that do not change the forward pass at inference, and why.
_IGNORED = (
    "sample_size",                      # the training resolution; any latent size runs
    "dropout",                          # inactive at inference
    "mid_block_only_cross_attention",   # read only by UNetMidBlock2DSimpleCrossAttn, not by ours
    "addition_embed_type_num_heads",    # read only when addition_embed_type == "text" (not implemented)
)

# Keys that change the math, implemented at one value only: any other value is an error naming the key.
_FIXED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "num_attention_heads": None,        # diffusers itself refuses it (see UNet2DConditionConfig)
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
}


# ---------------------------------------------------------------------------------------------------
# Time embedding
# ---------------------------------------------------------------------------------------------------

class TimestepEmbedding(Module):
    """The time MLP: emb = W2 silu(W1 sinusoid(t) + b1) + b2, (B, C0) -> (B, time_embed_dim)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def forward(self, t_emb):
        return self.linear_2(F.silu(self.linear_1(t_emb)))


# ---------------------------------------------------------------------------------------------------
# Transformer: attention, feed-forward, the block, and the 2-D wrapper
# ---------------------------------------------------------------------------------------------------

class Attention(Module):
    """Multi-head attention (Vaswani et al., 2017) with diffusers' key names.

    Q = x W_q^T, K = c W_k^T, V = c W_v^T (no biases), split into H heads of size d;
    out = concat_h softmax(Q_h K_h^T / sqrt(d)) V_h  W_o^T + b_o.
    Self-attention when c is x (attn1); cross-attention when c is the text embedding (attn2).

    IP-Adapter (refldm/models/ip_adapter.py, off unless ``load_ip_adapter`` attached a `processor` to this
    attn2): c arrives as (text, [image tokens c_i per adapter]) and a second attention over the image tokens,
    with keys and values of its own, is added before the output projection (the decoupled cross-attention):

        out = [softmax(Q K^T / sqrt(d)) V + sum_i s_i softmax(Q K_i^T / sqrt(d)) V_i] W_o^T + b_o
              K_i = c_i W_k,i^T, V_i = c_i W_v,i^T  (to_k_ip.i, to_v_ip.i), s_i the adapter's scale
    """

    processor = None  # an IPAdapterAttnProcessor once an IP-Adapter is loaded (attn2 only)

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False):
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = ModuleList([Linear(inner, query_dim)])  # to_out.1 is dropout in diffusers
        self.heads = heads
        self.upcast_attention = upcast_attention

    def forward(self, x, context=None):
        # x: (B, L, C) tokens; context: (B, S, D_c), or None for self-attention; with an IP-Adapter, a pair
        # (text (B, S, D_c), [image tokens (B, T_i, D_c)])
        context, image_tokens = context if isinstance(context, tuple) else (context, None)
        context = x if context is None else context
        q = self.to_q(x)                           # (B, L, H*d)
        k = self.to_k(context)                     # (B, S, H*d)
        v = self.to_v(context)                     # (B, S, H*d)
        q, k, v = (F.split_heads(a, self.heads) for a in (q, k, v))  # (B, H, L or S, d), views
        dtype = q.dtype
        if self.upcast_attention and dtype.itemsize < 4:
            # SD 2.x's attention overflows float16; it is computed in float32 (as the original code does)
            q, k, v = (a.astype("float32") for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)     # (B, H, L, d); chunked over queries
        if image_tokens is not None and self.processor is not None:  # IP-Adapter: + sum_i s_i Attn(Q, K_i, V_i)
            out = self.processor(out, q, image_tokens)
        out = F.merge_heads(out.astype(dtype, copy=False))  # (B, L, H*d)
        return self.to_out[0](out)                 # (B, L, C)


class GEGLU(Module):
    """The gated first layer of the feed-forward: [h, g] = x W^T + b; out = h * gelu(g)."""

    def __init__(self, dim_in: int, dim_out: int):
        self.proj = Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        return F.geglu(x, materialize(self.proj.weight), self.proj.bias)


class Identity(Module):
    """A slot without weights (diffusers' dropout layers): returns its input."""

    def forward(self, x):
        return x


class FeedForward(Module):
    """FF(x) = W2 (GEGLU(x)) + b2, with an inner width of 4 * dim (keys net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int = 4):
        inner = dim * mult
        self.net = ModuleList([GEGLU(dim, inner), Identity(), Linear(inner, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))         # (B, L, C) -> (B, L, 4C) -> (B, L, C)


class BasicTransformerBlock(Module):
    """One transformer layer on the image tokens, pre-norm, three residual sub-layers:

        x = x + attn1(LN1(x))          self-attention among the pixels (on the text if only_cross)
        x = x + attn2(LN2(x), text)    cross-attention: queries from pixels, keys/values from the text
        x = x + FF(LN3(x))             GEGLU feed-forward
    """

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head,
                               cross_attention_dim if only_cross_attention else None, upcast_attention)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast_attention)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.only_cross_attention = only_cross_attention

    def forward(self, x, context):
        # x: (B, L, C), owned by the caller's transformer, so it is updated in place
        x += self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x += self.attn2(self.norm2(x), context)
        x += self.ff(self.norm3(x))
        return x


class Transformer2DModel(Module):
    """Attention on a feature map: GroupNorm, project to tokens, transformer blocks, project back, residual.

    (B, C, H, W) -> GroupNorm -> tokens (B, H*W, C) -> proj_in -> blocks -> proj_out -> (B, C, H, W) + x.
    proj_in/proj_out are 1x1 convs on the map (SD 1.x) or Linear layers on the tokens (SD 2.x,
    use_linear_projection). Both are the same linear map on each pixel's channels; only the weight's
    shape ((C, C, 1, 1) or (C, C)) and the side of the reshape they sit on differ.
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, only_cross_attention: bool,
                 upcast_attention: bool):
        inner = heads * dim_head
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner)
        else:
            self.proj_in = Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, only_cross_attention,
                                  upcast_attention)
            for _ in range(num_layers)])
        if use_linear_projection:
            self.proj_out = Linear(inner, in_channels)
        else:
            self.proj_out = Conv2d(inner, in_channels, kernel_size=1)
        self.use_linear_projection = use_linear_projection

    def forward(self, x, context):
        b, c, h, w = x.shape
        xp = backend.array_namespace(x)
        hidden = self.norm(x)                                             # (B, C, H, W)
        if self.use_linear_projection:
            tokens = self.proj_in(_to_tokens(xp, hidden))                 # (B, HW, C) -> (B, HW, inner)
        else:
            tokens = _to_tokens(xp, self.proj_in(hidden))                 # (B, inner, H, W) -> (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)                               # (B, HW, inner)
        if self.use_linear_projection:
            out = _to_map(xp, self.proj_out(tokens), h, w)                # (B, HW, C) -> (B, C, H, W)
        else:
            out = self.proj_out(_to_map(xp, tokens, h, w))                # (B, inner, H, W) -> (B, C, H, W)
        out += x                                                          # the residual
        return out


def _to_tokens(xp, x):
    """(B, C, H, W) feature map -> (B, H*W, C) sequence of pixels (a contiguous copy)."""
    b, c, h, w = x.shape
    return xp.ascontiguousarray(xp.swapaxes(x.reshape(b, c, h * w), 1, 2))


def _to_map(xp, tokens, h: int, w: int):
    """(B, H*W, C) sequence of pixels -> (B, C, H, W) feature map (a contiguous copy)."""
    b, _, c = tokens.shape
    return xp.ascontiguousarray(xp.swapaxes(tokens, 1, 2)).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------------
# Down, mid and up blocks
# ---------------------------------------------------------------------------------------------------

def _transformer(cfg: UNet2DConditionConfig, channels: int, heads: int, layers: int, cross_dim: int,
                 only_cross: bool):
    return Transformer2DModel(heads, channels // heads, channels, layers, cross_dim, cfg.norm_num_groups,
                              cfg.use_linear_projection, only_cross, cfg.upcast_attention)


def _resnet(cfg: UNet2DConditionConfig, cin: int, cout: int, scale: float = 1.0):
    return ResnetBlock2D(cin, cout, temb_channels=cfg.time_embedding_dim, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, output_scale_factor=scale)


class DownBlock2D(Module):
    """One level of the encoder without attention: ResNets, then (except at the last level) a
    stride-2 conv. Returns the output and every intermediate output as skip connections."""

    def __init__(self, cfg: UNet2DConditionConfig, level: int, cin: int, cout: int, add_downsample: bool):
        self.resnets = ModuleList([_resnet(cfg, cin if i == 0 else cout, cout)
                                   for i in range(cfg.layers_per_block[level])])
        if add_downsample:
            self.downsamplers = ModuleList([Downsample2D(cout, padding=cfg.downsample_padding)])

    def forward(self, x, temb, context=None, additional_residual=None):
        """additional_residual: a T2I-Adapter's feature, added to the block's output (after the downsampler),
        which is also its last skip (diffusers adds it in place to the tensor both hold)."""
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)                     # (B, C_out, H, W)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)             # (B, C_out, H/2, W/2)
            skips.append(x)
        if additional_residual is not None:         # T2I-Adapter: out + F_k, the last skip too
            x = add_feature(x, additional_residual, self)
            skips[-1] = x
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """A DownBlock2D with a Transformer2DModel (self- and cross-attention) after every ResNet."""

    def __init__(self, cfg: UNet2DConditionConfig, level: int, cin: int, cout: int, add_downsample: bool):
        super().__init__(cfg, level, cin, cout, add_downsample=False)
        self.attentions = ModuleList([
            _transformer(cfg, cout, cfg.attention_head_dim[level], cfg.transformer_layers_per_block[level],
                         cfg.cross_attention_dim[level], cfg.only_cross_attention[level])
            for _ in range(cfg.layers_per_block[level])])
        if add_downsample:
            self.downsamplers = ModuleList([Downsample2D(cout, padding=cfg.downsample_padding)])

    def forward(self, x, temb, context=None, additional_residual=None):
        """additional_residual: a T2I-Adapter's feature, added after the last (ResNet, attention) pair, before
        that skip is kept and before the downsampler."""
        skips = []
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = resnet(x, temb)                     # (B, C_out, H, W)
            x = attn(x, context)                    # (B, C_out, H, W)
            if additional_residual is not None and i == len(self.resnets) - 1:
                x = add_feature(x, additional_residual, self)   # T2I-Adapter: h + F_k
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)             # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(Module):
    """The bottleneck: ResNet, then (Transformer, ResNet) once; ResNets divide by mid_block_scale_factor.

    diffusers' mid block never uses only_cross_attention, whatever the config says.
    """

    def __init__(self, cfg: UNet2DConditionConfig):
        c = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        self.attentions = ModuleList([_transformer(cfg, c, cfg.attention_head_dim[-1],
                                                   cfg.transformer_layers_per_block[-1],
                                                   cfg.cross_attention_dim[-1], False)])
        self.resnets = ModuleList([_resnet(cfg, c, c, scale), _resnet(cfg, c, c, scale)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, list(self.resnets)[1:]):
            x = attn(x, context)
            x = resnet(x, temb)
        return x                                    # (B, C_last, H, W)


class UpBlock2D(Module):
    """One level of the decoder without attention: for each of layers_per_block + 1 ResNets, concatenate
    the next skip connection (last in, first out) on the channels; then (except at the last level)
    nearest upsampling (2x, or to the odd size of the skip) and a conv."""

    def __init__(self, cfg: UNet2DConditionConfig, level: int, cin: int, cout: int, prev: int,
                 add_upsample: bool):
        n = list(reversed(cfg.layers_per_block))[level] + 1
        # ResNet i sees the previous output (prev channels for i = 0) and a skip (cin channels for the
        # last one, which comes from the level below on the way down)
        self.resnets = ModuleList([
            _resnet(cfg, (prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout) for i in range(n)])
        if add_upsample:
            self.upsamplers = ModuleList([Upsample2D(cout)])

    def _concat(self, x, skip):
        xp = backend.array_namespace(x, skip)
        return xp.concatenate([x, skip], axis=1)    # (B, C_x + C_skip, H, W)

    def forward(self, x, skips, temb, context=None):
        for resnet in self.resnets:
            x = resnet(self._concat(x, skips.pop()), temb)
        return self._upsample(x, skips)

    def _upsample(self, x, skips):
        if not hasattr(self, "upsamplers"):
            return x
        # to the size of the next skip: 2x, or one less where the way down halved an odd size
        return self.upsamplers[0](x, output_size=skips[-1].shape[2:])  # (B, C_out, ~2H, ~2W)


class CrossAttnUpBlock2D(UpBlock2D):
    """An UpBlock2D with a Transformer2DModel after every ResNet."""

    def __init__(self, cfg: UNet2DConditionConfig, level: int, cin: int, cout: int, prev: int,
                 add_upsample: bool):
        super().__init__(cfg, level, cin, cout, prev, add_upsample=False)
        rev = list(reversed(range(len(cfg.block_out_channels))))[level]  # the matching down level
        layers = (cfg.reverse_transformer_layers_per_block[level]
                  if cfg.reverse_transformer_layers_per_block is not None
                  else cfg.transformer_layers_per_block[rev])
        self.attentions = ModuleList([
            _transformer(cfg, cout, cfg.attention_head_dim[rev], layers, cfg.cross_attention_dim[rev],
                         cfg.only_cross_attention[rev])
            for _ in range(len(self.resnets))])
        if add_upsample:
            self.upsamplers = ModuleList([Upsample2D(cout)])

    def forward(self, x, skips, temb, context=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(self._concat(x, skips.pop()), temb)
            x = attn(x, context)
        return self._upsample(x, skips)


# ---------------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------------

class UNet2DConditionModel(PretrainedModel):
    """eps_theta(x_t, t, c): the conditional U-Net of Stable Diffusion 1.x / 2.x and SDXL.

    ``unet(sample, timestep, encoder_hidden_states) -> array`` of sample's shape; SDXL adds
    ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``.
    """

    def __init__(self, config: UNet2DConditionConfig):
        cfg = self.config = config
        ch = cfg.block_out_channels
        levels = len(ch)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], kernel_size=cfg.conv_in_kernel,
                              padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embedding_dim)
        if cfg.addition_embed_type == "text_time":   # SDXL: pooled text + time ids -> (B, 4*C0)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                   cfg.time_embedding_dim)

        blocks, cout = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            cls = CrossAttnDownBlock2D if kind == "CrossAttnDownBlock2D" else DownBlock2D
            blocks.append(cls(cfg, i, cin, cout, add_downsample=i < levels - 1))
        self.down_blocks = ModuleList(blocks)

        self.mid_block = UNetMidBlock2DCrossAttn(cfg)

        blocks, rch = [], list(reversed(ch))
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout = cout, rch[i]
            cin = rch[min(i + 1, levels - 1)]
            cls = CrossAttnUpBlock2D if kind == "CrossAttnUpBlock2D" else UpBlock2D
            blocks.append(cls(cfg, i, cin, cout, prev, add_upsample=i < levels - 1))
        self.up_blocks = ModuleList(blocks)

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, kernel_size=cfg.conv_out_kernel,
                               padding=(cfg.conv_out_kernel - 1) // 2)
        self.assign_names()

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def parse_config(cls, config: dict, where: str) -> UNet2DConditionConfig:
        """config.json dict -> UNet2DConditionConfig; unsupported keys and values raise ConfigError."""
        return parse_config(UNet2DConditionConfig, config, ignored=_IGNORED, fixed=_FIXED, where=where)

    # -- forward ------------------------------------------------------------------------------------

    def _timesteps(self, timestep, batch: int, xp, dtype):
        """A scalar or (B,) timestep -> (B,) array of `dtype` on the sample's device."""
        t = timestep
        if isinstance(t, (int, float, numpy.integer, numpy.floating)) or isinstance(t, numpy.ndarray):
            t = xp.asarray(numpy.asarray(t, dtype=dtype)) if xp is not numpy else numpy.asarray(t, dtype=dtype)
        elif backend.array_namespace(t) is not xp:
            raise ValueError("unet: timestep lives on another device than sample; move it with "
                             "refldm.backend.asarray")
        t = t.astype(dtype)
        if t.ndim == 0:
            t = xp.broadcast_to(t.reshape(1), (batch,))
        if t.shape != (batch,):
            raise ValueError(f"unet: timestep must be a scalar or have shape ({batch},) to match the "
                             f"batch, got {tuple(t.shape)}")
        return t

    def _inputs(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        """Check the inputs; -> (sample, t (B,) in the sinusoid's dtype, context, added or None)."""
        cfg = self.config
        xp = backend.array_namespace(sample, encoder_hidden_states)
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"unet: sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
        b, _, h, w = sample.shape
        if self.dtype is not None and sample.dtype != self.dtype:
            raise ValueError(f"unet: sample is {sample.dtype} but the model was loaded as {self.dtype}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b \
                or encoder_hidden_states.shape[2] != cfg.cross_attention_dim[0]:
            raise ValueError(f"unet: encoder_hidden_states must be ({b}, S, {cfg.cross_attention_dim[0]}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        if encoder_hidden_states.dtype != sample.dtype:
            raise ValueError(f"unet: encoder_hidden_states is {encoder_hidden_states.dtype} but sample is "
                             f"{sample.dtype}")
        context = encoder_hidden_states                                     # (B, S, D_text)

        if cfg.center_input_sample:
            sample = 2.0 * sample - 1.0
        # the sinusoid is computed in the model's dtype (float32 for a float16 model)
        t = self._timesteps(timestep, b, xp, "float32" if sample.dtype.itemsize < 4 else sample.dtype)  # (B,)
        added = self._added_inputs(added_cond_kwargs, b, xp, sample.dtype)  # None, or (text_embeds, time_ids)
        return sample, t, context, added

    def _added_inputs(self, added_cond_kwargs, batch: int, xp, dtype):
        """Check SDXL's added conditioning: (text_embeds (B, P), time_ids (B, n)) or None without it."""
        cfg = self.config
        if cfg.addition_embed_type is None:
            if added_cond_kwargs:
                raise ValueError("unet: added_cond_kwargs given, but this U-Net has no addition_embed_type")
            return None
        kwargs = added_cond_kwargs or {}
        missing = [k for k in ("text_embeds", "time_ids") if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"unet: addition_embed_type 'text_time' (SDXL) needs added_cond_kwargs with "
                             f"{' and '.join(missing)}")
        text_embeds, time_ids = kwargs["text_embeds"], kwargs["time_ids"]
        n_ids = (cfg.projection_class_embeddings_input_dim - text_embeds.shape[-1]) // cfg.addition_time_embed_dim
        if text_embeds.ndim != 2 or text_embeds.shape[0] != batch or time_ids.ndim != 2 \
                or time_ids.shape[0] != batch or \
                text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim \
                != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"unet: text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} must be "
                f"({batch}, P) and ({batch}, n) with P + n * {cfg.addition_time_embed_dim} = "
                f"{cfg.projection_class_embeddings_input_dim} (projection_class_embeddings_input_dim; "
                f"SDXL base: 1280 + 6 ids, refiner: 1280 + 5 ids; {max(n_ids, 0)} ids for this text_embeds)")
        sin_dtype = "float32" if numpy.dtype(dtype).itemsize < 4 else dtype    # as for the timestep
        text_embeds = backend.asarray(text_embeds, dtype=dtype) if backend.array_namespace(text_embeds) \
            is not xp else text_embeds.astype(dtype, copy=False)
        time_ids = backend.asarray(time_ids, dtype=sin_dtype) if backend.array_namespace(time_ids) \
            is not xp else time_ids.astype(sin_dtype, copy=False)
        return text_embeds, time_ids

    def added_embedding(self, text_embeds, time_ids, dtype):
        """SDXL's added embedding (diffusers' ``add_time_proj`` + ``add_embedding``), summed into the
        time embedding:

            a = [text_embeds, sinusoid(time_ids[:, 0]), ..., sinusoid(time_ids[:, n-1])]   (B, P + n*A)
            aug = W2 silu(W1 a + b1) + b2                                                (B, 4*C0)

        text_embeds (B, P) is text encoder 2's pooled, projected output; time_ids (B, n) holds the
        micro-conditioning numbers: original size (h, w), crop top-left (y, x), target size (h, w) for
        the base (n = 6); the refiner has the aesthetic score instead of the target size (n = 5).
        Each id gets the same A-wide sinusoid as a timestep (A = addition_time_embed_dim, 256)."""
        cfg = self.config
        xp = backend.array_namespace(text_embeds, time_ids)
        b = text_embeds.shape[0]
        s = F.timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                 flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 downscale_freq_shift=cfg.freq_shift)          # (B*n, A)
        s = s.reshape(b, -1).astype(dtype, copy=False)                         # (B, n*A)
        a = xp.concatenate([text_embeds.astype(dtype, copy=False), s], axis=1)  # (B, P + n*A)
        return self.add_embedding(a)                                           # (B, 4*C0)

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs: dict | None = None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None):
        """eps_theta(x_t, t, c), the network top to bottom: latents `sample` (B, C_in, H, W) at `timestep`
        (scalar or (B,)) given text embeddings `encoder_hidden_states` (B, S, cross_attention_dim)
        -> the predicted noise (or v) (B, C_out, H, W).

        SDXL (addition_embed_type "text_time") also needs ``added_cond_kwargs={"text_embeds": (B, P),
        "time_ids": (B, n)}``: the pooled text embedding and the micro-conditioning ids (see
        `added_embedding`), as diffusers' argument of the same name.

        With an IP-Adapter loaded (refldm/adapters/ip_adapter.py), ``added_cond_kwargs["image_embeds"]`` holds
        one array of CLIP image features per adapter, as diffusers' (see `image_tokens`).

        A ControlNet's residuals (refldm/models/controlnet.py) enter with diffusers' names: every skip
        connection k gets ``skip_k + down_block_additional_residuals[k]`` and the mid block's output gets
        ``+ mid_block_additional_residual``; both or neither.

        A T2I-Adapter's features F_0, F_1, ... (refldm/models/t2i_adapter.py) enter inside the encoder, as
        diffusers' ``down_intrablock_additional_residuals``: down block k's hidden state becomes h_k + F_k
        (a cross-attention block: after its last attention, before its downsampler; a block without
        attention: its output, after the downsampler) and, with one feature more than down blocks (SDXL's
        adapter), the mid block's output becomes mid + F_last. Both the skips and the way down see it."""
        cfg = self.config
        added_cond_kwargs, image_embeds = self._image_embeds(added_cond_kwargs)
        sample, t, context, added = self._inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if image_embeds is not None:                                        # IP-Adapter: image tokens beside
            context = (context, self.image_tokens(image_embeds, sample))    # the text, for every attn2

        # 1. time: sinusoid of t, then the MLP
        t_emb = F.timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     downscale_freq_shift=cfg.freq_shift)  # (B, C0)
        emb = self.time_embedding(t_emb.astype(sample.dtype, copy=False))   # (B, 4*C0)
        if added is not None:                                               # SDXL's micro-conditioning
            emb = emb + self.added_embedding(*added, dtype=sample.dtype)    # (B, 4*C0)

        # 2. down: every output is kept as a skip connection
        x = self.conv_in(sample)                                            # (B, C0, H, W)
        skips = [x]
        adapter = _adapter_residuals(down_intrablock_additional_residuals, len(self.down_blocks))
        for k, block in enumerate(self.down_blocks):
            feature = adapter[k] if k < len(adapter) else None              # T2I-Adapter: h_k + F_k inside
            x, res = block(x, emb, context, feature)                        # (B, C_i, H/2^i, W/2^i)
            skips.extend(res)
        control = _control_residuals(skips, down_block_additional_residuals, mid_block_additional_residual)
        if control:                                                         # ControlNet: skip_k + r_k
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        # 3. mid
        x = self.mid_block(x, emb, context)                                 # (B, C_last, H/f, W/f)
        if len(adapter) > len(self.down_blocks):                            # SDXL's T2I-Adapter: mid + F_last
            x = add_feature(x, adapter[-1], self.mid_block)
        if control:                                                         # ControlNet: mid + r_mid
            x = x + mid_block_additional_residual

        # 4. up: each block takes its layers_per_block + 1 skips, last in first out
        for block in self.up_blocks:
            x = block(x, skips, emb, context)
        # 5. out
        x = F.silu(self.conv_norm_out(x))                                 # (B, C0, H, W)
        return self.conv_out(x)                                             # (B, C_out, H, W)

    # -- IP-Adapter ----------------------------------------------------------------------------------------

    encoder_hid_proj = None  # MultiIPAdapterImageProjection once an IP-Adapter is loaded (diffusers' name)

    def _image_embeds(self, added_cond_kwargs):
        """Split ``image_embeds`` (IP-Adapter) off added_cond_kwargs: -> (the rest or None, image_embeds or None)."""
        if not added_cond_kwargs or "image_embeds" not in added_cond_kwargs:
            if self.encoder_hid_proj is not None:
                raise ValueError("unet: an IP-Adapter is loaded; give added_cond_kwargs['image_embeds'] (the "
                                 "pipelines' ip_adapter_image=) or unload it")
            return added_cond_kwargs, None
        rest = {k: v for k, v in added_cond_kwargs.items() if k != "image_embeds"}
        if self.encoder_hid_proj is None:
            raise ValueError("unet: added_cond_kwargs has image_embeds but no IP-Adapter is loaded")
        return rest or None, added_cond_kwargs["image_embeds"]

    def image_tokens(self, image_embeds, sample):
        """IP-Adapter's image tokens: one (B, n*T_i, D_c) array per adapter from its image features, a list of
        (B, n, E) (plain) or (B, n, 1+N, E) (plus) arrays for n images each, through `encoder_hid_proj`."""
        layers = self.encoder_hid_proj.image_projection_layers
        embeds = list(image_embeds) if isinstance(image_embeds, (list, tuple)) else [image_embeds]
        if len(embeds) != len(layers):
            raise ValueError(f"unet: {len(embeds)} image_embeds for {len(layers)} IP-Adapters")
        b = sample.shape[0]
        for i, e in enumerate(embeds):
            if e.ndim not in (3, 4) or e.shape[0] != b:
                raise ValueError(f"unet: image_embeds[{i}] has shape {tuple(e.shape)}; expected ({b}, n, E) or "
                                 f"({b}, n, tokens, E)")
        embeds = [backend.asarray(e, dtype=sample.dtype) if backend.array_namespace(e) is not
                  backend.array_namespace(sample) else e.astype(sample.dtype, copy=False) for e in embeds]
        return self.encoder_hid_proj(embeds)                                # [(B, n*T_i, D_c)]


def _control_residuals(skips, down, mid) -> bool:
    """Check a ControlNet's residuals against the U-Net's skips: both or neither, one per skip, same shapes."""
    if down is None and mid is None:
        return False
    if down is None or mid is None:
        raise ValueError("unet: give both down_block_additional_residuals and mid_block_additional_residual "
                         "(a ControlNet's outputs), or neither")
    if len(down) != len(skips):
        raise ValueError(f"unet: {len(down)} down_block_additional_residuals for {len(skips)} skip connections")
    for k, (s, r) in enumerate(zip(skips, down)):
        # (B, C, H, W) as the skip, or (B, C, 1, 1) from a ControlNet with global_pool_conditions (broadcast)
        if tuple(r.shape[:2]) != tuple(s.shape[:2]) or tuple(r.shape[2:]) not in (tuple(s.shape[2:]), (1, 1)):
            raise ValueError(f"unet: down_block_additional_residuals[{k}] has shape {tuple(r.shape)}, the skip "
                             f"has {tuple(s.shape)}")
    return True


def add_feature(x, feature, block):
    """h + F for a T2I-Adapter feature F of h's shape exactly (no broadcasting); the message names the block."""
    if tuple(feature.shape) != tuple(x.shape):
        raise ValueError(f"unet: a T2I-Adapter feature of shape {tuple(feature.shape)} enters "
                         f"{block._name or 'a block'}, whose hidden state is {tuple(x.shape)}")
    return x + feature


def _adapter_residuals(features, n_blocks: int) -> list:
    """A T2I-Adapter's features: one per down block, or one more for the mid block (SDXL's). The shapes are
    checked where each enters (`add_feature`)."""
    if features is None:
        return []
    features = list(features)
    if len(features) not in (n_blocks, n_blocks + 1):
        raise ValueError(f"unet: {len(features)} down_intrablock_additional_residuals (a T2I-Adapter's features) "
                         f"for {n_blocks} down blocks; give one per down block (and one for the mid block)")
    return features
