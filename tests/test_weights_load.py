"""Loading without a second copy (issue 32): load_file maps the file copy-on-write and converts float
tensors to a target dtype while it reads them; the values are exactly those of the plain read."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from refldm.checkpoints.weights import bf16_to_float32, load_file, load_state, read_header, save_file


def _tensors():
    rng = np.random.default_rng(3)
    return {"f32": rng.standard_normal((5, 7)).astype(np.float32),
            "f16": rng.standard_normal((4, 3, 3)).astype(np.float16),
            "f64": rng.standard_normal((6,)) * 1e3,
            "i64": np.arange(12).reshape(3, 4),
            "empty": np.zeros((0, 4), np.float32),
            "scalar": np.array(2.5, np.float32)}


def _mapping_of(arr):
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_kept_dtype_is_a_copy_on_write_view_of_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _tensors()
    save_file(tensors, path)
    before = path.read_bytes()
    state = load_file(path)
    for key, value in tensors.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape
        np.testing.assert_array_equal(state[key], value)
    assert isinstance(_mapping_of(state["f32"]), mmap.mmap)      # no copy of the stored bytes
    state["f32"][0, 0] = 123.0                                    # writable, but only this process's copy
    assert path.read_bytes() == before
    assert load_file(path)["f32"][0, 0] == tensors["f32"][0, 0]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_conversion_while_reading_equals_astype(tmp_path, dtype, monkeypatch):
    from refldm.checkpoints import weights
    monkeypatch.setattr(weights, "_READ_CHUNK", 64)              # many chunks per tensor
    path = tmp_path / "w.safetensors"
    tensors = _tensors()
    save_file(tensors, path)
    state = load_file(path, dtype=dtype)
    for key, value in tensors.items():
        want = value if value.dtype.kind != "f" else value.astype(dtype)
        assert state[key].dtype == want.dtype, key
        np.testing.assert_array_equal(state[key], want)
    header, _, start = read_header(path)
    kept = [k for k, v in tensors.items() if v.dtype == np.dtype(dtype) and v.size]   # a misaligned one is read
    aligned = [k for k in kept if (start + header[k]["data_offsets"][0]) % v_size(tensors[k]) == 0]
    assert all(isinstance(_mapping_of(state[k]), mmap.mmap) for k in aligned)
    assert all(state[k].flags.aligned for k in kept)


def v_size(value):
    return value.dtype.itemsize


def test_bf16_converts_through_float32(tmp_path):
    import json
    import struct
    values = np.random.default_rng(4).standard_normal((3, 5)).astype(np.float32) * 100
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)          # bfloat16: the top 16 bits
    header = json.dumps({"b": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, bits.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "b.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.astype("<u2").tobytes())
    np.testing.assert_array_equal(load_file(path)["b"], bf16_to_float32(bits))
    for dtype in ("float16", "float32"):
        np.testing.assert_array_equal(load_file(path, dtype=dtype)["b"], bf16_to_float32(bits).astype(dtype))
    np.testing.assert_array_equal(load_state([path], dtype="float16")["b"], bf16_to_float32(bits).astype("float16"))
