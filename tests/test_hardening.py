"""Bad adapters, configs and tokenizer files (issue: hardening, round two): each is refused in one line
naming the file, key or value, before anything changes; nothing non-finite is accepted.

The adapter tests run on the built-in model (no torch): LoRA and embedding files are written here with
NumPy. The mutant corpus tests start from one valid file and apply every mutation the audit found
(rank 0, NaN, inf / NaN / 1e300 alphas, huge scales, metadata of the wrong type, a bad regex, an empty
token, values that overflow float16) at every position, and assert, for each mutant: either a
ValueError whose message is one line, with every weight bit for bit as before, or success with every
weight finite.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import refldm
from refldm.adapters import lora as lora_mod
from refldm.adapters.lora import LoRAError, apply_loras, load_lora, remove_loras
from refldm.checkpoints.weights import save_file

UNET_LAYERS = {  # module key -> weight shape (out, in) of the built-in model's U-Net
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (64, 64),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (128, 128),
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": (128, 128),
}


@pytest.fixture(scope="module")
def pipe():
    from refldm import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)


def _weights(pipe):
    return {f"{name}:{key}": np.array(module.weight, copy=True) for name in ("unet", "text_encoder")
            for key, module in lora_mod._layers_of(getattr(pipe, name)).items()}


def _assert_unchanged(pipe, before):
    after = _weights(pipe)
    assert after.keys() == before.keys()
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert not changed, f"a refusal changed {changed[:3]}"
    assert not lora_mod.adapted_layers(pipe)


def _kohya(rank=2, alpha=1.0, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for key, (out, inp) in UNET_LAYERS.items():
        name = "lora_unet_" + key.replace(".", "_")
        state[f"{name}.lora_down.weight"] = rng.standard_normal((rank, inp)).astype(np.float32) * 0.1
        state[f"{name}.lora_up.weight"] = rng.standard_normal((out, rank)).astype(np.float32) * 0.1
        state[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return state


def _peft(rank=2, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for key, (out, inp) in UNET_LAYERS.items():
        state[f"unet.{key}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype(np.float32) * 0.1
        state[f"unet.{key}.lora_B.weight"] = rng.standard_normal((out, rank)).astype(np.float32) * 0.1
    return state


def _mutants():
    """(name, state, metadata, scale): every mutation, placed on the first and on the last layer."""
    keys = sorted(_kohya())
    last_down = [k for k in keys if k.endswith("lora_down.weight")][-1]
    first_up = [k for k in keys if k.endswith("lora_up.weight")][0]
    last_alpha = [k for k in keys if k.endswith(".alpha")][-1]
    for where, down_key in (("first", keys[1]), ("last", last_down)):
        state = _kohya()
        state[down_key] = state[down_key][:0]          # rank 0
        up = down_key.replace("lora_down", "lora_up")
        state[up] = state[up][:, :0]
        yield f"rank 0 ({where})", state, None, 1.0
    for value in (np.nan, np.inf, -np.inf, 3e38):
        state = _kohya()
        state[first_up] = state[first_up].copy()
        state[first_up][0, 0] = value
        yield f"up holds {value}", state, None, 1.0
    for alpha in (np.inf, np.nan, 1e30, -1e30):
        state = _kohya()
        state[last_alpha] = np.asarray(alpha, np.float32)
        yield f"alpha {alpha}", state, None, 1.0
    state = _kohya()
    state[last_alpha] = np.asarray(1e300, np.float64)
    yield "alpha 1e300 (float64)", state, None, 1.0
    for scale in (1e30, -1e30, math.inf, math.nan, 1e5):
        yield f"scale {scale}", _kohya(), None, scale
    for meta in ('[1, 2]', '{"unet.lora_alpha": {}}', '{"unet.lora_alpha": "x"}', '{"unet.lora_alpha": 1e999}',
                 '{"unet.alpha_pattern": {"to_(q": 4}}', '{"unet.alpha_pattern": [1]}',
                 '{"unet.alpha_pattern": {"to_q": "x"}}', '{"unet.use_rslora": "yes"}', '"text"', "[[[[]]]]",
                 '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"attn1": 8}}'):
        yield f"metadata {meta}", _peft(), {"lora_adapter_metadata": meta}, 1.0


def test_lora_mutants_are_refused_whole_or_applied_finite(pipe, tmp_path):
    refused = applied = 0
    for i, (name, state, metadata, scale) in enumerate(_mutants()):
        path = tmp_path / f"mutant{i}.safetensors"
        save_file(state, path, metadata=metadata)
        before = _weights(pipe)
        for merge in (True, False):
            try:
                apply_loras(pipe, [(path, scale)], merge=merge)
            except ValueError as e:
                refused += 1
                assert "\n" not in str(e) and str(path) in str(e), (name, str(e))
                _assert_unchanged(pipe, before)
            else:
                applied += 1
                for key, w in _weights(pipe).items():
                    assert np.all(np.isfinite(w)), (name, key)
                remove_loras(pipe)
                _assert_unchanged(pipe, before)
    assert refused >= 40 and applied >= 2  # the valid metadata mutant and scale 1e5 load


def test_a_rank_0_layer_after_good_ones_changes_nothing(pipe, tmp_path):
    """The audit's case: a rank-0 layer sorted last used to divide by zero after the others merged."""
    state = _kohya()
    last = sorted(k for k in state if k.endswith("lora_down.weight"))[-1]
    state[last] = state[last][:0]
    state[last.replace("lora_down", "lora_up")] = state[last.replace("lora_down", "lora_up")][:, :0]
    save_file(state, tmp_path / "r0.safetensors")
    before = _weights(pipe)
    with pytest.raises(LoRAError, match="rank 0 .*a LoRA layer needs rank >= 1"):
        apply_loras(pipe, [(tmp_path / "r0.safetensors", 1.0)])
    _assert_unchanged(pipe, before)


