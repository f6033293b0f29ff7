"""The MMDiT of Stable Diffusion 3 / 3.5 (diffusers' ``SD3Transformer2DModel``; Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 4 and fig. 2).

Given the noisy latent x_t (B, 16, H, W), the time t (in [0, 1000]), the text tokens c (B, S, 4096) and the
pooled text vector y (B, 2048), it predicts the velocity v = e - x_0 with the latent's shape:

    x    = patchify(x_t) + crop(pos_embed)         p x p patches -> (B, N, D) tokens, N = (H/p)(W/p)
    temb = MLP(sinusoid(t)) + MLP(y)               (B, D): everything global about this call
    c    = context_embedder(c)                     (B, S, D)
    for each joint block:                          two streams, one attention
        x, c = JointTransformerBlock(x, c, temb)
    x    = proj_out(AdaLN(x, temb))                (B, N, p*p*16)
    v    = unpatchify(x)                           (B, 16, H, W)

Unlike the U-Net there is no down/up-sampling and no cross-attention: image tokens and text tokens each
keep their own weights (projections, MLPs, modulation) but attend to each other in one softmax over the
concatenated sequence [x; c]. The time and pooled text enter only through adaLN modulation: each block
computes shift, scale and gate vectors from temb (adaLN-Zero, Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers", sec. 3.2).

SD3.5 adds RMS normalisation of each head's queries and keys (qk_norm="rms_norm") and, in SD3.5-medium's
first 13 blocks (dual_attention_layers, "MMDiT-X"), a second self-attention over the image tokens alone
(``attn2``) with its own modulation. docs/sd3.md walks through it; attribute names are diffusers' keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy

from refldm import backend
from refldm.checkpoints.config import parse_config
from refldm.core import functional as F
from refldm.core.nn import Module, ModuleList, Param, PretrainedModel
from refldm.models.blocks import Conv2d, Linear, RMSNorm
from refldm.models.unet import Identity, TimestepEmbedding

__all__ = ["SD3Transformer2DModel", "SD3Transformer2DConfig", "JointTransformerBlock", "JointAttention",
           "get_2d_sincos_pos_embed"]


@dataclass
class SD3Transformer2DConfig:
    """config.json keys with diffusers' defaults. SD3-medium: 24 layers, 24 heads of 64 (D = 1536),
    pos_embed_max_size 192; SD3.5-large: 38 layers and heads (D = 2432), qk_norm "rms_norm";
    SD3.5-medium: as SD3-medium with qk_norm, pos_embed_max_size 384 and dual_attention_layers 0-12."""

    sample_size: int = 128                 # training latent size: sets the position grid's base_size
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096        # width of the text tokens (T5-XXL's; CLIP's are zero-padded to it)
    caption_projection_dim: int = 1152     # = D in every published config
    pooled_projection_dim: int = 2048      # CLIP-L pooled (768) + CLIP-G pooled (1280)
    out_channels: int = 16
    pos_embed_max_size: int = 96           # the stored position grid is pos_embed_max_size^2
    dual_attention_layers: list = field(default_factory=list)
    qk_norm: str | None = None

    def __post_init__(self):
        for key in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                    "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                    "pooled_projection_dim", "pos_embed_max_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={self.qk_norm!r} is not implemented in refldm (only None and 'rms_norm', "
                             "SD3.5's)")
        if self.caption_projection_dim != self.num_attention_heads * self.attention_head_dim:
            raise ValueError(f"caption_projection_dim={self.caption_projection_dim} must equal num_attention_heads"
                             f" * attention_head_dim = {self.num_attention_heads * self.attention_head_dim} "
                             "(the text stream has the image stream's width)")
        if (self.num_attention_heads * self.attention_head_dim) % 4:
            raise ValueError("num_attention_heads * attention_head_dim must be divisible by 4 (the 2-D sin-cos "
                             "position embedding gives a quarter of it to each of sin/cos of rows/columns)")
        bad = [i for i in self.dual_attention_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers has {bad}, not layer indices in [0, {self.num_layers})")


# ---------------------------------------------------------------------------------------------------
# Position embedding
# ---------------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0):
    """The fixed 2-D sin-cos position table of ViT/MAE, on a grid_size x grid_size grid (diffusers'
    get_2d_sincos_pos_embed). Position (i, j) (row, column) is scaled to r = i * base_size / grid_size /
    interpolation_scale (same for the column c); with d = embed_dim / 4 and w_k = 10000^(-k/d), k < d:

        pe(i, j) = [sin(c w), cos(c w), sin(r w), cos(r w)]      (embed_dim,)

    (the first half encodes the column, the second the row). Returns (grid_size^2, embed_dim), float64, rows in
    raster order (i * grid_size + j). SD3 checkpoints store this table (rounded to float32) as pos_embed."""
    if embed_dim % 4:
        raise ValueError(f"get_2d_sincos_pos_embed: embed_dim={embed_dim} must be divisible by 4")
    pos = numpy.arange(grid_size, dtype=numpy.float32) / numpy.float32(grid_size / base_size)
    pos = pos / numpy.float32(interpolation_scale)              # float32, as diffusers builds the grid
    d = embed_dim // 4
    omega = 1.0 / 10000 ** (numpy.arange(d, dtype=numpy.float64) / (embed_dim / 4))   # (d,)
    rows, cols = numpy.meshgrid(pos, pos, indexing="ij")        # (G, G): rows[i, j] = pos_i, cols[i, j] = pos_j

    def sincos(p):
        out = numpy.outer(p.reshape(-1).astype(numpy.float64), omega)   # (G*G, d)
        return numpy.concatenate([numpy.sin(out), numpy.cos(out)], axis=1)

    return numpy.concatenate([sincos(cols), sincos(rows)], axis=1)      # (G*G, embed_dim)


class PatchEmbed(Module):
    """Latent (B, C, H, W) -> tokens (B, (H/p)(W/p), D): a p x p convolution with stride p (one linear map per
    patch), plus the centre crop of the stored (max x max) position table that fits (H/p) x (W/p)."""

    def __init__(self, cfg: SD3Transformer2DConfig, dim: int):
        p = cfg.patch_size
        self.proj = Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.pos_embed = Param(1, cfg.pos_embed_max_size ** 2, dim)     # a buffer in diffusers, stored
        self.patch_size, self.max_size = p, cfg.pos_embed_max_size

    def cropped_pos_embed(self, h: int, w: int):
        """The centre h x w window of the max x max grid (top = (max - h) // 2), as (h*w, D)."""
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"SD3Transformer2DModel: the latent is {h} x {w} patches, more than "
                             f"pos_embed_max_size={self.max_size} (image too large for this model)")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        grid = self.pos_embed.reshape(self.max_size, self.max_size, -1)
        return grid[top:top + h, left:left + w].reshape(h * w, -1)

    def forward(self, latent):
        b, _, hh, ww = latent.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        x = self.proj(latent)                                          # (B, D, h, w)
        x = x.reshape(b, x.shape[1], h * w).transpose(0, 2, 1)          # (B, h*w, D)
        return x + self.cropped_pos_embed(h, w).astype(x.dtype, copy=False)


