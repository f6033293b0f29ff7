"""IP-Adapter's layers (Ye et al., 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): the image
projections that turn CLIP image features into a few "image tokens", and the decoupled cross-attention
that lets the U-Net attend to them beside the text.

    image tokens  c_img = ImageProjection(image_embeds)              # plain:  (B, E) -> (B, T, C), T = 4
                        = IPAdapterPlusImageProjection(h_{-2})       # "plus": (B, 1+N, E) -> (B, Q, C), Q = 16
    in every attn2:  out = Attn(Q, K_text, V_text) + s * Attn(Q, c_img W_k'^T, c_img W_v'^T)   then to_out
                     Q = x W_q^T is shared; W_k', W_v' (to_k_ip, to_v_ip) are the adapter's; s its scale

Keys: the IP-Adapter file's own (tencent-ailab's layout, what ``ip-adapter_sd15.safetensors`` and the others
hold), ``image_proj.*`` for the projection and ``ip_adapter.{2k+1}.to_{k,v}_ip.weight`` for the k-th
cross-attention of the U-Net in diffusers' order (down blocks, up blocks, mid block; see
refldm/adapters/ip_adapter.py). diffusers renames the projection's keys on loading (``proj`` ->
``image_embeds``; ``layers.i.0.to_kv`` split into ``layers.i.attn.to_k`` / ``to_v``; ``layers.i.1.{0,1,3}`` ->
``layers.i.ff.{0, 1.net.0.proj, 1.net.2}``); refldm keeps the file's names and computes the same thing.
docs/control.md explains the mechanism.
"""

from __future__ import annotations

from refldm import backend
from refldm.core import functional as F
from refldm.core.nn import Module, ModuleList, Param
from refldm.models.blocks import LayerNorm, Linear

__all__ = ["ImageProjection", "IPAdapterPlusImageProjection", "MultiIPAdapterImageProjection",
           "IPAdapterAttnProcessor", "PLUS_HEAD_DIM"]

PLUS_HEAD_DIM = 64  # the resampler's head size: the files do not store it; every released one uses 64


