"""refldm/checkpoints/weights.py under attack: truncated files, lying headers, wrong shapes, missing and extra keys.

Every malformed input must give one WeightsError naming the file (and the key, where there is one):
never another exception, never a silently wrong array. Valid fp32 / fp16 / bf16 files must load
exactly, and sharded checkpoints must merge.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refldm import backend
from refldm.models.blocks import Conv2d, GroupNorm
from refldm.core.nn import Module
from refldm.checkpoints.weights import (
    WeightsError,
    find_weights,
    load_file,
    load_into,
    load_state,
    read_config,
    read_header,
    save_file,
)
from tests.conftest import require


class Tiny(Module):
    """conv.weight (4, 2, 3, 3), conv.bias (4,), norm.weight (4,), norm.bias (4,)."""

    def __init__(self):
        self.conv = Conv2d(2, 4, 3)
        self.norm = GroupNorm(2, 4)
        self.assign_names()


def tiny_state(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(dtype) for k, _, _, v in Tiny().params()}


def write_raw(path, header, data: bytes = b"", length=None) -> str:
    """A safetensors file with an arbitrary header (dict, or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def valid_file(tmp_path, name="w.safetensors"):
    path = str(tmp_path / name)
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.float16),
               "c": np.arange(3, dtype=np.float64)}, path)
    return path


def raises_naming(fn, *names):
    """Call fn; it must raise WeightsError whose message names every one of `names`."""
    with pytest.raises(WeightsError) as info:
        fn()
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------------------------------

def test_save_then_load_roundtrips_every_dtype(tmp_path):
    tensors = {"f64": np.linspace(-1, 1, 6).reshape(2, 3), "f32": np.ones((1, 2, 3), np.float32) / 3,
               "f16": np.array([0.5, -2, 65504], np.float16), "i64": np.arange(5), "u8": np.arange(3, dtype=np.uint8),
               "empty": np.zeros((0, 4), np.float32)}
    path = str(tmp_path / "all.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert read_header(path)[1] == {"format": "pt"}


def test_save_keeps_a_scalar_a_scalar(tmp_path):
    path = str(tmp_path / "scalar.safetensors")
    save_file({"s": np.array(2.5, np.float32)}, path)
    assert load_file(path)["s"].shape == ()


def test_files_agree_with_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file as st_load
    from safetensors.numpy import save_file as st_save

    tensors = {"x": np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32),
               "y": np.arange(7, dtype=np.float16), "z": np.arange(4, dtype=np.int32)}
    theirs = str(tmp_path / "theirs.safetensors")
    ours = str(tmp_path / "ours.safetensors")
    st_save(tensors, theirs)
    save_file(tensors, ours)
    for path, reader in ((theirs, load_file), (ours, st_load)):
        back = reader(path)
        for k, v in tensors.items():
            np.testing.assert_array_equal(back[k], v)
            assert back[k].dtype == v.dtype