# ---------------------------------------------------------------------------------------------------
# Modulation (adaLN)
# ---------------------------------------------------------------------------------------------------

def modulate(x, shift, scale):
    """LN(x) (1 + scale) + shift, LN without learned affine (eps 1e-6); shift, scale (B, D) per sample."""
    return F.layer_norm(x, eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(Module):
    """adaLN-Zero: [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] = W silu(temb) + b, each (B, D);
    returns (modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp). With n_chunks=9
    (SD3.5's SD35AdaLayerNormZeroX) three more, shift/scale/gate for attn2, give a second modulated copy."""

    def __init__(self, dim: int, n_chunks: int = 6):
        self.linear = Linear(dim, n_chunks * dim)
        self.n_chunks = n_chunks

    def forward(self, x, temb):
        emb = self.linear(F.silu(temb))                              # (B, n*D)
        chunks = [emb[:, i * x.shape[-1]:(i + 1) * x.shape[-1]] for i in range(self.n_chunks)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        normed = F.layer_norm(x, eps=1e-6)
        out = (normed * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa, shift_mlp, scale_mlp, gate_mlp)
        if self.n_chunks == 9:
            shift2, scale2, gate2 = chunks[6:]
            out += (normed * (1 + scale2[:, None]) + shift2[:, None], gate2)
        return out


class AdaLayerNormContinuous(Module):
    """[scale, shift] = W silu(temb) + b (note the order); x -> LN(x) (1 + scale) + shift. The last block's text
    stream and the output norm (norm_out) use it: modulation without gates."""

    def __init__(self, dim: int):
        self.linear = Linear(dim, 2 * dim)

    def forward(self, x, temb):
        emb = self.linear(F.silu(temb))                              # (B, 2D)
        d = x.shape[-1]
        return modulate(x, shift=emb[:, d:], scale=emb[:, :d])


# ---------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------------

class JointAttention(Module):
    """Attention over the image tokens x (B, N, D) and, when the block has a text stream, the text tokens
    c (B, S, D) together: each stream has its own projections (to_q/k/v for x, add_q/k/v_proj for c),
    the heads of both are concatenated along the sequence, and one softmax runs over all N + S keys:

        [o_x; o_c] = softmax([q_x; q_c] [k_x; k_c]^T / sqrt(d)) [v_x; v_c]       per head
        out_x = to_out.0(o_x),   out_c = to_add_out(o_c)   (dropped in the last block: context_pre_only)

    With qk_norm "rms_norm" each head's q and k are RMS-normalised first (norm_q, norm_k, norm_added_q/k).
    Without a text stream (``joint=False``: SD3.5's attn2) it is plain self-attention over x."""

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: str | None, joint: bool,
                 context_pre_only: bool = False):
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = Linear(dim, inner), Linear(dim, inner), Linear(dim, inner)
        if qk_norm == "rms_norm":
            self.norm_q, self.norm_k = RMSNorm(dim_head, eps=1e-6), RMSNorm(dim_head, eps=1e-6)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, inner), Linear(dim, inner),
                                                                 Linear(dim, inner))
            if qk_norm == "rms_norm":
                self.norm_added_q, self.norm_added_k = RMSNorm(dim_head, eps=1e-6), RMSNorm(dim_head, eps=1e-6)
        self.to_out = ModuleList([Linear(inner, dim)])                   # to_out.1 is dropout in diffusers
        if joint and not context_pre_only:
            self.to_add_out = Linear(inner, dim)
        self.heads, self.qk_norm, self.joint, self.context_pre_only = heads, qk_norm, joint, context_pre_only

    def _qkv(self, x, q_proj, k_proj, v_proj, norm_q, norm_k):
        q, k, v = (F.split_heads(proj(x), self.heads) for proj in (q_proj, k_proj, v_proj))  # (B, H, L, d)
        if self.qk_norm is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def forward(self, x, context=None):
        n = x.shape[1]
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, getattr(self, "norm_q", None),
                            getattr(self, "norm_k", None))
        if self.joint:
            xp = backend.array_namespace(x, context)
            qc, kc, vc = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   getattr(self, "norm_added_q", None), getattr(self, "norm_added_k", None))
            q, k, v = (xp.concatenate(pair, axis=2) for pair in ((q, qc), (k, kc), (v, vc)))  # (B, H, N+S, d)
        out = F.merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N(+S), H*d)
        out_x = self.to_out[0](out[:, :n])
        if not self.joint:
            return out_x
        out_c = None if self.context_pre_only else self.to_add_out(out[:, n:])
        return out_x, out_c


