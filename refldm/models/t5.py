"""T5's encoder (Raffel et al., 2020), as transformers' ``T5EncoderModel``: token ids -> contextual embeddings.

Stable Diffusion 3 and FLUX condition on the last hidden state of T5 v1.1 XXL's encoder (4096 wide, 24
layers of 64 heads, d_ff 10240, gated-GELU); the tokenizer is `refldm.models.t5_tokenizer.T5TokenizerFast`.
docs/t5.md explains the math.

    x_0 = shared[ids]                                                   # (B, L) -> (B, L, D), no positions
    B_h[i, j] = relative_attention_bias[bucket(j - i), h]              # layer 0's table, shared by all layers
    for each layer l = 1..N  (pre-norm):
        x = x + o(Attention(rms_norm(x)))          Attention: softmax(Q K^T + B + M) V   (no 1/sqrt(d))
        x = x + wo(act(wi_0 h) * (wi_1 h)),  h = rms_norm(x)     ("gated-gelu"; "relu": wo(relu(wi h)))
    last_hidden_state = final_layer_norm(x_N)                           # (B, L, D)

M is the padding mask (the dtype's most negative number where attention_mask is 0). Nothing in the
model knows absolute positions: the only positional signal is the bias B, a learned scalar per head and
per *bucket* of relative distance (`relative_position_bucket`).

Keys (transformers' names): ``shared.weight``, ``encoder.embed_tokens.weight`` (the same table, tied),
``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight``, ``encoder.block.0.layer.0.SelfAttention.
relative_attention_bias.weight``, ``encoder.block.N.layer.0.layer_norm.weight``, ``encoder.block.N.layer.1.
DenseReluDense.{wi_0,wi_1,wo}.weight`` (``wi`` when not gated), ``encoder.block.N.layer.1.layer_norm.weight``,
``encoder.final_layer_norm.weight``. No layer has a bias. Checkpoints store either or both embedding keys;
T5-XXL comes in shards (``model.safetensors.index.json``), which `PretrainedModel.from_pretrained` reads.

float16: as transformers does for T5 (``_keep_in_fp32_modules = ["wo"]``), the ``wo`` weights stay in
float32, so each feed-forward output and from then on the residual stream are float32 (T5 v1.1's
feed-forward activations overflow float16); every norm is computed in float32 and its output cast back
to float16, and the float16 residual stream of the first layer is clamped to the finite range as
transformers clamps it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from refldm import backend
from refldm.checkpoints.config import parse_config
from refldm.checkpoints.weights import WeightsError
from refldm.core import functional as F
from refldm.core.nn import Module, ModuleList, Param, PretrainedModel
from refldm.models.blocks import Embedding, Linear, relu
from refldm.models.clip import IGNORED_KEYS as _PRETRAINED_CONFIG_KEYS

__all__ = ["T5Config", "T5EncoderModel", "T5EncoderOutput", "relative_position_bucket"]


# The activation of the feed-forward block by transformers' name (``dense_act_fn``, from feed_forward_proj).
ACTIVATIONS = {
    "relu": relu,                                                 # T5 v1.0
    "gelu": F.gelu,                                              # exact erf GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),         # tanh approximation: T5 v1.1 ("gated-gelu")
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

# Keys that do not change the encoder's forward pass: the generic PretrainedConfig keys (as for CLIP, less
# is_decoder, which would make the attention causal) and T5's training / decoder / derived keys.
# dense_act_fn and is_gated_act are derived from feed_forward_proj, and transformers re-derives them.
IGNORED_KEYS = tuple(k for k in _PRETRAINED_CONFIG_KEYS if k != "is_decoder") + (
    "dropout_rate", "classifier_dropout", "initializer_factor", "num_decoder_layers", "n_positions",
    "output_past", "dense_act_fn", "is_gated_act", "scale_decoder_outputs", "eos_token_id",
)
FIXED = {"is_decoder": False}  # a decoder stack (causal, with cross-attention) is not implemented

SHARED = "shared.weight"
EMBED_TOKENS = "encoder.embed_tokens.weight"


@dataclass
class T5Config:
    """The keys of a transformers ``T5Config`` that the encoder reads (transformers' defaults: t5-small).

    feed_forward_proj: "ACT" or "gated-ACT", ACT one of `ACTIVATIONS`; "gated-gelu" means the tanh GELU
    (gelu_new), as in transformers. T5-XXL (SD3, FLUX): d_model 4096, d_kv 64, d_ff 10240, num_layers 24,
    num_heads 64, vocab_size 32128, "gated-gelu", 32 buckets up to distance 128, eps 1e-6.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                    "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be at "
                             "least 4 (half per direction, half of those exact)")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                             f"the exact range, relative_attention_num_buckets // 4 = "
                             f"{self.relative_attention_num_buckets // 4}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or isinstance(self.layer_norm_epsilon, bool) \
                or self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon!r} must be a positive number")
        self.activation, self.is_gated = _parse_feed_forward_proj(self.feed_forward_proj)

    @classmethod
    def from_dict(cls, config: dict, where: str = "T5 config") -> "T5Config":
        """Parse a transformers config.json dict; a key refldm does not implement is a ConfigError."""
        return parse_config(cls, dict(config), ignored=IGNORED_KEYS, fixed=FIXED, where=where)


