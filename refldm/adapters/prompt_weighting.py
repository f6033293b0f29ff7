"""The AUTOMATIC1111 web UI's prompt syntax: attention weights, BREAK and prompts longer than 75 tokens.

Opt-in (``pipe(..., prompt_syntax="webui")``, ``refldm txt2img --prompt-syntax webui``); the default is
diffusers' plain behaviour (one 77-token window, longer prompts cut). The algorithm, as the web UI's
``prompt_parser.parse_prompt_attention`` and ``sd_hijack_clip`` do it (docs/adapters.md has it with shapes):

1. Parse the prompt into (text, weight) pieces (`parse_prompt_attention`):
       (x)  multiplies the weight of x by 1.1        [x]  divides it by 1.1
       (x:w) multiplies it by w                        \\( \\) \\[ \\] \\\\  are the literal characters
   Brackets nest multiplicatively: ((x)) is 1.21. A ")" or "]" with nothing open is literal text; a "(" or
   "[" never closed applies to the end of the prompt; ":w)" without an open "(" is literal text. A lone
   backslash before any other character vanishes. "BREAK" (a whole word) becomes the marker ("BREAK", -1).
   Adjacent pieces of equal weight are joined; an empty prompt is [("", 1.0)].
2. Tokenize each piece on its own (no start / end token, no truncation) and lay the tokens out in chunks
   of 75, each token keeping its piece's weight. A chunk that would overflow starts a new one; if a comma
   lies within the last 20 tokens of the full chunk, the tokens after it move to the next chunk (the web
   UI's comma_padding_backtrack = 20). BREAK closes the current chunk. Each chunk is padded with the end
   token to 75 and wrapped: [start] + 75 + [end] = 77 tokens, weights 1.0 at the wrapped ends. (SD 2.x, whose
   padding token differs from the end token: everything after the first end token becomes padding.)
3. Encode each chunk with the text encoder: z (77, D), the last hidden state, or with clip_skip k
   final_layer_norm(hidden_states[-(k + 1)]) (diffusers' counting: k = 1 is the penultimate layer; the web
   UI calls it "Clip skip 2").
4. Weight and restore the mean (the web UI's "Original" emphasis), per chunk:
       m = mean(z);  z' = z * w[:, None];  z'' = z' * (m / mean(z'))
5. Concatenate the chunks along the sequence: (77 * n_chunks, D). Cond and uncond with different chunk
   counts: the shorter one gets empty chunks ([start] + 76 x [end], weights 1), encoded the same way
   (the web UI's "pad prompt/negative prompt to be same length" option).

Textual-inversion tokens are cut out whole by the tokenizer (refldm/adapters/textual_inversion.py) and expanded to
their n tokens before parsing, as diffusers does; the web UI keeps an embedding's vectors in one chunk,
refldm lets a chunk boundary fall between them (a difference only for prompts over 75 tokens).
"""

from __future__ import annotations

import re

import numpy as np

from refldm import backend

__all__ = ["parse_prompt_attention", "chunk_tokens", "chunk_length", "encode_weighted", "encode_prompts", "PromptSyntaxError"]

ROUND, SQUARE = 1.1, 1 / 1.1
CHUNK = 75                 # prompt tokens per chunk for a 77-position text encoder; + start + end = 77
# The largest |weight| (after nesting): far beyond any useful emphasis (the web UI's useful range is about
# 0-2), and small enough that weight * z (CLIP's states reach about 30) stays finite even in float16's
# neighbour float32 arithmetic. A larger one is refused, never turned into inf downstream.
MAX_WEIGHT = 1e6
COMMA_BACKTRACK = 20       # the web UI's default comma_padding_backtrack
# One token of the syntax per match, tried in this order: the escapes, a lone backslash, the openers,
# ":w)" (a weight closing a round bracket, spaces allowed around w), the closers, a run of plain text, ":".
TOKENS = re.compile(r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\
  | \( | \[
  | :\s*([+-]?[.\d]+)\s*\)
  | \) | ]
  | [^\\()\[\]:]+
  | :
