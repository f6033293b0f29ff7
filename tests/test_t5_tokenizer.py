"""refldm.models.t5_tokenizer.T5TokenizerFast against transformers' T5TokenizerFast and the sentencepiece library.

A unigram model is trained here with sentencepiece's trainer (a fraction of a second, on a generated
corpus that covers accents, fullwidth forms, ligatures, CJK, emoji, digits and punctuation), once without
and once with byte fallback. Ids must equal transformers' (built from that spiece.model, and from the
tokenizer.json transformers writes) on every prompt of the suite and on hypothesis-drawn text. Against
the sentencepiece library they are equal except on the inputs named in SENTENCEPIECE_DIFFERS, where
transformers (and so refldm) differ from it by design (docs/t5.md, "Where the ids differ").
"""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.models import t5_tokenizer
from refldm.models.t5_tokenizer import CharsMap, T5TokenizerFast, TokenizerError, graphemes, read_spiece_model
from tests.conftest import require

PROMPTS = [
    "", " ", "a photo of an astronaut riding a horse on the moon", "  leading and trailing  ",
    "multiple   spaces\tand\ttabs\nnewlines\r\n", "café naïve Zürich façade", "cafe\u0301 decomposed",
    "ﬁ ligature ½ ① ㍱ ™ ＡＢＣ fullwidth", "東京 日本語 🙂 emoji 👍🏽 🇯🇵 👨\u200d👩\u200d👧", "!!!??? ... ,,, --- ;;",
    "1234567890 4k 1024x768 3.14", "unknown ßþ Ω ж", "</s> in text <pad> <unk>", "x\u2581y literal metaspace",
    "\u3000ideographic space", "zero\u200bwidth\u200djoin", "a" * 300, "toka rimo " * 60, "\u0600a prepend",
    "ＡＢ\u0301 fullwidth and accent", "e\u0301\u0301 two marks", "ｶﾞ halfwidth", "Ａ\u0301", "tab\tcontrol\x07bell",
    "<extra_id_0> sentinels <extra_id_99>",
]
# Where the sentencepiece library's ids differ from transformers' (and refldm's), and why:
SENTENCEPIECE_DIFFERS = {
    # the added tokens </s>, <pad>, <unk> are cut out of the raw text first (sentencepiece spells them out)
    "</s> in text <pad> <unk>": "added tokens", "<extra_id_0> sentinels <extra_id_99>": "added tokens",
    # a grapheme cluster under 6 bytes is replaced by its *shortest* prefix's mapping, the rest of the
    # cluster dropped (tokenizers' Precompiled); sentencepiece takes the longest match and keeps the rest
    "ＡＢ\u0301 fullwidth and accent": "cluster", "e\u0301\u0301 two marks": "cluster", "Ａ\u0301": "cluster",
    # a cluster of 6 bytes or more is mapped character by character (U+FF76 U+FF9E -> カ + U+3099);
    # sentencepiece maps the pair (-> ガ)
    "ｶﾞ halfwidth": "long cluster",
}
# With byte fallback, transformers' T5 tokenizer gives <unk> where refldm and sentencepiece give bytes
# (transformers builds T5's unigram model with byte_fallback=False whatever the file says).

SYLLABLES = ["ka", "to", "ri", "an", "the", "ing", "ph", "ot", "o", "ca", "t", "do", "g", "as", "tr", "on", "au",
             "mo", "ré", "ï", "ü", "ç", "東", "京", "日", "本", "語", "🙂", "4", "k", "1", "0", "2", "x", "ve", "le",
             "al", "st", "er", "A", "Á", "é", "fi", "TM", "hPa", "!", "?", ".", ",", "-", "ß", "ж", "Ω", "B", "ガ"]