@settings(max_examples=25)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=40))
def test_bf16_file_upcasts_to_the_float32_of_its_top_bits(values):
    """A bfloat16 is the top half of a float32: loading must give exactly that float32 (no rounding)."""
    import tempfile

    bits = (np.array(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = write_raw(os.path.join(d, "bf.safetensors"),
                         {"t": {"dtype": "BF16", "shape": [len(values)], "data_offsets": [0, 2 * len(values)]}},
                         bits.astype("<u2").tobytes())
        got = load_file(path)["t"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_bf16_matches_torch(tmp_path):
    torch = require("torch")
    from safetensors.torch import save_file as st_save

    t = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = str(tmp_path / "bf16.safetensors")
    st_save({"t": t}, path)
    np.testing.assert_array_equal(load_file(path)["t"], t.float().numpy())


@pytest.mark.parametrize("file_dtype", [np.float16, "bf16", np.float32, np.float64])
@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_load_into_upcasts_exactly(tmp_path, file_dtype, compute):
    state = tiny_state(np.float32)
    path = str(tmp_path / "m.safetensors")
    if file_dtype == "bf16":
        header, chunks, off = {}, [], 0
        for k, v in sorted(state.items()):
            b = (v.view(np.uint32) >> 16).astype("<u2").tobytes()
            header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
            chunks.append(b)
            off += len(b)
        write_raw(path, header, b"".join(chunks))
        expected = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in state.items()}
    else:
        save_file({k: v.astype(file_dtype) for k, v in state.items()}, path)
        expected = {k: v.astype(file_dtype) for k, v in state.items()}
    model = load_into(Tiny(), load_state([path]), dtype=compute, source=path)
    for k, v in model.state_dict().items():
        assert v.dtype == np.dtype(compute)
        np.testing.assert_array_equal(v, expected[k].astype(compute))  # the upcast is exact


def test_load_into_puts_weights_on_the_active_backend(on_backend):
    model = load_into(Tiny(), tiny_state(), dtype="float32")
    for v in model.state_dict().values():
        assert backend.array_namespace(v) is backend.xp()


# --------------------------------------------------------------------------------------------------
# Files that lie
# --------------------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(st.data())
def test_any_truncation_is_a_clear_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("trunc")
    path = valid_file(tmp)
    full = open(path, "rb").read()
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    with open(path, "wb") as f:
        f.write(full[:cut])
    raises_naming(lambda: load_file(path), path)


@settings(max_examples=60)
@given(st.data())
def test_corrupted_bytes_never_crash(tmp_path_factory, data):
    """Overwrite a few bytes anywhere in the length prefix or the header: a WeightsError or a valid load."""
    tmp = tmp_path_factory.mktemp("flip")
    path = valid_file(tmp)
    blob = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, 8 + n - 1), label="position")
        blob[i] = data.draw(st.sampled_from(list(b'0123456789[]{}":,-. eE\x00\xff') + [blob[i] ^ 1]), label="byte")
    with open(path, "wb") as f:
        f.write(bytes(blob))
    try:
        out = load_file(path)
    except WeightsError as e:
        assert path in str(e)
        return
    header, _, _ = read_header(path)  # a load that succeeds must be self-consistent
    for key, arr in out.items():
        assert list(arr.shape) == header[key]["shape"]


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


