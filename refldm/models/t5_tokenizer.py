"""T5's SentencePiece unigram tokenizer, giving the ids of transformers' ``T5TokenizerFast`` (transformers 5).

From a prompt to ids (docs/t5.md has the long version, and where this differs from the sentencepiece
library):

1. Added tokens. ``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>`` and the folder's other added tokens
   are cut out of the raw text first (leftmost match, the longest on a tie) and map straight to their ids.
2. Normalisation of each remaining chunk by the model's *precompiled charsmap*: SentencePiece's
   ``nmt_nfkc`` rules (NFKC, odd spaces -> " ", control characters dropped) compiled into a table of
   {UTF-8 string: replacement}, stored as a double-array trie (`CharsMap`). As the `tokenizers`
   library applies it: the text is cut into grapheme clusters (`graphemes`); a cluster shorter than 6
   bytes is looked up whole (its *shortest* prefix in the table replaces the whole cluster), anything
   else character by character; what is not in the table stays.
3. Pre-tokenisation: split at whitespace (which disappears), then each word gets the metaspace "▁"
   (U+2581) in front, unless it starts with one, and is cut again before every further "▁".
4. The unigram model on each piece: of all ways to write the piece as a sequence of vocabulary
   entries, the one with the largest sum of log-probabilities (scores), found by Viterbi (`viterbi`).
   A character no entry covers becomes the unknown token, with the score min(scores) - 10; adjacent
   unknown characters fuse into one unknown token. With byte fallback (when the model has it) an unknown
   run becomes the ids of its UTF-8 bytes ``<0x..>`` instead.
5. ``</s>`` appended; truncated to max_length (``</s>`` kept, with a warning naming the limit), padded
   with ``<pad>``.

Files: ``tokenizer.json`` (the `tokenizers` library's file; its Unigram model's vocabulary of [piece,
score] pairs, unk_id, byte_fallback, and its Precompiled normaliser's charsmap) is read when present, as
transformers does; else ``spiece.model``, the SentencePiece model, a protobuf parsed here by hand
(`read_spiece_model`). transformers 5 builds the same pipeline (steps 1-5) from either file, whatever
normaliser and pre-tokeniser tokenizer.json spells out, and so does refldm; except that transformers'
T5 tokenizer turns byte fallback off, where refldm (and the sentencepiece library) follow the file.
tokenizer_config.json / special_tokens_map.json give the special tokens and model_max_length. Standard
library and NumPy only.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import unicodedata
import warnings

import numpy as np

from refldm.backend import to_numpy
from refldm.errors import TokenizerError
from refldm.models.tokenizer import MAX_LENGTH, split_whole, tokenize_batch

__all__ = ["T5TokenizerFast", "TokenizerError", "CharsMap", "SentencePieceModel", "read_spiece_model",
           "graphemes", "viterbi"]

METASPACE = "\u2581"      # "▁", SentencePiece's visible space
UNK_PENALTY = 10.0        # the unknown token scores min(score) - 10, in sentencepiece and tokenizers alike
NO_LIMIT = int(1e30)      # transformers' model_max_length when the folder sets none
DEFAULT_SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
DEFAULT_EXTRA_IDS = 100   # transformers adds <extra_id_99> .. <extra_id_0> after spiece.model's pieces


# --------------------------------------------------------------------------------------------------------
# spiece.model: a protobuf ModelProto, read by hand
#
# The wire format: a message is a run of fields, each a varint key (field_number << 3 | wire_type) and a
# value: wire type 0 a varint (7 bits a byte, low first, high bit = more), 1 eight bytes, 2 a varint
# length and that many bytes (strings, bytes, nested messages), 5 four bytes (a little-endian float32).
# sentencepiece_model.proto numbers the fields used here:
#   ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
#   SentencePiece   1 piece (string), 2 score (float), 3 type (enum: 1 NORMAL, 2 UNKNOWN, 3 CONTROL,
#                   4 USER_DEFINED, 5 UNUSED, 6 BYTE)
#   TrainerSpec     3 model_type (1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR), 35 byte_fallback, 40 unk_id,
#                   41 bos_id, 42 eos_id, 43 pad_id (int32: negative values take 10 bytes)
#   NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces,
#                   5 escape_whitespaces

PIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    """Read one varint at buf[pos]: (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TokenizerError(f"{where}: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise TokenizerError(f"{where}: varint longer than 10 bytes")


def _fields(buf: bytes, where: str):
    """(field number, wire type, value) for each field of a message: an int for varints, bytes else."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
            if len(value) != size:
                raise TokenizerError(f"{where}: truncated fixed-size field {number}")
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            value, pos = buf[pos:pos + size], pos + size
            if len(value) != size:
                raise TokenizerError(f"{where}: field {number} runs past the end ({size} bytes declared)")
        else:
            raise TokenizerError(f"{where}: wire type {wire} (field {number}) is not a protobuf wire type "
                                 "refldm reads; not a SentencePiece model")
        if number == 0:
            raise TokenizerError(f"{where}: field number 0; not a protobuf message")
        yield number, wire, value


def _int32(value: int) -> int:
    """A varint holding a (possibly negative) int32, as two's complement over 64 bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{where}: a string field is not UTF-8") from None


class SentencePieceModel:
    """What refldm reads from spiece.model: pieces [(piece, score, type)], and the spec fields it uses."""

    def __init__(self, pieces, model_type="UNIGRAM", byte_fallback=False, unk_id=0, bos_id=1, eos_id=2,
                 pad_id=-1, normalizer_name="", precompiled_charsmap=b"", add_dummy_prefix=True,
                 remove_extra_whitespaces=True, escape_whitespaces=True):
        self.pieces = pieces
        self.model_type, self.byte_fallback = model_type, byte_fallback
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = unk_id, bos_id, eos_id, pad_id
        self.normalizer_name, self.precompiled_charsmap = normalizer_name, precompiled_charsmap
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces, self.escape_whitespaces = remove_extra_whitespaces, escape_whitespaces


def read_spiece_model(path) -> SentencePieceModel:
    """Parse a SentencePiece model file (serialised ModelProto) by hand, with one error line if it is not."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    if data[:1] in (b"{", b"[") or not data:
        raise TokenizerError(f"{path}: not a SentencePiece model (a protobuf), it looks like JSON or is empty")
    pieces, trainer, normalizer = [], {}, {}
    for number, wire, value in _fields(data, path):
        if number == 1 and wire == 2:
            piece, score, kind = None, 0.0, 1
            for n, w, v in _fields(value, path):
                if n == 1 and w == 2:
                    piece = _text(v, path)
                elif n == 2 and w == 5:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and w == 0:
                    kind = v
            if piece is None or kind not in PIECE_TYPES:
                raise TokenizerError(f"{path}: piece #{len(pieces)} has no piece string or an unknown type "
                                     f"{kind}; not a SentencePiece model")
            pieces.append((piece, float(score), PIECE_TYPES[kind]))
        elif number == 2 and wire == 2:
            trainer.update({n: v for n, w, v in _fields(value, path) if w == 0})
        elif number == 3 and wire == 2:
            normalizer.update({n: v for n, w, v in _fields(value, path)})
        elif number in (1, 2, 3):
            raise TokenizerError(f"{path}: field {number} has wire type {wire}; not a SentencePiece model")
    if not pieces:
        raise TokenizerError(f"{path}: no pieces; not a SentencePiece model")
    model_type = MODEL_TYPES.get(trainer.get(3, 1), f"type {trainer.get(3)}")
    charsmap = normalizer.get(2, b"")
    return SentencePieceModel(
        pieces, model_type=model_type, byte_fallback=bool(trainer.get(35, 0)),
        unk_id=_int32(trainer.get(40, 0)), bos_id=_int32(trainer.get(41, 1)), eos_id=_int32(trainer.get(42, 2)),
        pad_id=_int32(trainer.get(43, (1 << 64) - 1)),
        normalizer_name=_text(normalizer.get(1, b""), path) if isinstance(normalizer.get(1, b""), bytes) else "",
        precompiled_charsmap=charsmap if isinstance(charsmap, bytes) else b"",
        add_dummy_prefix=bool(normalizer.get(3, 1)), remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)))


# --------------------------------------------------------------------------------------------------------
# The precompiled charsmap: SentencePiece's normalisation rules as a double-array trie


class CharsMap:
    """SentencePiece's precompiled normalisation table: {UTF-8 string: replacement}.

    Layout: a uint32 (little-endian) trie size T, T bytes of trie, then the replacements, each ending in
    a zero byte. The trie is a darts-clone double array of uint32 units; unit u holds
    label = u & (2^31 | 0xFF), has_leaf = bit 8, value = u & (2^31 - 1),
    offset = (u >> 10) << ((u & 2^9) >> 6). Walking a key byte c from node p goes to p' = p ^ offset(unit[p])
    ^ c, valid when label(unit[p']) == c; if unit[p'] has a leaf, the key so far is in the table and
    unit[p' ^ offset(unit[p'])].value is the byte offset of its replacement.
    """

    def __init__(self, blob: bytes, where: str = "precompiled_charsmap"):
        if len(blob) < 4:
            raise TokenizerError(f"{where}: a charsmap of {len(blob)} bytes is shorter than its 4-byte header")
        (size,) = struct.unpack("<I", blob[:4])
        if size % 4 or size > len(blob) - 4:
            raise TokenizerError(f"{where}: trie size {size} does not fit the {len(blob)}-byte charsmap")
        self.units = np.frombuffer(blob[4:4 + size], dtype="<u4").astype(np.int64).tolist()
        self.normalized = blob[4 + size:]
        self.where = where
        self._cache = {}

    def _unit(self, pos: int) -> int:
        if not 0 <= pos < len(self.units):
            raise TokenizerError(f"{self.where}: the trie points outside itself (unit {pos})")
        return self.units[pos]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def prefixes(self, key: bytes) -> list[tuple[int, int]]:
        """Every prefix of `key` in the table, shortest first, as (length in bytes, replacement offset)."""
        found = []
        pos = self._offset(self._unit(0))
        for i, c in enumerate(key):
            if c == 0:
                break
            pos ^= c
            unit = self._unit(pos)
            if unit & ((1 << 31) | 0xFF) != c:
                break
            pos ^= self._offset(unit)
            if (unit >> 8) & 1:
                found.append((i + 1, self._unit(pos) & ((1 << 31) - 1)))
        return found

    def replacement(self, offset: int) -> str:
        end = self.normalized.find(b"\0", offset)
        raw = self.normalized[offset:end if end >= 0 else len(self.normalized)]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"{self.where}: replacement at byte {offset} is not UTF-8") from None

    def transform(self, text: str) -> str | None:
        """The replacement of `text`'s shortest prefix in the table (for the whole of `text`, as the
        `tokenizers` library's Precompiled normaliser does), or None."""
        if text in self._cache:
            return self._cache[text]
        found = self.prefixes(text.encode("utf-8"))
        result = self.replacement(found[0][1]) if found else None
        if len(self._cache) < 100_000:
            self._cache[text] = result
        return result

    def normalize(self, text: str) -> str:
        """Each grapheme cluster shorter than 6 bytes is replaced whole if its shortest prefix is in the
        table; any other cluster character by character; what is not in the table stays."""
        out = []
        for cluster in graphemes(text):
            if len(cluster.encode("utf-8")) < 6:
                whole = self.transform(cluster)
                if whole is not None:
                    out.append(whole)
                    continue
            for ch in cluster:
                one = self.transform(ch)
                out.append(ch if one is None else one)
        return "".join(out)


# --------------------------------------------------------------------------------------------------------
# Grapheme clusters (Unicode UAX #29), as far as the charsmap needs them
#
# Only clusters of 2+ characters and under 6 bytes are looked up whole (a longer one is looked up
# character by character, as if each character were its own cluster). So the rules that matter join a
# short base to what follows it: CR LF (GB3), Extend / ZWJ (GB9), SpacingMark (GB9a), Prepend (GB9b),
# and no joining across controls (GB4, GB5). Hangul syllable sequences (GB6-8) are included; emoji ZWJ
# sequences and flag pairs (GB11-13) join characters of 3-4 bytes each into clusters of 6 or more
# bytes, which are treated character by character anyway, and are left out.

# Grapheme_Extend characters outside the Mn / Me categories (Other_Grapheme_Extend), emoji modifiers
# (Extend in UAX #29) and the tag characters (Cf, but Extend)
_OTHER_EXTEND = {0x09BE, 0x09D7, 0x0B3E, 0x0B57, 0x0BBE, 0x0BD7, 0x0CC2, 0x0CD5, 0x0CD6, 0x0D3E, 0x0D57,
                 0x0DCF, 0x0DDF, 0x1B35, 0x200C, 0x200D, 0x302E, 0x302F, 0xFF9E, 0xFF9F, 0x1133E, 0x11357,
                 0x114B0, 0x114BD, 0x115AF, 0x11930, 0x1D165, *range(0x1D16E, 0x1D173),
                 *range(0x1F3FB, 0x1F400), *range(0xE0020, 0xE0080)}
# Mc characters that are not SpacingMark (they break), and Lo characters that are
_NOT_SPACING = {0x102B, 0x102C, 0x1038, 0x1062, 0x1063, 0x1064, *range(0x1067, 0x106E), 0x1083,
                *range(0x1087, 0x108D), 0x108F, 0x109A, 0x109B, 0x109C, 0x1A61, 0x1A63, 0x1A64, 0xAA7B,
                0xAA7D, 0x11720, 0x11721}
_SPACING = {0x0E33, 0x0EB3}
_PREPEND = {*range(0x0600, 0x0606), 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2, 0x0D4E, 0x110BD, 0x110CD,
            0x111C2, 0x111C3, 0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02}


def _break_class(ch: str) -> str:
    """The Grapheme_Cluster_Break class of one character, reduced to what `graphemes` needs."""
    cp = ord(ch)
    if ch == "\r":
        return "CR"
    if ch == "\n":
        return "LF"
    if cp in _OTHER_EXTEND:
        return "Extend"
    if cp in _PREPEND:
        return "Prepend"
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me"):
        return "Extend"
    if (cat == "Mc" and cp not in _NOT_SPACING) or cp in _SPACING:
        return "SpacingMark"
    if cat in ("Cc", "Zl", "Zp", "Cf", "Cs"):
        return "Control"
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"
    return "Other"


_HANGUL_JOINS = {("L", "L"), ("L", "V"), ("L", "LV"), ("L", "LVT"), ("LV", "V"), ("V", "V"), ("LV", "T"),
                 ("V", "T"), ("LVT", "T"), ("T", "T")}


def graphemes(text: str) -> list[str]:
    """Cut `text` into extended grapheme clusters (the UAX #29 rules listed above)."""
    clusters = []
    prev = None
    for ch in text:
        cls = _break_class(ch)
        if prev is None:
            join = False
        elif prev == "CR" and cls == "LF":
            join = True                                                   # GB3
        elif prev in ("Control", "CR", "LF") or cls in ("Control", "CR", "LF"):
            join = False                                                  # GB4, GB5
        elif (prev, cls) in _HANGUL_JOINS or cls in ("Extend", "SpacingMark") or prev == "Prepend":
            join = True                                                   # GB6-8, GB9, GB9a, GB9b
        else:
            join = False                                                  # GB999
        if join:
            clusters[-1] += ch
        else:
            clusters.append(ch)
        prev = cls
    return clusters


# --------------------------------------------------------------------------------------------------------
# Pre-tokenisation and the unigram model

# Unicode's White_Space characters (what Rust's char::is_whitespace, and so WhitespaceSplit, splits at)
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                        "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def pre_tokenize(text: str) -> list[str]:
    """WhitespaceSplit, then Metaspace (prepend "always", split): the pieces the unigram model sees.

    "a photo  of" -> ["▁a", "▁photo", "▁of"]; a word is cut before each "▁" it holds ("x▁y" -> ["▁x", "▁y"]).
    """
    pieces = []
    word = []
    for ch in text + " ":
        if ch not in WHITE_SPACE:
            word.append(ch)
            continue
        if word:
            w = "".join(word)
            if not w.startswith(METASPACE):
                w = METASPACE + w
            starts = [i for i, c in enumerate(w) if c == METASPACE] + [len(w)]
            pieces.extend(w[a:b] for a, b in zip(starts, starts[1:]))
            word = []
    return pieces


def viterbi(text: str, scores: dict, max_len: int, unk_score: float) -> list[tuple[str, bool]]:
    """The best segmentation of `text` into vocabulary pieces: [(piece, is_unknown)].

    best[0] = 0; best[e] = max over pieces text[s:e] in the vocabulary of best[s] + score(text[s:e]);
    a character at s that no one-character piece covers also offers the unknown token, text[s:s+1] with
    unk_score. Candidates are tried by start, then by length, and only a strictly better one replaces
    the current best (the first of equals wins, as in sentencepiece and tokenizers). The path is read
    back from the end; adjacent unknown characters are fused into one unknown piece.
    """
    n = len(text)
    best = [0.0] + [None] * n
    back = [None] * (n + 1)                              # (start, is_unknown) of the best piece ending here
    for s in range(n):
        base = best[s]
        if base is None:                                 # unreachable: never, since unknowns cover everything
            continue
        single = False
        for e in range(s + 1, min(n, s + max_len) + 1):
            score = scores.get(text[s:e])
            if score is None:
                continue
            if e == s + 1:
                single = True
            if best[e] is None or base + score > best[e]:
                best[e], back[e] = base + score, (s, False)
        if not single and (best[s + 1] is None or base + unk_score > best[s + 1]):
            best[s + 1], back[s + 1] = base + unk_score, (s, True)
    pieces = []
    e = n
    while e > 0:
        s, unknown = back[e]
        if unknown and pieces and pieces[-1][1]:
            pieces[-1] = (text[s:e] + pieces[-1][0], True)
        else:
            pieces.append((text[s:e], unknown))
        e = s
    return pieces[::-1]


# --------------------------------------------------------------------------------------------------------
# The tokenizer


class T5TokenizerFast:
    """``tokenizer(prompts, padding="max_length", max_length=256, return_tensors="np")["input_ids"]`` -> (B, 256).

    Attributes as transformers': vocab ({piece: id}), model_max_length, eos_token / pad_token / unk_token
    and their *_id, byte_fallback.
    """

    def __init__(self, vocab: list, unk_id: int = 2, byte_fallback: bool = False, charsmap: bytes | None = None,
                 added_tokens: dict | None = None, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                 model_max_length: int = NO_LIMIT, source: str = "tokenizer"):
        self.source = source
        self.pieces = [p for p, _ in vocab]
        self.vocab = {}
        for i, (piece, score) in enumerate(vocab):
            if not isinstance(piece, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
                raise TokenizerError(f"{source}: vocabulary entry #{i} {_short([piece, score])} is not "
                                     "[piece string, score]")
            if piece in self.vocab:
                raise TokenizerError(f"{source}: piece {piece!r} appears twice in the vocabulary (ids "
                                     f"{self.vocab[piece]} and {i})")
            self.vocab[piece] = i
        self.scores = {p: float(s) for p, s in vocab}
        if not isinstance(unk_id, int) or not 0 <= unk_id < len(vocab):
            raise TokenizerError(f"{source}: unk_id={unk_id!r} is not an id of the {len(vocab)}-piece vocabulary")
        self.unk_id = unk_id
        self.unk_score = min(self.scores.values()) - UNK_PENALTY
        self.max_piece = max(len(p) for p in self.pieces)
        self.byte_fallback = bool(byte_fallback)
        self.charsmap = CharsMap(charsmap, f"{source}: precompiled_charsmap") if charsmap else None
        self.added = {}                                   # {added token text: id}, cut out of raw text first
        for content, i in (added_tokens or {}).items():
            self._add(content, i)
        self.eos_token, self.pad_token, self.unk_token = eos_token, pad_token, unk_token
        for name in ("eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token not in self.added:
                if token not in self.vocab:
                    raise TokenizerError(f"{source}: {name} {token!r} is not in the vocabulary")
                self._add(token, self.vocab[token])
        self.special_ids = set(self.added.values())
        self.decoder = {i: p for i, p in enumerate(self.pieces)}
        self.decoder.update({i: t for t, i in self.added.items()})
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or not (
                1 <= model_max_length <= MAX_LENGTH or model_max_length == NO_LIMIT):
            raise TokenizerError(f"{source}: model_max_length={model_max_length!r} must be an integer from 1 to "
                                 f"{MAX_LENGTH}")
        self.model_max_length = model_max_length
        self._cache = {}

    def _add(self, content, i):
        if not isinstance(content, str) or not content or not isinstance(i, int) or i < 0:
            raise TokenizerError(f"{self.source}: added token {_short(content)} (id {i!r}) is not a non-empty "
                                 "string with an id")
        if i >= len(self.pieces) or self.pieces[i] != content:
            raise TokenizerError(f"{self.source}: added token {content!r} has id {i}, but that id is "
                                 f"{'not in the vocabulary' if i >= len(self.pieces) else repr(self.pieces[i])}; "
                                 "refldm implements added tokens that are vocabulary pieces only")
        self.added[content] = i

    # -- the ids of the special tokens, as in transformers
    eos_token_id = property(lambda self: self.added[self.eos_token])
    pad_token_id = property(lambda self: self.added[self.pad_token])
    unk_token_id = property(lambda self: self.added[self.unk_token])
    all_special_ids = property(lambda self: sorted(self.special_ids))

    def __len__(self):
        return len(self.pieces)

    # -- reading a folder

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None) -> "T5TokenizerFast":
        """Read a transformers T5 tokenizer folder: tokenizer.json (preferred, as transformers) or
        spiece.model, with tokenizer_config.json and special_tokens_map.json."""
        folder = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        if not os.path.isdir(folder):
            raise TokenizerError(f"{folder}: no such tokenizer folder")
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        tokens = {}
        for name, default in DEFAULT_SPECIALS.items():
            value = special_map.get(name, config.get(name, default))
            tokens[name] = value.get("content") if isinstance(value, dict) else value
            if not isinstance(tokens[name], str):
                raise TokenizerError(f"{folder}: {name} {_short(value)} is not a token string")
        fast = os.path.join(folder, "tokenizer.json")
        spiece = os.path.join(folder, "spiece.model")
        if os.path.isfile(fast):
            vocab, unk_id, byte_fallback, charsmap, added = _read_tokenizer_json(fast)
            source = fast
        elif os.path.isfile(spiece):
            model = read_spiece_model(spiece)
            if model.model_type != "UNIGRAM":
                raise TokenizerError(f"{spiece}: a SentencePiece {model.model_type} model; T5's tokenizer is a "
                                     "UNIGRAM one (refldm implements that only)")
            extra = config.get("extra_ids", DEFAULT_EXTRA_IDS)
            if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
                raise TokenizerError(f"{folder}/tokenizer_config.json: extra_ids={extra!r} must be an integer >= 0")
            vocab = [(p, s) for p, s, _ in model.pieces] + [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
            # control and user-defined pieces are added tokens in transformers, and so are the extra ids
            added = {p: i for i, (p, _, kind) in enumerate(model.pieces) if kind in ("CONTROL", "USER_DEFINED")}
            added.update({p: len(model.pieces) + k for k, (p, _) in enumerate(vocab[len(model.pieces):])})
            unk_id, byte_fallback, charsmap = model.unk_id, model.byte_fallback, model.precompiled_charsmap
            source = spiece
        else:
            others = sorted(n for n in os.listdir(folder) if n in ("vocab.json", "merges.txt", "tokenizer.model",
                                                                   "sentencepiece.bpe.model", "vocab.txt"))
            raise TokenizerError(f"{folder}: no tokenizer.json nor spiece.model"
                                 + (f" (found {', '.join(others)}: not a T5 tokenizer)" if others else ""))
        # the special tokens tokenizer_config.json lists (transformers 4: additional_special_tokens and
        # added_tokens_decoder; transformers 5: extra_special_tokens, a list or a {name: token} object)
        listed = []
        for key in ("additional_special_tokens", "extra_special_tokens", "added_tokens_decoder"):
            value = config.get(key) or []
            listed.extend(value.values() if isinstance(value, dict) else value)
        ids_of = {}
        for i, (piece, _) in enumerate(vocab):
            ids_of.setdefault(piece, i)
        for entry in listed:
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str) and content not in added:
                if content not in ids_of:
                    raise TokenizerError(f"{folder}: added token {content!r} is not in the vocabulary; refldm "
                                         "implements added tokens that are vocabulary pieces only")
                added[content] = ids_of[content]
        limit = config.get("model_max_length", NO_LIMIT)
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= NO_LIMIT:
            limit = NO_LIMIT  # transformers' "no limit", written as 1e30 or as the integer
        return cls(vocab, unk_id=unk_id, byte_fallback=byte_fallback, charsmap=charsmap, added_tokens=added,
                   model_max_length=limit, source=source, **tokens)

    # -- text -> pieces -> ids

    def normalize(self, text: str) -> str:
        """Step 2: the precompiled charsmap (nothing when the model has none)."""
        return self.charsmap.normalize(text) if self.charsmap is not None else text

    def _encode_chunk(self, chunk: str) -> list[tuple[str, int]]:
        """Steps 2-4 on text without added tokens: [(piece, id)]."""
        out = []
        for word in pre_tokenize(self.normalize(chunk)):
            cached = self._cache.get(word)
            if cached is None:
                cached = []
                for piece, unknown in viterbi(word, self.scores, self.max_piece, self.unk_score):
                    i = self.vocab.get(piece) if not unknown else None
                    if i is None and self.byte_fallback:
                        byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
                        if all(b is not None for b in byte_ids):
                            cached.extend((f"<0x{b:02X}>", j) for b, j in zip(piece.encode("utf-8"), byte_ids))
                            continue
                    cached.append((piece, self.unk_id if i is None else i))
                if len(self._cache) < 100_000:
                    self._cache[word] = cached
            out.extend(cached)
        return out

    def tokenize(self, text: str) -> list:
        """The pieces of `text` (added tokens kept whole), without the end token."""
        return [p for p, _ in self._encode_pieces(text)]

    def _encode_pieces(self, text: str) -> list[tuple[str, int]]:
        out = []
        for chunk, added in self._split_added(text):
            out.extend([(chunk, self.added[chunk])] if added else self._encode_chunk(chunk))
        return out

    def convert_tokens_to_ids(self, tokens):
        """A piece -> its id (the unknown id if absent); a list maps element-wise."""
        if isinstance(tokens, str):
            return self.added.get(tokens, self.vocab.get(tokens, self.unk_id))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        """An id -> its piece; a list maps element-wise."""
        if isinstance(ids, (int, np.integer)):
            return self._token(int(ids))
        return [self._token(int(i)) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None) -> list:
        """The ids of one text, then </s>; with truncation, cut to max_length (</s> kept) with a warning."""
        ids = [i for _, i in self._encode_pieces(text)]
        if truncation:
            full = self._limit(max_length)
            limit = full - (1 if add_special_tokens else 0)
            if limit < 0:
                raise TokenizerError(f"T5TokenizerFast: max_length={max_length} leaves no room for the end token")
            if len(ids) > limit:
                dropped = self.decode(ids[limit:])
                dropped = dropped if len(dropped) <= 80 else dropped[:77] + "..."
                warnings.warn(f"T5TokenizerFast: the prompt is {len(ids) + (1 if add_special_tokens else 0)} "
                              f"tokens long but the limit is max_length={full}; truncated, dropping: {dropped!r}",
                              stacklevel=3)
                ids = ids[:limit]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text, padding="max_length", max_length: int | None = None, truncation: bool = True,
                 return_tensors: str | None = "np", add_special_tokens: bool = True) -> dict:
        """Tokenize a prompt or a list of prompts -> {"input_ids", "attention_mask"}.

        padding: "max_length" (to max_length, default model_max_length), "longest" or True (to the
        longest in the batch), False / "do_not_pad". truncation: cut to max_length (default
        model_max_length), with a warning naming the limit when something is cut. return_tensors: "np"
        gives (B, L) int64 arrays (B = 1 for one prompt), None gives lists (a flat list for one prompt).
        """
        return tokenize_batch(self, "T5TokenizerFast", text, padding, max_length, truncation, return_tensors,
                              add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text: pieces joined, each "▁" a space, the leading space dropped."""
        ids = np.asarray(to_numpy(ids)).reshape(-1).tolist() if hasattr(ids, "shape") else list(ids)
        skip = self.special_ids if skip_special_tokens else set()
        text = "".join(self._token(int(i)) for i in ids if int(i) not in skip).replace(METASPACE, " ")
        return text[1:] if text.startswith(" ") else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list:
        """decode() for each row."""
        return [self.decode(row, skip_special_tokens) for row in sequences]

    # -- helpers

    def _split_added(self, text: str):
        """Step 1: (chunk, is_added_token) in order; the leftmost added token wins, the longest on a tie."""
        whole = self.__dict__.get("_by_length")
        if whole is None:
            whole = self._by_length = sorted(self.added, key=lambda s: (-len(s), s))
        yield from split_whole(text, whole)

    def _limit(self, max_length):
        limit = self.model_max_length if max_length is None else max_length
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise TokenizerError(f"T5TokenizerFast: max_length={max_length!r} must be a non-negative integer")
        if max_length is not None and limit > MAX_LENGTH:                 # padding to it would fill the memory
            raise TokenizerError(f"T5TokenizerFast: max_length={max_length} is over {MAX_LENGTH} tokens")
        if limit >= NO_LIMIT:
            raise TokenizerError("T5TokenizerFast: the folder sets no model_max_length; pass max_length "
                                 "(SD3 uses 256, FLUX 512)")
        return limit

    def _token(self, i: int) -> str:
        if i not in self.decoder:
            raise TokenizerError(f"T5TokenizerFast: id {i} is not in the vocabulary (0..{len(self.pieces) - 1})")
        return self.decoder[i]


# --------------------------------------------------------------------------------------------------------
# Files


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json(path, required: bool = False) -> dict:
    if not os.path.isfile(path):
        if required:
            raise TokenizerError(f"{path}: no such file")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


# Normalisers and pre-tokenisers a SentencePiece unigram tokenizer.json is written with (by transformers
# 4 and 5 and the tokenizers library's converters). transformers 5's T5 tokenizer rebuilds its own from the
# charsmap (steps 2 and 3 above), whichever of these the file names; another component means the file is
# not a SentencePiece tokenizer, and is refused.
SPM_NORMALIZERS = {"Precompiled", "Replace", "Strip", "Prepend", "Sequence"}
SPM_PRE_TOKENIZERS = {"Metaspace", "WhitespaceSplit", "Sequence"}


def _components(node, where: str, allowed: set) -> list:
    """The component dicts of a normaliser / pre-tokeniser (flattening Sequence), checked against `allowed`."""
    if node is None:
        return []
    if not isinstance(node, dict) or node.get("type") not in allowed:
        kind = node.get("type") if isinstance(node, dict) else type(node).__name__
        raise TokenizerError(f"{where} is {_short(kind)}, not one of a SentencePiece tokenizer "
                             f"({', '.join(sorted(allowed))}); not a T5 tokenizer")
    if node["type"] == "Sequence":
        children = node.get("normalizers", node.get("pretokenizers"))
        if not isinstance(children, list):
            raise TokenizerError(f"{where}: a Sequence without its list")
        return [c for child in children for c in _components(child, where, allowed)]
    return [node]


def _read_tokenizer_json(path):
    """tokenizer.json -> (vocab [(piece, score)], unk_id, byte_fallback, charsmap bytes, added {content: id})."""
    data = _read_json(path, required=True)
    model = data.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "Unigram":
        raise TokenizerError(f"{path}: model type {_short(kind if kind else type(model).__name__)} is not "
                             "Unigram; T5's tokenizer is a SentencePiece unigram one (refldm implements that only)")
    vocab = model.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in vocab):
        raise TokenizerError(f"{path}: model.vocab must be a non-empty list of [piece, score] pairs")
    unk_id = model.get("unk_id")
    if unk_id is None:
        raise TokenizerError(f"{path}: model.unk_id is null; T5's unigram model has an unknown token")
    charsmap = b""
    for node in _components(data.get("normalizer"), f"{path}: normalizer", SPM_NORMALIZERS):
        if node["type"] == "Precompiled" and node.get("precompiled_charsmap"):
            try:
                charsmap = base64.b64decode(node["precompiled_charsmap"], validate=True)
            except (ValueError, TypeError):
                raise TokenizerError(f"{path}: the Precompiled normalizer's charsmap is not base64") from None
    _components(data.get("pre_tokenizer"), f"{path}: pre_tokenizer", SPM_PRE_TOKENIZERS)
    added = {}
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: added_tokens entry {_short(entry)} has no content string")
        for flag in ("lstrip", "rstrip", "single_word"):
            if entry.get(flag):
                raise TokenizerError(f"{path}: added token {entry['content']!r} has {flag}=true; refldm "
                                     "implements added tokens matched as they are only")
        added[entry["content"]] = entry.get("id")
    return [(p, s) for p, s in vocab], unk_id, bool(model.get("byte_fallback", False)), charsmap, added
