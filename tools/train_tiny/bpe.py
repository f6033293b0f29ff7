"""Build a small byte-level BPE vocabulary in CLIP's format from the dataset's captions.

CLIP's tokenizer (and so Stable Diffusion's) works like this:

1. lower-case the text and split it into words with a regex (letters, single digits, punctuation runs);
2. map every byte of a word to a printable unicode character (`bytes_to_unicode`, so that no byte is
   whitespace or a control character) and mark the word's last symbol with the suffix "</w>";
3. apply the learned merges, lowest rank first, until no merge applies; each resulting symbol is a
   token, looked up in vocab.json;
4. wrap the ids in <|startoftext|> ... <|endoftext|> and pad with <|endoftext|>.

The vocabulary is laid out as CLIP's is: the 256 byte symbols, the same 256 with "</w>", then one
entry per merge (the merged symbol), then the two special tokens. merges.txt is a "#version: 0.2"
line followed by one "left right" pair per line, in rank order.

Learning the merges is classic BPE (Sennrich et al. 2016): count adjacent symbol pairs over all
words (weighted by word frequency), merge the most frequent pair everywhere, repeat. We repeat until
every caption word is a single token, which for this small closed vocabulary takes about a hundred
merges. Ties are broken by the pair's text, so the result is deterministic.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's word regex, with \p{L} / \p{N} narrowed to ASCII (our captions are plain lowercase English)
_WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the other 68 bytes to the characters 256, 257, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def words_of(text: str) -> list[str]:
    """Lower-case and split like CLIP, then spell each word in byte symbols."""
    table = bytes_to_unicode()
    text = re.sub(r"\s+", " ", text).strip().lower()
    return ["".join(table[b] for b in w.encode("utf-8")) for w in _WORD.findall(text)]


def learn_merges(texts) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every word is one symbol."""
    freq = Counter(w for t in texts for w in words_of(t))
    words = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in freq}   # word -> current symbols
    merges = []
    while True:
        pairs = Counter()
        for w, symbols in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[a, b] += freq[w]
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], tuple(-ord(c) for c in p[0] + " " + p[1])))
        merges.append(best)
        for w, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = out


def build_vocab(merges) -> dict[str, int]:
    """CLIP's layout: byte symbols, byte symbols + "</w>", merged symbols, then the specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder, texts, model_max_length: int) -> dict[str, int]:
    """Learn merges from `texts` and write a tokenizer folder that transformers' CLIPTokenizer loads:
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json. Returns the vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(texts)
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    specials = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return vocab


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    import data
    vocab = write_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "runs/tokenizer", data.all_caption_words(), 32)
    print(f"{len(vocab)} tokens")