class ImageProjection(Module):
    """The plain IP-Adapter's projection: c_img = LayerNorm(reshape(proj(e), (T, C))), (B, E) -> (B, T, C).

    e is CLIP's projected image embedding (``image_embeds``); keys proj (T*C, E), norm (C,)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        self.proj = Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = LayerNorm(cross_attention_dim)
        self.num_tokens = num_tokens

    def forward(self, image_embeds):
        b = image_embeds.shape[0]
        tokens = self.proj(image_embeds).reshape(b, self.num_tokens, -1)   # (B, E) -> (B, T, C)
        return self.norm(tokens)


class PerceiverAttention(Module):
    """The resampler's attention: the latents (queries) attend to the image features and to themselves.

        x' = norm1(x),  l' = norm2(l)
        out = to_out(softmax(Q K^T / sqrt(d)) V),  Q = l' W_q^T,  [K, V] = [x'; l'] W_kv^T (split in two halves)

    Keys norm1, norm2, to_q, to_kv, to_out (no biases in the projections)."""

    def __init__(self, dim: int, heads: int, dim_head: int = PLUS_HEAD_DIM):
        inner = heads * dim_head
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim, bias=False)
        self.heads = heads

    def forward(self, x, latents):
        xp = backend.array_namespace(x, latents)
        x, latents = self.norm1(x), self.norm2(latents)                   # (B, S, D), (B, Q, D)
        q = F.split_heads(self.to_q(latents), self.heads)                 # (B, H, Q, d)
        kv = self.to_kv(xp.concatenate([x, latents], axis=1))             # (B, S + Q, 2 H d)
        half = kv.shape[-1] // 2
        k, v = (F.split_heads(a, self.heads) for a in (kv[..., :half], kv[..., half:]))
        out = F.scaled_dot_product_attention(q, k, v)                     # (B, H, Q, d)
        return self.to_out(F.merge_heads(out))                            # (B, Q, D)


class GELU(Module):
    """gelu(x) = x Phi(x), the exact (erf) form (torch's nn.GELU()); no weights."""

    def forward(self, x):
        return F.gelu(x)


class PerceiverFeedForward(ModuleList):
    """FF(l) = W_2 gelu(W_1 LayerNorm(l)), no biases; keys 0 (the norm), 1 and 3 (the layers)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__([LayerNorm(dim), Linear(dim, dim * mult, bias=False), GELU(),
                          Linear(dim * mult, dim, bias=False)])

    def forward(self, x):
        return self[3](self[2](self[1](self[0](x))))


class IPAdapterPlusImageProjection(Module):
    """IP-Adapter Plus's resampler (a Perceiver, Jaegle et al., 2021): Q learned latents read the CLIP
    image encoder's penultimate hidden states (every patch token) through `depth` attention layers.

        x = proj_in(h)                                     # (B, 1+N, E) -> (B, 1+N, D)
        l = latents                                        # (1, Q, D), the same for every image
        for each layer:  l = l + PerceiverAttention(x, l);  l = l + FF(l)
        c_img = norm_out(proj_out(l))                      # (B, Q, C)

    Keys latents, proj_in, proj_out, norm_out, layers.i.0.* (attention), layers.i.1.{0,1,3} (feed-forward)."""

    def __init__(self, embed_dims: int, output_dims: int, hidden_dims: int, depth: int, heads: int,
                 num_queries: int, ffn_ratio: int = 4):
        self.latents = Param(1, num_queries, hidden_dims)
        self.proj_in = Linear(embed_dims, hidden_dims)
        self.proj_out = Linear(hidden_dims, output_dims)
        self.norm_out = LayerNorm(output_dims)
        self.layers = ModuleList([ModuleList([PerceiverAttention(hidden_dims, heads),
                                              PerceiverFeedForward(hidden_dims, ffn_ratio)])
                                  for _ in range(depth)])

    def forward(self, hidden_states):
        xp = backend.array_namespace(hidden_states)
        b = hidden_states.shape[0]
        x = self.proj_in(hidden_states)                                   # (B, 1+N, D)
        latents = xp.broadcast_to(self.latents, (b,) + tuple(self.latents.shape[1:]))  # (B, Q, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))                      # (B, Q, C)


class MultiIPAdapterImageProjection(Module):
    """One projection per loaded IP-Adapter (diffusers' name; the U-Net's ``encoder_hid_proj``).

    image_embeds: a list, one array per adapter, (B, n, E) (plain) or (B, n, 1+N, E) (plus) for n images;
    each image's tokens are projected and the n images' tokens laid end to end: -> a list of (B, n*T, C)."""

    def __init__(self, layers):
        self.image_projection_layers = ModuleList(layers)

    def forward(self, image_embeds):
        out = []
        for embeds, layer in zip(image_embeds, self.image_projection_layers):
            b, n = embeds.shape[:2]
            tokens = layer(embeds.reshape((b * n,) + tuple(embeds.shape[2:])))    # (B n, T, C)
            out.append(tokens.reshape(b, n * tokens.shape[1], tokens.shape[2]))  # (B, n T, C)
        return out


class IPAdapterAttnProcessor(Module):
    """The image half of IP-Adapter's decoupled cross-attention, attached to an attn2 (`refldm.models.unet.Attention`):

        out <- out + s_i * softmax(Q K_i^T / sqrt(d)) V_i,   K_i = c_i W_k,i^T,  V_i = c_i W_v,i^T   (per head)

    for each adapter i with image tokens c_i (B, T_i, C) and scale s_i (skipped when s_i is 0, as diffusers
    does); Q is the text attention's query. Keys to_k_ip.i, to_v_ip.i (diffusers' names), no biases."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, heads: int, count: int = 1):
        self.to_k_ip = ModuleList([Linear(cross_attention_dim, hidden_size, bias=False) for _ in range(count)])
        self.to_v_ip = ModuleList([Linear(cross_attention_dim, hidden_size, bias=False) for _ in range(count)])
        self.scale = [1.0] * count
        self.heads = heads

    def forward(self, out, q, image_tokens):
        """out: the text attention (B, H, L, d) before the heads are merged; q: its query (B, H, L, d)."""
        for tokens, s, to_k, to_v in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip):
            if s == 0:
                continue
            k = F.split_heads(to_k(tokens), self.heads).astype(q.dtype, copy=False)   # (B, H, T, d)
            v = F.split_heads(to_v(tokens), self.heads).astype(q.dtype, copy=False)
            out = out + s * F.scaled_dot_product_attention(q, k, v)                   # (B, H, L, d)
        return out
