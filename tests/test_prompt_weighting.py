"""The web UI's prompt syntax (refldm/adapters/prompt_weighting.py).

The parser is checked on a table of prompts whose expected (text, weight) pieces are written out here
from the web UI's documented rules (the examples in the docstring of its prompt_parser.
parse_prompt_attention, and the rules it states: (x) x1.1, [x] /1.1, (x:w) xw, escapes, unbalanced
brackets, BREAK, merging of equal neighbours). The chunking is checked on token ids written out by its
rules, the weighting on its equation, clip_skip against diffusers' encode_prompt (float64, 1e-10 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require
from tests.test_pipeline import build_tiny_sd

R, S = 1.1, 1 / 1.1

TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),                          # never closed: to the end
    ("\\(literal\\]", [("(literal]", 1.0)]),                       # escaped brackets are text
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),         # equal neighbours are joined
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",     # three "(" but two closers: one open to the end
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", R * S), (" a ", R), ("hill", 0.5 * R),
      (", sun, ", R), ("sky", R ** 4), (".", R)]),
    ("((word))", [("word", R * R)]),
    ("[word]", [("word", S)]),
    ("[[word]] x", [("word", S * S), (" x", 1.0)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),                             # spaces around the number
    ("(word:-0.5)", [("word", -0.5)]),
    ("a) b] c", [("a) b] c", 1.0)]),                               # closers with nothing open: text
    ("word:1.5) x", [("word:1.5) x", 1.0)]),                       # ":w)" with no "(" open: text
    ("(a:x)", [("a:x", R)]),                                       # ":" not followed by a number: text
    ("[a (b] c)", [("a ", S), ("b", S * R), (" c", R)]),           # interleaved: each closes its own kind
    ("[unclosed (both", [("unclosed ", S), ("both", R * S)]),
    ("a\\b", [("ab", 1.0)]),                                       # a lone backslash vanishes
    ("a \\\\ b", [("a \\ b", 1.0)]),                               # an escaped backslash stays
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),                           # BREAK only as a whole word
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),          # inside brackets it is scaled: no BREAK
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", TABLE)
def test_parser_follows_the_web_ui_rules(prompt, expected):
    from refldm.adapters.prompt_weighting import parse_prompt_attention
    got = parse_prompt_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a_weight_that_is_not_a_number_is_one_clear_error():
    from refldm.adapters.prompt_weighting import PromptSyntaxError, parse_prompt_attention
    with pytest.raises(PromptSyntaxError, match=r"prompt weight '1.2.3' in '\:1.2.3\)' is not a number"):
        parse_prompt_attention("(a:1.2.3)")


# ---------------------------------------------------------------------------------------------------------------
# Chunks, weights and the pipeline, on the tiny SD folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("pw") / "tiny-sd", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def pipe64(folder):
    from refldm.pipelines.sd import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, dtype="float64")


def test_chunks_of_75_with_start_end_and_padding(pipe64):
    from refldm.adapters.prompt_weighting import chunk_tokens
    tok = pipe64.tokenizer
    bos, eos, cat, dog, comma = tok.bos_token_id, tok.eos_token_id, tok.vocab["cat</w>"], tok.vocab["dog</w>"], \
        tok.vocab[",</w>"]
    chunks = chunk_tokens(tok, "cat " * 80)                   # 80 tokens: 75 + 5
    assert [len(ids) for ids, _ in chunks] == [77, 77]
    assert chunks[0][0] == [bos] + [cat] * 75 + [eos]
    assert chunks[1][0] == [bos] + [cat] * 5 + [eos] * 71
    # weights: 1 at the ends and on padding, the piece's weight on its tokens
    chunks = chunk_tokens(tok, "(cat:1.5) dog BREAK dog")
    assert len(chunks) == 2
    assert chunks[0][0][:4] == [bos, cat, dog, eos] and chunks[0][1][:4] == [1.0, 1.5, 1.0, 1.0]
    assert chunks[1][0][:3] == [bos, dog, eos]
    # a full chunk with a comma among its last 20 tokens: what follows the comma moves on
    chunks = chunk_tokens(tok, "cat " * 70 + ", " + "dog " * 10)   # 70 cat, a comma, 10 dog
    assert chunks[0][0] == [bos] + [cat] * 70 + [comma] + [eos] * 5   # the 4 dogs after the comma moved on
    assert chunks[1][0] == [bos] + [dog] * 10 + [eos] * 66
    assert chunk_tokens(tok, "cat " * 70 + ", " + "dog " * 10, backtrack=0)[0][0] == \
        [bos] + [cat] * 70 + [comma] + [dog] * 4 + [eos]              # without the backtrack rule
    # a comma that would open the next chunk stays where it falls: it is not "after" the comma
    chunks = chunk_tokens(tok, "cat, " * 40)                  # cat , cat , ...: 80 tokens
    assert chunks[0][0] == [bos] + [cat, comma] * 37 + [cat, eos]
    assert chunks[1][0][:3] == [bos, comma, cat]


def test_weights_scale_the_embeddings_and_the_mean_is_restored(pipe64):
    """z'' = z * w * mean(z) / mean(z * w), per chunk, on the text encoder's last hidden state."""
    from refldm.adapters.prompt_weighting import chunk_tokens, encode_weighted
    prompt = "a (red:1.5) [cat] on the ((white)) background"
    got = np.asarray(encode_weighted(pipe64.tokenizer, pipe64.text_encoder, prompt))[0]   # (77, D)
    (ids, w), = chunk_tokens(pipe64.tokenizer, prompt)
    z = np.asarray(pipe64.text_encoder(np.asarray([ids])).last_hidden_state)[0]
    w = np.asarray(w)[:, None]
    np.testing.assert_allclose(got, z * w * (z.mean() / (z * w).mean()), rtol=1e-12, atol=0)
    assert abs(got.mean() - z.mean()) <= 1e-12 * abs(z).max()
    assert sorted(set(np.round(w[:, 0], 6))) == [round(1 / 1.1, 6), 1.0, 1.21, 1.5]


