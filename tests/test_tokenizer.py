"""refldm.models.tokenizer.CLIPTokenizer: the same ids as transformers' CLIPTokenizer.

transformers 5 has one CLIP tokenizer, backed by the `tokenizers` library (``CLIPTokenizerFast`` is the
same class); transformers 4's pure-Python one is gone, so that one is the reference. Two vocabularies:

- the real CLIP BPE merges, shipped in tests/data/clip-bpe/ (OpenAI, MIT licence, see its LICENSE), made
  into vocab.json + merges.txt the way CLIP builds its vocabulary;
- a small vocabulary learned inside the tests from a few captions, so everything also runs without it.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refldm.models.tokenizer import CLIPTokenizer, TokenizerError, _scan, bytes_to_unicode, clip_vocab, normalize
from tests.conftest import require

CLIP_BPE = Path(__file__).resolve().parent / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------------
# Building tokenizer folders


def write_folder(folder: Path, merges, pad_token=EOS, model_max_length=77) -> Path:
    """A tokenizer folder laid out as Stable Diffusion's tokenizer/ (transformers 4 wrote these files)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    token = lambda c: {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    special = {"bos_token": token(BOS), "eos_token": token(EOS), "pad_token": pad_token, "unk_token": token(EOS)}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer",
              **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in special.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def real_merges() -> list:
    """The merges CLIP uses: lines 1 .. 48894 of its BPE file (line 0 is a version header)."""
    lines = gzip.open(CLIP_BPE).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]


CAPTIONS = [
    "a photo of an astronaut riding a horse on mars",
    "a painting of a fox sitting in a field at sunrise, oil on canvas",
    "portrait of a cat wearing a hat, highly detailed, 4k, trending on artstation",
    "the quick brown fox jumps over the lazy dog",
    "a cozy cabin in the snowy mountains, warm light, cinematic",
    "Une tasse de café sur une table en bois, lumière douce",
    "ein Hund läuft über die Straße",
    "东京的夜景, 霓虹灯",
    "an astronaut's helmet reflecting the earth; photorealistic!",
]


def learn_merges(texts, count: int) -> list:
    """A tiny byte-level BPE training: repeatedly merge the most frequent adjacent pair of symbols."""
    byte = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for word in _scan(normalize(text)):
            chars = [byte[b] for b in word.encode("utf-8")]
            words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    for _ in range(count):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = pairs.most_common(1)[0][0]
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("small_tok"), learn_merges(CAPTIONS, 150))


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("clip_tok"), real_merges())


@pytest.fixture(scope="module")
def real_folder_sd2(tmp_path_factory):
    """Stable Diffusion 2.x's tokenizer: the same files, but the padding token is "!" (id 0)."""
    return write_folder(tmp_path_factory.mktemp("clip_tok_sd2"), real_merges(), pad_token="!")


