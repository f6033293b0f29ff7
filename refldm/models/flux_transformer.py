"""The FLUX.1 transformer (diffusers' ``FluxTransformer2DModel``; Black Forest Labs 2024, reference code
https://github.com/black-forest-labs/flux, src/flux/model.py and modules/layers.py).

FLUX is the MMDiT of SD3 (refldm.models.sd3_transformer) with four changes: positions are a rotary embedding
(RoPE) over 3-axis ids instead of a stored sin-cos table; the latent is packed into 2x2 patches *outside* the
model (so the model's x_embedder is a plain Linear on 64 = 16 * 2 * 2 features); after N double-stream blocks
(separate weights for image and text, one joint attention, as SD3's) come M single-stream blocks, where text and
image tokens share every weight and attention and MLP run in parallel from one modulated input; and FLUX.1-dev
adds a guidance embedding (guidance distillation). With B batch, N image tokens, S text tokens, D = heads * d:

    x    = x_embedder(packed latent)                         (B, N, 64) -> (B, N, D)
    temb = MLP(sin(1000 t)) [+ MLP(sin(1000 g))] + MLP(y)    (B, D); y the pooled CLIP-L vector (B, 768)
    c    = context_embedder(T5 tokens)                       (B, S, 4096) -> (B, S, D)
    cos, sin = rope([txt_ids; img_ids])                      (S + N, d) rotation angles per head channel pair
    for each double block:   c, x = FluxTransformerBlock(x, c, temb, rope)
    for each single block:   c, x = FluxSingleTransformerBlock(x, c, temb, rope)
    v    = proj_out(AdaLN(x, temb))                          (B, N, 64): the packed velocity

Published sizes: 19 double + 38 single blocks, 24 heads of 128 (D = 3072), axes_dims_rope (16, 56, 56);
11,901,408,320 parameters for dev (guidance_embeds=True) and 11,891,178,560 for schnell (as diffusers'
num_parameters() on the meta device; tests/test_flux_transformer.py). docs/flux.md explains the math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from refldm import backend
from refldm.checkpoints.config import parse_config
from refldm.core import functional as F
from refldm.core.nn import Module, ModuleList, PretrainedModel
from refldm.models.blocks import Linear, RMSNorm
from refldm.models.sd3_transformer import AdaLayerNormContinuous, AdaLayerNormZero, FeedForward, modulate
from refldm.models.unet import TimestepEmbedding

__all__ = ["FluxTransformer2DModel", "FluxTransformer2DConfig", "FluxTransformerBlock", "FluxSingleTransformerBlock",
           "rope", "apply_rope", "pack_latents", "unpack_latents", "latent_image_ids"]

ROPE_THETA = 10000.0


@dataclass
class FluxTransformer2DConfig:
    """config.json keys with diffusers' defaults (which are FLUX.1-schnell's; dev sets guidance_embeds)."""

    patch_size: int = 1                    # the model sees already-packed tokens; only 1 is published
    in_channels: int = 64                  # 16 latent channels x 2 x 2 (pack_latents)
    out_channels: int | None = None
    num_layers: int = 19                   # double-stream blocks
    num_single_layers: int = 38            # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096        # T5-XXL's width
    pooled_projection_dim: int = 768       # CLIP-L's pooled output
    guidance_embeds: bool = False          # True for FLUX.1-dev (guidance-distilled)
    axes_dims_rope: list = field(default_factory=lambda: [16, 56, 56])

    def __post_init__(self):
        for key in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                    "pooled_projection_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        for key in ("num_layers", "num_single_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}={value!r} must be a non-negative integer")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        axes = list(self.axes_dims_rope)
        if not axes or any(isinstance(a, bool) or not isinstance(a, int) or a < 2 or a % 2 for a in axes):
            raise ValueError(f"axes_dims_rope={axes!r} must be even positive integers (one per id axis)")
        if sum(axes) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope={axes!r} must sum to attention_head_dim={self.attention_head_dim} "
                             "(each axis rotates its own slice of every head)")
        self.axes_dims_rope = axes


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding over (text, row, column) ids
# ---------------------------------------------------------------------------------------------------

def rope(ids, axes_dims, theta: float = ROPE_THETA):
    """The rotation table of a K-axis RoPE (Su et al. 2021, "RoFormer", eq. 34; FLUX's EmbedND). Token n has
    integer ids (p_n,0, ..., p_n,K-1); axis a owns d_a channels of each head (sum_a d_a = head dim). With
    w_a,i = theta^(-2i / d_a), i < d_a / 2, the angles of axis a are p_n,a * w_a,i, each repeated for the channel
    pair (2i, 2i+1) it rotates:

        cos[n] = [cos(p_n,0 w_0,0), cos(p_n,0 w_0,0), cos(p_n,0 w_0,1), ..., cos(p_n,K-1 w_K-1,last) x2]   (d,)

    and sin likewise. FLUX uses K = 3 axes: (0, 0, 0) for every text token, (0, row, column) for the image
    token of the packed latent at (row, column); d_a = (16, 56, 56). ids: (L, K) -> (cos, sin), each (L, d),
    float64 NumPy (the caller casts; diffusers rounds them to float32)."""
    ids = backend.to_numpy(numpy.asarray(ids) if isinstance(ids, (list, tuple)) else ids)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"rope: ids must be (L, {len(axes_dims)}) for axes_dims {list(axes_dims)}, got "
                         f"{tuple(ids.shape)}")
    cos, sin = [], []
    for a, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (numpy.arange(0, dim, 2, dtype=numpy.float64) / dim)      # (d_a / 2,)
        angle = numpy.outer(ids[:, a].astype(numpy.float32).astype(numpy.float64), omega)  # (L, d_a / 2)
        cos.append(numpy.repeat(numpy.cos(angle), 2, axis=1))
        sin.append(numpy.repeat(numpy.sin(angle), 2, axis=1))
    return numpy.concatenate(cos, axis=1), numpy.concatenate(sin, axis=1)


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x_2i, x_2i+1) of every head by its angle (RoFormer eq. 34):

        y_2i   = x_2i cos - x_2i+1 sin
        y_2i+1 = x_2i+1 cos + x_2i sin        i.e. y = x * cos + rot(x) * sin, rot(x)_(2i, 2i+1) = (-x_2i+1, x_2i)

    x: (B, H, L, d); cos, sin: (L, d) in x's dtype (at least float32: a float16 x is rotated in float32 and
    rounded back, as diffusers does). Queries and keys are rotated, so q_m . k_n depends on the id difference."""
    xp = backend.array_namespace(x)
    wide = x.astype("float32") if x.dtype.itemsize < 4 else x
    pairs = wide.reshape(wide.shape[:-1] + (wide.shape[-1] // 2, 2))
    rotated = xp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(wide.shape)
    return (wide * cos + rotated * sin).astype(x.dtype, copy=False)


def latent_image_ids(height: int, width: int):
    """The ids of the packed latent's tokens, in raster order: (h * w, 3) int array, row n = (0, n // w, n % w),
    for a packed grid of h x w tokens (h = latent height / 2). Text tokens take (0, 0, 0)."""
    ids = numpy.zeros((height, width, 3), dtype=numpy.int64)
    ids[..., 1] = numpy.arange(height)[:, None]
    ids[..., 2] = numpy.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def pack_latents(latents):
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): each 2x2 patch becomes one token, features ordered (c, i, j):

        packed[b, r * (W/2) + s, 4c + 2i + j] = latents[b, c, 2r + i, 2s + j]

    (diffusers' FluxPipeline._pack_latents, the reference's rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)")."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: the latent is {h} x {w}; FLUX packs 2x2 patches, so both must be even")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)   # (B, h, w, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, height: int, width: int):
    """The inverse of pack_latents: (B, (H/2)(W/2), 4C) -> (B, C, H, W) for a latent of height x width."""
    b, n, f = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or f % 4:
        raise ValueError(f"unpack_latents: {tuple(packed.shape)} tokens do not form a {height} x {width} latent "
                         "of 2x2 patches")
    x = packed.reshape(b, height // 2, width // 2, f // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, f // 4, height, width)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

class FluxAttention(Module):
    """Multi-head attention with RMS qk-norm and RoPE. In a double block (``joint=True``) the text tokens c have
    their own projections (add_q/k/v_proj, norm_added_q/k, to_add_out) and are put *before* the image tokens:

        q = [rms(c W_q'); rms(x W_q)],  k likewise,  v = [c W_v'; x W_v]        (B, H, S + N, d)
        o = softmax(rope(q) rope(k)^T / sqrt(d)) v
        out_x = to_out.0(o[S:]),  out_c = to_add_out(o[:S])

    In a single block (``joint=False``, pre_only) x is already [c; x] and the output is o itself, not projected
    (the block's proj_out mixes it with the MLP)."""

    def __init__(self, dim: int, heads: int, dim_head: int, joint: bool):
        inner = heads * dim_head
        self.norm_q, self.norm_k = RMSNorm(dim_head, eps=1e-6), RMSNorm(dim_head, eps=1e-6)
        self.to_q, self.to_k, self.to_v = Linear(dim, inner), Linear(dim, inner), Linear(dim, inner)
        if joint:
            self.to_out = ModuleList([Linear(inner, dim)])               # to_out.1 is dropout in diffusers
            self.norm_added_q, self.norm_added_k = RMSNorm(dim_head, eps=1e-6), RMSNorm(dim_head, eps=1e-6)
            self.add_q_proj, self.add_k_proj = Linear(dim, inner), Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            self.to_add_out = Linear(inner, dim)
        self.heads, self.joint = heads, joint

    def _qkv(self, x, q_proj, k_proj, v_proj, norm_q, norm_k):
        q, k, v = (F.split_heads(proj(x), self.heads) for proj in (q_proj, k_proj, v_proj))  # (B, H, L, d)
        return norm_q(q), norm_k(k), v

    def forward(self, x, rotary, context=None):
        cos, sin = rotary
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if self.joint:
            xp = backend.array_namespace(x, context)
            qc, kc, vc = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = (xp.concatenate(pair, axis=2) for pair in ((qc, q), (kc, k), (vc, v)))  # text first
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.merge_heads(F.scaled_dot_product_attention(q, k, v))   # (B, L, H*d)
        if not self.joint:
            return out
        s = context.shape[1]
        return self.to_out[0](out[:, s:]), self.to_add_out(out[:, :s])


# ---------------------------------------------------------------------------------------------------
# The two kinds of block
# ---------------------------------------------------------------------------------------------------

class FluxTransformerBlock(Module):
    """A double-stream block (the MMDiT block of SD3, with RoPE and qk-norm; the reference's DoubleStreamBlock):

        x_mod, g1, s2, sc2, g2 = adaLN-Zero(x, temb);   c_mod, g1', s2', sc2', g2' = adaLN-Zero'(c, temb)
        a_x, a_c = attn(x_mod, c_mod, rope)
        x = x + g1 a_x;   x = x + g2 FF(LN(x) (1 + sc2) + s2)
        c = c + g1' a_c;  c = c + g2' FF'(LN(c) (1 + sc2') + s2')

    (every block has a text stream: unlike SD3's last block none is context_pre_only.)"""

    def __init__(self, dim: int, heads: int, dim_head: int):
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, heads, dim_head, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, x, c, temb, rotary):
        x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        c_mod, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(x_mod, rotary, c_mod)
        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * self.ff(modulate(x, shift_mlp, scale_mlp))
        c = c + c_gate_msa[:, None] * attn_c
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp))
        return _clip_float16(c), x