class GELUProj(Module):
    """The feed-forward's first layer: gelu_tanh(x W^T + b) (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(Module):
    """FF(x) = W2 gelu_tanh(W1 x + b1) + b2, inner width 4D (keys net.0.proj, net.2)."""

    def __init__(self, dim: int, mult: int = 4):
        self.net = ModuleList([GELUProj(dim, dim * mult), Identity(), Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))                             # (B, L, D) -> (B, L, 4D) -> (B, L, D)


# ---------------------------------------------------------------------------------------------------
# The joint block
# ---------------------------------------------------------------------------------------------------

class JointTransformerBlock(Module):
    """One MMDiT block: two streams (image x, text c) with their own weights, one joint attention.

        x_mod, g1, s2, sc2, g2 = adaLN-Zero(x, temb);   c_mod, ... = adaLN-Zero(c, temb)
        a_x, a_c = JointAttention(x_mod, c_mod)
        x = x + g1 a_x                                 [+ g1' attn2(x_mod') in MMDiT-X blocks]
        x = x + g2 FF(LN(x) (1 + sc2) + s2)
        c = c + g1_c a_c;  c = c + g2_c FF_c(LN(c) (1 + sc2_c) + s2_c)

    The gates are zero at initialisation in training (adaLN-Zero), so each block starts as the identity.
    Returns (c, x), in diffusers' order (c is None after the last block).
    The last block (context_pre_only) only reads the text: its text stream is modulated without gates
    (AdaLayerNormContinuous), its attention output for the text and its text MLP do not exist."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_pre_only: bool, qk_norm: str | None,
                 use_dual_attention: bool):
        self.norm1 = AdaLayerNormZero(dim, 9 if use_dual_attention else 6)
        self.norm1_context = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, dim_head, qk_norm, joint=True, context_pre_only=context_pre_only)
        if use_dual_attention:
            self.attn2 = JointAttention(dim, heads, dim_head, qk_norm, joint=False)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)
        self.context_pre_only, self.use_dual_attention = context_pre_only, use_dual_attention

    def forward(self, x, c, temb):
        # x: (B, N, D) image tokens; c: (B, S, D) text tokens; temb: (B, D)
        if self.use_dual_attention:
            x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_mod2, gate_msa2 = self.norm1(x, temb)
        else:
            x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            c_mod = self.norm1_context(c, temb)
        else:
            c_mod, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)

        attn_x, attn_c = self.attn(x_mod, c_mod)                       # (B, N, D), (B, S, D) or None
        x = x + gate_msa[:, None] * attn_x
        if self.use_dual_attention:                                   # MMDiT-X: image-only self-attention
            x = x + gate_msa2[:, None] * self.attn2(x_mod2)
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))

        if self.context_pre_only:
            return None, x
        c = c + c_gate_msa[:, None] * attn_c
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp))
        return c, x                                                   # diffusers' order (traces compare by name)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------

