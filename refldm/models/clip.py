"""CLIP's text encoder (Radford et al., 2021), as transformers' ``CLIPTextModel``: prompt tokens -> embeddings.

Stable Diffusion conditions its U-Net on the last hidden state of this transformer (SD 1.x: OpenAI's
ViT-L/14 text tower, 768 wide, 12 layers, quick_gelu; SD 2.x: OpenCLIP ViT-H's text tower, 1024 wide,
gelu, shipped with 23 of its 24 layers so that the "last" layer is OpenCLIP's penultimate one).

    x_0 = token_embedding[ids] + position_embedding[0..L-1]           # (B, L) -> (B, L, D)
    for each layer l = 1..N  (pre-LN, causal):
        x = x + out_proj(Attention(layer_norm1(x)))                   # token i sees tokens 0..i only
        x = x + fc2(act(fc1(layer_norm2(x))))                         # act: quick_gelu or gelu
        x_l = x
    last_hidden_state = final_layer_norm(x_N)                          # (B, L, D)
    pooler_output     = last_hidden_state[b, position of the end-of-text token]   # (B, D)

Keys: ``embeddings.token_embedding.weight``, ``embeddings.position_embedding.weight``,
``encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.{weight,bias}``,
``final_layer_norm.{weight,bias}``: transformers 5's names. Checkpoints written by transformers 4 (every
Stable Diffusion ``text_encoder/`` folder on the Hub) put ``text_model.`` in front of each; both load.
docs/text_encoder.md explains the math; the tokenizer is `refldm.models.tokenizer.CLIPTokenizer`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from refldm import backend
from refldm.core import functional as F
from refldm.checkpoints.config import ConfigError, parse_config
from refldm.models.blocks import Embedding, LayerNorm, Linear
from refldm.core.nn import Module, ModuleList, Param, PretrainedModel
from refldm.checkpoints.weights import WeightsError

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput", "CLIPTextWithProjectionConfig",
           "CLIPTextModelWithProjection", "CLIPTextModelOutput"]

# Activation functions by transformers' ``hidden_act`` name (transformers.activations.ACT2FN).
ACTIVATIONS = {
    "quick_gelu": F.quick_gelu,                                    # x * sigmoid(1.702 x): OpenAI CLIP, SD 1.x
    "gelu": F.gelu,                                                # exact erf GELU: OpenCLIP, SD 2.x
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),           # tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

# Config keys that do not change the forward pass: bookkeeping, training-only settings (dropout,
# initialisation), the token ids the tokenizer (not the model) uses, the projection of
# CLIPTextModelWithProjection, and the generic PretrainedConfig keys transformers 4 wrote into every file.
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "name_or_path",
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "gradient_checkpointing",
    "bos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "projection_dim",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "use_cache", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "tie_word_embeddings", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "task_specific_params", "problem_type", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
)

LEGACY_PREFIX = "text_model."  # transformers 4 wrapped the model in a `text_model` attribute
POSITION_IDS = "embeddings.position_ids"  # a constant arange that transformers < 4.31 saved as a buffer


@dataclass
class CLIPTextConfig:
    """The keys of a transformers ``CLIPTextConfig`` that the forward pass reads (transformers' defaults).

    eos_token_id picks the pooled position: 2 is the legacy value of the original OpenAI / SD configs
    and means "the largest id of each row" (CLIP's end-of-text token has the largest id); any other
    value means "the first position holding that id".
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not implemented in refldm "
                             f"(only {', '.join(repr(a) for a in ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id={self.eos_token_id!r} must be one integer")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r} must be a positive number")

    @classmethod
    def from_dict(cls, config: dict, where: str = "text encoder config") -> "CLIPTextConfig":
        """Parse a transformers config.json dict; any key refldm does not implement is a ConfigError."""
        config = dict(config)
        pruned = config.pop("pruned_heads", None)
        if pruned:
            raise ConfigError(f"{where}: pruned_heads={pruned!r} is not implemented in refldm (only {{}})")
        return parse_config(cls, config, ignored=IGNORED_KEYS, where=where)


