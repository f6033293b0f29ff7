"""Textual inversion (Gal et al., 2022, "An Image is Worth One Word"): new words for the text encoder.

An embedding file holds n vectors of the text encoder's width D, learned for a new token. Loading it
does what diffusers' ``load_textual_inversion`` does:

    tokens  = [t] if n == 1 else [t, t_1, ..., t_{n-1}]          # t_i: the token with "_i" appended
    ids     = len(tokenizer) .. len(tokenizer) + n - 1            # the next free ids, in that order
    table   = [table[:len(tokenizer)]; vectors]                   # token_embedding.weight: (V, D) -> (V + n, D)

and a prompt that names t is read as "t t_1 ... t_{n-1}" (diffusers' ``maybe_convert_prompt``: every
occurrence of t in the prompt string is replaced), so the n vectors enter the text encoder side by side,
each taking one of the 77 positions. Nothing else changes: x_0[i] = table[id_i] + position[i] as for any word.

File formats (safetensors only; a .pt / .bin embedding is refused unopened, as checkpoints are):
- diffusers ``learned_embeds.safetensors``: one key, the token, holding (D,) or (n, D);
- the web UI's safetensors: ``emb_params`` (n, D), the token being the file's name without extension;
- SDXL embeddings: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280), one per text encoder; refldm's pipeline
  has SD 1.x / 2.x's single text encoder and takes the entry whose width fits it (``clip_l`` for 768).

docs/adapters.md has the details.
"""

from __future__ import annotations

import os

import numpy as np

from refldm.checkpoints.weights import WeightsError, load_file, refuse_pickle

# The largest |value| an embedding vector may hold: float16's largest finite number. Word embeddings of a
# trained CLIP are of order 0.01-1; 65504 is already far outside anything learned.
MAX_EMBEDDING_VALUE = 65504.0

__all__ = ["load_embedding", "load_textual_inversion", "expand_prompt", "TextualInversionError"]


class TextualInversionError(WeightsError):
    """An embedding file that refldm cannot read or that does not fit the text encoder / tokenizer."""


def load_embedding(path, token: str | None = None, width: int | None = None) -> tuple[str, np.ndarray]:
    """Read an embedding file -> (token, vectors (n, D) float32). `token` overrides the file's own name;
    `width` (the text encoder's D) picks ``clip_l`` or ``clip_g`` from an SDXL file."""
    path = os.fspath(path)
    refuse_pickle(path)
    state = load_file(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if "emb_params" in state:                                           # the web UI's format
        name, vectors = stem, state["emb_params"]
    elif "clip_l" in state or "clip_g" in state:                       # SDXL: one entry per text encoder
        fits = [k for k in ("clip_l", "clip_g") if k in state and width in (None, state[k].shape[-1])]
        if not fits:
            widths = ", ".join(f"{k} {state[k].shape[-1]}" for k in ("clip_l", "clip_g") if k in state)
            raise TextualInversionError(f"{path}: an SDXL embedding ({widths} wide); no entry fits this text "
                                        f"encoder's width {width}")
        name, vectors = stem, state[fits[0]]
    elif len(state) == 1:                                               # diffusers: {token: vectors}
        name, vectors = next(iter(state.items()))
    else:
        raise TextualInversionError(f"{path}: not a textual-inversion embedding: expected one key (diffusers), "
                                    "emb_params (web UI) or clip_l / clip_g (SDXL); found "
                                    f"{', '.join(sorted(state)[:4])}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]                                         # (D,) -> (1, D)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise TextualInversionError(f"{path}: the embedding has shape {tuple(vectors.shape)}; expected (D,) or (n, D)")
    if not np.all(np.isfinite(vectors)):
        raise TextualInversionError(f"{path}: the embedding holds NaN or inf")
    largest = float(np.max(np.abs(vectors)))
    if largest > MAX_EMBEDDING_VALUE:
        raise TextualInversionError(f"{path}: the embedding holds a value of magnitude {largest:.3g}, over "
                                    f"{MAX_EMBEDDING_VALUE:g} (it would overflow the text encoder's float16 "
                                    "arithmetic; a trained embedding's values are of order 1)")
    token = name if token is None else token
    if not isinstance(token, str) or not token.strip() or token != token.strip() or any(c.isspace() for c in token):
        raise TextualInversionError(f"{path}: token {token!r} must be a non-empty word without spaces "
                                    "(give another with token=...)")
    return token, vectors


def load_textual_inversion(pipe, path, token: str | None = None) -> list[str]:
    """Add the embedding's tokens to ``pipe.tokenizer`` and its vectors to ``pipe.text_encoder`` (or to the
    `tokenizer` / `text_encoder` attributes of any object having both). Returns the tokens added.

    Everything is checked before anything changes: the width, and that no token is in the vocabulary yet.
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    width = text_encoder.config.hidden_size
    token, vectors = load_embedding(path, token, width)
    if vectors.shape[1] != width:
        raise TextualInversionError(f"{os.fspath(path)}: the embedding is {vectors.shape[1]} wide but the text "
                                    f"encoder is {width} wide (an embedding for another model?)")
    tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    taken = [t for t in tokens if t in tokenizer.vocab]
    if taken:
        raise TextualInversionError(f"{os.fspath(path)}: token {taken[0]!r} is already in the vocabulary; "
                                    "give another token name (token=...)")
    rows = len(tokenizer)
    if text_encoder.config.vocab_size < rows:
        raise TextualInversionError(f"the text encoder has {text_encoder.config.vocab_size} embedding rows, fewer "
                                    f"than the tokenizer's {rows} tokens")
    text_encoder.resize_token_embeddings(rows, vectors)                 # (V, D) -> (V + n, D)
    tokenizer.add_tokens(tokens)                                        # ids V .. V + n - 1
    return tokens


def expand_prompt(tokenizer, prompt: str) -> str:
    """diffusers' ``maybe_convert_prompt``: each added token t of the prompt with vectors t_1, t_2, ... is
    replaced, everywhere in the string, by "t t_1 t_2 ..." (a single-vector token stays as it is)."""
    added = tokenizer.added_tokens_encoder
    if not added:
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt
