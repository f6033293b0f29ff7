"""CLIP's byte-level BPE tokenizer, giving the same ids as transformers' ``CLIPTokenizer``.

From a prompt to token ids, in five steps (docs/text_encoder.md has the long version):

1. Special tokens. The folder's start / end / padding / unknown token strings (``<|startoftext|>``,
   ``<|endoftext|>``, and for SD 2.x the padding token ``!``) are cut out of the raw text first and map
   straight to their ids.
2. Normalisation of the rest: Unicode NFC, every run of whitespace becomes one space, and each
   character is lower-cased on its own (no context rules: a final capital sigma becomes σ, not ς).
3. Pre-tokenisation into words with CLIP's pattern, tried at each position in this order:
   ``<|startoftext|>``, ``<|endoftext|>``, the contractions ``'s 't 're 've 'm 'll 'd``, a run of letters
   (Unicode category L*), one digit (category N*), a run of anything else but whitespace. Whitespace
   only separates. (transformers writes the pattern with ``\\p{L}`` / ``\\p{N}``; Python's ``re`` has no
   such classes, so `_scan` walks the characters and asks `unicodedata` for their categories.)
4. Byte-level BPE on each word: its UTF-8 bytes become printable characters (`bytes_to_unicode`), the
   last one gets the end-of-word mark ``</w>``, and adjacent symbols are merged pairwise, lowest merge
   rank first (merges.txt order), until no listed pair is left. Every word then is a few vocabulary
   entries; every byte has one, so nothing is ever out of vocabulary.
5. ``<|startoftext|>`` + ids + ``<|endoftext|>``, truncated to ``model_max_length`` (77) and padded
   with the folder's padding token.

The files are those transformers writes: either tokenizer.json (what transformers 5 saves: the `tokenizers`
library's one file, whose BPE "model" holds the vocabulary and the merges; its normaliser and
pre-tokeniser must be CLIP's, else the folder is refused), or the older vocab.json ({token: id}) +
merges.txt (``#version`` line, then one "left right" pair per line, best first); and
tokenizer_config.json / special_tokens_map.json (special tokens, model_max_length). tokenizer.json wins
when both are there, as in transformers. NumPy and the standard library only.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from functools import lru_cache

import numpy as np

from refldm.backend import to_numpy

__all__ = ["CLIPTokenizer", "TokenizerError", "bytes_to_unicode", "clip_vocab"]

END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# CLIP's pattern names these two strings before anything else; a match is then split by the byte-level
# pre-tokenizer's GPT-2 pattern into "<|", the word, "|>" (only reached when the text spells them in
# another case, e.g. "<|EndOfText|>", since exact occurrences are cut out as special tokens first).
PATTERN_SPECIALS = {"<|startoftext|>": ("<|", "startoftext", "|>"), "<|endoftext|>": ("<|", "endoftext", "|>")}
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # transformers' defaults
NO_LIMIT = int(1e30)  # transformers' model_max_length when the folder sets none
MAX_LENGTH = 1 << 16  # the longest sequence a tokenizer may pad to (text encoders have 77-512 positions)


from refldm.errors import TokenizerError  # one home for the error classes


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """The byte -> printable character table of GPT-2 / CLIP byte-level BPE.

    The 188 printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    (controls, space, soft hyphen, ...) are shifted to U+0100, U+0101, ... in byte order. Every byte gets
    a visible character, so a BPE vocabulary of strings covers arbitrary UTF-8.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table  # printable bytes first, then the shifted ones: CLIP's vocabulary order


def clip_vocab(merges) -> list:
    """The vocabulary that CLIP's merges imply, in CLIP's id order: the 256 byte characters, the same
    with </w>, each merge joined (a merge whose result is already there adds nothing), then
    <|startoftext|> and <|endoftext|>. Token i of the list has id i."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + END_OF_WORD for c in chars]
    seen = set(vocab)
    for left, right in merges:
        if left + right not in seen:
            vocab.append(left + right)
            seen.add(left + right)
    return vocab + ["<|startoftext|>", "<|endoftext|>"]


# --------------------------------------------------------------------------------------------------------
# Character classes and the text steps 2 and 3


def _is_space(ch: str) -> bool:
    """Unicode White_Space (what \\s means in transformers' regex engine): str.isspace() without the
    four information separators U+001C..U+001F, which Python counts as space and Unicode does not."""
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


def _is_letter(ch: str) -> bool:
    """\\p{L}: categories Lu, Ll, Lt, Lm, Lo."""
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    """\\p{N}: categories Nd, Nl, No."""
    return unicodedata.category(ch)[0] == "N"


def normalize(text: str) -> str:
    """Step 2: NFC, then each whitespace run -> " ", then per-character lower case."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for ch in text:
        if _is_space(ch):
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch.lower())
            in_space = False
    return "".join(out)


def _scan(text: str) -> list:
    """Step 3: split normalised text into words by CLIP's pattern (see the module docstring)."""
    words, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if _is_space(ch):
            i += 1
            continue
        if ch == "<":
            special = next((s for s in PATTERN_SPECIALS if text.startswith(s, i)), None)
            if special:
                words.extend(PATTERN_SPECIALS[special])
                i += len(special)
                continue
        if ch == "'":
            contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if contraction:
                words.append(contraction)
                i += len(contraction)
                continue
        j = i + 1
        if _is_letter(ch):  # a run of letters
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(ch):  # a run of what is neither space, letter nor number (one digit stays alone)
            while j < n and not (_is_space(text[j]) or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


# --------------------------------------------------------------------------------------------------------
# The tokenizer


class CLIPTokenizer:
    """``tokenizer(prompts, padding="max_length", return_tensors="np")["input_ids"]`` -> (B, 77) int64.

    Attributes as transformers': vocab ({token: id}), model_max_length, bos_token / eos_token /
    pad_token / unk_token and their *_id.
    """

    def __init__(self, vocab: dict, merges: list, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length: int = 77,
                 source: str = "tokenizer"):
        self.vocab = dict(vocab)
        self.decoder = {i: t for t, i in self.vocab.items()}
        if len(self.decoder) != len(self.vocab):
            raise TokenizerError(f"{source}: vocab.json maps two tokens to the same id")
        self.ranks = {}
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise TokenizerError(f"{source}: merge #{rank + 1} {left!r} {right!r}: {part!r} is not in "
                                         "vocab.json")
            self.ranks[(left, right)] = rank  # a pair listed twice keeps its last rank, as in transformers
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token not in self.vocab:
                raise TokenizerError(f"{source}: {name} {token!r} is not in vocab.json")
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or not (
                2 <= model_max_length <= MAX_LENGTH or model_max_length == NO_LIMIT):
            raise TokenizerError(f"{source}: model_max_length={model_max_length!r} must be an integer >= 2")
        self.model_max_length = model_max_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # special strings are cut out longest first, so that of two starting at one place the longer wins
        self.special_tokens = sorted({bos_token, eos_token, pad_token, unk_token}, key=lambda s: (-len(s), s))
        self.cache = {}

    # -- the ids of the special tokens, as in transformers
    bos_token_id = property(lambda self: self.vocab[self.bos_token])
    eos_token_id = property(lambda self: self.vocab[self.eos_token])
    pad_token_id = property(lambda self: self.vocab[self.pad_token])
    unk_token_id = property(lambda self: self.vocab[self.unk_token])
    all_special_ids = property(lambda self: sorted({self.vocab[t] for t in self.special_tokens}))

    def __len__(self):
        return len(self.vocab)

    @classmethod
    def from_pretrained(cls, folder) -> "CLIPTokenizer":
        """Read a transformers tokenizer folder: vocab.json, merges.txt, tokenizer_config.json and
        special_tokens_map.json (the latter overrides the former, as in transformers)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise TokenizerError(f"{folder}: no such tokenizer folder")
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        fast_path = os.path.join(folder, "tokenizer.json")
        added_fast = {}
        if os.path.isfile(fast_path):  # what transformers 5 writes (and what it reads first when present)
            vocab, merges, added_fast = _read_tokenizer_json(fast_path)
        elif not os.path.isfile(vocab_path) and not os.path.isfile(merges_path):
            raise TokenizerError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt (is it a tokenizer "
                                 "folder?)")
        else:
            vocab = _read_json(vocab_path, required=True)
            if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                       for k, v in vocab.items()):
                raise TokenizerError(f"{vocab_path}: expected a JSON object of {{token: integer id}}")
            merges = _read_merges(merges_path)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        tokens = {}
        for name, default in DEFAULT_SPECIALS.items():
            value = special_map.get(name, config.get(name, default))
            tokens[name] = value.get("content") if isinstance(value, dict) else value
            if not isinstance(tokens[name], str):
                raise TokenizerError(f"{folder}: {name} {value!r} is not a token string")
        _check_added_tokens(folder, config, vocab, added_fast)
        limit = config.get("model_max_length", NO_LIMIT)
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= NO_LIMIT:
            limit = NO_LIMIT  # transformers' "no limit" (int(1e30), written as 1e30 or 1000000000000000019884624838656)
        elif not isinstance(limit, int) or isinstance(limit, bool) or not 2 <= limit <= MAX_LENGTH:
            raise TokenizerError(f"{os.path.join(folder, 'tokenizer_config.json')}: model_max_length="
                                 f"{_short(limit)} must be an integer from 2 to {MAX_LENGTH} (or transformers' "
                                 "1e30 for no limit)")
        return cls(vocab, merges, model_max_length=limit, source=folder, **tokens)

    # -- text -> tokens -> ids

    def bpe(self, word: str) -> tuple:
        """Step 4 on one word already mapped to byte characters: the merged symbols, last with </w>."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            # the adjacent pair that was learned first (lowest rank)
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self.cache) < 100_000:
            self.cache[word] = result
        return result

    def tokenize(self, text: str) -> list:
        """The BPE tokens of `text` (special token strings kept whole), without start / end tokens."""
        tokens = []
        for piece, is_special in self._split_specials(text):
            if is_special:
                tokens.append(piece)
                continue
            for word in _scan(normalize(piece)):
                tokens.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return tokens

    def convert_tokens_to_ids(self, tokens):
        """A token -> its id (the unknown token's id if absent); a list maps element-wise."""
        if isinstance(tokens, str):
            return self.vocab.get(tokens, self.unk_token_id)
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        """An id -> its token; a list maps element-wise."""
        if isinstance(ids, (int, np.integer)):
            return self._token(int(ids))
        return [self._token(int(i)) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None) -> list:
        """The ids of one text: [bos] + BPE ids + [eos], truncated to max_length if truncation is set."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if truncation:
            limit = self._limit(max_length) - (2 if add_special_tokens else 0)
            if limit < 0:
                raise TokenizerError(f"CLIPTokenizer: max_length={max_length} leaves no room for the start and "
                                     "end tokens")
            if len(ids) > limit:
                dropped = self.decode(ids[limit:])
                dropped = dropped if len(dropped) <= 80 else dropped[:77] + "..."
                warnings.warn(f"CLIPTokenizer: the prompt is {len(ids)} tokens long but only {limit} fit "
                              f"(max_length {self._limit(max_length)}); truncated, dropping: {dropped!r}",
                              stacklevel=3)
                ids = ids[:limit]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text, padding="max_length", max_length: int | None = None, truncation: bool = True,
                 return_tensors: str | None = "np", add_special_tokens: bool = True) -> dict:
        """Tokenize a prompt or a list of prompts -> {"input_ids", "attention_mask"}.

        padding: "max_length" (to max_length, default model_max_length), "longest" or True (to the
        longest in the batch), False / "do_not_pad". truncation: cut to max_length (default
        model_max_length), with a warning when something is cut. return_tensors: "np" gives (B, L)
        int64 arrays (B = 1 for one prompt), None gives lists (a flat list for one prompt).
        """
        return tokenize_batch(self, "CLIPTokenizer", text, padding, max_length, truncation, return_tensors,
                              add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: tokens joined, byte characters back to UTF-8, each </w> a space, stripped."""
        ids = np.asarray(to_numpy(ids)).reshape(-1).tolist() if hasattr(ids, "shape") else list(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        chars = "".join(self._token(int(i)) for i in ids if int(i) not in skip)
        data = bytes(self.byte_decoder[c] for c in chars if c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list:
        """decode() for each row."""
        return [self.decode(row, skip_special_tokens) for row in sequences]

    # -- added tokens (textual inversion), as transformers' ``add_tokens``

    @property
    def added_tokens_encoder(self) -> dict:
        """{added token: id} for the tokens added with `add_tokens`, in the order they were added."""
        return dict(self.__dict__.get("_added", {}))

    def add_tokens(self, tokens) -> int:
        """Add tokens to the vocabulary with the next free ids (len(vocab), len(vocab) + 1, ...); each is then
        cut out of the text whole, before normalisation and BPE, as the special tokens are. Returns how many
        were added; a token already in the vocabulary is an error (nothing is added then)."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise TokenizerError(f"CLIPTokenizer: cannot add {token!r}: a token is a non-empty string")
            if token in self.vocab or tokens.count(token) > 1:
                raise TokenizerError(f"CLIPTokenizer: token {token!r} is already in the vocabulary (id "
                                     f"{self.vocab.get(token, 'given twice')}); choose another token name")
        added = self.__dict__.setdefault("_added", {})
        for token in tokens:
            added[token] = self.vocab[token] = len(self.vocab)
            self.decoder[self.vocab[token]] = token
        self._whole_tokens = sorted(set(self.special_tokens) | set(added), key=lambda s: (-len(s), s))
        self.cache.clear()
        return len(tokens)

    # -- helpers

    def _split_specials(self, text: str):
        """Step 1: (piece, is_special) in order; the leftmost special string wins, the longest on a tie.
        Tokens added with `add_tokens` are cut out the same way."""
        yield from split_whole(text, self.__dict__.get("_whole_tokens", self.special_tokens))  # longest first

    def _limit(self, max_length):
        limit = self.model_max_length if max_length is None else max_length
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise TokenizerError(f"CLIPTokenizer: max_length={max_length!r} must be a non-negative integer")
        if max_length is not None and limit > MAX_LENGTH:
            raise TokenizerError(f"CLIPTokenizer: max_length={max_length} is over {MAX_LENGTH} tokens")
        if limit >= NO_LIMIT:
            raise TokenizerError("CLIPTokenizer: the folder sets no model_max_length; pass max_length")
        return limit

    def _token(self, i: int) -> str:
        if i not in self.decoder:
            raise TokenizerError(f"CLIPTokenizer: id {i} is not in the vocabulary (0..{len(self.vocab) - 1})")
        return self.decoder[i]




def split_whole(text: str, whole):
    """(piece, is_whole) in order: every occurrence of a string of `whole` (special and added tokens, longest
    first, so the leftmost match wins and the longer one on a tie) cut out of `text`, the rest in between."""
    start = i = 0
    n = len(text)
    while i < n:
        token = next((t for t in whole if text.startswith(t, i)), None)
        if token is None:
            i += 1
            continue
        if i > start:
            yield text[start:i], False
        yield token, True
        i += len(token)
        start = i
    if start < n:
        yield text[start:], False

def tokenize_batch(tok, name: str, text, padding, max_length, truncation, return_tensors, add_special_tokens):
    """A tokenizer's ``__call__`` (CLIP's and T5's alike): check the arguments, ``tok.encode`` each text
    (truncated to max_length when asked), pad with ``tok.pad_token_id`` to max_length or to the longest,
    and return {"input_ids", "attention_mask"} as (B, L) int64 arrays ("np") or lists. `name` opens every
    error message."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not all(isinstance(t, str) for t in texts):
        raise TokenizerError(f"{name}: expected a string or a list of strings, got "
                             f"{type(text).__name__ if single else [type(t).__name__ for t in texts]}")
    if padding not in ("max_length", "longest", True, False, "do_not_pad"):
        raise TokenizerError(f"{name}: padding={padding!r}; choose 'max_length', 'longest' or False")
    if return_tensors not in ("np", None):
        raise TokenizerError(f"{name}: return_tensors={return_tensors!r}; refldm returns 'np' or None")
    if truncation not in (True, False, "longest_first", "do_not_truncate"):
        raise TokenizerError(f"{name}: truncation={truncation!r}; choose True or False")
    for t in texts:  # a lone surrogate (an undecodable byte kept by Python) has no UTF-8 bytes to tokenize
        bad = next((i for i, ch in enumerate(t) if "\ud800" <= ch <= "\udfff"), None)
        if bad is not None:
            raise TokenizerError(f"{name}: the text holds a lone surrogate U+{ord(t[bad]):04X} at "
                                 f"position {bad} (a byte that was not UTF-8?); it has no UTF-8 encoding")
    truncation = truncation in (True, "longest_first")
    ids = [tok.encode(t, add_special_tokens, truncation, max_length) for t in texts]
    if padding == "max_length":
        width = tok._limit(max_length)
    elif padding in ("longest", True):
        width = max((len(row) for row in ids), default=0)
    else:
        width = 0
    mask = [[1] * len(row) + [0] * max(0, width - len(row)) for row in ids]
    ids = [row + [tok.pad_token_id] * max(0, width - len(row)) for row in ids]
    if return_tensors == "np":
        if len({len(row) for row in ids}) > 1:
            raise TokenizerError(f"{name}: the prompts have different lengths; use padding='longest' "
                                 "or 'max_length' to get one array")
        shape = (len(ids), len(ids[0]) if ids else 0)
        return {"input_ids": np.asarray(ids, dtype=np.int64).reshape(shape),
                "attention_mask": np.asarray(mask, dtype=np.int64).reshape(shape)}
    if single:
        return {"input_ids": ids[0], "attention_mask": mask[0]}
    return {"input_ids": ids, "attention_mask": mask}


def _read_json(path, required: bool = False) -> dict:
    if not os.path.isfile(path):
        if required:
            raise TokenizerError(f"{path}: no such file (is {os.path.dirname(path)} a tokenizer folder?)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: JSON nested too deeply to be a tokenizer file") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _read_merges(path) -> list:
    """merges.txt: "#version ..." lines are skipped; every other line is "left right"."""
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: no such file (is {os.path.dirname(path)} a tokenizer folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}: line {number} is not two symbols separated by one space: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _check_added_tokens(folder, config: dict, vocab: dict, added_fast: dict | None = None) -> None:
    """Refuse added tokens outside vocab.json (textual-inversion tokens, ...): they are not implemented."""
    added = dict(added_fast or {})
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{folder}: tokenizer_config.json's added_tokens_decoder must be an object of "
                             f"{{id: token}}, not {_short(decoder)}")
    for key, value in decoder.items():
        content = value.get("content") if isinstance(value, dict) else value
        added[content] = key
    added_path = os.path.join(folder, "added_tokens.json")
    added.update(_read_json(added_path))
    for content, key in added.items():
        try:
            same = vocab.get(content) == int(key)
        except (TypeError, ValueError):
            same = False
        if not same:
            raise TokenizerError(f"{folder}: added token {content!r} (id {key}) is not in vocab.json under that "
                                 "id; refldm's CLIPTokenizer does not implement extra added tokens")


# --------------------------------------------------------------------------------------------------------
# tokenizer.json: the `tokenizers` library's one-file format, which transformers 5 writes instead of
# vocab.json + merges.txt. Its "model" holds the same vocabulary and merges; its normaliser and
# pre-tokeniser must be CLIP's (steps 2 and 3 above), or the ids would differ: anything else is refused.

# CLIP's pattern as transformers writes it into the Split pre-tokeniser.
CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                      r"[^\s\p{L}\p{N}]+")
CLIP_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]}
CLIP_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": True},
    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
# BPE model fields and the values CLIP's tokenizer has (absent counts as the library's default)
CLIP_BPE_FIELDS = {"dropout": None, "continuing_subword_prefix": "", "end_of_word_suffix": END_OF_WORD,
                   "byte_fallback": False}


def _without(value, drop=("trim_offsets",)):
    """A JSON value without the keys that do not change ids (offset trimming only moves character spans)."""
    if isinstance(value, dict):
        return {k: _without(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_without(v, drop) for v in value]
    return value


def _short(value, limit: int = 200) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_tokenizer_json(path) -> tuple[dict, list, dict]:
    """tokenizer.json -> (vocab {token: id}, merges [(left, right)], added tokens {content: id}).

    Checks that it describes CLIP's tokenizer: a BPE model with the </w> end-of-word suffix, and CLIP's
    normaliser (NFC, whitespace runs -> " ", lower case) and pre-tokeniser (CLIP's pattern, then byte-level).
    """
    data = _read_json(path, required=True)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise TokenizerError(f"{path}: model type {_short(kind)} is not BPE; refldm implements CLIP's BPE "
                             "tokenizer only")
    for name, want in CLIP_BPE_FIELDS.items():
        have = model.get(name, want if name != "continuing_subword_prefix" else None)
        if have != want and not (name == "continuing_subword_prefix" and have is None):
            raise TokenizerError(f"{path}: model.{name} is {_short(have)}, CLIP's is {_short(want)}; "
                                 "not a CLIP tokenizer")
    for name, want in (("normalizer", CLIP_NORMALIZER), ("pre_tokenizer", CLIP_PRE_TOKENIZER)):
        if _without(data.get(name)) != want:
            raise TokenizerError(f"{path}: the {name} {_short(data.get(name))} is not CLIP's; refldm "
                                 "implements CLIP's tokenizer only (docs/text_encoder.md)")
    vocab = model["vocab"]
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
        raise TokenizerError(f"{path}: model.vocab must be a JSON object of {{token: integer id}}")
    merges = []
    for number, merge in enumerate(model.get("merges") or [], start=1):
        # tokenizers >= 0.20 writes ["left", "right"]; older versions wrote "left right"
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerError(f"{path}: merge #{number} {_short(merge)} is not a pair of symbols")
        merges.append((parts[0], parts[1]))
    added = {}
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list):
        raise TokenizerError(f"{path}: added_tokens must be a list of token objects, not {_short(entries)}")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: added_tokens entry {_short(entry)} has no content string")
        added[entry["content"]] = entry.get("id")
    return vocab, merges, added