class AdaLayerNormZeroSingle(Module):
    """[shift, scale, gate] = W silu(temb) + b, each (B, D); returns (LN(x) (1 + scale) + shift, gate)."""

    def __init__(self, dim: int):
        self.linear = Linear(dim, 3 * dim)

    def forward(self, x, temb):
        emb = self.linear(F.silu(temb))                               # (B, 3D)
        d = x.shape[-1]
        shift, scale, gate = emb[:, :d], emb[:, d:2 * d], emb[:, 2 * d:]
        return modulate(x, shift, scale), gate


class FluxSingleTransformerBlock(Module):
    """A single-stream block (Dehghani et al. 2023's parallel layer; the reference's SingleStreamBlock): text and
    image are one sequence h = [c; x] with shared weights, and attention and MLP read the same modulated input:

        h_mod, g = adaLN-Zero-single(h, temb)
        h = h + g * proj_out([attn(h_mod, rope); gelu_tanh(proj_mlp(h_mod))])      concat on features: D + 4D

    proj_out is (D, D + 4D): one matrix is both the attention's output projection and the MLP's second layer."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: float = 4.0):
        mlp = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = Linear(dim, mlp)
        self.proj_out = Linear(dim + mlp, dim)
        self.attn = FluxAttention(dim, heads, dim_head, joint=False)

    def forward(self, x, c, temb, rotary):
        s = c.shape[1]
        xp = backend.array_namespace(x, c)
        h = xp.concatenate([c, x], axis=1)                              # (B, S + N, D)
        h_mod, gate = self.norm(h, temb)
        mlp = F.gelu(self.proj_mlp(h_mod), approximate="tanh")        # (B, S + N, 4D)
        attn = self.attn(h_mod, rotary)                                 # (B, S + N, D)
        h = h + gate[:, None] * self.proj_out(xp.concatenate([attn, mlp], axis=2))
        h = _clip_float16(h)
        return h[:, :s], h[:, s:]


def _clip_float16(x):
    """diffusers clips float16 activations to the finite range (+-65504) after each block; others pass."""
    if str(x.dtype) == "float16":
        return backend.array_namespace(x).clip(x, -65504, 65504)
    return x


# ---------------------------------------------------------------------------------------------------
# Embeddings and the model
# ---------------------------------------------------------------------------------------------------

class CombinedTimestepTextProjEmbeddings(Module):
    """temb = MLP_t(sin_256(1000 t)) [+ MLP_g(sin_256(1000 g))] + MLP_y(y) (diffusers'
    CombinedTimestep[Guidance]TextProjEmbeddings; each MLP is linear_1 -> silu -> linear_2, the sinusoid
    [cos, sin] with frequencies 10000^(-i/128))."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance: bool):
        self.timestep_embedder = TimestepEmbedding(256, dim)
        if guidance:
            self.guidance_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_projection_dim, dim)  # diffusers' PixArtAlphaTextProjection
        self.guidance = guidance

    @staticmethod
    def _sinusoid(t, dtype):
        return F.timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).astype(dtype, copy=False)

    def forward(self, t, guidance, pooled):
        temb = self.timestep_embedder(self._sinusoid(t, pooled.dtype))
        if self.guidance:
            temb = temb + self.guidance_embedder(self._sinusoid(guidance, pooled.dtype))
        return temb + self.text_embedder(pooled)