def test_plain_prompt_gives_the_plain_embeddings(pipe64):
    from refldm.adapters.prompt_weighting import encode_prompts
    prompts, negatives = ["a photo of a red cat, on the white background"], ["blue dog"]
    cond, uncond = encode_prompts(pipe64, prompts, negatives, "webui")
    np.testing.assert_array_equal(np.asarray(cond), np.asarray(pipe64.encode_prompt(prompts)))
    np.testing.assert_array_equal(np.asarray(uncond), np.asarray(pipe64.encode_prompt(negatives)))


def test_clip_skip_matches_diffusers(folder, pipe64):
    """clip_skip=1: the penultimate layer through the final layer norm, for the prompt (diffusers leaves the
    negative prompt at the last layer); float64, 1e-10 relative."""
    torch = require("torch")
    diffusers = require("diffusers")
    from refldm.adapters.prompt_weighting import encode_prompts
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.text_encoder.to(torch.float64)
    # diffusers 0.42 reaches the final layer norm as text_encoder.text_model.final_layer_norm, an attribute
    # transformers 5's CLIPTextModel no longer has (the layer norm sits on the model itself): a plain
    # attribute (not a registered submodule) pointing at the model lets diffusers' own code run
    object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    with torch.no_grad():
        want, want_neg = ref.encode_prompt("a red cat", "cpu", 1, True, negative_prompt="a dog", clip_skip=1)
    cond, uncond = encode_prompts(pipe64, ["a red cat"], ["a dog"], "plain", clip_skip=1)
    for got, ref_arr in ((cond, want), (uncond, want_neg)):
        ref_arr = ref_arr.numpy()
        assert float(np.abs(np.asarray(got) - ref_arr).max() / np.abs(ref_arr).max()) <= 1e-10
    plain = np.asarray(pipe64.encode_prompt(["a red cat"]))
    assert np.abs(np.asarray(cond) - plain).max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip=3 must be an integer from 0 to 2"):
        encode_prompts(pipe64, ["a"], None, "plain", clip_skip=3)


def test_long_weighted_prompt_runs_through_the_pipeline(folder):
    from refldm.pipelines.sd import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    seen = []
    unet = pipe.unet
    original = unet.forward

    def spy(x, t, context):
        seen.append(tuple(context.shape))
        return original(x, t, context)
    unet.forward = spy
    long = "a photo of a (red:1.3) cat, " * 12                     # 96 tokens: two chunks
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=1, scheduler="euler", progress=False)
    weighted = np.asarray(pipe(long, negative_prompt="dog", prompt_syntax="webui", **kwargs).images[0])
    assert seen[0] == (2, 154, 32)                                 # [uncond; cond], 2 chunks of 77
    with pytest.warns(UserWarning, match="truncated"):                # plain: cut to 77, as diffusers
        plain = np.asarray(pipe(long, negative_prompt="dog", **kwargs).images[0])
    assert np.abs(weighted.astype(int) - plain.astype(int)).max() > 0
    with pytest.raises(ValueError, match="prompt_syntax='comfy'"):
        pipe("a", prompt_syntax="comfy", **kwargs)


def test_sd2_padding_token_follows_the_first_end_token(tmp_path):
    """SD 2.x pads with "!" (id 0), not the end token: after the first end token of each chunk, padding."""
    from refldm.adapters.prompt_weighting import chunk_tokens
    from refldm.models.tokenizer import CLIPTokenizer
    from tests.test_pipeline import write_tiny_tokenizer
    write_tiny_tokenizer(tmp_path / "tok", pad_token="!")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    bos, eos, pad, cat = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab["cat</w>"]
    assert pad != eos
    (ids, weights), = chunk_tokens(tok, "(cat:2)")
    assert ids == [bos, cat, eos] + [pad] * 74 and weights[:3] == [1.0, 2.0, 1.0]