@dataclass
class CLIPTextOutput:
    """What `CLIPTextModel` returns (transformers' BaseModelOutputWithPooling, by the same field names).

    last_hidden_state: (B, L, D), after the final layer norm.
    pooler_output: (B, D), last_hidden_state at each row's end-of-text position.
    hidden_states: None, or (embeddings, output of layer 1, ..., output of layer N), N + 1 arrays of
        (B, L, D), when ``output_hidden_states=True``. They are taken *before* the final layer norm, so
        ``hidden_states[-1]`` is not ``last_hidden_state``; clip-skip k uses
        ``text_model.final_layer_norm(hidden_states[-(k + 1)])`` (see docs/text_encoder.md).
    """

    last_hidden_state: object
    pooler_output: object
    hidden_states: tuple | None = None

    def __getitem__(self, i):
        """Index like transformers' output tuple: [0] last_hidden_state, [1] pooler_output."""
        return (self.last_hidden_state, self.pooler_output)[i]


# --------------------------------------------------------------------------------------------------------
# Leaves


# --------------------------------------------------------------------------------------------------------
# Blocks


class CLIPTextEmbeddings(Module):
    """x_0[b, i] = token_embedding[ids[b, i]] + position_embedding[i]: learned absolute positions."""

    def __init__(self, c: CLIPTextConfig):
        self.token_embedding = Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids):
        xp = backend.array_namespace(input_ids)
        length = input_ids.shape[-1]
        positions = xp.arange(length)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d) + M) V per head, then out_proj.

    Q = x Wq^T + bq (likewise K, V), split into H heads of d = D / H features; M is the causal mask
    (token i attends to keys j <= i) plus the padding mask, given additively. causal=False (CLIP's
    vision tower, refldm/models/clip_vision.py): M = 0, every token sees every token.
    """

    def __init__(self, c: CLIPTextConfig, causal: bool = True):
        d = c.hidden_size
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.q_proj = Linear(d, d)
        self.out_proj = Linear(d, d)
        self.heads = c.num_attention_heads
        self.scale = (d // c.num_attention_heads) ** -0.5  # as transformers: head_dim ** -0.5
        self.causal = causal

    def forward(self, x, additive_mask=None, query_sees_keys=None):
        """x (B, L, D) -> (B, L, D).

        additive_mask: None for the causal mask alone (no padding), else M itself, (B, 1, L, L): 0 where
        query i may attend to key j, -inf where not (causal and padding together; see
        `CLIPTextModel._additive_mask`). query_sees_keys: None, or a boolean (B, 1, L, 1) that is False for
        the queries that see no key at all (left padding): their output is set to zero, as PyTorch's
        scaled_dot_product_attention gives.
        """
        q = F.split_heads(self.q_proj(x), self.heads)  # (B, L, D) -> (B, H, L, d)
        k = F.split_heads(self.k_proj(x), self.heads)
        v = F.split_heads(self.v_proj(x), self.heads)
        if additive_mask is None:  # no padding mask: the causal mask alone (or none, for the vision tower)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        else:  # (B, 1, L, L), causal and padding together
            o = F.scaled_dot_product_attention(q, k, v, mask=additive_mask, scale=self.scale)
        if query_sees_keys is not None:  # queries that see no key at all get a zero output
            xp = backend.array_namespace(o)
            o = xp.where(query_sees_keys, o, xp.zeros((), dtype=o.dtype))
        return self.out_proj(F.merge_heads(o))  # (B, H, L, d) -> (B, L, D)


class CLIPMLP(Module):
    """The feed-forward block: fc2(act(fc1(x))), D -> intermediate_size -> D."""

    def __init__(self, c: CLIPTextConfig):
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.activation = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(Module):
    """A pre-LN transformer layer: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, c: CLIPTextConfig, causal: bool = True):
        self.self_attn = CLIPAttention(c, causal)
        self.layer_norm1 = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = LayerNorm(c.hidden_size, c.layer_norm_eps)

    def forward(self, x, additive_mask=None, query_sees_keys=None):
        x = x + self.self_attn(self.layer_norm1(x), additive_mask, query_sees_keys)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    """The stack of N layers: returns (output of the last layer, [output of each layer])."""

    def __init__(self, c: CLIPTextConfig, causal: bool = True):
        self.layers = ModuleList([CLIPEncoderLayer(c, causal) for _ in range(c.num_hidden_layers)])

    def forward(self, x, additive_mask=None, query_sees_keys=None):
        outputs = []
        for layer in self.layers:
            x = layer(x, additive_mask, query_sees_keys)
            outputs.append(x)
        return x, outputs