def train(byte_fallback: bool, model_type: str = "unigram") -> bytes:
    """A small unigram spiece.model trained by sentencepiece (ids: <pad> 0, </s> 1, <unk> 2, as T5's)."""
    spm = require("sentencepiece")
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type=model_type,
                                   vocab_size=600 if byte_fallback else 300, hard_vocab_limit=False,
                                   byte_fallback=byte_fallback, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2, num_threads=1)
    return out.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"plain" | "bytes": (spiece folder, tokenizer.json folder, sentencepiece processor, transformers tokenizer)}."""
    spm = require("sentencepiece")
    transformers = require("transformers")
    require("google.protobuf")  # transformers reads spiece.model through sentencepiece's protobuf module
    root = tmp_path_factory.mktemp("t5tok")
    found = {}
    for name, fallback in (("plain", False), ("bytes", True)):
        folder = root / name
        folder.mkdir()
        (folder / "spiece.model").write_bytes(train(fallback))
        reference = transformers.T5TokenizerFast.from_pretrained(str(folder))
        fast = root / f"{name}_json"
        reference.save_pretrained(str(fast))
        assert (fast / "tokenizer.json").is_file() and not (fast / "spiece.model").exists()
        found[name] = (folder, fast, spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")), reference)
    return found


@pytest.mark.parametrize("kind", ["spiece", "tokenizer.json"])
def test_prompt_suite_ids_equal_transformers(models, kind):
    folder, fast, _, reference = models["plain"]
    tok = T5TokenizerFast.from_pretrained(folder if kind == "spiece" else fast)
    assert len(tok) == len(reference)
    for prompt in PROMPTS:
        assert tok.encode(prompt) == reference(prompt)["input_ids"], prompt
        assert tok.tokenize(prompt) == reference.tokenize(prompt), prompt


@pytest.mark.parametrize("name", ["plain", "bytes"])
def test_prompt_suite_ids_equal_sentencepiece_except_the_named_inputs(models, name):
    folder, _, processor, reference = models[name]
    tok = T5TokenizerFast.from_pretrained(folder)
    assert tok.byte_fallback is (name == "bytes")
    differ = set()
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        if ids != processor.encode(prompt) + [processor.eos_id()]:
            differ.add(prompt)
        if name == "bytes" and ids != reference(prompt)["input_ids"]:  # transformers: <unk>, not bytes
            assert reference.unk_token_id in reference(prompt)["input_ids"], prompt
            assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids), prompt
    assert differ == set(SENTENCEPIECE_DIFFERS)


def test_byte_fallback_spells_unknown_characters_in_utf8_bytes(models):
    tok = T5TokenizerFast.from_pretrained(models["bytes"][0])
    pieces = tok.tokenize("ж🙃")  # 🙃 is not in the training corpus: its 4 bytes
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x83>"]
    plain = T5TokenizerFast.from_pretrained(models["plain"][0])
    assert plain.encode("🙃🙃 x")[1] == plain.unk_token_id  # fused: one <unk> for the run


# Text drawn from characters that exercise every step: ASCII, vocabulary characters, compatibility forms,
# combining marks, controls and odd spaces, emoji (with modifiers and joiners), added-token strings.
ALPHABET = list("abcdefghikmnoprstx AB0123456789.,!?-'\"\t\n") + [
    "é", "e\u0301", "\u0301", "\u0308", "Á", "Ａ", "ｶ", "ﾞ", "ﬁ", "½", "①", "™", "㍱", "東", "京", "語", "ß", "ж", "Ω",
    "🙂", "👍", "\U0001F3FD", "\u200d", "\u200b", "\u3000", "\u00a0", "\x07", "\u2581", "</s>", "<pad>", "ガ"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)


@settings(max_examples=120)
@given(text=texts)
def test_drawn_text_ids_equal_transformers(models, text):
    folder, fast, _, reference = models["plain"]
    want = reference(text)["input_ids"]
    assert T5TokenizerFast.from_pretrained(fast).encode(text) == want
    assert _cached(folder).encode(text) == want


_TOKENIZERS = {}


def _cached(folder):
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = T5TokenizerFast.from_pretrained(folder)
    return _TOKENIZERS[folder]


@settings(max_examples=150)
@given(text=texts)
def test_charsmap_normalizes_as_tokenizers_precompiled(models, text):
    normalizers = require("tokenizers").normalizers
    blob = read_spiece_model(models["plain"][0] / "spiece.model").precompiled_charsmap
    assert CharsMap(blob).normalize(text) == normalizers.Precompiled(blob).normalize_str(text)


def test_spiece_model_read_by_hand_equals_the_protobuf_library(models):
    require("google.protobuf")
    pb = require("sentencepiece.sentencepiece_model_pb2")
    for name in ("plain", "bytes"):
        path = models[name][0] / "spiece.model"
        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
        mine = read_spiece_model(path)
        assert [(p, s, t) for p, s, t in mine.pieces] == [
            (p.piece, p.score, t5_tokenizer.PIECE_TYPES[p.type]) for p in proto.pieces]
        spec, norm = proto.trainer_spec, proto.normalizer_spec
        assert (mine.unk_id, mine.bos_id, mine.eos_id, mine.pad_id) == (spec.unk_id, spec.bos_id, spec.eos_id,
                                                                        spec.pad_id) == (2, -1, 1, 0)
        assert mine.byte_fallback == spec.byte_fallback == (name == "bytes")
        assert mine.model_type == "UNIGRAM" and mine.normalizer_name == norm.name == "nmt_nfkc"
        assert mine.precompiled_charsmap == norm.precompiled_charsmap and len(mine.precompiled_charsmap) > 1000
        assert (mine.add_dummy_prefix, mine.remove_extra_whitespaces, mine.escape_whitespaces) == (
            norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces)


def test_padding_truncation_and_decode_as_transformers(models):
    folder, _, _, reference = models["plain"]
    tok = T5TokenizerFast.from_pretrained(folder)
    prompts = ["a photo of ka", "toka rimo " * 10, ""]
    with pytest.warns(UserWarning, match=r"max_length=16"):
        mine = tok(prompts, padding="max_length", max_length=16, truncation=True)
    theirs = reference(prompts, padding="max_length", max_length=16, truncation=True)
    assert mine["input_ids"].tolist() == theirs["input_ids"]
    assert mine["attention_mask"].tolist() == theirs["attention_mask"]
    longest = tok(prompts, padding="longest", truncation=False)
    assert longest["input_ids"].tolist() == reference(prompts, padding="longest")["input_ids"]
    for prompt in ("a photo of ka", "toka rimo"):
        ids = tok.encode(prompt)
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------
# Without the cross-check packages: a hand-written tokenizer.json


def write_folder(path, model=None, normalizer=None, pre_tokenizer=None, config=None, added=None):
    path.mkdir(parents=True, exist_ok=True)
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["\u2581", -2.0], ["\u2581a", -3.0], ["b", -4.0],
             ["\u2581ab", -6.5], ["a", -5.0], ["\u2581b", -4.5]]
    data = {"version": "1.0", "added_tokens": added if added is not None else [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for i, t in enumerate(["<pad>", "</s>", "<unk>"])],
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer if pre_tokenizer is not None else {
                "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
            "model": model or {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": False}}
    (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config or {"model_max_length": 8}), encoding="utf-8")
    return path


def test_viterbi_picks_the_best_sum_of_scores(tmp_path):
    tok = T5TokenizerFast.from_pretrained(write_folder(tmp_path / "t"))
    # "▁ab": one piece (-6.5) beats "▁a" + "b" (-7.0); "▁ba": "▁b" + "a" (-9.5); "▁c": "▁" + <unk> (-2 + -16.5)
    assert tok.tokenize("ab ba c") == ["\u2581ab", "\u2581b", "a", "\u2581", "c"]
    assert tok.encode("ab ba c") == [6, 8, 7, 3, 2, 1]
    assert tok.encode("cc dd") == [3, 2, 3, 2, 1]  # each unknown run fuses into one <unk>


def test_truncation_warns_with_the_limit_and_keeps_the_end_token(tmp_path):
    tok = T5TokenizerFast.from_pretrained(write_folder(tmp_path / "t"))
    with pytest.warns(UserWarning, match=r"limit is max_length=8; truncated, dropping: 'a a'"):
        out = tok("ab " * 7 + "a a")
    assert out["input_ids"].tolist() == [[6] * 7 + [1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok("ab")["input_ids"].tolist() == [[6, 1, 0, 0, 0, 0, 0, 0]]
        assert tok("ab")["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("case", ["bpe", "wordpiece_pre", "no_files", "spiece_json", "spiece_garbage", "bad_added"])
def test_a_tokenizer_file_of_another_kind_is_one_clear_line(tmp_path, case):
    folder = tmp_path / "t"
    if case == "bpe":
        write_folder(folder, model={"type": "BPE", "vocab": {"a": 0}, "merges": []})
        match = r"tokenizer.json: model type \"BPE\" is not Unigram"
    elif case == "wordpiece_pre":
        write_folder(folder, pre_tokenizer={"type": "BertPreTokenizer"})
        match = r"pre_tokenizer is \"BertPreTokenizer\", not one of a SentencePiece tokenizer"
    elif case == "no_files":
        folder.mkdir()
        (folder / "vocab.json").write_text("{}")
        match = r"no tokenizer.json nor spiece.model \(found vocab.json: not a T5 tokenizer\)"
    elif case == "spiece_json":
        folder.mkdir()
        (folder / "spiece.model").write_text('{"model": {}}')
        match = r"spiece.model: not a SentencePiece model \(a protobuf\)"
    elif case == "spiece_garbage":
        folder.mkdir()
        (folder / "spiece.model").write_bytes(b"\x0a\xff\xff\xff\x0f")
        match = r"spiece.model: field 1 runs past the end"
    else:
        write_folder(folder, added=[{"id": 5, "content": "<extra_id_0>", "special": True}])
        match = r"added token '<extra_id_0>' has id 5, but that id is 'b'"
    with pytest.raises(TokenizerError, match=match) as info:
        T5TokenizerFast.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_graphemes_join_marks_and_crlf_but_not_across_controls():
    assert graphemes("e\u0301x\r\n\u0301a\u0903\u0600b") == ["e\u0301", "x", "\r\n", "\u0301", "a\u0903", "\u0600b"]
    assert graphemes("\u1100\u1161\u11a8\uac00") == ["\u1100\u1161\u11a8", "\uac00"]  # Hangul L V T, then LV


# Characters for which the UAX #29 rules refldm leaves out (emoji ZWJ sequences, flags, Indic conjuncts)
# do not come into play: letters, CJK, Hangul jamo and syllables, marks, spacing marks, prepend, controls.
CLUSTER_ALPHABET = ["a", "Z", "é", "東", "\u0301", "\u0308", "\u20e3", "\ufe0f", "\u200d", "\u200c", "\u0903",
                    "\u0e33", "\u0600", "\r", "\n", "\t", "\x07", "\u200b", "\u1100", "\u1161", "\u11a8",
                    "\uac00", "\uac01", "\uff9e", "\U0001F3FD", "\U000E0041", " "]


@settings(max_examples=200)
@given(text=st.lists(st.sampled_from(CLUSTER_ALPHABET), max_size=12).map("".join))
def test_graphemes_equal_the_regex_modules_clusters(text):
    regex = require("regex")  # installed with transformers; its \X implements UAX #29 in full
    assert graphemes(text) == regex.findall(r"\X", text)


def test_protobuf_reader_handles_negative_ids_and_unknown_fields(tmp_path):
    def varint(v):
        v &= (1 << 64) - 1
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def field(n, wire, payload):
        key = varint(n << 3 | wire)
        return key + (varint(len(payload)) + payload if wire == 2 else payload)

    piece = field(1, 2, "▁a".encode()) + field(2, 5, np.float32(-1.5).tobytes()) + field(3, 0, varint(1))
    trainer = field(40, 0, varint(2)) + field(41, 0, varint(-1)) + field(99, 0, varint(7))
    blob = field(1, 2, piece) + field(2, 2, trainer) + field(3, 2, field(3, 0, varint(0))) + field(7, 2, b"x")
    (tmp_path / "spiece.model").write_bytes(blob)
    model = read_spiece_model(tmp_path / "spiece.model")
    assert model.pieces == [("▁a", -1.5, "NORMAL")]
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (2, -1, 2, -1)
    assert model.add_dummy_prefix is False and model.remove_extra_whitespaces is True


def test_the_files_normalizer_and_pre_tokenizer_do_not_change_transformers_ids(models, tmp_path):
    """Older tokenizer.json files spell out other SentencePiece pipelines (transformers 4: the charsmap, then
    runs of spaces -> "▁"; a Metaspace with prepend_scheme "first" and no WhitespaceSplit). transformers 5's
    T5 tokenizer takes only the vocabulary and the charsmap from them; so does refldm."""
    transformers = require("transformers")
    _, fast, _, reference = models["plain"]
    data = json.loads((fast / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"}]}
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (old / "tokenizer_config.json").write_text((fast / "tokenizer_config.json").read_text(encoding="utf-8"))
    theirs = transformers.T5TokenizerFast.from_pretrained(str(old))
    mine = T5TokenizerFast.from_pretrained(old)
    for prompt in PROMPTS:
        assert mine.encode(prompt) == theirs(prompt)["input_ids"] == reference(prompt)["input_ids"], prompt


def test_a_sentencepiece_bpe_model_is_refused_in_one_line(tmp_path):
    (tmp_path / "spiece.model").write_bytes(train(False, model_type="bpe"))
    with pytest.raises(TokenizerError, match=r"spiece.model: a SentencePiece BPE model; T5's tokenizer is a UNIGRAM"):
        T5TokenizerFast.from_pretrained(tmp_path)


def test_the_clip_tokenizer_folder_is_refused_in_one_line():
    from refldm.about import DEFAULT_MODEL
    import os
    with pytest.raises(TokenizerError, match=r"no tokenizer.json nor spiece.model \(found .*: not a T5 tokenizer\)"):
        T5TokenizerFast.from_pretrained(os.path.join(DEFAULT_MODEL, "tokenizer"))


def test_max_length_is_bounded_as_the_clip_tokenizers(tmp_path):
    """Padding to a huge max_length would fill the memory: over 65,536 tokens is one clear line, as CLIP's."""
    from refldm.models.tokenizer import MAX_LENGTH
    tok = T5TokenizerFast.from_pretrained(write_folder(tmp_path / "t"))
    assert tok("ab", padding="max_length", max_length=MAX_LENGTH)["input_ids"].shape == (1, MAX_LENGTH)
    for bad in (MAX_LENGTH + 1, 10 ** 12):
        with pytest.raises(TokenizerError, match=rf"T5TokenizerFast: max_length={bad} is over 65536 tokens$"):
            tok("ab", padding="max_length", max_length=bad)
    with pytest.raises(TokenizerError, match=r"model_max_length=65537 must be an integer from 1 to 65536$"):
        T5TokenizerFast.from_pretrained(write_folder(tmp_path / "big", config={"model_max_length": MAX_LENGTH + 1}))
    for k, unset in enumerate((1e30, int(1e30), 10 ** 40)):  # transformers' "no limit": max_length must be given
        t = T5TokenizerFast.from_pretrained(write_folder(tmp_path / f"u{k}", config={"model_max_length": unset}))
        with pytest.raises(TokenizerError, match="sets no model_max_length"):
            t("ab", padding="max_length")