LIES = [
    ("offsets past the end", {"w": {**ENTRY, "data_offsets": [0, 16]}}, b"\0" * 8, ["w", "data_offsets"]),
    ("offsets reversed", {"w": {**ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8, ["w", "data_offsets"]),
    ("negative offset", {"w": {**ENTRY, "data_offsets": [-8, 0]}}, b"\0" * 8, ["w"]),
    ("float offsets", {"w": {**ENTRY, "data_offsets": [0.0, 8.0]}}, b"\0" * 8, ["w"]),
    ("three offsets", {"w": {**ENTRY, "data_offsets": [0, 4, 8]}}, b"\0" * 8, ["w"]),
    ("shape too big for the bytes", {"w": {**ENTRY, "shape": [3]}}, b"\0" * 8, ["w", "bytes"]),
    ("shape too small for the bytes", {"w": {**ENTRY, "shape": [1]}}, b"\0" * 8, ["w", "bytes"]),
    ("negative shape", {"w": {**ENTRY, "shape": [-2]}}, b"\0" * 8, ["w", "shape"]),
    ("shape not a list", {"w": {**ENTRY, "shape": 2}}, b"\0" * 8, ["w", "shape"]),
    ("dtype lies about the size", {"w": {**ENTRY, "dtype": "F64"}}, b"\0" * 8, ["w", "F64"]),
    ("unknown dtype", {"w": {**ENTRY, "dtype": "F9"}}, b"\0" * 8, ["w", "F9"]),
    ("dtype NumPy lacks", {"w": {**ENTRY, "dtype": "F8_E4M3", "shape": [8]}}, b"\0" * 8, ["w", "F8_E4M3"]),
    ("missing field", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, ["w"]),
    ("entry not an object", {"w": [1, 2]}, b"\0" * 8, ["w"]),
    ("overlapping tensors", {"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12, ["'a'", "'b'", "overlap"]),
    ("same bytes twice", {"a": ENTRY, "b": ENTRY}, b"\0" * 8, ["overlap"]),
    ("header a list", [1, 2], b"", ["JSON object"]),
]


@pytest.mark.parametrize("name, header, data, words", LIES, ids=[c[0] for c in LIES])
def test_lying_header_is_a_clear_error(tmp_path, name, header, data, words):
    path = write_raw(tmp_path / "lie.safetensors", header, data)
    raises_naming(lambda: load_file(path), path, *words)


BROKEN = [
    ("empty file", None, None),
    ("shorter than the length prefix", b"\x01\x02\x03", None),
    ("length past the end", b'{"a": 1}', 1000),
    ("length cuts the JSON", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 10),
    ("not JSON", b"\x80\x81 not json", None),
    ("not UTF-8", b'{"\xff": 1}', None),
    ("zero length", b"", 0),
]


@pytest.mark.parametrize("name, raw, length", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_prefix_or_header_is_a_clear_error(tmp_path, name, raw, length):
    path = str(tmp_path / "broken.safetensors")
    if raw is None:
        open(path, "wb").close()
    elif name.startswith("shorter"):
        open(path, "wb").write(raw)
    else:
        write_raw(path, raw, b"", length=length)
    raises_naming(lambda: load_file(path), path)


# Pathological headers and indexes: each must be a WeightsError naming the file, never a TypeError,
# RecursionError or AttributeError from deep inside the parser.


PATHOLOGICAL = [
    ("dtype a list", b'{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}'),
    ("bool in the shape", b'{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}'),
    ("nesting too deep", b"[" * 100000 + b"]" * 100000),
    ("integer too long", b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'),
]


@pytest.mark.parametrize("name, raw", PATHOLOGICAL, ids=[c[0] for c in PATHOLOGICAL])
def test_pathological_header_is_a_clear_error(tmp_path, name, raw):
    path = write_raw(tmp_path / "weird.safetensors", raw, b"\0" * 8)
    raises_naming(lambda: load_file(path), path)


def test_pickle_checkpoints_are_refused(tmp_path):
    for name in ("model.ckpt", "pytorch_model.bin", "x.pt", "x.pth"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04 pickle")
        raises_naming(lambda: load_file(str(path)), name, "pickle")
    folder = tmp_path / "only_bin"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    raises_naming(lambda: find_weights(folder), "diffusion_pytorch_model.bin", "pickle")


def test_missing_file_and_folder(tmp_path):
    raises_naming(lambda: load_file(str(tmp_path / "nope.safetensors")), "nope.safetensors")
    raises_naming(lambda: find_weights(tmp_path / "nofolder"), "nofolder")
    raises_naming(lambda: find_weights(tmp_path), str(tmp_path), "diffusion_pytorch_model.safetensors")
    raises_naming(lambda: read_config(tmp_path), "config.json")
    (tmp_path / "config.json").write_text("{not json")
    raises_naming(lambda: read_config(tmp_path), "config.json", "JSON")
    (tmp_path / "config.json").write_text("[1]")
    raises_naming(lambda: read_config(tmp_path), "config.json")


# --------------------------------------------------------------------------------------------------
# The model does not fit the checkpoint
# --------------------------------------------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_keys_are_all_named():
    state = tiny_state()
    del state["norm.bias"]
    state["conv.weight"] = state["conv.weight"][:, :1]
    state["extra.weight"] = np.zeros(3, np.float32)
    message = raises_naming(lambda: load_into(Tiny(), state, source="ckpt.safetensors"), "ckpt.safetensors",
                            "missing: norm.bias", "unexpected: extra.weight", "conv.weight (4, 1, 3, 3) != (4, 2, 3, 3)")
    assert message.count("Tiny") == 1


def test_many_missing_keys_are_summarised():
    state = {f"junk.{i}": np.zeros(1, np.float32) for i in range(20)}
    raises_naming(lambda: load_into(Tiny(), state), "unexpected: junk.0", "(20 in all)", "missing: conv.bias")


def test_non_float_and_non_finite_weights_are_refused():
    state = tiny_state()
    state["norm.weight"] = np.arange(4)
    raises_naming(lambda: load_into(Tiny(), state, source="f"), "norm.weight", "int64")
    state = tiny_state()
    state["conv.bias"][2] = np.nan
    raises_naming(lambda: load_into(Tiny(), state, source="f"), "conv.bias", "NaN")


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints
# --------------------------------------------------------------------------------------------------

def write_shards(folder, state, split):
    """Save `state` as two shards plus the index json, as diffusers' save_pretrained(max_shard_size=...)."""
    keys = sorted(state)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    parts = [keys[:split], keys[split:]]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file({k: state[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return names, index


def test_sharded_checkpoint_merges(tmp_path):
    state = tiny_state()
    names, _ = write_shards(tmp_path, state, 2)
    paths = find_weights(tmp_path)
    assert [os.path.basename(p) for p in paths] == names
    model = load_into(Tiny(), load_state(paths))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_sharded_checkpoint_errors(tmp_path):
    state = tiny_state()
    names, index = write_shards(tmp_path, state, 2)
    # a key stored in both shards
    save_file({k: state[k] for k in sorted(state)[:3]}, os.path.join(tmp_path, names[1]))
    raises_naming(lambda: load_state(find_weights(tmp_path)), names[0], names[1], sorted(state)[0])
    # a shard the index names but the folder lacks
    os.remove(os.path.join(tmp_path, names[1]))
    raises_naming(lambda: load_state(find_weights(tmp_path)), names[1])
    # an index that is not JSON / has no weight_map
    with open(index, "w") as f:
        f.write("{")
    raises_naming(lambda: find_weights(tmp_path), "index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}}, f)
    raises_naming(lambda: find_weights(tmp_path), "index.json")


@pytest.mark.parametrize("weight_map", [[1, 2], None, {"a": 3}, {"a": "../outside.safetensors"}],
                         ids=["list", "null", "not a file name", "outside the folder"])
def test_malformed_shard_index_is_a_clear_error(tmp_path, weight_map):
    with open(tmp_path / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    raises_naming(lambda: find_weights(tmp_path), "index.json")


# --------------------------------------------------------------------------------------------------
# What the safetensors library refuses, refldm refuses (issue 12, items 1-3)
# --------------------------------------------------------------------------------------------------


def library_refuses(path) -> bool:
    import safetensors
    try:
        safetensors.deserialize(open(path, "rb").read())
    except safetensors.SafetensorError:
        return True
    return False


def test_header_length_shifted_into_the_padding_is_refused(tmp_path):
    """Shrinking the length field by 4 eats 4 padding spaces: valid JSON, but every tensor would start
    4 bytes early (one float). The tensors then do not cover the data section: refused."""
    raw = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode() + b"    "
    data = np.array([1.0, 2.0, 3.0], "<f4").tobytes()
    good = write_raw(tmp_path / "good.safetensors", raw, data)
    np.testing.assert_array_equal(load_file(good)["a"], [1.0, 2.0])
    shifted = write_raw(tmp_path / "shifted.safetensors", raw, data, length=len(raw) - 4)
    assert library_refuses(shifted)
    raises_naming(lambda: load_file(shifted), shifted, "cover")


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_dtype_changed_with_its_range_halved_is_refused(tmp_path, dtype):
    """F32 -> F16 with the byte range halved: the sizes match, but half the tensor's bytes belong to no one."""
    header = {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    path = write_raw(tmp_path / "half.safetensors", header, b"\0" * 16)
    assert library_refuses(path)
    raises_naming(lambda: load_file(path), path, "4..8", "'b'")


def test_holes_and_uncovered_tail_are_refused(tmp_path):
    path = write_raw(tmp_path / "tail.safetensors", {"a": ENTRY}, b"\0" * 12)
    assert library_refuses(path)
    raises_naming(lambda: load_file(path), path, "8 of the 12")


@pytest.mark.parametrize("metadata", [{"a": 1}, {"a": None}, [], "text", {"a": ["b"]}])
def test_metadata_must_be_strings(tmp_path, metadata):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": metadata, "w": ENTRY}, b"\0" * 8)
    assert library_refuses(path)
    raises_naming(lambda: load_file(path), path, "__metadata__")


def test_null_metadata_and_unknown_fields_are_accepted_as_the_library_does(tmp_path):
    path = write_raw(tmp_path / "ok.safetensors", {"__metadata__": None, "w": {**ENTRY, "extra": [1]}},
                     np.array([1.5, 2.5], "<f4").tobytes())
    assert not library_refuses(path)
    np.testing.assert_array_equal(load_file(path)["w"], [1.5, 2.5])


@pytest.mark.parametrize("shape", [[0] * 65, [0, 10 ** 19], [0, 2 ** 63 - 1], [0, 2 ** 64 - 1], [1] * 65])
def test_shapes_numpy_cannot_hold_are_one_clear_error(tmp_path, shape):
    header = {"w": ENTRY, "z": {"dtype": "F32", "shape": shape, "data_offsets": [8, 8 + 4 * int(0 not in shape)]}}
    path = write_raw(tmp_path / "z.safetensors", header, b"\0" * (8 + 4 * int(0 not in shape)))
    raises_naming(lambda: load_file(path), path, "'z'", "NumPy")


@pytest.mark.parametrize("shape", [[2 ** 32, 2 ** 32, 0], [2 ** 64]])
def test_shapes_overflowing_64_bits_are_refused(tmp_path, shape):
    path = write_raw(tmp_path / "o.safetensors", {"w": ENTRY, "z": {"dtype": "F32", "shape": shape,
                                                                     "data_offsets": [8, 8]}}, b"\0" * 8)
    assert library_refuses(path)
    raises_naming(lambda: load_file(path), path, "'z'")


SERDE_STRICTER = [
    ("NaN in an unknown field", b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}'),
    ("1e400", b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}'),
    ("-0 as a size", b'{"w":{"dtype":"F32","shape":[-0,2],"data_offsets":[0,0]}}'),
    ("lone surrogate", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("repeated field", b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("repeated __metadata__", b'{"__metadata__":{},"__metadata__":{},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("invalid entry shadowed by a repeated key", b'{"w":["F32",[2]],"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("deep nesting in a shadowed entry", b'{"w":{"x":' + b"[" * 200 + b"]" * 200 + b'},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'),
    ("nested 128 deep", b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 126 + b"]" * 126 + b"}}"),
]


@pytest.mark.parametrize("name, raw", SERDE_STRICTER, ids=[c[0] for c in SERDE_STRICTER])
def test_json_the_library_refuses_is_refused(tmp_path, name, raw):
    """Python's json module takes these; the library's parser does not, so refldm must not either."""
    path = write_raw(tmp_path / "j.safetensors", raw, b"\0" * 8)
    assert library_refuses(path)
    raises_naming(lambda: load_file(path), path)


def test_entry_as_a_list_and_nesting_127_deep_are_accepted_as_the_library_does(tmp_path):
    for raw in (b'{"w":["F32",[2],[0,8]]}',
                b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + b"[" * 125 + b"]" * 125 + b"}}"):
        path = write_raw(tmp_path / "l.safetensors", raw, np.array([1, 2], "<f4").tobytes())
        assert not library_refuses(path)
        np.testing.assert_array_equal(load_file(path)["w"], [1, 2])


@pytest.mark.parametrize("key", ["\x1b[2J\x1b[31mred", "a\rb\nc", "k" * 10_000_000])
def test_untrusted_names_are_escaped_and_cut_in_messages(tmp_path, key):
    header = {key: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}  # wrong size: an error naming the key
    path = write_raw(tmp_path / "n.safetensors", header, b"\0" * 8)
    message = raises_naming(lambda: load_file(path), path)
    assert len(message) < 600
    assert all(c.isprintable() for c in message), message


def test_huge_dtype_string_makes_a_short_message(tmp_path):
    path = write_raw(tmp_path / "d.safetensors", {"w": {**ENTRY, "dtype": "X" * 10_000_000}}, b"\0" * 8)
    message = raises_naming(lambda: load_file(path), path, "unsupported dtype")
    assert len(message) < 600


def test_unexpected_keys_are_escaped_in_fit_errors():
    state = {**tiny_state(), "\x1b[31mevil": np.zeros(1, np.float32)}
    with pytest.raises(WeightsError) as info:
        load_into(Tiny(), state)
    assert "\x1b" not in str(info.value) and "\\x1b[31mevil" in str(info.value)


def test_verdicts_agree_with_the_safetensors_library_on_3000_mutants(tmp_path):
    """refldm accepts a mutated file exactly when the library does, with the same metadata and bytes
    (tests/weights_fuzz.py; tools/fuzz_weights.py runs it longer). The mutants must exercise both sides."""
    require("safetensors")
    from tests.weights_fuzz import run
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path  # 3000 small writes: memory is faster
    counts, failures = run(3000, seed=12, folder=folder)
    assert not failures, failures[0][:2]
    assert counts["accepted"] > 300 and counts["refused"] > 1500 and counts["load refused"] > 10