""", re.X)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


class PromptSyntaxError(ValueError):
    """A weighted prompt refldm cannot read (a weight that is not a number)."""


def parse_prompt_attention(text: str) -> list:
    """A prompt -> [[text, weight], ...] by the web UI's rules (module docstring, step 1)."""
    pieces = []                 # [text, weight]; ["BREAK", -1] marks a BREAK
    rounds, squares = [], []    # where each open bracket began (an index into pieces)

    def scale_from(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in TOKENS.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])        # "\(" -> "(", "\\" -> "\", a lone "\" -> ""
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                value = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"prompt weight {weight!r} in {token!r} is not a number") from None
            if not abs(value) <= MAX_WEIGHT:
                raise PromptSyntaxError(f"prompt weight {weight!r} in {token!r} is out of range: a weight's "
                                        f"magnitude must be at most {MAX_WEIGHT:g}")
            scale_from(rounds.pop(), value)
        elif token == ")" and rounds:
            scale_from(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale_from(squares.pop(), SQUARE)
        else:                                       # plain text (also an unmatched ")", "]" or ":w)")
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in rounds:                            # brackets never closed reach to the end
        scale_from(start, ROUND)
    for start in squares:
        scale_from(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    for text_piece, weight in pieces:               # nested weights multiply: ((x:1e4):1e4) is 1e8
        if weight != -1 and not abs(weight) <= MAX_WEIGHT:
            raise PromptSyntaxError(f"prompt weight {weight:g} of {text_piece.strip()!r} (nested brackets "
                                    f"multiply) is out of range: at most {MAX_WEIGHT:g}")
    merged = [pieces[0]]
    for piece in pieces[1:]:                        # join neighbours of equal weight
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def chunk_tokens(tokenizer, prompt: str, backtrack: int = COMMA_BACKTRACK, chunk: int = CHUNK) -> list:
    """A prompt -> [(ids (chunk + 2,), weights (chunk + 2,)), ...], one pair per chunk (module docstring,
    step 2). `chunk` is the text encoder's positions minus 2 (75 for CLIP's 77; `chunk_length`)."""
    CHUNK = chunk  # noqa: N806  (the module docstring's 75, for this text encoder)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.vocab.get(",</w>")
    pieces = parse_prompt_attention(prompt)
    chunks, ids, weights = [], [], []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        chunks.append(([bos] + ids + [eos] * pad + [eos], [1.0] + weights + [1.0] * pad + [1.0]))
        ids, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if text == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenizer.encode(text, add_special_tokens=False):
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1                 # move what follows the comma to the next chunk
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    pad_id = tokenizer.pad_token_id
    if pad_id != eos:                                # SD 2.x: padding after the first end token
        for chunk_ids, _ in chunks:
            first = chunk_ids.index(eos)
            chunk_ids[first + 1:] = [pad_id] * (len(chunk_ids) - first - 1)
    return chunks


def _encode_ids(text_encoder, ids, clip_skip):
    """ids (N, 77) -> (N, 77, D): the last hidden state, or final_layer_norm(hidden_states[-(k + 1)])."""
    if not clip_skip:
        return text_encoder(ids).last_hidden_state
    out = text_encoder(ids, output_hidden_states=True)
    return text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def chunk_length(tokenizer, text_encoder) -> int:
    """Prompt tokens per chunk: the text encoder's positions (and the tokenizer's length) minus start and end
    (75 for SD's 77; 30 for the built-in model's 32)."""
    positions = getattr(text_encoder.config, "max_position_embeddings", CHUNK + 2)
    return min(positions, getattr(tokenizer, "model_max_length", positions) or positions) - 2


def encode_weighted(tokenizer, text_encoder, prompt: str, clip_skip: int | None = None, chunks: int = 0):
    """One prompt -> (L * n, D) by steps 2-5 (L = 77 for SD); `chunks` pads with empty chunks up to that many."""
    CHUNK = chunk_length(tokenizer, text_encoder)  # noqa: N806
    pairs = chunk_tokens(tokenizer, prompt, chunk=CHUNK)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while len(pairs) < chunks:                       # empty chunk: [start] + 76 x [end], weights 1
        empty = [bos] + [eos] * (CHUNK + 1)
        if tokenizer.pad_token_id != eos:
            empty = [bos, eos] + [tokenizer.pad_token_id] * CHUNK
        pairs.append((empty, [1.0] * (CHUNK + 2)))
    ids = np.asarray([p[0] for p in pairs], dtype=np.int64)                  # (n, 77)
    z = _encode_ids(text_encoder, ids, clip_skip)                           # (n, 77, D)
    xp = backend.array_namespace(z)
    w = backend.asarray(np.asarray([p[1] for p in pairs]), dtype=z.dtype)   # (n, 77)
    mean = xp.mean(z, axis=(1, 2), keepdims=True)                           # (n, 1, 1): per chunk
    weighted = z * w[:, :, None]
    weighted = weighted * (mean / xp.mean(weighted, axis=(1, 2), keepdims=True))
    return weighted.reshape(1, -1, z.shape[-1])                             # (1, 77 n, D)


def encode_prompts(pipe, prompts: list, negatives: list | None, syntax: str = "webui",
                   clip_skip: int | None = None):
    """(cond (B, L, D), uncond (B, L, D) or None) for the pipeline, by `syntax` ("webui" or "plain").

    "plain" is diffusers' encoding (77 tokens, truncated), with clip_skip as diffusers' ``clip_skip``, which
    diffusers applies to the prompts and not to the negative prompts. "webui" encodes every prompt, negative
    ones too, by the algorithm above (clip_skip for both, as the web UI); all rows get the same chunk count.
    """
    if syntax not in ("webui", "plain"):
        raise ValueError(f"prompt_syntax={syntax!r}; choose 'plain' (diffusers) or 'webui' (AUTOMATIC1111)")
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0 or
                                  clip_skip >= pipe.text_encoder.config.num_hidden_layers):
        raise ValueError(f"clip_skip={clip_skip!r} must be an integer from 0 to "
                         f"{pipe.text_encoder.config.num_hidden_layers - 1} (the layers to skip from the end)")
    if syntax == "plain":  # as diffusers' encode_prompt, which applies clip_skip to the prompt only
        cond = _encode_ids(pipe.text_encoder, pipe.tokenize(list(prompts)), clip_skip)      # (B, 77, D)
        uncond = None if negatives is None else _encode_ids(pipe.text_encoder, pipe.tokenize(list(negatives)), None)
        return cond, uncond
    from refldm.adapters.textual_inversion import expand_prompt
    texts = [expand_prompt(pipe.tokenizer, p) for p in list(prompts) + list(negatives or [])]
    length = chunk_length(pipe.tokenizer, pipe.text_encoder)
    n = max(len(chunk_tokens(pipe.tokenizer, t, chunk=length)) for t in texts)
    rows = [encode_weighted(pipe.tokenizer, pipe.text_encoder, t, clip_skip, chunks=n) for t in texts]
    z = backend.array_namespace(rows[0]).concatenate(rows, axis=0)           # (B or 2B, 77 n, D)
    b = len(prompts)
    return z[:b], (z[b:] if negatives is not None else None)