# --------------------------------------------------------------------------------------------------------
# The model


class CLIPTextModel(PretrainedModel):
    """CLIP's text transformer; ``text_encoder(input_ids) -> CLIPTextOutput``.

        text_encoder = CLIPTextModel.from_pretrained("sd/text_encoder", dtype="float32")
        out = text_encoder(tokens["input_ids"], output_hidden_states=True)
        out.last_hidden_state    # (B, 77, D): what the U-Net cross-attends to
        out.hidden_states[-2]    # the penultimate layer, before the final layer norm (clip-skip)
    """

    def __init__(self, config: CLIPTextConfig):
        if isinstance(config, dict):
            config = CLIPTextConfig.from_dict(config)
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.assign_names()

    weights_stem = "model"  # transformers names the file model.safetensors

    @classmethod
    def parse_config(cls, config: dict, where: str) -> CLIPTextConfig:
        """config.json dict -> CLIPTextConfig; unsupported keys and values raise ConfigError."""
        return CLIPTextConfig.from_dict(config, where=where)

    def convert_keys(self, state: dict, source: str) -> dict:
        """Accept transformers 5 keys and transformers 4's ``text_model.*`` ones.

        A stored ``embeddings.position_ids`` buffer is dropped (transformers 5 drops it too and uses
        0..L-1); if it is not 0..L-1 a warning says so, as transformers 4 would have used it.
        """
        renamed = {}
        for key, value in state.items():
            bare = key[len(LEGACY_PREFIX):] if key.startswith(LEGACY_PREFIX) else key
            if bare in renamed:
                raise WeightsError(f"{source}: key {bare!r} appears both with and without the "
                                   f"{LEGACY_PREFIX!r} prefix")
            renamed[bare] = value
        ids = renamed.pop(POSITION_IDS, None)
        if ids is not None:
            flat = np.asarray(backend.to_numpy(ids)).reshape(-1)
            if not np.array_equal(flat, np.arange(flat.size)):
                warnings.warn(f"{source}: {POSITION_IDS} is not 0..{flat.size - 1}; it is ignored, as "
                              "transformers 5 ignores it (transformers 4 used it)", stacklevel=3)
        return renamed

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids: (B, L) or (L,) integer token ids (NumPy or on the active backend), L <= 77 (config).

        attention_mask: optional (B, L) of 1 (token) / 0 (padding); a padded key is hidden from every
        query, on top of the causal mask. A query that then sees no key at all (left padding) gets a
        zero attention output, as in PyTorch's scaled_dot_product_attention.
        """
        c = self.config
        ids = self._as_ids(input_ids)  # (B, L) on the weights' backend
        xp = backend.array_namespace(ids)
        additive_mask = query_sees_keys = None  # None: the causal mask alone
        if attention_mask is not None:
            additive_mask, query_sees_keys = self._additive_mask(attention_mask, ids.shape)

        x = self.embeddings(ids)  # (B, L) -> (B, L, D)
        h, layers = self.encoder(x, additive_mask, query_sees_keys)  # (B, L, D), and each layer's output
        last = self.final_layer_norm(h)  # (B, L, D)

        # pooled: the end-of-text position of each row
        if c.eos_token_id == 2:  # legacy configs: the largest id in the row (CLIP's <|endoftext|>)
            where = xp.argmax(ids, axis=-1)
        else:  # the first position holding eos_token_id (0 if there is none, as transformers)
            where = xp.argmax((ids == c.eos_token_id).astype(xp.int32), axis=-1)
        pooled = last[xp.arange(ids.shape[0]), where]  # (B, L, D) -> (B, D)

        hidden = tuple([x] + layers) if output_hidden_states else None
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)

    # -- textual inversion -------------------------------------------------------------------------------

    def resize_token_embeddings(self, rows, new_rows=None):
        """Keep the first `rows` rows of the token embedding table and append `new_rows` (n, D) after them, as
        transformers' ``resize_token_embeddings(rows + n)`` followed by writing the new rows (what
        diffusers' ``load_textual_inversion`` does): the new tokens get ids rows .. rows + n - 1."""
        table = self.embeddings.token_embedding.weight                       # (V, D)
        xp = backend.array_namespace(table)
        d = table.shape[1]
        extra = np.zeros((0, d)) if new_rows is None else np.asarray(backend.to_numpy(new_rows))
        if extra.ndim != 2 or extra.shape[1] != d:
            raise ValueError(f"CLIPTextModel: new embedding rows have shape {tuple(extra.shape)}; this text encoder "
                             f"is {d} wide, so they must be (n, {d})")
        if not 0 < rows <= table.shape[0]:
            raise ValueError(f"CLIPTextModel: cannot keep {rows} rows of a {table.shape[0]}-row embedding table")
        extra = backend.asarray(extra, dtype=table.dtype)
        self.embeddings.token_embedding.weight = xp.concatenate([table[:rows], extra], axis=0)  # (rows + n, D)
        self.config.vocab_size = rows + extra.shape[0]
        return self

    # -- input checks ------------------------------------------------------------------------------------

    def _as_ids(self, input_ids):
        """Put input_ids on the weights' backend as a (B, L) integer array, with one clear error if wrong."""
        weights = self.final_layer_norm.weight
        if isinstance(weights, Param):
            raise ValueError("CLIPTextModel: the weights are not loaded (use from_pretrained or load_state_dict)")
        if isinstance(input_ids, (list, tuple)):
            input_ids = np.asarray(input_ids)
        if not hasattr(input_ids, "dtype") or input_ids.dtype.kind not in "iu":
            kind = getattr(input_ids, "dtype", type(input_ids).__name__)
            raise ValueError(f"CLIPTextModel: input_ids must be integer token ids, got {kind}")
        if isinstance(input_ids, np.ndarray) and backend.array_namespace(weights) is not np:
            input_ids = backend.asarray(input_ids)  # host ids go to the device (an explicit copy)
        if input_ids.ndim == 1:
            input_ids = input_ids.reshape(1, -1)
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextModel: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        length, limit = input_ids.shape[1], self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"CLIPTextModel: input_ids has {length} tokens, more than max_position_embeddings="
                             f"{limit}; truncate the prompt (the tokenizer does, with truncation=True)")
        if length == 0:
            raise ValueError("CLIPTextModel: input_ids is empty (length 0); a tokenized prompt has at least "
                             "the start and end tokens")
        xp = backend.array_namespace(input_ids)
        low, high = int(xp.min(input_ids)), int(xp.max(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"CLIPTextModel: input_ids range [{low}, {high}] lies outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return input_ids

    def _additive_mask(self, attention_mask, shape):
        """The additive mask (B, 1, L, L) for a padding mask, and which queries see any key (or None).

        keep[b, i, j] = (j <= i) and attention_mask[b, j] == 1; mask = 0 where kept, -inf elsewhere.
        A query row with nothing kept (left padding) would be all -inf, a 0/0 softmax: its mask row is
        set to 0 instead and `query_sees_keys` marks it False, so the attention zeroes its output afterwards.
        """
        weights = self.final_layer_norm.weight
        if isinstance(attention_mask, (list, tuple)):
            attention_mask = np.asarray(attention_mask)
        if tuple(attention_mask.shape) != tuple(shape) and not (
                len(attention_mask.shape) == 1 and (1,) + tuple(attention_mask.shape) == tuple(shape)):
            raise ValueError(f"CLIPTextModel: attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(shape)}")
        if isinstance(attention_mask, np.ndarray) and backend.array_namespace(weights) is not np:
            attention_mask = backend.asarray(attention_mask)
        xp = backend.array_namespace(attention_mask, weights)
        am = attention_mask.reshape(shape)
        if not bool(xp.all((am == 0) | (am == 1))):
            raise ValueError("CLIPTextModel: attention_mask must hold only 0 (padding) and 1 (token)")
        b, length = shape
        causal = xp.arange(length).reshape(length, 1) >= xp.arange(length).reshape(1, length)  # (L, L): j <= i
        keep = causal.reshape(1, length, length) & (am != 0).reshape(b, 1, length)  # (B, L, L)
        seen = xp.any(keep, axis=-1, keepdims=True)  # (B, L, 1): does query i see any key?
        keep = keep | ~seen
        dtype = weights.dtype
        additive_mask = xp.where(keep, xp.zeros((), dtype=dtype), xp.asarray(-xp.inf, dtype=dtype))
        query_sees_keys = None if bool(xp.all(seen)) else seen.reshape(b, 1, length, 1)
        return additive_mask.reshape(b, 1, length, length), query_sees_keys


# --------------------------------------------------------------------------------------------------------
# The second SDXL text encoder: CLIP with its text projection


@dataclass
class CLIPTextWithProjectionConfig(CLIPTextConfig):
    """CLIPTextConfig plus ``projection_dim``, the width of the projected pooled output (text_embeds).

    SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14's text tower): hidden_size 1280, intermediate_size 5120,
    32 layers of 20 heads, gelu, projection_dim 1280 (694,659,840 parameters).
    """

    projection_dim: int = 512

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.projection_dim, int) or isinstance(self.projection_dim, bool) \
                or self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim!r} must be a positive integer")


@dataclass
class CLIPTextModelOutput:
    """What `CLIPTextModelWithProjection` returns (transformers' CLIPTextModelOutput, same field names).

    text_embeds: (B, projection_dim), the pooled output times text_projection (SDXL's pooled embedding).
    last_hidden_state: (B, L, D) after the final layer norm. hidden_states: as in `CLIPTextOutput`.
    """

    text_embeds: object
    last_hidden_state: object
    hidden_states: tuple | None = None

    def __getitem__(self, i):
        """Index like transformers' output tuple: [0] text_embeds, [1] last_hidden_state."""
        return (self.text_embeds, self.last_hidden_state)[i]


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text transformer and its projection into the joint image-text space (transformers'
    ``CLIPTextModelWithProjection``); SDXL's second text encoder.

        text_embeds = pooler_output W_proj^T        # (B, D) -> (B, projection_dim), no bias

    Keys: the `CLIPTextModel` keys (stored under ``text_model.`` by transformers 4 and 5 alike) and
    ``text_projection.weight`` (projection_dim, D).
    """

    def __init__(self, config: CLIPTextWithProjectionConfig):
        if isinstance(config, dict):
            config = CLIPTextWithProjectionConfig.from_dict(config)
        super().__init__(config)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)
        self.assign_names()

    @classmethod
    def parse_config(cls, config: dict, where: str) -> CLIPTextWithProjectionConfig:
        return CLIPTextWithProjectionConfig.from_dict(config, where=where)

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextModelOutput:
        """As `CLIPTextModel.forward`; returns text_embeds (B, projection_dim) instead of pooler_output."""
        out = super().forward(input_ids, attention_mask, output_hidden_states)
        text_embeds = self.text_projection(out.pooler_output)          # (B, D) -> (B, projection_dim)
        return CLIPTextModelOutput(text_embeds=text_embeds, last_hidden_state=out.last_hidden_state,
                                   hidden_states=out.hidden_states)