def test_a_merged_weight_that_overflows_is_refused(pipe, tmp_path):
    save_file(_kohya(alpha=2.0), tmp_path / "ok.safetensors")
    before = _weights(pipe)
    with pytest.raises(LoRAError, match="scale .* must be a finite number of magnitude <= 1e"):
        apply_loras(pipe, [(tmp_path / "ok.safetensors", 1e30)])
    state = _kohya(alpha=2.0)
    for k in state:
        if k.endswith(("lora_up.weight", "lora_down.weight")):
            state[k] = np.full_like(state[k], 3e38 if "up" in k else 1.0)  # B A = 2 * 3e38 per entry
    save_file(state, tmp_path / "big.safetensors")
    with pytest.raises(LoRAError, match="overflows float32"):
        apply_loras(pipe, [(tmp_path / "big.safetensors", 1.0)])
    _assert_unchanged(pipe, before)
    # and the check is not a blanket refusal: the same file at a sane scale merges and restores exactly
    apply_loras(pipe, [(tmp_path / "ok.safetensors", 0.5)])
    assert lora_mod.adapted_layers(pipe)
    remove_loras(pipe)
    _assert_unchanged(pipe, before)


@pytest.mark.parametrize("meta, message", [
    ('[1, 2]', "must be a JSON object, not list"),
    ('{"unet.lora_alpha": {}}', r"unet.lora_alpha must be a finite number"),
    ('{"unet.alpha_pattern": {"to_(q": 4}}', "is not a valid regular expression"),
    ('{"unet.alpha_pattern": [1]}', "must be an object of"),
    ('{"unet.use_rslora": "yes"}', "must be true or false"),
])
def test_lora_metadata_of_the_wrong_type_is_one_line(tmp_path, meta, message):
    save_file(_peft(), tmp_path / "m.safetensors", metadata={"lora_adapter_metadata": meta})
    with pytest.raises(LoRAError, match=message):
        load_lora(tmp_path / "m.safetensors")


# --------------------------------------------------------------------------------------------------
# embeddings