def transformers_tokenizer(folder):
    transformers = require("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # transformers 5's CLIPTokenizer; in transformers 4 the same tokenizers-backed class was the "Fast" one
        return transformers.CLIPTokenizerFast.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------------
# Prompts: a seeded generator of varied text


PARTS = {
    "words": ["a", "photo", "of", "the", "cat", "astronaut", "riding", "horse", "Mountains", "SUNSET", "Portrait",
              "highly", "detailed", "masterpiece", "best", "quality", "octane", "render", "HDR", "McDonald",
              "iPhone", "x-ray", "well-known", "self‑portrait", "steampunk", "unreal", "engine", "bokeh"],
    "accents": ["café", "naïve", "Ångström", "Straße", "İstanbul", "Ærøskøbing", "Zürich", "São", "crème", "brûlée",
                "ΟΔΟΣ", "Σίσυφος", "ΣΑΣ", "Москва", "ПРИВЕТ", "ǅemal", "ﬁne", "Ǆ", "ΐ", "ß", "ŉ", "ǰ"],
    "cjk": ["你好世界", "日本語のテキスト", "한국어", "東京タワー", "ｆｕｌｌｗｉｄｔｈ", "ＡＢＣ", "中文，标点。", "カタカナ"],
    "emoji": ["🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "✨", "🐱‍👤", "🔥🔥🔥", "☃", "♥", "🏳️‍🌈", "©", "™"],
    "punct": [",", ".", "!!!", "...", "—", "«", "»", "(", ")", "[", "]", "{", "}", "(masterpiece:1.2)", "[[cat]]",
              "#hashtag", "@user", "$100", "50%", "a/b", "c++", "e-mail", '"quoted"', "'single'", "`tick`", "~",
              "^_^", ":-)", "<3", "&amp;", "<b>", "||", "\\", "?!", "¿qué?", "¡hola!", "…", "·", "–", "_", "*"],
    "numbers": ["1024x768", "3.14159", "2023", "1,000,000", "٣٤", "½", "Ⅻ", "①", "⁴²", "4k", "8K", "v1.5",
                "0.5", "12:30", "१२३", "𝟘𝟙", "IV", "007"],
    "contractions": ["don't", "it's", "they're", "we've", "I'm", "you'll", "he'd", "''s", "'steve", "rock'n'roll",
                     "O'Neil", "DON'T", "IT'S", "'S", "'ll've", "can't", "'", "''"],
    "spaces": [" ", "  ", "   ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u2003", "\x0b", "\x0c", "\x85", "\x1c",
               "\x1f", "\u200b", "\u2028", "\u2029", "\u180e", "\u202f"],
    "combining": ["e\u0301", "a\u0308", "n\u0303", "\u0301", "A\u030a", "o\u0302\u0323", "\u0915\u094d\u0937",
                  "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\u05e9\u05dc\u05d5\u05dd", "ไทย", "\u0e01\u0e34"],
    "control": ["\x00", "\x07", "\x7f", "\u200d", "\ufeff", "\ufffd", "\x1b[0m", "\u00ad", "\U000e0041"],
    "special": [EOS, BOS, "<|", "|>", "<|endoftext", "startoftext|>", f"x{EOS}y", f"{BOS}{EOS}"],
}


def random_char(rng: random.Random) -> str:
    """A random assigned character (the interpreter's Unicode version; no surrogates, no unassigned)."""
    while True:
        plane = rng.choice([0x0000, 0x0000, 0x0000, 0x10000, 0x20000])
        ch = chr(plane + rng.randrange(0x10000))
        if unicodedata.category(ch) not in ("Cs", "Cn", "Co"):
            return ch


def prompts(count: int, seed: int = 0) -> list:
    """`count` varied prompts: words of every kind of script and symbol, odd spacing, long ones."""
    rng = random.Random(seed)
    kinds = list(PARTS)
    out = []
    for n in range(count):
        roll = rng.random()
        if roll < 0.05:  # random characters
            text = "".join(random_char(rng) if rng.random() < 0.8 else " " for _ in range(rng.randrange(1, 40)))
        else:
            length = rng.randrange(100, 300) if roll < 0.12 else rng.randrange(0, 25)
            pieces = []
            for _ in range(length):
                kind = rng.choice(kinds) if rng.random() < 0.5 else "words"
                pieces.append(rng.choice(PARTS[kind]) if rng.random() < 0.95 else random_char(rng))
                pieces.append(rng.choice([" ", " ", " ", "", ", ", rng.choice(PARTS["spaces"])]))
            text = "".join(pieces)
            if rng.random() < 0.1:
                text = text.upper()
            elif rng.random() < 0.1:
                text = text.title()
        out.append(text)
    return out


def exclude_special_case_variants(texts) -> list:
    """Drop texts whose lower-case form holds a special token string their raw form lacks, such as
    "<|ENDOFTEXT|>": transformers matches those as the special token or not depending on the
    "normalized" flags the folder's json files happen to carry; refldm treats them as text (see
    docs/text_encoder.md)."""
    def ambiguous(t):
        low = "".join(c.lower() for c in t)
        return any(low.count(s) != t.count(s) for s in (BOS, EOS))
    return [t for t in texts if not ambiguous(t)]


PROMPTS = exclude_special_case_variants(prompts(1300))


def assert_same_ids(mine, theirs, texts):
    bad = [i for i, (a, b) in enumerate(zip(mine, theirs)) if list(a) != list(b)]
    assert not bad, (f"{len(bad)} of {len(texts)} prompts differ; first: {texts[bad[0]]!r}\n"
                     f" refldm       {list(mine[bad[0]])}\n transformers {list(theirs[bad[0]])}")


def compare_with_transformers(folder, texts):
    """Stable Diffusion's call (pad to 77, truncate) and the full untruncated ids, against transformers."""
    ours, theirs = CLIPTokenizer.from_pretrained(folder), transformers_tokenizer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts warn that they are truncated
        mine = ours(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    ref = theirs(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    assert mine["input_ids"].dtype == np.int64 and mine["input_ids"].shape == (len(texts), 77)
    assert_same_ids(mine["input_ids"], ref["input_ids"], texts)
    np.testing.assert_array_equal(mine["attention_mask"], ref["attention_mask"])
    full = ours(texts, padding=False, truncation=False, return_tensors=None)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_full = theirs(texts, truncation=False)["input_ids"]
    assert_same_ids(full, ref_full, texts)
    return ours, theirs


# ---------------------------------------------------------------------------------------------------------
# Same ids as transformers


def test_prompt_generator_is_varied():
    assert len(PROMPTS) >= 1000
    joined = "".join(PROMPTS)
    for part in ("é", "你", "🙂", "\t", "\n", "   ", "'s", "٣", EOS):
        assert part in joined
    assert sum(len(p) > 500 for p in PROMPTS) >= 50  # long prompts, far over 77 tokens


def test_real_clip_vocabulary_has_clip_ids(real_folder):
    tok = CLIPTokenizer.from_pretrained(real_folder)
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    # the ids every Stable Diffusion user has seen for this prompt
    assert tok.encode("a photo of an astronaut riding a horse") == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_same_ids_as_transformers_with_the_real_clip_vocabulary(real_folder):
    compare_with_transformers(real_folder, PROMPTS)


def test_same_ids_as_transformers_with_sd2_padding_token(real_folder_sd2):
    """SD 2.x pads with "!"; transformers then treats "!" in the text as that special token too."""
    texts = PROMPTS[:300] + ["hello! world!!", "!", "a!b", "?!"]
    ours, _ = compare_with_transformers(real_folder_sd2, texts)
    assert ours.pad_token_id == 0
    assert ours("hi")["input_ids"][0, 3:].tolist() == [0] * 74


def test_same_ids_as_transformers_with_a_small_vocabulary(small_folder):
    ours, _ = compare_with_transformers(small_folder, PROMPTS)
    assert len(ours) < 1000


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs", "Cn", "Co")), max_size=60))
def test_arbitrary_text_gives_the_same_ids_as_transformers(small_folder, text):
    texts = exclude_special_case_variants([text])
    if texts:
        theirs = transformers_tokenizer_cached(small_folder)
        assert CLIPTokenizer.from_pretrained(small_folder).encode(text) == theirs(text)["input_ids"]


_CACHE = {}


def transformers_tokenizer_cached(folder):
    if folder not in _CACHE:
        _CACHE[folder] = transformers_tokenizer(folder)
    return _CACHE[folder]


def test_decode_matches_transformers(small_folder):
    ours, theirs = CLIPTokenizer.from_pretrained(small_folder), transformers_tokenizer(small_folder)
    for text in PROMPTS[:200]:
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text


def test_call_conventions_match_transformers(small_folder):
    ours, theirs = CLIPTokenizer.from_pretrained(small_folder), transformers_tokenizer(small_folder)
    batch = ["a cat", "a painting of a fox in a field", ""]
    for kwargs in ({"padding": "max_length", "return_tensors": "np"}, {"padding": "longest", "return_tensors": "np"},
                   {"padding": True, "return_tensors": None}, {"padding": False, "return_tensors": None},
                   {"padding": "max_length", "max_length": 12, "return_tensors": None}):
        for text in (batch, batch[1]):
            mine, ref = ours(text, **kwargs), theirs(text, truncation=True, **kwargs)
            for key in ("input_ids", "attention_mask"):
                if kwargs["return_tensors"] == "np":
                    assert mine[key].dtype == np.int64
                    np.testing.assert_array_equal(mine[key], ref[key])
                else:
                    assert mine[key] == ref[key]
    assert ours.tokenize("A cat's hat!") == theirs.tokenize("A cat's hat!")
    tokens = theirs.tokenize("astronaut riding")
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.model_max_length == theirs.model_max_length == 77


# ---------------------------------------------------------------------------------------------------------
# Properties that need no reference


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<"), max_size=80))
def test_decode_inverts_encode_up_to_word_spacing(small_folder, text):
    tok = small_tokenizer(small_folder)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == " ".join(_scan(normalize(text))).strip()


def small_tokenizer(folder):
    key = ("refldm", folder)
    if key not in _CACHE:
        _CACHE[key] = CLIPTokenizer.from_pretrained(folder)
    return _CACHE[key]


def test_every_byte_has_a_printable_character():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_long_prompts_warn_once_and_are_cut_to_77(small_folder):
    tok = CLIPTokenizer.from_pretrained(small_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tok(["a cat " * 50, "a cat"], padding="max_length")
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "100 tokens" in str(caught[0].message)
    ids = out["input_ids"]
    assert ids.shape == (2, 77) and ids[0, -1] == tok.eos_token_id and ids[0, 0] == tok.bos_token_id
    assert out["attention_mask"][0].all() and out["attention_mask"][1].sum() == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tok("a cat " * 37 + "a")["input_ids"][0]) == 77  # 75 tokens + 2 fit without a warning
        assert len(tok.encode("a cat " * 50)) == 102  # encode does not truncate unless asked


def test_model_max_length_comes_from_the_folder(small_folder, tmp_path):
    folder = write_folder(tmp_path / "tok", learn_merges(CAPTIONS, 20), model_max_length=10)
    tok = CLIPTokenizer.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tok("a photo of an astronaut riding a horse")["input_ids"].shape == (1, 10)


def test_special_tokens_map_overrides_tokenizer_config(small_folder, tmp_path):
    folder = write_folder(tmp_path / "tok", learn_merges(CAPTIONS, 20))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    assert tok.pad_token_id == transformers_tokenizer(folder).pad_token_id


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_broken_folders_are_errors_naming_the_file(small_folder, tmp_path):
    def copy():
        folder = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for f in small_folder.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    with pytest.raises(TokenizerError, match="no such tokenizer folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "absent")
    f = copy()
    (f / "vocab.json").unlink()
    with pytest.raises(TokenizerError, match="vocab.json: no such file"):
        CLIPTokenizer.from_pretrained(f)
    f = copy()
    (f / "merges.txt").write_text("#version: 0.2\na b\nthree parts here\n")
    with pytest.raises(TokenizerError, match="merges.txt: line 3"):
        CLIPTokenizer.from_pretrained(f)
    f = copy()
    (f / "merges.txt").write_text("#version: 0.2\nq z\n")  # "qz" is not in the vocabulary
    with pytest.raises(TokenizerError, match="'qz' is not in vocab.json"):
        CLIPTokenizer.from_pretrained(f)
    f = copy()
    (f / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    with pytest.raises(TokenizerError, match="pad_token '<|pad|>' is not in vocab.json"):
        CLIPTokenizer.from_pretrained(f)
    f = copy()
    (f / "added_tokens.json").write_text(json.dumps({"<my-style>": 99999}))
    with pytest.raises(TokenizerError, match="added token '<my-style>'"):
        CLIPTokenizer.from_pretrained(f)
    f = copy()
    (f / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        CLIPTokenizer.from_pretrained(f)


def test_bad_calls_are_errors(small_folder):
    tok = CLIPTokenizer.from_pretrained(small_folder)
    with pytest.raises(TokenizerError, match="different lengths"):
        tok(["a", "a cat"], padding=False, return_tensors="np")
    with pytest.raises(TokenizerError, match="padding="):
        tok("a", padding="left")
    with pytest.raises(TokenizerError, match="return_tensors="):
        tok("a", return_tensors="pt")
    with pytest.raises(TokenizerError, match="truncation="):
        tok("a", truncation="only_second")
    with pytest.raises(TokenizerError, match="string"):
        tok(["a", 3])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.decode([10**6])


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json, as transformers 5 saves a tokenizer (issue 12, item 0)


def saved_by_transformers(folder, out):
    """The folder loaded by transformers and saved again, exactly as a user's save_pretrained writes it."""
    tok = transformers_tokenizer(folder)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def real_folder_saved(real_folder, tmp_path_factory):
    return saved_by_transformers(real_folder, tmp_path_factory.mktemp("clip_tok_saved"))


def test_tokenizer_json_alone_gives_the_same_ids_as_transformers(real_folder_saved):
    files = {p.name for p in real_folder_saved.iterdir()}
    assert "tokenizer.json" in files and not {"vocab.json", "merges.txt"} & files
    tok = CLIPTokenizer.from_pretrained(real_folder_saved)
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    compare_with_transformers(real_folder_saved, exclude_special_case_variants(prompts(300, seed=5)))


def test_sd2_padding_token_survives_tokenizer_json(real_folder_sd2, tmp_path):
    saved = saved_by_transformers(real_folder_sd2, tmp_path / "sd2")
    tok = CLIPTokenizer.from_pretrained(saved)
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    compare_with_transformers(saved, exclude_special_case_variants(prompts(50, seed=6)))


def test_old_style_merge_strings_in_tokenizer_json(small_folder, tmp_path):
    """tokenizers < 0.20 wrote each merge as one "left right" string; both spellings give the same ids."""
    saved = saved_by_transformers(small_folder, tmp_path / "new")
    data = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (saved / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    a, b = CLIPTokenizer.from_pretrained(saved), CLIPTokenizer.from_pretrained(small_folder)
    texts = prompts(50, seed=7)
    with pytest.warns(UserWarning, match="only 75 fit"):  # some of the prompts are long: truncated, and said so
        ids_a, ids_b = a(texts)["input_ids"], b(texts)["input_ids"]
    np.testing.assert_array_equal(ids_a, ids_b)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["model"].update(type="WordPiece"), "model type"),
    (lambda d: d["model"].update(end_of_word_suffix=""), "end_of_word_suffix"),
    (lambda d: d["model"].update(dropout=0.1), "dropout"),
    (lambda d: d["normalizer"]["normalizers"].pop(), "normalizer"),
    (lambda d: d.update(normalizer=None), "normalizer"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "pre_tokenizer"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"), "pre_tokenizer"),
    (lambda d: d["model"].update(merges=[["a"]]), "merge #1"),
    (lambda d: d["added_tokens"].append({"id": 10**6, "content": "<cat-toy>"}), "added token"),
])
def test_tokenizer_json_that_is_not_clips_is_refused(small_folder, tmp_path, change, message):
    saved = saved_by_transformers(small_folder, tmp_path / "tok")
    data = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    change(data)
    (saved / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as e:
        CLIPTokenizer.from_pretrained(saved)
    assert "tokenizer" in str(e.value) and "\n" not in str(e.value)


def test_folder_without_any_vocabulary_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json, nor vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_lone_surrogate_is_a_clear_error(small_folder):
    tok = CLIPTokenizer.from_pretrained(small_folder)
    with pytest.raises(TokenizerError, match="lone surrogate U\\+DCFF at position 6"):
        tok("a cat \udcff")


def test_unicode_version_dependence_is_measured(real_folder):
    """refldm asks `unicodedata` (the interpreter's Unicode tables) whether a character is a letter;
    transformers' tokenizer carries newer tables. The characters the two disagree on are exactly those
    that are letters or digits to `regex` (transformers' own dependency, with tables as new as the
    tokenizers') but unassigned to this interpreter: prompts holding one of them give other ids, and
    prompts holding none give the same ids (docs/text_encoder.md, "The Unicode version")."""
    regex = require("regex")
    newer = [chr(c) for c in range(0x30000, 0x32400) if unicodedata.category(chr(c)) == "Cn"
             and regex.match(r"[\p{L}\p{N}]", chr(c))]
    if unicodedata.unidata_version < "15.0.0":  # Python 3.11: CJK Extension H (U+31350..U+323AF) is new
        assert "\U000320a9" in newer
    ours, theirs = CLIPTokenizer.from_pretrained(real_folder), transformers_tokenizer(real_folder)
    sample = newer[:: max(1, len(newer) // 40)]
    differ = [ch for ch in sample if list(ours.encode(f"a{ch}b")) != list(theirs.encode(f"a{ch}b"))]
    # the dependence is real (Unicode 15's ideographs differ), and `regex`'s tables can be newer still than
    # the tokenizers' (U+323E0, Unicode 17, is unassigned to both 3.11 and the tokenizers: alike there)
    assert len(differ) >= len(sample) - 2 and "\U000320a9" not in set(sample) - set(differ)
    assigned = [chr(c) for c in range(0x20000, 0x2A6DF, 977)]  # CJK Extension B: letters in both tables
    same = [ch for ch in assigned if list(ours.encode(f"a{ch}b")) == list(theirs.encode(f"a{ch}b"))]
    assert same == assigned