# Keys that do not change the forward pass at inference.
_IGNORED = ()


class SD3Transformer2DModel(PretrainedModel):
    """v_theta(x_t, t, c, y): the MMDiT denoiser of SD3 / SD3.5 (module docstring).

    ``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> array`` of
    hidden_states' shape, as diffusers' forward (which wraps it in ``.sample``)."""

    BUFFERS = ("pos_embed.pos_embed",)  # stored in checkpoints, but not a parameter in diffusers' count

    def __init__(self, config: SD3Transformer2DConfig):
        cfg = self.config = config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.pos_embed = PatchEmbed(cfg, dim)
        self.time_text_embed = _CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim)
        self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = ModuleList([
            JointTransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim,
                                  context_pre_only=i == cfg.num_layers - 1, qk_norm=cfg.qk_norm,
                                  use_dual_attention=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> SD3Transformer2DConfig:
        return parse_config(SD3Transformer2DConfig, config, ignored=_IGNORED, where=where)

    def num_parameters(self, include_buffers: bool = False) -> int:
        """Weights counted from the declared shapes; as diffusers' num_parameters(), without the stored
        position table unless include_buffers."""
        total = super().num_parameters()
        if not include_buffers:
            total -= math.prod(self.pos_embed.pos_embed.shape)
        return total

    def _check(self, hidden_states, encoder_hidden_states, pooled_projections):
        cfg = self.config
        where = "SD3Transformer2DModel"
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"{where}: hidden_states must be (B, {cfg.in_channels}, H, W), got "
                             f"{tuple(hidden_states.shape)}")
        b, _, h, w = hidden_states.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"{where}: latent size {h} x {w} is not divisible by patch_size={cfg.patch_size}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b \
                or encoder_hidden_states.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"{where}: encoder_hidden_states must be ({b}, S, {cfg.joint_attention_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        if tuple(pooled_projections.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"{where}: pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got "
                             f"{tuple(pooled_projections.shape)}")
        for name, a in (("encoder_hidden_states", encoder_hidden_states), ("pooled_projections", pooled_projections)):
            if a.dtype != hidden_states.dtype:
                raise ValueError(f"{where}: {name} is {a.dtype} but hidden_states is {hidden_states.dtype}")
        if self.dtype is not None and hidden_states.dtype != self.dtype:
            raise ValueError(f"{where}: hidden_states is {hidden_states.dtype} but the model was loaded as "
                             f"{self.dtype}")

    def _timesteps(self, timestep, batch, xp, dtype):
        t = timestep
        if not hasattr(t, "dtype") or isinstance(t, (numpy.ndarray, numpy.generic)):
            t = numpy.asarray(t, dtype=dtype)
            t = t if xp is numpy else xp.asarray(t)
        t = t.astype(dtype).reshape(-1)
        if t.shape[0] == 1:
            t = xp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"SD3Transformer2DModel: timestep must be a scalar or ({batch},), got {tuple(t.shape)}")
        return t

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """The velocity v (B, C_out, H, W) for the latent `hidden_states` (B, C_in, H, W) at `timestep` (scalar or
        (B,), 1000 t), text tokens `encoder_hidden_states` (B, S, joint_attention_dim) and the pooled text
        `pooled_projections` (B, pooled_projection_dim)."""
        cfg = self.config
        self._check(hidden_states, encoder_hidden_states, pooled_projections)
        xp = backend.array_namespace(hidden_states, encoder_hidden_states, pooled_projections)
        b, _, hh, ww = hidden_states.shape
        dtype = hidden_states.dtype
        # the sinusoid in the model's dtype (float32 for a float16 model)
        t = self._timesteps(timestep, b, xp, "float32" if dtype.itemsize < 4 else dtype)

        x = self.pos_embed(hidden_states)                              # 1. (B, N, D) tokens + positions
        temb = self.time_text_embed(t, pooled_projections)             # 2. (B, D) time + pooled text
        c = self.context_embedder(encoder_hidden_states)               # 3. (B, S, D) text tokens
        for block in self.transformer_blocks:                          # 4. joint blocks
            c, x = block(x, c, temb)
        x = self.proj_out(self.norm_out(x, temb))                      # 5. (B, N, p*p*C_out)

        p, h, w, co = cfg.patch_size, hh // cfg.patch_size, ww // cfg.patch_size, cfg.out_channels
        x = x.reshape(b, h, w, p, p, co).transpose(0, 5, 1, 3, 2, 4)   # 6. unpatchify: (B, C, h, p, w, p)
        return x.reshape(b, co, h * p, w * p)                          # (B, C_out, H, W)


class _CombinedTimestepTextProjEmbeddings(Module):
    """temb = MLP_t(sinusoid_256(t)) + MLP_y(y): the time and the pooled text in one (B, D) vector
    (diffusers' CombinedTimestepTextProjEmbeddings; both MLPs are linear_1 -> silu -> linear_2)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_projection_dim, dim)  # the same MLP shape (PixArt's)

    def forward(self, t, pooled):
        s = F.timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)  # (B, 256) [cos, sin]
        return self.timestep_embedder(s.astype(pooled.dtype, copy=False)) + self.text_embedder(pooled)