@pytest.mark.parametrize("content, token, message", [
    ({"": np.ones((64,), np.float32)}, None, "token '' must be a non-empty word"),
    ({"a b": np.ones((64,), np.float32)}, None, "token 'a b' must be a non-empty word"),
    ({"<big>": np.full((2, 64), 3e38, np.float32)}, None, "magnitude 3e\\+38, over 65504"),
    ({"<nan>": np.full((64,), np.nan, np.float32)}, None, "holds NaN or inf"),
    ({"<ok>": np.ones((64,), np.float32)}, "", "token '' must be a non-empty word"),
])
def test_bad_embeddings_are_refused_before_the_text_encoder_grows(pipe, tmp_path, content, token, message):
    from refldm.adapters.textual_inversion import TextualInversionError, load_textual_inversion
    save_file(content, tmp_path / "e.safetensors")
    rows, vocab = pipe.text_encoder.embeddings.token_embedding.weight.shape[0], len(pipe.tokenizer)
    with pytest.raises(TextualInversionError, match=message):
        load_textual_inversion(pipe, tmp_path / "e.safetensors", token=token)
    assert pipe.text_encoder.embeddings.token_embedding.weight.shape[0] == rows and len(pipe.tokenizer) == vocab


# --------------------------------------------------------------------------------------------------
# the web UI's prompt syntax

@pytest.mark.parametrize("prompt", ["a (cat:" + "9" * 40 + ")", "((((cat:1000):1000):1000))", "(x:-10000000)"])
def test_prompt_weights_that_overflow_are_refused(prompt):
    from refldm.adapters.prompt_weighting import PromptSyntaxError, parse_prompt_attention
    with pytest.raises(PromptSyntaxError, match="out of range"):
        parse_prompt_attention(prompt)
    assert parse_prompt_attention("(cat:1000)") == [["cat", 1000.0]]  # large but allowed


def test_webui_syntax_chunks_to_the_text_encoders_own_length(pipe):
    """The built-in text encoder has 32 positions: chunks of 30 tokens + start + end, not 77."""
    from refldm.adapters.prompt_weighting import chunk_length, chunk_tokens, encode_prompts
    assert chunk_length(pipe.tokenizer, pipe.text_encoder) == 30
    long_prompt = ", ".join(["a red circle"] * 12)
    chunks = chunk_tokens(pipe.tokenizer, long_prompt, chunk=30)
    assert len(chunks) > 1 and all(len(ids) == 32 and len(w) == 32 for ids, w in chunks)
    cond, uncond = encode_prompts(pipe, [long_prompt], ["(blue:1.2)"], syntax="webui")
    assert cond.shape == uncond.shape == (1, 32 * len(chunks), 64)
    assert np.all(np.isfinite(cond))


# --------------------------------------------------------------------------------------------------
# configs: one table of rules where the config is read

CONFIG_MUTANTS = [
    ("vae", "norm_num_groups", 0), ("vae", "in_channels", math.inf), ("vae", "latent_channels", 0),
    ("vae", "sample_size", []), ("vae", "layers_per_block", 10**9), ("vae", "block_out_channels", [0]),
    ("vae", "block_out_channels", [[[[64]]]]), ("vae", "scaling_factor", math.nan), ("vae", "force_upcast", "x"),
    ("unet", "freq_shift", math.inf), ("unet", "norm_eps", 0.0), ("unet", "layers_per_block", 10**9),
    ("unet", "cross_attention_dim", {"a": 1}), ("unet", "in_channels", True), ("unet", "mid_block_type", {}),
    ("text_encoder", "layer_norm_eps", math.inf), ("text_encoder", "num_hidden_layers", 10**9),
    ("text_encoder", "hidden_size", 1.5), ("text_encoder", "max_position_embeddings", 10**20),
    ("scheduler", "beta_start", 1), ("scheduler", "beta_start", -0.1), ("scheduler", "num_train_timesteps", 10**12),
    ("scheduler", "thresholding", math.inf), ("scheduler", "clip_sample", math.nan),
    ("scheduler", "rescale_betas_zero_snr", -64), ("scheduler", "set_alpha_to_one", "x"),
    ("scheduler", "steps_offset", [1]),
]


@pytest.mark.parametrize("part, key, value", CONFIG_MUTANTS)
def test_config_values_of_the_wrong_type_or_range_are_one_line(part, key, value):
    import refldm.schedulers as rs
    from refldm.checkpoints.config import ConfigError
    from refldm.models.clip import CLIPTextModel
    from refldm.models.unet import UNet2DConditionModel
    from refldm.models.vae import AutoencoderKL
    folder = f"{refldm.DEFAULT_MODEL}/{part}"
    config = json.load(open(f"{folder}/{'scheduler_config' if part == 'scheduler' else 'config'}.json"))
    config[key] = value
    cls = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}.get(part)
    with pytest.raises(ConfigError) as e:
        if cls is None:
            rs.DDIMScheduler.from_config(config)
        else:
            cls.parse_config(config, f"{part}/config.json")
    assert "\n" not in str(e.value) and key in str(e.value)