def _parse_feed_forward_proj(value) -> tuple[str, bool]:
    """feed_forward_proj -> (activation name, gated?), as transformers' T5Config derives them."""
    parts = value.split("-") if isinstance(value, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj={value!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if value == "gated-gelu" else parts[-1]
    if act not in ACTIVATIONS:
        raise ValueError(f"feed_forward_proj={value!r}: activation {act!r} is not implemented in refldm "
                         f"(only {', '.join(repr(a) for a in ACTIVATIONS)})")
    return act, len(parts) == 2


@dataclass
class T5EncoderOutput:
    """What `T5EncoderModel` returns (transformers' BaseModelOutput, by the same field names).

    last_hidden_state: (B, L, d_model), after the final layer norm.
    hidden_states: None, or, with ``output_hidden_states=True``, N + 1 arrays of (B, L, d_model) as
        transformers 5 gives them: the embeddings, the outputs of layers 1 .. N-1, and last_hidden_state
        (the last layer's output after the final layer norm).
    """

    last_hidden_state: object
    hidden_states: tuple | None = None

    def __getitem__(self, i):
        """Index like transformers' output tuple: [0] is last_hidden_state."""
        return (self.last_hidden_state,)[i]


# --------------------------------------------------------------------------------------------------------
# The equations


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128):
    """T5's bidirectional relative-position buckets (Mesh TensorFlow's rule, as transformers computes it).

    For r = key position - query position, with n = num_buckets / 2 buckets per direction and
    e = n / 2 of them exact:

        bucket(r) = n [r > 0] + ( |r|                                                  if |r| < e
                                  min(n - 1, e + floor( log(|r| / e) / log(max_distance / e) * (n - e) ))  else )

    Distances below e get a bucket each; farther ones share log-spaced buckets, and every distance
    >= max_distance falls into the last one. The expression is evaluated in float32, as transformers
    does. Where it is an integer (a distance exactly on a bucket boundary: |r| = 16, 32, 64 with the
    defaults) the last bit of float32 log(|r| / e) decides the side; NumPy's float32 log and torch's
    (SLEEF) agree on every distance for the published configuration (32 buckets, 128) and disagreed by
    one ulp on 9 of 36,713 (num_buckets, max_distance) pairs searched (float64 would differ on 29).
    relative_position: integer array (host); returns int64 buckets in [0, num_buckets).
    """
    r = np.asarray(relative_position, dtype=np.int64)
    n = num_buckets // 2
    exact = n // 2
    bucket = (r > 0).astype(np.int64) * n
    distance = np.abs(r)
    with np.errstate(divide="ignore"):  # log(0) for the exact ones, not used
        scaled = (np.log(distance.astype(np.float32) / np.float32(exact))
                  / np.float32(math.log(max_distance / exact)) * np.float32(n - exact))
    large = exact + np.where(distance < exact, 0, scaled).astype(np.int64)  # truncation, as .to(long)
    large = np.minimum(large, n - 1)
    return bucket + np.where(distance < exact, distance, large)


class T5LayerNorm(Module):
    """T5's layer norm: a root-mean-square norm with a learned scale, no mean subtraction and no bias
    (Zhang & Sennrich, 2019):

        y = weight * x / sqrt(mean(x^2) + eps)          mean over the last axis

    mean(x^2) and the division are computed in float32 for a float16 x (in x's dtype when wider), and the
    result is cast to the weight's dtype before the scale, as transformers does. (transformers computes
    mean(x^2) in float32 even for float64; refldm keeps float64 for float64, see tests/test_t5.py.)
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = Param(dim)
        self.eps = float(eps)

    def forward(self, x):
        xp = backend.array_namespace(x)
        wide = x if x.dtype.itemsize >= 4 else x.astype(np.float32)
        variance = xp.mean(wide * wide, axis=-1, keepdims=True)          # mean(x^2), (..., 1)
        y = wide / xp.sqrt(variance + self.eps)
        if y.dtype != self.weight.dtype and self.weight.dtype.itemsize < 4:
            y = y.astype(self.weight.dtype)                               # float16 weights: back to float16
        return self.weight * y


class T5Attention(Module):
    """Multi-head self-attention with T5's relative position bias and no 1/sqrt(d) scaling:

        Attention = softmax(Q K^T + B + M) V  per head,  Q = x Wq^T, K = x Wk^T, V = x Wv^T (no biases)

    with H heads of d_kv features (H * d_kv need not equal d_model), then o: (H * d_kv) -> d_model. The
    scale is folded into the initialisation of Wq instead (Mesh TensorFlow's convention). Only the first
    layer owns ``relative_attention_bias`` (num_buckets, H); the others reuse its bias.
    """

    def __init__(self, c: T5Config, has_relative_attention_bias: bool = False):
        inner = c.num_heads * c.d_kv
        self.q = Linear(c.d_model, inner, bias=False)
        self.k = Linear(c.d_model, inner, bias=False)
        self.v = Linear(c.d_model, inner, bias=False)
        self.o = Linear(inner, c.d_model, bias=False)
        self.relative_attention_bias = Embedding(c.relative_attention_num_buckets, c.num_heads) \
            if has_relative_attention_bias else None
        self.heads = c.num_heads
        self.num_buckets = c.relative_attention_num_buckets
        self.max_distance = c.relative_attention_max_distance

    def compute_bias(self, length: int):
        """B (1, H, L, L): B[0, h, i, j] = relative_attention_bias[bucket(j - i), h]."""
        positions = np.arange(length)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets,
                                           self.max_distance)                      # (L, L), on the host
        table = self.relative_attention_bias.weight                                # (num_buckets, H)
        if backend.array_namespace(table) is not np:
            buckets = backend.asarray(buckets)
        values = F.embedding(buckets, table)                                     # (L, L, H)
        return values.transpose(2, 0, 1)[None]                                     # (1, H, L, L)

    def forward(self, x, additive_mask):
        """x (B, L, D), additive_mask B + M (1 or B, H, L, L) -> (B, L, D)."""
        q = F.split_heads(self.q(x), self.heads)       # (B, L, H*d) -> (B, H, L, d)
        k = F.split_heads(self.k(x), self.heads)
        v = F.split_heads(self.v(x), self.heads)
        o = F.scaled_dot_product_attention(q, k, v, mask=additive_mask, scale=1.0)
        return self.o(F.merge_heads(o))


class T5LayerSelfAttention(Module):
    """x + SelfAttention(layer_norm(x)): the attention half of a T5 block."""

    def __init__(self, c: T5Config, has_relative_attention_bias: bool = False):
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, additive_mask):
        return x + self.SelfAttention(self.layer_norm(x), additive_mask)


class T5DenseActDense(Module):
    """The plain feed-forward block (T5 v1.0, "relu"): wo(act(wi x)), d_model -> d_ff -> d_model."""

    def __init__(self, c: T5Config):
        self.wi = Linear(c.d_model, c.d_ff, bias=False)
        self.wo = Linear(c.d_ff, c.d_model, bias=False)
        self.activation = ACTIVATIONS[c.activation]

    def forward(self, x):
        h = self.activation(self.wi(x))
        return self.wo(h.astype(self.wo.weight.dtype, copy=False))  # float16 model: wo is float32


class T5DenseGatedActDense(Module):
    """The gated feed-forward block (T5 v1.1, "gated-gelu"; Shazeer, 2020):

        wo( act(wi_0 x) * (wi_1 x) )          act = gelu_new(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    """

    def __init__(self, c: T5Config):
        self.wi_0 = Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = Linear(c.d_model, c.d_ff, bias=False)
        self.wo = Linear(c.d_ff, c.d_model, bias=False)
        self.activation = ACTIVATIONS[c.activation]

    def forward(self, x):
        h = self.activation(self.wi_0(x)) * self.wi_1(x)             # (B, L, d_ff)
        return self.wo(h.astype(self.wo.weight.dtype, copy=False))  # float16 model: wo is float32


class T5LayerFF(Module):
    """x + DenseReluDense(layer_norm(x)): the feed-forward half of a T5 block (the name is historical)."""

    def __init__(self, c: T5Config):
        self.DenseReluDense = T5DenseGatedActDense(c) if c.is_gated else T5DenseActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(Module):
    """One encoder layer: ``layer.0`` self-attention, ``layer.1`` feed-forward, each pre-norm and residual."""

    def __init__(self, c: T5Config, has_relative_attention_bias: bool = False):
        self.layer = ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias), T5LayerFF(c)])

    def forward(self, x, additive_mask):
        x = _clamp_float16(self.layer[0](x, additive_mask))
        return _clamp_float16(self.layer[1](x))


def _clamp_float16(x):
    """A float16 residual stream is clamped to +-(largest float16, less 1000 if any value is inf), as
    transformers' T5Block does (a no-op on finite values; wider streams pass through)."""
    if x.dtype != np.float16:
        return x
    xp = backend.array_namespace(x)
    limit = float(np.finfo(np.float16).max) - (1000.0 if bool(xp.any(xp.isinf(x))) else 0.0)
    return xp.clip(x, -limit, limit)


class T5Stack(Module):
    """The encoder: the (tied) embedding, N blocks, the final norm."""

    def __init__(self, c: T5Config):
        self.embed_tokens = Embedding(c.vocab_size, c.d_model)
        self.block = ModuleList([T5Block(c, has_relative_attention_bias=(i == 0)) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, ids, additive_mask_of, output_hidden_states: bool = False):
        x = self.embed_tokens(ids)                                               # (B, L, D)
        attention = self.block[0].layer[0].SelfAttention
        additive_mask = additive_mask_of(attention.compute_bias(ids.shape[1]))  # B (+ M), computed once
        states = [x]
        for block in self.block:
            x = block(x, additive_mask)
            states.append(x)
        last = self.final_layer_norm(x)
        hidden = tuple(states[:-1]) + (last,) if output_hidden_states else None
        return last, hidden


# --------------------------------------------------------------------------------------------------------
# The model


class T5EncoderModel(PretrainedModel):
    """T5's encoder; ``text_encoder(input_ids, attention_mask=None) -> T5EncoderOutput``.

        text_encoder_3 = T5EncoderModel.from_pretrained("sd3/text_encoder_3", dtype="float32")
        ids = T5TokenizerFast.from_pretrained("sd3/tokenizer_3")(prompt, max_length=256)["input_ids"]
        text_encoder_3(ids).last_hidden_state         # (1, 256, 4096)

    ``shared`` and ``encoder.embed_tokens`` are one table (tied) unless a checkpoint stores both keys
    with different values; then, as transformers, the encoder reads ``encoder.embed_tokens``.
    """

    weights_stem = "model"  # model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json

    def __init__(self, config: T5Config):
        if isinstance(config, dict):
            config = T5Config.from_dict(config)
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> T5Config:
        """config.json dict -> T5Config; unsupported keys and values raise ConfigError."""
        return T5Config.from_dict(config, where=where)

    def num_parameters(self) -> int:
        """Scalar weights, the tied embedding table counted once (as transformers counts)."""
        total = super().num_parameters()
        tied = self.encoder.embed_tokens.weight
        return total - (math.prod(tied.shape) if tied is self.shared.weight or isinstance(tied, Param) else 0)

    def load_state_dict(self, state: dict, dtype="float32", source: str = "checkpoint"):
        """As `PretrainedModel.load_state_dict`, plus the tie of ``shared`` and ``encoder.embed_tokens`` (one
        table unless both are stored and differ) and, for float16, the ``wo`` weights kept in float32."""
        state = dict(state)
        shared, embed = state.get(SHARED), state.get(EMBED_TOKENS)
        untied = shared is not None and embed is not None and not (
            shared.shape == embed.shape and np.array_equal(np.asarray(shared), np.asarray(embed)))
        if untied:
            warnings.warn(f"{source}: {SHARED} and {EMBED_TOKENS} differ; they are not tied, and the encoder "
                          f"uses {EMBED_TOKENS} (as transformers does)", stacklevel=2)
            super().load_state_dict(state, dtype=dtype, source=source)
        else:
            if shared is None and embed is None:
                raise WeightsError(f"{source} does not fit T5EncoderModel: missing: {SHARED} (or {EMBED_TOKENS})")
            state[SHARED] = shared if shared is not None else embed
            state.pop(EMBED_TOKENS, None)
            stack, tied = self.encoder, self.encoder.embed_tokens
            stack.embed_tokens = None  # load the table once, under shared.weight
            try:
                super().load_state_dict(state, dtype=dtype, source=source)
            finally:
                stack.embed_tokens = tied
            tied.weight = self.shared.weight
        if np.dtype(self.dtype).itemsize < 4:  # transformers' _keep_in_fp32_modules = ["wo"]
            for i, block in enumerate(self.encoder.block):
                key = f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight"
                block.layer[1].DenseReluDense.wo.weight = backend.asarray(np.asarray(state[key]).astype(np.float32))
        return self

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> T5EncoderOutput:
        """input_ids: (B, L) or (L,) integer ids (NumPy or on the active backend); attention_mask: optional
        (B, L) of 1 (token) / 0 (padding): padding keys get the dtype's most negative score, as in
        transformers (SD3 and FLUX call T5 without a mask: padding tokens are attended to)."""
        ids = self._as_ids(input_ids)
        keep = None if attention_mask is None else self._keep(attention_mask, ids.shape)

        def additive_mask_of(bias):  # B, or B where the key is kept and the lowest number where not
            if keep is None:
                return bias
            xp = backend.array_namespace(bias)
            lowest = xp.asarray(np.finfo(bias.dtype).min, dtype=bias.dtype)
            return xp.where(keep, bias, lowest)                                 # (B, H, L, L)

        last, hidden = self.encoder(ids, additive_mask_of, output_hidden_states)
        return T5EncoderOutput(last_hidden_state=last, hidden_states=hidden)

    # -- input checks ------------------------------------------------------------------------------------

    def _as_ids(self, input_ids):
        table = self.encoder.embed_tokens.weight
        if isinstance(table, Param):
            raise ValueError("T5EncoderModel: the weights are not loaded (use from_pretrained or load_state_dict)")
        if isinstance(input_ids, (list, tuple)):
            input_ids = np.asarray(input_ids)
        if not hasattr(input_ids, "dtype") or input_ids.dtype.kind not in "iu":
            kind = getattr(input_ids, "dtype", type(input_ids).__name__)
            raise ValueError(f"T5EncoderModel: input_ids must be integer token ids, got {kind}")
        if isinstance(input_ids, np.ndarray) and backend.array_namespace(table) is not np:
            input_ids = backend.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids.reshape(1, -1)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"T5EncoderModel: input_ids must be (batch, length) with length >= 1, got shape "
                             f"{tuple(input_ids.shape)}")
        xp = backend.array_namespace(input_ids)
        low, high = int(xp.min(input_ids)), int(xp.max(input_ids))
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"T5EncoderModel: input_ids range [{low}, {high}] lies outside the vocabulary "
                             f"[0, {table.shape[0]})")
        return input_ids

    def _keep(self, attention_mask, shape):
        """attention_mask (B, L) of 0/1 -> keep (B, 1, 1, L) booleans on the weights' backend."""
        table = self.encoder.embed_tokens.weight
        if isinstance(attention_mask, (list, tuple)):
            attention_mask = np.asarray(attention_mask)
        if tuple(attention_mask.shape) != tuple(shape) and not (
                attention_mask.ndim == 1 and (1,) + tuple(attention_mask.shape) == tuple(shape)):
            raise ValueError(f"T5EncoderModel: attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(shape)}")
        if isinstance(attention_mask, np.ndarray) and backend.array_namespace(table) is not np:
            attention_mask = backend.asarray(attention_mask)
        xp = backend.array_namespace(attention_mask)
        mask = attention_mask.reshape(shape)
        if not bool(xp.all((mask == 0) | (mask == 1))):
            raise ValueError("T5EncoderModel: attention_mask must hold only 0 (padding) and 1 (token)")
        return (mask != 0).reshape(shape[0], 1, 1, shape[1])