class FluxTransformer2DModel(PretrainedModel):
    """v_theta(x_t, t, c, y[, g]): the FLUX.1 denoiser on packed latents (module docstring).

    ``transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
    guidance=None) -> array`` of hidden_states' shape, as diffusers' forward (which wraps it in ``.sample``);
    timestep and guidance as diffusers takes them (t in [0, 1], multiplied by 1000 inside)."""

    def __init__(self, config: FluxTransformer2DConfig):
        cfg = self.config = config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.context_embedder = Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = Linear(cfg.in_channels, dim)
        self.transformer_blocks = ModuleList([
            FluxTransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = ModuleList([
            FluxSingleTransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim)
            for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> FluxTransformer2DConfig:
        return parse_config(FluxTransformer2DConfig, config, where=where)

    @classmethod
    def from_single_file(cls, path, config: dict | None = None, dtype="float32", weights_dtype: str | None = None):
        """Load a FLUX.1 transformer saved under the reference repository's names (flux1-dev.safetensors,
        flux1-schnell.safetensors; with or without "model.diffusion_model."): the key table is `flux_key` in
        refldm/checkpoints/convert.py. config: a config.json dict, or None to read it off the shapes (heads of
        128, RoPE axes (16, 56, 56)). weights_dtype="stored" keeps the file's tensors mapped, as from_pretrained."""
        import os

        from refldm.checkpoints import convert
        from refldm.checkpoints.weights import load_file, refuse_pickle
        path = os.fspath(path)
        refuse_pickle(path)
        if weights_dtype not in (None, "stored"):
            raise ValueError(f"FluxTransformer2DModel.from_single_file: weights_dtype={weights_dtype!r}; the only "
                             "option is 'stored'")
        if weights_dtype == "stored":
            from refldm.checkpoints.stored import load_file_mapped
            state = load_file_mapped(path)
        else:
            state = load_file(path)
        if not convert.is_flux(state):
            raise ValueError(f"{path}: not a FLUX single file (no double_blocks.*.img_attn.qkv.*)")
        model = cls.from_config(config if config is not None else convert.flux_config_from_shapes(state),
                                where=f"{path} (config)")
        dim = model.config.num_attention_heads * model.config.attention_head_dim
        expected = [key for key, *_ in model.params()]
        return model.load_state_dict(convert.flux_from_original(state, expected, dim, source=path), dtype=dtype,
                                     source=path)

    def _check(self, x, c, y, img_ids, txt_ids, guidance):
        cfg, where = self.config, "FluxTransformer2DModel"
        if x.ndim != 3 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"{where}: hidden_states must be packed tokens (B, N, {cfg.in_channels}), got "
                             f"{tuple(x.shape)}")
        b, n = x.shape[:2]
        if c.ndim != 3 or c.shape[0] != b or c.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"{where}: encoder_hidden_states must be ({b}, S, {cfg.joint_attention_dim}), got "
                             f"{tuple(c.shape)}")
        if tuple(y.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"{where}: pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got "
                             f"{tuple(y.shape)}")
        k = len(cfg.axes_dims_rope)
        for name, ids, length in (("img_ids", img_ids, n), ("txt_ids", txt_ids, c.shape[1])):
            if tuple(ids.shape) != (length, k):
                raise ValueError(f"{where}: {name} must be ({length}, {k}) (one id per token and rope axis), got "
                                 f"{tuple(ids.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError(f"{where}: this model has a guidance embedding (guidance_embeds, FLUX.1-dev); pass "
                             "guidance")
        for name, a in (("encoder_hidden_states", c), ("pooled_projections", y)):
            if a.dtype != x.dtype:
                raise ValueError(f"{where}: {name} is {a.dtype} but hidden_states is {x.dtype}")
        if self.dtype is not None and x.dtype != self.dtype:
            raise ValueError(f"{where}: hidden_states is {x.dtype} but the model was loaded as {self.dtype}")

    @staticmethod
    def _times(value, batch, xp, dtype, name):
        """A scalar or (B,) value, cast to the model's dtype and multiplied by 1000 in it, as diffusers does;
        the sinusoid is then taken in at least float32."""
        host = isinstance(value, (int, float, list, tuple, numpy.ndarray, numpy.generic))
        t = numpy.asarray(value if host else backend.to_numpy(value)).astype(dtype).reshape(-1)
        if t.shape[0] == 1:
            t = numpy.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"FluxTransformer2DModel: {name} must be a scalar or ({batch},), got {tuple(t.shape)}")
        t = (t * numpy.asarray(1000, dtype=dtype)).astype(numpy.float32 if numpy.dtype(dtype).itemsize < 4 else dtype)
        return t if xp is numpy else xp.asarray(t)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        """The packed velocity (B, N, out_channels) for packed latent tokens `hidden_states` (B, N, in_channels)
        at time `timestep` (scalar or (B,), in [0, 1]), T5 tokens `encoder_hidden_states` (B, S, 4096), the
        pooled CLIP vector `pooled_projections` (B, 768), ids (N, 3) and (S, 3), and for dev the `guidance`."""
        cfg = self.config
        img_ids, txt_ids = (numpy.asarray(backend.to_numpy(numpy.asarray(i) if isinstance(i, (list, tuple)) else i))
                            for i in (img_ids, txt_ids))
        self._check(hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance)
        xp = backend.array_namespace(hidden_states, encoder_hidden_states, pooled_projections)
        b, dtype = hidden_states.shape[0], hidden_states.dtype
        t = self._times(timestep, b, xp, dtype, "timestep")
        g = self._times(guidance, b, xp, dtype, "guidance") if cfg.guidance_embeds else None

        x = self.x_embedder(hidden_states)                               # 1. (B, N, D)
        temb = self.time_text_embed(t, g, pooled_projections)            # 2. (B, D)
        c = self.context_embedder(encoder_hidden_states)                 # 3. (B, S, D)
        cos, sin = rope(numpy.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)  # 4. (S + N, d)
        rdtype = "float32" if dtype.itemsize < 4 else dtype
        rotary = tuple(backend.asarray(a.astype(rdtype)) for a in (cos, sin))
        for block in self.transformer_blocks:                            # 5. double-stream blocks
            c, x = block(x, c, temb, rotary)
        for block in self.single_transformer_blocks:                     # 6. single-stream blocks
            c, x = block(x, c, temb, rotary)
        return self.proj_out(self.norm_out(x, temb))                     # 7. (B, N, p*p*C_out)