def test_deeply_nested_configs_are_one_line_not_a_recursion_error(tmp_path):
    from refldm.checkpoints.config import ConfigError
    from refldm.checkpoints.weights import WeightsError, read_config
    from refldm.models.vae import AutoencoderKL
    (tmp_path / "config.json").write_text('{"in_channels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(WeightsError, match="nested too deeply"):
        read_config(tmp_path)
    nested = []
    for _ in range(5000):
        nested = [nested]
    for key in ("block_out_channels", "unknown_key", "in_channels"):
        with pytest.raises(ConfigError, match=key):
            AutoencoderKL.parse_config({key: nested}, "vae/config.json")


# --------------------------------------------------------------------------------------------------
# tokenizer files

def _tokenizer_folder(tmp_path, config_changes=None, fast=None):
    import shutil
    folder = tmp_path / "tok"
    shutil.copytree(f"{refldm.DEFAULT_MODEL}/tokenizer", folder)
    if config_changes:
        path = folder / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config.update(config_changes)
        path.write_text(json.dumps(config))
    if fast is not None:
        (folder / "tokenizer.json").write_text(fast)
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"added_tokens_decoder": [1]}, "added_tokens_decoder must be an object"),
    ({"model_max_length": 10**20}, "model_max_length=.* must be an integer from 2 to 65536"),
    ({"model_max_length": 3.2e10}, "model_max_length=.* must be an integer from 2 to 65536"),
    ({"model_max_length": 1}, "model_max_length=1 must be an integer from 2"),
])
def test_bad_tokenizer_configs_are_one_line(tmp_path, changes, message):
    from refldm.models.tokenizer import CLIPTokenizer, TokenizerError
    with pytest.raises(TokenizerError, match=message):
        CLIPTokenizer.from_pretrained(_tokenizer_folder(tmp_path, changes))


def test_bad_tokenizer_json_is_one_line(tmp_path):
    from refldm.models.tokenizer import CLIPTokenizer, TokenizerError
    folder = _tokenizer_folder(tmp_path)
    with pytest.raises(TokenizerError, match="nested too deeply"):
        CLIPTokenizer.from_pretrained(_tokenizer_folder(tmp_path / "deep", fast="[" * 100_000 + "]" * 100_000))
    assert CLIPTokenizer.from_pretrained(folder)("a red circle")["input_ids"].shape == (1, 32)
    # the no-limit value of transformers still means "no limit"
    tok = CLIPTokenizer.from_pretrained(_tokenizer_folder(tmp_path / "nolimit", {"model_max_length": 1e30}))
    with pytest.raises(TokenizerError, match="sets no model_max_length; pass max_length"):
        tok("a red circle")
    assert tok("a red circle", max_length=8)["input_ids"].shape == (1, 8)


# --------------------------------------------------------------------------------------------------
# <lora:NAME> tags resolve inside --lora-dir only

def test_lora_tag_outside_the_lora_dir_is_refused(tmp_path):
    from refldm.cli import main
    (tmp_path / "loras").mkdir()
    save_file(_kohya(), tmp_path / "outside.safetensors")
    code = main(["txt2img", "-p", "a <lora:../outside:1> circle", "--lora-dir", str(tmp_path / "loras"),
                 "--steps", "1", "-o", str(tmp_path / "out.png")])
    assert code == 2 and not (tmp_path / "out.png").exists()


def test_a_transposed_single_file_tensor_loads_c_contiguous():
    """SDXL's OpenCLIP text_projection is stored transposed in a single file; a transposed view would
    make BLAS sum in another order than the folder's C-ordered array (1.6e-5 apart in the latents)."""
    from refldm.checkpoints import convert
    configs = {"unet": {}, "vae": {}, "text_encoder_2": {"num_hidden_layers": 1}}
    key = convert.original_key("xl_open_clip", "text_projection.weight", convert.shape_of(configs)).key
    stored = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = convert.from_original({key: stored}, {"text_encoder_2": ["text_projection.weight"]}, configs, "sdxl")
    value = out["text_encoder_2"]["text_projection.weight"]
    np.testing.assert_array_equal(value, stored.T)
    assert value.flags["C_CONTIGUOUS"]


