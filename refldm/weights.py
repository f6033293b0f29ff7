"""Reading and writing safetensors checkpoints, and loading them into a model, for every model alike.

The safetensors format is: 8 bytes little-endian header length N, then N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. This module parses it by hand so that every way a file can
lie (a truncated file, offsets outside the data, overlapping tensors, a size that does not match the
shape and dtype, an unknown dtype) is one clear error naming the file and the key. It never unpickles:
``.ckpt`` / ``.bin`` / ``.pt`` files are refused.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from refldm import backend

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype(v).name: k for k, v in _DTYPES.items() if k != "BF16"}
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024


from refldm.errors import WeightsError  # one home for the error classes


def refuse_pickle(path) -> None:
    """Raise for pickle-based checkpoint files, which refldm never opens."""
    if str(path).lower().endswith(_PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: refusing a pickle-based checkpoint (it can run arbitrary code when opened); "
            "convert it to .safetensors first, e.g. with the safetensors convert script in a trusted sandbox")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 -> float32: a bfloat16 is the top 16 bits of a float32, so shift them back up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path) -> tuple[dict, dict, int]:
    """Parse a safetensors header: ({key: info}, metadata, byte offset of the data section)."""
    path = os.fspath(path)
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                               "truncated or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON errors, ints > 4300 digits
        raise WeightsError(f"{path}: header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: __metadata__ is not a JSON object")
    data_size = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"{path}: key {key!r}: header entry must have exactly dtype, shape, data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise WeightsError(f"{path}: key {key!r}: unsupported dtype {dt!r}")
        if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)):
            raise WeightsError(f"{path}: key {key!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_size):
            raise WeightsError(f"{path}: key {key!r}: data_offsets {offs!r} lie outside the "
                               f"{data_size}-byte data section (truncated or corrupted file)")
        count = 1
        for s in shape:
            count *= s
        if offs[1] - offs[0] != count * _DTYPES[dt].itemsize:
            raise WeightsError(f"{path}: key {key!r}: {offs[1] - offs[0]} bytes do not hold a {dt} tensor "
                               f"of shape {tuple(shape)}")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise WeightsError(f"{path}: keys {k0!r} and {k1!r} overlap in the data section")
    return header, metadata, 8 + n


def load_file(path, keys=None) -> dict:
    """Read a safetensors file into {key: NumPy array} (bf16 becomes float32; others keep their dtype)."""
    header, _, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for key, info in header.items():
            if keys is not None and key not in keys:
                continue
            b, e = info["data_offsets"]
            f.seek(start + b)
            buf = f.read(e - b)
            if len(buf) != e - b:
                raise WeightsError(f"{path}: key {key!r}: file ends inside the tensor data")
            arr = np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
            out[key] = bf16_to_float32(arr) if info["dtype"] == "BF16" else arr.copy()
    return out


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {key: array} as a safetensors file (arrays of any backend; stored little-endian)."""
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        arr = np.asarray(backend.to_numpy(tensors[key]))
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray makes a 0-d array 1-d
        name = arr.dtype.name
        if name not in _NAMES:
            raise WeightsError(f"{path}: key {key!r}: cannot store dtype {name}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": _NAMES[name], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)


def find_weights(folder, stem: str = "diffusion_pytorch_model") -> list[str]:
    """The safetensors files of a model folder: ``stem.safetensors``, or the shards its index json lists."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: no such model folder")
    single = os.path.join(folder, f"{stem}.safetensors")
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid shard index ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: weight_map must be a non-empty {{key: shard file}} object")
        shards = sorted(set(weight_map.values()), key=str)
        for s in shards:
            if not isinstance(s, str) or not s or os.path.basename(s) != s:
                raise WeightsError(f"{index}: shard {s!r} is not a file name inside {folder}")
        return [os.path.join(folder, s) for s in shards]
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith(_PICKLE_SUFFIXES):
            refuse_pickle(os.path.join(folder, name))
    raise WeightsError(f"{folder}: no {stem}.safetensors (nor a sharded index) found")


def load_state(paths) -> dict:
    """Read and merge one or more safetensors files into one {key: array}; a key in two files is an error."""
    state, where = {}, {}
    for path in paths:
        for key, value in load_file(path).items():
            if key in state:
                raise WeightsError(f"key {key!r} appears in both {where[key]} and {path}")
            state[key], where[key] = value, path
    return state


def load_into(model, state: dict, dtype="float32", source: str = "checkpoint"):
    """Check `state` against the declared tensors of `model` (a `refldm.nn.Module`) and put the arrays into it.

    Every expected key must be present with the expected shape and no key may be left over; a mismatch
    raises one WeightsError listing the keys at fault. Arrays are cast to `dtype` (fp16 / bf16 files are
    upcast) and moved to the active backend.
    """
    dt = backend.resolve_dtype(dtype)
    expected = {key: (owner, attr, value) for key, owner, attr, value in model.params()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k][2].shape)}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k][2].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    for key, (owner, attr, _) in expected.items():
        value = state[key]
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise WeightsError(f"{source}: key {key!r} has non-float dtype {value.dtype}")
        arr = backend.asarray(np.asarray(value).astype(dt, copy=False))
        if not bool(backend.xp().all(backend.xp().isfinite(arr))):
            raise WeightsError(f"{source}: key {key!r} holds NaN or inf")
        setattr(owner, attr, arr)
    return model


def read_config(folder, name: str = "config.json") -> dict:
    """Read a model folder's config json, with one clear error if it is missing or malformed."""
    path = os.path.join(os.fspath(folder), name)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file (is {folder} a model folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config
