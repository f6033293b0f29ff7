"""What one denoising step costs, counted from the architecture: why the loop runs on latents.

A U-Net step is a fixed list of layers whose cost follows from their shapes. This module walks a
diffusers ``UNet2DConditionModel`` config (and an ``AutoencoderKL`` config) layer by layer, in the
order of the forward pass, and writes down for every layer (B = batch, the whole batch is counted):

    conv      k x k, C_in -> C_out, output H_o x W_o     MACs = B * H_o * W_o * C_out * C_in * k * k
    linear    N tokens, D_in -> D_out                    MACs = B * N * D_out * D_in
    attention H heads of size d, L queries, S keys       MACs = 2 * B * H * L * S * d   (Q K^T, then P V)
    norm      GroupNorm / LayerNorm over V values        FLOPs = 8 * B * V  (NORM_FLOPS_PER_VALUE)

A multiply-add is 2 FLOPs. ``flops`` below counts the products (convolutions, linear layers and the
two attention products), which is what ``torch.utils.flop_counter.FlopCounterMode`` counts on
diffusers' model; norms are reported apart, and the elementwise work (SiLU, softmax, residual adds,
biases) is not counted: under 1% of the products (0.65% for SD 1.x at 512x512 at 5 FLOPs per
softmax score and per layer output).

The same walk on the same network run directly on pixels (``in_channels = out_channels = 3`` at the
full image size, conv_in / conv_out adapted, every other weight unchanged) gives the cost that
pixel-space diffusion would pay with that network. Convolutions grow with H*W (64x at 8x the side);
self-attention grows with (H*W)^2 (4096x).

Activation memory of one step (inference, no gradients), in values:

    written  the values every layer writes (conv, linear and norm outputs, and the attention
             probabilities P = softmax(Q K^T), B * H * L * S of them)
    peak     the largest live set at any layer: the skip connections the U-Net holds for its up path
             at that point, plus the layer's input and output, plus the full score matrix P for an
             attention layer (an implementation that never forms all of P at once -- refldm's
             chunked attention, flash attention -- holds less: ``peak_chunked`` leaves P out)

``count_unet(config, height, width)`` and ``count_vae(config, height, width)`` return a `Count`;
`refldm cost` (refldm/cli/analysis.py) prints them; docs/why-latent.md reads the numbers.

The same walk is the one cost model of a run: ``estimate_pipeline(pipe, batch, height, width, steps, cfg)``
(and ``estimate_decode`` for the VAE alone) gives the peak memory and the FLOPs that `refldm txt2img`,
`img2img`, `inpaint` and `decode` check against the machine before they start (refldm/cli/common.py):

    bytes = weights + max(U-Net call, VAE decode),
            each = WORKING_SET * itemsize * peak_chunked + one chunk of attention scores
    flops = steps * U-Net call (batch 2B with guidance) + VAE decode

WORKING_SET = 2 covers what the walk leaves out (a layer's temporaries: the normalised copy, the activation,
buffers), measured: refldm's SD 1.x U-Net step holds 225 MiB above the weights where the walk counts 110 MB,
its VAE decode to 512x512 about 1.0 GiB where the walk counts 0.55 GiB (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
import os

from refldm.about import DEFAULT_MODEL

__all__ = ["Op", "Count", "UNetShape", "VAEShape", "count_unet", "count_vae", "count_sd3", "count_flux", "find_configs",
           "find_flux_configs", "weight_bytes",
           "find_sd3_configs", "estimate_generation", "estimate_pipeline", "estimate_decode", "WORKING_SET",
           "NORM_FLOPS_PER_VALUE", "SD_VAE_CONFIG"]

# GroupNorm / LayerNorm per value: mean (1 add), variance (subtract, square, add), normalise
# (subtract, multiply by 1/std), scale and shift (multiply, add).
NORM_FLOPS_PER_VALUE = 8

# The VAE of SD 1.x, 2.x and SDXL (same shape): used when a model folder has no vae/.
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "layers_per_block": 2, "latent_channels": 4, "in_channels": 3, "out_channels": 3,
                 "norm_num_groups": 32}


@dataclasses.dataclass
class Op:
    """One layer of the forward pass, counted for the whole batch."""

    name: str            # diffusers module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    kind: str            # "conv", "linear", "attention" or "norm"
    macs: int            # multiply-adds (0 for norms)
    in_values: int       # values read
    out_values: int      # values written (for attention: the output B*L*H*d, P is in `scores`)
    scores: int = 0      # attention only: B * H * L * S probabilities
    held: int = 0        # skip-connection values the U-Net holds while this layer runs

    @property
    def flops(self) -> int:
        """2 x multiply-adds; a norm: NORM_FLOPS_PER_VALUE x the values it writes."""
        return 2 * self.macs if self.kind != "norm" else NORM_FLOPS_PER_VALUE * self.out_values


@dataclasses.dataclass
class Count:
    """The ops of one forward pass and their totals."""

    ops: list

    @property
    def flops(self) -> int:
        """2 x multiply-adds of convolutions, linear layers and attention products (torch's count)."""
        return sum(2 * op.macs for op in self.ops)

    @property
    def norm_flops(self) -> int:
        """The norms' estimated FLOPs (NORM_FLOPS_PER_VALUE per value written), kept apart from `flops`."""
        return sum(op.flops for op in self.ops if op.kind == "norm")

    def flops_by_kind(self) -> dict:
        out = {"conv": 0, "linear": 0, "attention": 0, "norm": 0}
        for op in self.ops:
            out[op.kind] += op.flops
        return out

    def flops_by_block(self) -> dict:
        """FLOPs per top-level block ("conv_in", "down_blocks.0", ..., "mid_block", ...), in order."""
        out = {}
        for op in self.ops:
            parts = op.name.split(".")
            n = 2 if parts[0] in ("encoder", "decoder") else 1      # "encoder.down_blocks.0", "mid_block"
            if len(parts) > n and parts[n].isdigit():
                n += 1                                              # "down_blocks.0", not "down_blocks"
            key = ".".join(parts[:n])
            out[key] = out.get(key, 0) + op.flops
        return out

    @property
    def written_values(self) -> int:
        """Values written by every layer, including the attention probabilities."""
        return sum(op.out_values + op.scores for op in self.ops)

    @property
    def peak_values(self) -> int:
        """The largest live set: held skips + the layer's input and output (+ P for attention)."""
        return max(op.held + op.in_values + op.out_values + op.scores for op in self.ops)

    @property
    def peak_chunked_values(self) -> int:
        """The same without the full score matrix P (chunked or flash attention)."""
        return max(op.held + op.in_values + op.out_values for op in self.ops)

    @property
    def largest_scores(self) -> int:
        return max((op.scores for op in self.ops), default=0)


class _Walk:
    """Appends `Op`s for a batch of `b`; `held` is the skip connections kept at the moment."""

    def __init__(self, b: int):
        self.b = b
        self.ops = []
        self.held = 0

    def conv(self, name, cin, cout, hw, k=3, stride=1, pad=None):
        """k x k convolution; pad = total padding per side pair (default k - 1, 'same'). -> (H_o, W_o)"""
        h, w = hw
        pad = (k - 1) if pad is None else pad
        ho, wo = (h + pad - k) // stride + 1, (w + pad - k) // stride + 1
        b = self.b
        self.ops.append(Op(name, "conv", b * ho * wo * cout * cin * k * k, b * cin * h * w, b * cout * ho * wo,
                           held=self.held))
        return ho, wo

    def linear(self, name, tokens, din, dout):
        """y = x W^T + b on B x tokens rows: B * tokens * D_out * D_in multiply-adds."""
        b = self.b
        self.ops.append(Op(name, "linear", b * tokens * dout * din, b * tokens * din, b * tokens * dout,
                           held=self.held))

    def norm(self, name, values):
        """GroupNorm / LayerNorm over B x values: no products; counted apart (Op.flops)."""
        b = self.b
        self.ops.append(Op(name, "norm", 0, b * values, b * values, held=self.held))

    def attention(self, name, heads, lq, lk, d):
        """softmax(Q K^T / sqrt(d)) V per head: Q (L, d), K and V (S, d)."""
        b = self.b
        self.ops.append(Op(name, "attention", 2 * b * heads * lq * lk * d, b * heads * (lq + 2 * lk) * d,
                           b * heads * lq * d, scores=b * heads * lq * lk, held=self.held))


# ---------------------------------------------------------------------------------------------------
# The U-Net's shape, read from config.json with diffusers' defaults
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class UNetShape:
    """What the cost depends on, from a UNet2DConditionModel config.json (SD 1.x, 2.x, SDXL)."""

    in_channels: int
    out_channels: int
    block_out_channels: list
    down_block_types: list
    up_block_types: list
    layers_per_block: list
    transformer_layers_per_block: list
    reverse_transformer_layers_per_block: list
    heads: list                    # attention_head_dim: the number of heads per level (diffusers' naming)
    cross_attention_dim: list
    only_cross_attention: list
    use_linear_projection: bool
    time_embed_dim: int
    addition_embed_type: str | None
    projection_class_embeddings_input_dim: int | None
    conv_in_kernel: int
    conv_out_kernel: int
    downsample_padding: int

    @classmethod
    def from_config(cls, cfg, where: str = "unet config") -> UNetShape:
        """From a config.json dict (read as `UNet2DConditionModel` reads it: diffusers' defaults, unsupported
        keys refused naming them) or from a loaded model's `UNet2DConditionConfig` (``unet.config``)."""
        from refldm.models.unet import UNet2DConditionConfig, UNet2DConditionModel
        c = cfg if isinstance(cfg, UNet2DConditionConfig) else UNet2DConditionModel.parse_config(dict(cfg), where)
        rev = c.reverse_transformer_layers_per_block
        return cls(
            in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=list(c.block_out_channels),
            down_block_types=list(c.down_block_types), up_block_types=list(c.up_block_types),
            layers_per_block=list(c.layers_per_block),
            transformer_layers_per_block=list(c.transformer_layers_per_block),
            reverse_transformer_layers_per_block=list(reversed(c.transformer_layers_per_block)) if rev is None
            else list(rev),
            heads=list(c.attention_head_dim), cross_attention_dim=list(c.cross_attention_dim),
            only_cross_attention=list(c.only_cross_attention), use_linear_projection=bool(c.use_linear_projection),
            time_embed_dim=c.time_embedding_dim, addition_embed_type=c.addition_embed_type,
            projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim,
            conv_in_kernel=c.conv_in_kernel, conv_out_kernel=c.conv_out_kernel,
            downsample_padding=c.downsample_padding)

    def on_pixels(self, channels: int = 3) -> UNetShape:
        """The same network with conv_in / conv_out taking and giving `channels` (an RGB image)."""
        return dataclasses.replace(self, in_channels=channels, out_channels=channels)


# ---------------------------------------------------------------------------------------------------
# The U-Net walk: the same order as UNet2DConditionModel.forward (refldm/models/unet.py)
# ---------------------------------------------------------------------------------------------------

def count_unet(shape, height: int, width: int, batch: int = 2, text_tokens: int = 77) -> Count:
    """The ops of one U-Net call on a (batch, in_channels, height, width) sample with
    `text_tokens` text embeddings per batch element (77 for CLIP). shape: a `UNetShape`, a config.json
    dict or a model's `UNet2DConditionConfig`."""
    s = shape if isinstance(shape, UNetShape) else UNetShape.from_config(shape)
    if height < 1 or width < 1:
        raise ValueError(f"cost: the U-Net's input must be at least 1x1, got {height}x{width}")
    t = _Walk(batch)
    ch, temb, n = s.block_out_channels, s.time_embed_dim, len(s.block_out_channels)

    # 1. time embedding: sinusoid (not counted) -> linear_1 -> SiLU -> linear_2, one token per element
    t.linear("time_embedding.linear_1", 1, ch[0], temb)
    t.linear("time_embedding.linear_2", 1, temb, temb)
    if s.addition_embed_type == "text_time":
        # SDXL: [pooled text (1280), sinusoids of the 6 size/crop numbers (6 x 256)] -> the same MLP
        t.linear("add_embedding.linear_1", 1, s.projection_class_embeddings_input_dim, temb)
        t.linear("add_embedding.linear_2", 1, temb, temb)

    # 2. down: every output is kept as a skip connection
    hw = t.conv("conv_in", s.in_channels, ch[0], (height, width), k=s.conv_in_kernel)
    skips = [(ch[0], hw)]
    t.held += ch[0] * hw[0] * hw[1] * batch
    cout = ch[0]
    for i, kind in enumerate(s.down_block_types):
        cin, cout = cout, ch[i]
        for j in range(s.layers_per_block[i]):
            name = f"down_blocks.{i}"
            _resnet(t, f"{name}.resnets.{j}", cin if j == 0 else cout, cout, hw, temb)
            if kind == "CrossAttnDownBlock2D":
                _transformer(t, f"{name}.attentions.{j}", s, cout, hw, s.heads[i],
                             s.transformer_layers_per_block[i], s.cross_attention_dim[i],
                             s.only_cross_attention[i], text_tokens)
            skips.append((cout, hw))
            t.held += cout * hw[0] * hw[1] * batch
        if i < n - 1:
            hw = t.conv(f"down_blocks.{i}.downsamplers.0.conv", cout, cout, hw, stride=2,
                        pad=2 if s.downsample_padding == 1 else 1)
            skips.append((cout, hw))
            t.held += cout * hw[0] * hw[1] * batch

    # 3. mid: ResNet, transformer, ResNet at the coarsest level
    _resnet(t, "mid_block.resnets.0", ch[-1], ch[-1], hw, temb)
    _transformer(t, "mid_block.attentions.0", s, ch[-1], hw, s.heads[-1], s.transformer_layers_per_block[-1],
                 s.cross_attention_dim[-1], False, text_tokens)
    _resnet(t, "mid_block.resnets.1", ch[-1], ch[-1], hw, temb)

    # 4. up: concat a skip before each ResNet (last in, first out), then upsample to the next skip's size
    rch, rheads = list(reversed(ch)), list(reversed(s.heads))
    rcross, ronly = list(reversed(s.cross_attention_dim)), list(reversed(s.only_cross_attention))
    rlayers = list(reversed(s.layers_per_block))
    cout = rch[0]
    for i, kind in enumerate(s.up_block_types):
        prev, cout = cout, rch[i]
        for j in range(rlayers[i] + 1):
            skip_c, skip_hw = skips.pop()
            t.held -= skip_c * skip_hw[0] * skip_hw[1] * batch
            name = f"up_blocks.{i}"
            _resnet(t, f"{name}.resnets.{j}", (prev if j == 0 else cout) + skip_c, cout, hw, temb)
            if kind == "CrossAttnUpBlock2D":
                _transformer(t, f"{name}.attentions.{j}", s, cout, hw, rheads[i],
                             s.reverse_transformer_layers_per_block[i], rcross[i], ronly[i], text_tokens)
        if i < n - 1:
            hw = skips[-1][1]          # nearest upsampling to the next skip's size (2x, or 2x - 1)
            t.conv(f"up_blocks.{i}.upsamplers.0.conv", cout, cout, hw)

    # 5. out
    t.norm("conv_norm_out", ch[0] * hw[0] * hw[1])
    t.conv("conv_out", ch[0], s.out_channels, hw, k=s.conv_out_kernel)
    return Count(t.ops)


def _resnet(t: _Walk, name, cin, cout, hw, temb=None):
    """norm1 -> conv1 (+ time_emb_proj(temb)) -> norm2 -> conv2, + 1x1 conv_shortcut when C changes."""
    h, w = hw
    t.norm(f"{name}.norm1", cin * h * w)
    t.conv(f"{name}.conv1", cin, cout, hw)
    if temb is not None:
        t.linear(f"{name}.time_emb_proj", 1, temb, cout)
    t.norm(f"{name}.norm2", cout * h * w)
    t.conv(f"{name}.conv2", cout, cout, hw)
    if cin != cout:
        t.conv(f"{name}.conv_shortcut", cin, cout, hw, k=1)


def _transformer(t: _Walk, name, s: UNetShape, c, hw, heads, layers, cross_dim, only_cross, text_tokens):
    """GroupNorm -> proj_in -> [LN, self-attn; LN, cross-attn; LN, GEGLU FF] x layers -> proj_out."""
    length = hw[0] * hw[1]                       # L = H*W image tokens
    d = c // heads
    t.norm(f"{name}.norm", c * length)
    if s.use_linear_projection:
        t.linear(f"{name}.proj_in", length, c, c)
    else:
        t.conv(f"{name}.proj_in", c, c, hw, k=1)
    for k in range(layers):
        block = f"{name}.transformer_blocks.{k}"
        for a, context in (("attn1", (text_tokens, cross_dim) if only_cross else (length, c)),
                           ("attn2", (text_tokens, cross_dim))):
            lk, dk = context
            t.norm(f"{block}.norm{a[-1]}", c * length)
            t.linear(f"{block}.{a}.to_q", length, c, c)
            t.linear(f"{block}.{a}.to_k", lk, dk, c)
            t.linear(f"{block}.{a}.to_v", lk, dk, c)
            t.attention(f"{block}.{a}", heads, length, lk, d)
            t.linear(f"{block}.{a}.to_out.0", length, c, c)
        t.norm(f"{block}.norm3", c * length)
        t.linear(f"{block}.ff.net.0.proj", length, c, 8 * c)   # GEGLU: [h, g], 4C each
        t.linear(f"{block}.ff.net.2", length, 4 * c, c)
    if s.use_linear_projection:
        t.linear(f"{name}.proj_out", length, c, c)
    else:
        t.conv(f"{name}.proj_out", c, c, hw, k=1)


# ---------------------------------------------------------------------------------------------------
# The MMDiT of SD3 / SD3.5: the same order as SD3Transformer2DModel.forward (refldm/models/sd3_transformer.py)
# ---------------------------------------------------------------------------------------------------

SD3_DEFAULTS = {"patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
                "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
                "pooled_projection_dim": 2048, "out_channels": 16, "dual_attention_layers": [], "qk_norm": None}


def count_sd3(config: dict, height: int, width: int, batch: int = 2, text_tokens: int = 333) -> Count:
    """The ops of one SD3Transformer2DModel call on a (batch, in_channels, height, width) latent with
    `text_tokens` text tokens (77 CLIP + 256 T5 in SD3's pipeline). N = (height/p)(width/p) image tokens,
    S text tokens, D = heads * head_dim. Per joint block: the two adaLN linears on temb (6D or 9D; the last
    block's text stream 2D), q/k/v/out on both streams, one attention over N + S tokens, the 4D gelu MLPs;
    MMDiT-X blocks add an image-only attention. RMS qk-norms count as norms (D values per token each)."""
    c = {**SD3_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    p, heads, hd = c["patch_size"], c["num_attention_heads"], c["attention_head_dim"]
    if height % p or width % p or height < p or width < p:
        raise ValueError(f"cost: the latent {height}x{width} is not a positive multiple of patch_size={p}")
    d, n, s, layers = heads * hd, (height // p) * (width // p), text_tokens, c["num_layers"]
    out = c["out_channels"] if c["out_channels"] is not None else c["in_channels"]
    t = _Walk(batch)
    t.conv("pos_embed.proj", c["in_channels"], d, (height, width), k=p, stride=p, pad=0)
    t.linear("time_text_embed.timestep_embedder.linear_1", 1, 256, d)
    t.linear("time_text_embed.timestep_embedder.linear_2", 1, d, d)
    t.linear("time_text_embed.text_embedder.linear_1", 1, c["pooled_projection_dim"], d)
    t.linear("time_text_embed.text_embedder.linear_2", 1, d, d)
    t.linear("context_embedder", s, c["joint_attention_dim"], c["caption_projection_dim"])
    for i in range(layers):
        b = f"transformer_blocks.{i}"
        last, dual = i == layers - 1, i in c["dual_attention_layers"]
        t.linear(f"{b}.norm1.linear", 1, d, (9 if dual else 6) * d)
        t.norm(f"{b}.norm1.norm", n * d)
        t.linear(f"{b}.norm1_context.linear", 1, d, (2 if last else 6) * d)
        t.norm(f"{b}.norm1_context.norm", s * d)
        attentions = [("attn", True)] + ([("attn2", False)] if dual else [])
        for a, joint in attentions:
            for x in "qkv":
                t.linear(f"{b}.{a}.to_{x}", n, d, d)
            if c["qk_norm"]:
                t.norm(f"{b}.{a}.norm_q", n * d)
                t.norm(f"{b}.{a}.norm_k", n * d)
            if joint:
                for x in "qkv":
                    t.linear(f"{b}.{a}.add_{x}_proj", s, d, d)
                if c["qk_norm"]:
                    t.norm(f"{b}.{a}.norm_added_q", s * d)
                    t.norm(f"{b}.{a}.norm_added_k", s * d)
            length = n + s if joint else n
            t.attention(f"{b}.{a}", heads, length, length, hd)
            t.linear(f"{b}.{a}.to_out.0", n, d, d)
            if joint and not last:
                t.linear(f"{b}.{a}.to_add_out", s, d, d)
        t.norm(f"{b}.norm2", n * d)
        t.linear(f"{b}.ff.net.0.proj", n, d, 4 * d)
        t.linear(f"{b}.ff.net.2", n, 4 * d, d)
        if not last:
            t.norm(f"{b}.norm2_context", s * d)
            t.linear(f"{b}.ff_context.net.0.proj", s, d, 4 * d)
            t.linear(f"{b}.ff_context.net.2", s, 4 * d, d)
    t.linear("norm_out.linear", 1, d, 2 * d)
    t.norm("norm_out.norm", n * d)
    t.linear("proj_out", n, d, p * p * out)
    return Count(t.ops)


FLUX_DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
                 "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                 "pooled_projection_dim": 768, "guidance_embeds": False}


def count_flux(config: dict, height: int, width: int, batch: int = 1, text_tokens: int = 512) -> Count:
    """The ops of one FluxTransformer2DModel call for a 16-channel latent of height x width, packed in 2x2
    patches: N = (height/2)(width/2) image tokens of in_channels = 64 values, S = `text_tokens` T5 tokens (the
    pipeline's max_sequence_length, 512 by default), D = heads * head_dim. The embeddings: x_embedder (64 -> D on
    N), context_embedder (4096 -> D on S), the timestep, guidance (dev) and pooled-text MLPs on one row each.
    Per double-stream block: the adaLN-Zero linears (D -> 6D, both streams), q/k/v and the output on both
    streams, one joint attention over N + S tokens, the 4D MLPs of both streams. Per single-stream block on the
    N + S tokens: adaLN (D -> 3D), q/k/v, the MLP's D -> 4D, one attention, and the fused output (D + 4D -> D).
    Then norm_out (D -> 2D) and proj_out (D -> 64). RMS qk-norms and LayerNorms count as norms."""
    c = {**FLUX_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if height % 2 or width % 2 or height < 2 or width < 2:
        raise ValueError(f"cost: the FLUX latent {height}x{width} must have even sides (2x2 packing)")
    heads, hd = c["num_attention_heads"], c["attention_head_dim"]
    d, n, s, p = heads * hd, (height // 2) * (width // 2), int(text_tokens), c["patch_size"]
    out = c["out_channels"] if c["out_channels"] is not None else c["in_channels"]
    t = _Walk(batch)
    t.linear("x_embedder", n, c["in_channels"], d)
    embedders = ["timestep_embedder"] + (["guidance_embedder"] if c["guidance_embeds"] else [])
    for e in embedders:
        t.linear(f"time_text_embed.{e}.linear_1", 1, 256, d)
        t.linear(f"time_text_embed.{e}.linear_2", 1, d, d)
    t.linear("time_text_embed.text_embedder.linear_1", 1, c["pooled_projection_dim"], d)
    t.linear("time_text_embed.text_embedder.linear_2", 1, d, d)
    t.linear("context_embedder", s, c["joint_attention_dim"], d)
    for i in range(c["num_layers"]):
        b = f"transformer_blocks.{i}"
        for stream, tokens, add in (("", n, False), ("_context", s, True)):
            t.linear(f"{b}.norm1{stream}.linear", 1, d, 6 * d)
            t.norm(f"{b}.norm1{stream}.norm", tokens * d)
            for x in "qkv":
                t.linear(f"{b}.attn.add_{x}_proj" if add else f"{b}.attn.to_{x}", tokens, d, d)
            t.norm(f"{b}.attn.norm_added_q" if add else f"{b}.attn.norm_q", tokens * d)
            t.norm(f"{b}.attn.norm_added_k" if add else f"{b}.attn.norm_k", tokens * d)
        t.attention(f"{b}.attn", heads, n + s, n + s, hd)
        t.linear(f"{b}.attn.to_out.0", n, d, d)
        t.linear(f"{b}.attn.to_add_out", s, d, d)
        for stream, tokens in (("", n), ("_context", s)):
            t.norm(f"{b}.norm2{stream}", tokens * d)
            t.linear(f"{b}.ff{stream}.net.0.proj", tokens, d, 4 * d)
            t.linear(f"{b}.ff{stream}.net.2", tokens, 4 * d, d)
    for i in range(c["num_single_layers"]):
        b, tokens = f"single_transformer_blocks.{i}", n + s
        t.linear(f"{b}.norm.linear", 1, d, 3 * d)
        t.norm(f"{b}.norm.norm", tokens * d)
        t.linear(f"{b}.proj_mlp", tokens, d, 4 * d)
        for x in "qkv":
            t.linear(f"{b}.attn.to_{x}", tokens, d, d)
        t.norm(f"{b}.attn.norm_q", tokens * d)
        t.norm(f"{b}.attn.norm_k", tokens * d)
        t.attention(f"{b}.attn", heads, tokens, tokens, hd)
        t.linear(f"{b}.proj_out", tokens, 5 * d, d)
    t.linear("norm_out.linear", 1, d, 2 * d)
    t.norm("norm_out.norm", n * d)
    t.linear("proj_out", n, d, p * p * out)
    return Count(t.ops)


# ---------------------------------------------------------------------------------------------------
# The VAE: one encode (image -> posterior) and one decode (latent -> image)
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VAEShape:
    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: list
    layers_per_block: int
    mid_attention: bool
    quant_conv: bool
    post_quant_conv: bool

    @classmethod
    def from_config(cls, cfg, where: str = "vae config") -> VAEShape:
        """From a config.json dict (read as `AutoencoderKL` reads it) or a loaded VAE's `AutoencoderKLConfig`."""
        from refldm.models.vae import AutoencoderKL, AutoencoderKLConfig
        c = cfg if isinstance(cfg, AutoencoderKLConfig) else AutoencoderKL.parse_config(dict(cfg), where)
        return cls(c.in_channels, c.out_channels, c.latent_channels, list(c.block_out_channels), c.layers_per_block,
                   c.mid_block_add_attention, c.use_quant_conv, c.use_post_quant_conv)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def count_vae(shape, height: int, width: int, batch: int = 1) -> tuple:
    """(encode Count, decode Count) for `batch` images of height x width (multiples of the factor). shape: a
    `VAEShape`, a config.json dict or a model's `AutoencoderKLConfig`."""
    s = shape if isinstance(shape, VAEShape) else VAEShape.from_config(shape)
    f = s.factor
    if height < 1 or width < 1 or height % f or width % f:
        raise ValueError(f"cost: image size {height}x{width} is not a positive multiple of the VAE's factor {f}")
    c, n = s.block_out_channels, len(s.block_out_channels)

    enc = _Walk(batch)
    hw = enc.conv("encoder.conv_in", s.in_channels, c[0], (height, width))
    cout = c[0]
    for i in range(n):
        cin, cout = cout, c[i]
        for j in range(s.layers_per_block):
            _resnet(enc, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, hw)
        if i < n - 1:   # F.pad(x, (0, 1, 0, 1)), then a 3x3 stride-2 conv without padding
            hw = enc.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, hw, stride=2, pad=1)
    _vae_mid(enc, "encoder.mid_block", s, c[-1], hw)
    enc.norm("encoder.conv_norm_out", c[-1] * hw[0] * hw[1])
    enc.conv("encoder.conv_out", c[-1], 2 * s.latent_channels, hw)
    if s.quant_conv:
        enc.conv("quant_conv", 2 * s.latent_channels, 2 * s.latent_channels, hw, k=1)

    dec = _Walk(batch)
    hw = (height // f, width // f)
    if s.post_quant_conv:
        dec.conv("post_quant_conv", s.latent_channels, s.latent_channels, hw, k=1)
    dec.conv("decoder.conv_in", s.latent_channels, c[-1], hw)
    _vae_mid(dec, "decoder.mid_block", s, c[-1], hw)
    rc = list(reversed(c))
    cout = rc[0]
    for i in range(n):
        prev, cout = cout, rc[i]
        for j in range(s.layers_per_block + 1):
            _resnet(dec, f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else cout, cout, hw)
        if i < n - 1:
            hw = (2 * hw[0], 2 * hw[1])
            dec.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, cout, hw)
    dec.norm("decoder.conv_norm_out", c[0] * hw[0] * hw[1])
    dec.conv("decoder.conv_out", c[0], s.out_channels, hw)
    return Count(enc.ops), Count(dec.ops)


def _vae_mid(t: _Walk, name, s: VAEShape, c, hw):
    """ResNet -> single-head self-attention over the h*w latent pixels -> ResNet."""
    _resnet(t, f"{name}.resnets.0", c, c, hw)
    if s.mid_attention:
        length = hw[0] * hw[1]
        a = f"{name}.attentions.0"
        t.norm(f"{a}.group_norm", c * length)
        for proj in ("to_q", "to_k", "to_v"):
            t.linear(f"{a}.{proj}", length, c, c)
        t.attention(a, 1, length, length, c)
        t.linear(f"{a}.to_out.0", length, c, c)
    _resnet(t, f"{name}.resnets.1", c, c, hw)


# ---------------------------------------------------------------------------------------------------
# What a run costs, before it starts: the estimates the CLI checks against the machine
# ---------------------------------------------------------------------------------------------------

WORKING_SET = 2  # measured live memory / the walk's peak_chunked values (see the module docstring)


def _chunk_bytes() -> int:
    """The attention scores refldm holds at once (refldm/core/ops.py chunks the score matrix to this size)."""
    from refldm.core import ops
    return ops.ATTENTION_CHUNK_BYTES


def estimate_decode(vae_config, shape, itemsize: int = 4) -> dict:
    """{"bytes", "flops"} of decoding latents of `shape` (N, C, h, w): the decoder walk's largest live set
    (chunked attention: the score matrix held one chunk at a time), times WORKING_SET, and its products."""
    n, _, h, w = shape
    s = vae_config if isinstance(vae_config, VAEShape) else VAEShape.from_config(vae_config)
    _, dec = count_vae(s, h * s.factor, w * s.factor, n)
    return {"bytes": WORKING_SET * itemsize * dec.peak_chunked_values + _chunk_bytes(), "flops": dec.flops}


def estimate_generation(unet_config, vae_config, batch: int, height: int, width: int, steps: int,
                        guidance_scale: float, itemsize: int = 4, weight_bytes: int = 0,
                        text_tokens: int = 77) -> dict:
    """{"bytes": peak memory, "flops": total products} of generating `batch` images of height x width: the
    weights, then the larger of one U-Net call (batch 2B with classifier-free guidance, guidance_scale > 1)
    and the decode; `steps` U-Net calls and one decode."""
    vae = vae_config if isinstance(vae_config, VAEShape) else VAEShape.from_config(vae_config)
    f = vae.factor
    h, w = -(-height // f), -(-width // f)
    unet_batch = batch * (2 if guidance_scale > 1 else 1)
    unet = count_unet(unet_config, h, w, unet_batch, text_tokens)
    decode = estimate_decode(vae, (batch, vae.latent_channels, h, w), itemsize)
    peak = max(WORKING_SET * itemsize * unet.peak_chunked_values + _chunk_bytes(), decode["bytes"])
    return {"bytes": weight_bytes + peak, "flops": steps * unet.flops + decode["flops"]}


def steps_run(steps: int, strength: float | None = None) -> int:
    """The denoising steps a call runs: all `steps` from noise (strength None or 1), else img2img's / inpaint's
    min(int(steps * strength), steps), diffusers' rule (refldm/pipelines/sampling.py img2img_timesteps)."""
    if strength is None:
        return int(steps)
    return min(int(steps * strength), int(steps))


# Seconds per FLOP of a generation relative to the machine's plain float32 matmul speed (matmul_throughput in
# refldm/cli/resources.py): t = flops / (EFFICIENCY * matmul speed). Measured with tools/calibrate_time.py;
# docs/performance.md gives the measurements and the error of the estimate.
EFFICIENCY = 1.3


def estimate_seconds(flops: float, matmul_flops_per_second: float) -> float:
    """The time estimate t = flops / (EFFICIENCY * measured matmul speed), calibrated (docs/performance.md)."""
    return float(flops) / (EFFICIENCY * max(float(matmul_flops_per_second), 1.0))


def estimate_pipeline(pipe, batch: int, height: int, width: int, steps: int, guidance_scale: float) -> dict:
    """`estimate_generation` for a loaded pipeline (SD, SDXL, inpainting): its configs, dtype, weights and
    text length. Rough (the elementwise temporaries are not counted), for refusing what cannot fit and
    announcing long runs."""
    itemsize = pipe.dtype.itemsize
    if type(pipe).__name__ in ("FluxPipeline", "FluxImg2ImgPipeline"):
        return _estimate_flux(pipe, batch, height, width, steps, guidance_scale)
    if getattr(pipe, "transformer", None) is not None:  # SD3: the MMDiT in place of the U-Net
        return _estimate_sd3(pipe, batch, height, width, steps, guidance_scale)
    models = [getattr(pipe, part, None) for part in ("unet", "vae", "text_encoder", "text_encoder_2")]
    weights, mapped = weight_bytes(models, itemsize)
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    tokens = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return {**estimate_generation(pipe.unet.config, pipe.vae.config, batch, height, width, steps, guidance_scale,
                                  itemsize, weights, tokens), "mapped": mapped}


def weight_bytes(models, itemsize: int) -> tuple:
    """(resident, mapped) bytes of the models' weights. Default load: every tensor in the compute dtype, resident.
    weights_dtype="stored": the kept weights (StoredTensor) stay in the memory-mapped files -- `mapped`, clean
    file pages the kernel reads in as the layers run and may drop again, so they need not fit in memory at
    once -- and resident are the tensors converted on loading (biases, norms, embeddings) plus the float32 copy
    of the largest kept weight with its stored pages (one layer's conversion at a time)."""
    from refldm.checkpoints.stored import StoredTensor
    resident = mapped = largest = 0
    for model in models:
        if model is None:
            continue
        for _, _, _, value in model.params():
            size = 1
            for dim in value.shape:
                size *= int(dim)
            if isinstance(value, StoredTensor):
                mapped += value.nbytes
                largest = max(largest, size * itemsize + value.nbytes)
            else:
                resident += size * itemsize
    return resident + largest, mapped


def _estimate_sd3(pipe, batch, height, width, steps, guidance_scale, text_tokens: int = 77 + 256) -> dict:
    """`estimate_pipeline` for an SD3 pipeline: the weights of its five networks, then the larger of one
    transformer call (77 CLIP + 256 T5 tokens, the default max_sequence_length; batch 2B with guidance) and the
    decode; `steps` transformer calls and one decode."""
    import dataclasses
    itemsize = pipe.dtype.itemsize
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    weights, mapped = weight_bytes([getattr(pipe, p, None) for p in parts], itemsize)
    vae = VAEShape.from_config(pipe.vae.config)
    f = vae.factor
    h, w = -(-height // f), -(-width // f)
    call = count_sd3(dataclasses.asdict(pipe.transformer.config), h, w, batch * (2 if guidance_scale > 1 else 1),
                     text_tokens)
    decode = estimate_decode(vae, (batch, vae.latent_channels, h, w), itemsize)
    peak = max(WORKING_SET * itemsize * call.peak_chunked_values + _chunk_bytes(), decode["bytes"])
    return {"bytes": weights + peak, "flops": steps * call.flops + decode["flops"], "mapped": mapped}


def _estimate_flux(pipe, batch, height, width, steps, guidance_scale, text_tokens: int = 512) -> dict:
    """`estimate_pipeline` for a FLUX pipeline: the weights of its four networks (`weight_bytes`), then the larger
    of one transformer call (512 T5 tokens, the default max_sequence_length; batch 2B only with true CFG,
    guidance_scale > 1 here) and the decode; `steps` transformer calls, one decode."""
    import dataclasses
    itemsize = pipe.dtype.itemsize
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    weights, mapped = weight_bytes([getattr(pipe, p, None) for p in parts], itemsize)
    vae = VAEShape.from_config(pipe.vae.config)
    h, w = pipe.latent_size(height, width)
    call = count_flux(dataclasses.asdict(pipe.transformer.config), h, w, batch * (2 if guidance_scale > 1 else 1),
                      text_tokens)
    decode = estimate_decode(vae, (batch, vae.latent_channels, h, w), itemsize)
    peak = max(WORKING_SET * itemsize * call.peak_chunked_values + _chunk_bytes(), decode["bytes"])
    return {"bytes": weights + peak, "flops": steps * call.flops + decode["flops"], "mapped": mapped}


# ---------------------------------------------------------------------------------------------------
# Finding the configs of a model
# ---------------------------------------------------------------------------------------------------

def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def find_sd3_configs(model, kind: str = "SD3Transformer2DModel") -> tuple | None:
    """(transformer config, vae config, where) when `model` is a folder holding a transformer of class `kind` (a
    pipeline folder with transformer/ and vae/); None otherwise."""
    if model is None or not os.path.isdir(os.fspath(model)):
        return None
    path = os.path.join(os.fspath(model), "transformer", "config.json")
    if not os.path.isfile(path):
        return None
    cfg = _read(path)
    if cfg.get("_class_name") != kind:
        return None
    vae_path = os.path.join(os.fspath(model), "vae", "config.json")
    if not os.path.isfile(vae_path):
        raise ValueError(f"{model}: a {kind} folder without vae/config.json")
    return cfg, _read(vae_path), path


def find_flux_configs(model) -> tuple | None:
    """`find_sd3_configs` for a FLUX.1 folder (a FluxTransformer2DModel)."""
    return find_sd3_configs(model, "FluxTransformer2DModel")


def find_configs(model=None) -> tuple:
    """MODEL -> (unet config dict, vae config dict or None, where the U-Net config came from).

    MODEL: None (the built-in model), a pipeline folder (unet/ and vae/), a U-Net folder, or a U-Net
    config.json file. A folder or file without a U-Net config raises ValueError naming it.
    """
    if model is None:
        model = DEFAULT_MODEL
    model = os.fspath(model)
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model}: no such file or folder")
    vae = None
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "unet", "config.json")):
            path = os.path.join(model, "unet", "config.json")
            if os.path.isfile(os.path.join(model, "vae", "config.json")):
                vae = _read(os.path.join(model, "vae", "config.json"))
        elif os.path.isfile(os.path.join(model, "config.json")):
            path = os.path.join(model, "config.json")
        else:
            raise ValueError(f"{model}: no U-Net here (neither unet/config.json nor config.json)")
    else:
        path = model
    cfg = _read(path)
    kind = cfg.get("_class_name")
    if kind is None:                       # no class name: judge by the keys
        if "block_out_channels" not in cfg:
            kind = "an unknown config"
        elif any("Encoder" in str(t) for t in cfg.get("down_block_types", [])):
            kind = "a VAE config"
    if kind not in (None, "UNet2DConditionModel"):
        raise ValueError(f"{path}: no U-Net here ({kind}, not a UNet2DConditionModel); give a pipeline "
                         "folder with unet/, a U-Net folder or its config.json")
    return cfg, vae, path