# --------------------------------------------------------------------------------------------------
# the CLI: every bad size, count or value one line with a non-zero exit, before any work

@pytest.mark.parametrize("argv, message", [
    (["trace", "--part", "vae-decode", "-o", "{tmp}/t.png"], "a trace is a safetensors file"),
    (["trace", "--part", "vae-decode", "-o", "{tmp}/t.safetensors", "--batch", "1000000"], "--batch must lie in 1..256"),
    (["trace", "--part", "text-encoder", "-o", "{tmp}/t.safetensors", "--seq-len", "100000000"], "--seq-len must lie"),
    (["trace", "--part", "unet", "-o", "{tmp}/t.safetensors", "--timestep", "nan"], "--timestep must be a finite"),
    (["trace", "--part", "unet", "-o", "{tmp}/t.safetensors", "--timestep", "inf"], "--timestep must be a finite"),
    (["compare", "{tmp}/a.safetensors", "{tmp}/a.safetensors", "--rtol", "inf"], "--rtol must be a finite number > 0"),
    (["cost", "--measure", "--measure-size", "100000"], "--measure-size 100000 is over 2048"),
    (["vae-report", "--probes", "--bands", "1000000000"], "--bands must lie in 1..1024"),
    (["vae-report", "--probes", "--probe-size", "100000"], "--probe-size must lie in"),
])
def test_cli_bounds_are_one_line(tmp_path, capsys, argv, message):
    from refldm.cli import main
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "t.safetensors").exists()


def test_decompression_bombs_are_one_line(tmp_path, capsys):
    """A PNG whose header claims 100000 x 100000 pixels: refused by name in inpaint (image and mask) and
    vae-report, as img2img and encode already did."""
    import struct
    import zlib
    from refldm.cli import main

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    for argv in (["inpaint", "-i", str(bomb), "--mask", str(tmp_path / "ok.png"), "-p", "x"],
                 ["inpaint", "-i", str(tmp_path / "ok.png"), "--mask", str(bomb), "-p", "x"],
                 ["vae-report", str(bomb)]):
        code = main(argv + (["-o", str(tmp_path / "out.png")] if argv[0] == "inpaint" else []))
        err = capsys.readouterr().err.strip()
        assert code == 2 and "too large to open safely" in err and len(err.splitlines()) == 1, (argv, err)


def test_threads_beyond_the_bound_are_one_line(monkeypatch):
    from refldm.accel import AccelError, threads
    monkeypatch.setenv("REFLDM_NUM_THREADS", "100000")
    with pytest.raises(AccelError, match="REFLDM_NUM_THREADS must be an integer from 1 to 1024"):
        threads._threads_from_env()
    with pytest.raises(ValueError, match="from 1 to 1024"):
        threads.set_num_threads(100000)


def test_trace_metadata_of_the_wrong_type_is_one_line(tmp_path):
    from refldm.crosscheck import trace
    for field, value in (("order", '{"a": 1}'), ("inputs", "5"), ("order", "[1, 2]")):
        save_file({"x": np.zeros(2, np.float32)}, tmp_path / "t.safetensors", metadata={field: value})
        with pytest.raises(ValueError, match=f"trace metadata '{field}' must be a JSON list"):
            trace.load(tmp_path / "t.safetensors")


def test_interrupted_atomic_write_leaves_no_temporary_file(tmp_path):
    from refldm.files import atomic_write

    def write(f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.png", write)
    assert list(tmp_path.iterdir()) == []


def test_encode_and_decode_default_to_the_built_in_vae(tmp_path):
    from PIL import Image
    from refldm.cli import main
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "in.png")
    assert main(["encode", str(tmp_path / "in.png"), "-o", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape[-2:] == (8, 8)
    assert main(["decode", str(tmp_path / "z.npy"), "-o", str(tmp_path / "out.png")]) == 0
