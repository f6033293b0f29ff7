"""Reading and writing safetensors checkpoints, and loading them into a model, for every model alike.

The safetensors format is: 8 bytes little-endian header length N, then N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. This module parses it by hand so that every way a file can
lie (a truncated file, offsets outside the data, overlapping tensors or a hole between them, a size
that does not match the shape and dtype, an unknown dtype) is one clear error naming the file and the
key. It accepts a file exactly when the safetensors library does (the same rules, including those of
its JSON parser; tests/test_weights.py compares the two verdicts on thousands of mutated files), and
names read from a file are escaped and cut before they reach a message (`shown`). It never unpickles:
``.ckpt`` / ``.bin`` / ``.pt`` files are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from refldm import backend

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "C64": np.dtype("<c8"),
}
# Every dtype of the format and its size in bits. The ones NumPy has no type for (8-, 6- and 4-bit floats)
# are valid in a header, but refused when a tensor of them is read.
_BITS = {name: dt.itemsize * 8 for name, dt in _DTYPES.items()}
_BITS.update({"F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
              "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4})
_NAMES = {np.dtype(v).name: k for k, v in _DTYPES.items() if k != "BF16"}
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
_MAX_HEADER = 100_000_000   # bytes, as the safetensors library
_MAX_DEPTH = 127            # JSON nesting the safetensors library's parser (serde_json) accepts
_U64 = 2 ** 64 - 1          # shapes and offsets are unsigned 64-bit integers


from refldm.errors import WeightsError  # one home for the error classes


def shown(name, limit: int = 80) -> str:
    """An untrusted name (a key, a dtype, a value read from a file) made safe to print in one line:
    cut to `limit` characters, then quoted with every control and non-ASCII character escaped, so that
    no escape sequence, carriage return or megabyte of text from a file reaches the terminal."""
    text = name if isinstance(name, str) else json.dumps(name, ensure_ascii=True, default=repr)
    cut = text[:limit]
    return ascii(cut) + (f"... ({len(text)} characters)" if len(text) > limit else "")


def refuse_pickle(path) -> None:
    """Raise for pickle-based checkpoint files, which refldm never opens."""
    if str(path).lower().endswith(_PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: refusing a pickle-based checkpoint (it can run arbitrary code when opened); "
            "convert it to .safetensors first, e.g. with the safetensors convert script in a trusted sandbox")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 -> float32: a bfloat16 is the top 16 bits of a float32, so shift them back up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# -- the header's JSON, read as the safetensors library reads it --------------------------------------------
#
# Python's json module is more lenient than the Rust parser (serde_json) of the safetensors library: it
# takes NaN / Infinity, numbers that overflow a double, lone UTF-16 surrogates, nesting deeper than 127,
# "-0" as an integer, and a repeated field. The hooks below refuse exactly those, so that refldm accepts a
# header if and only if the library does (tests/test_weights.py compares the two on thousands of mutants).


class _Object(dict):
    """A JSON object that remembers which of its keys were repeated: the last value wins, but the
    library still parses the earlier ones (`shadowed`), so they must be well-formed too."""
    repeated: frozenset = frozenset()
    shadowed: tuple = ()


def _object(pairs):
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        seen, repeated, shadowed = {}, set(), []
        for key, value in pairs:
            if key in seen:
                repeated.add(key)
                shadowed.append((key, seen[key]))
            seen[key] = value
        obj.repeated, obj.shadowed = frozenset(repeated), tuple(shadowed)
    return obj


def _integer(text: str):
    """serde_json reads an integer outside the 64-bit range, and "-0", as a float."""
    value = int(text)
    if text != "-0" and -2 ** 63 <= value <= _U64:
        return value
    return _float(text)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} out of range")
    return value


def _constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _check_json(value) -> None:
    """Refuse nesting deeper than serde_json's limit and strings that are not Unicode (lone surrogates)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > _MAX_DEPTH:
                raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
            children = ([*item.keys(), *item.values(), *(v for _, v in getattr(item, "shadowed", ()))]
                        if isinstance(item, dict) else item)
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate


def _entry(path, key, info) -> tuple:
    """One tensor's (dtype, shape, (begin, end)); serde also takes the entry as a 3-item list, and ignores
    fields it does not know."""
    where = f"{path}: key {shown(key)}"
    if isinstance(info, list):
        if len(info) != 3:
            raise WeightsError(f"{where}: header entry must be an object with dtype, shape, data_offsets")
        dt, shape, offs = info
    elif isinstance(info, dict):
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        twice = sorted({"dtype", "shape", "data_offsets"} & info.repeated) if isinstance(info, _Object) else []
        if missing or twice:
            raise WeightsError(f"{where}: header entry must have dtype, shape, data_offsets once each "
                               f"({'missing ' + ', '.join(missing) if missing else 'repeated ' + ', '.join(twice)})")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    else:
        raise WeightsError(f"{where}: header entry must be an object with dtype, shape, data_offsets")
    if not isinstance(dt, str) or dt not in _BITS:
        raise WeightsError(f"{where}: unsupported dtype {shown(dt, 40)}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _U64 for d in shape):
        raise WeightsError(f"{where}: bad shape {shown(shape, 60)} (a list of non-negative integers)")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and 0 <= o <= _U64 for o in offs)):
        raise WeightsError(f"{where}: data_offsets {shown(offs, 60)} must be two non-negative integers")
    return dt, shape, tuple(offs)


def read_header(path) -> tuple[dict, dict, int]:
    """Parse a safetensors header: ({key: info}, metadata, byte offset of the data section).

    What the format requires, and the safetensors library checks (so refldm checks it too): the header
    length fits the file; the header is UTF-8 JSON, an object of {key: {dtype, shape, data_offsets}} and
    an optional "__metadata__" object of strings; each tensor's byte range [begin, end) holds exactly
    prod(shape) * itemsize bytes; and the ranges, sorted, follow one another without a hole or an
    overlap from byte 0 to the end of the file. Each info returned is {"dtype", "shape", "data_offsets"}.
    """
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
        if n > _MAX_HEADER:
            raise WeightsError(f"{path}: header length {n} is over the format's limit of {_MAX_HEADER} bytes; "
                               "corrupted or not a safetensors file")
        if n > size - 8:
            raise WeightsError(f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                               "truncated or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object, parse_int=_integer,
                            parse_float=_float, parse_constant=_constant)
        _check_json(header)
    except (UnicodeError, ValueError, RecursionError) as e:  # ValueError: JSON errors, ints > 4300 digits
        raise WeightsError(f"{path}: header is not valid JSON ({shown(str(e), 200)})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    if "__metadata__" in getattr(header, "repeated", ()):
        raise WeightsError(f"{path}: __metadata__ appears twice in the header")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in [*metadata.values(), *(v for _, v in getattr(metadata, "shadowed", ()))]):
        raise WeightsError(f"{path}: __metadata__ must be an object of {{string: string}}")
    for key, info in getattr(header, "shadowed", ()):  # a key given twice: the last counts, both must parse
        _entry(path, key, info)
    data_size = size - 8 - n
    infos, spans = {}, []
    for key, info in header.items():
        dt, shape, (begin, end) = _entry(path, key, info)
        if not begin <= end <= data_size:
            raise WeightsError(f"{path}: key {shown(key)}: data_offsets [{begin}, {end}] lie outside the "
                               f"{data_size}-byte data section (truncated or corrupted file)")
        count = 1
        for d in shape:  # as the library: the running product must fit 64 bits
            count *= d
            if count > _U64:
                raise WeightsError(f"{path}: key {shown(key)}: shape {shown(shape, 60)} overflows 64 bits")
        bits = count * _BITS[dt]
        if bits > _U64 or bits % 8:
            raise WeightsError(f"{path}: key {shown(key)}: {count} {dt} values do not fill whole bytes "
                               "(or overflow 64 bits)")
        if end - begin != bits // 8:
            raise WeightsError(f"{path}: key {shown(key)}: {end - begin} bytes do not hold a {dt} tensor of "
                               f"shape {shown(shape, 60)} ({bits // 8} bytes)")
        infos[key] = {"dtype": dt, "shape": shape, "data_offsets": [begin, end]}
        spans.append((begin, end, key))
    spans.sort(key=lambda span: span[:2])
    position, previous = 0, None
    for begin, end, key in spans:
        if begin < position:
            raise WeightsError(f"{path}: keys {shown(previous)} and {shown(key)} overlap in the data section")
        if begin > position:
            raise WeightsError(f"{path}: bytes {position}..{begin} of the data section belong to no tensor "
                               f"(a hole before key {shown(key)}); corrupted file or wrong header length")
        position, previous = end, key
    if position != data_size:
        raise WeightsError(f"{path}: the tensors cover {position} of the {data_size} bytes after the header; "
                           "the file is corrupted, has extra bytes, or its header length is wrong")
    return infos, dict(metadata), 8 + n


# Float dtypes a tensor may be converted between while it is read (load_file's `dtype`).
_FLOATS = ("F16", "BF16", "F32", "F64")
# A tensor converted while read passes through a buffer of at most this many bytes.
_READ_CHUNK = 16 * 2**20


def load_file(path, keys=None, dtype=None) -> dict:
    """Read a safetensors file into {key: NumPy array} without a second copy of the weights.

    The file is memory-mapped copy-on-write (``mmap.ACCESS_COPY``): a tensor kept in its stored dtype
    is a view of the mapping, so its bytes are read from the page cache when first touched and are
    never copied (writing to the array changes this process's copy only, never the file). With
    `dtype` ("float32", "float16", "float64"), a float tensor stored in another float dtype is
    converted while it is read, in chunks of at most 16 MiB through a small buffer, straight into an
    array of `dtype`: the stored bytes are never all held at once. Without `dtype`, bf16 becomes
    float32 and every other tensor keeps its stored dtype. `keys`: read only these.
    """
    header, _, start = read_header(path)
    target = None if dtype is None else backend.resolve_dtype(dtype)
    out = {}
    with open(path, "rb") as f:
        mapped = None
        for key, info in header.items():
            if keys is not None and key not in keys:
                continue
            dt, shape = info["dtype"], info["shape"]
            if dt not in _DTYPES:
                raise WeightsError(f"{path}: key {shown(key)}: dtype {dt} has no NumPy type; refldm cannot "
                                   "read it (convert the file to F32, F16 or BF16)")
            b, e = info["data_offsets"]
            stored = _DTYPES[dt]
            count = (e - b) // stored.itemsize
            try:  # NumPy's limits: 64 dimensions, each size within its index type
                want = np.dtype("<f4") if dt == "BF16" else stored
                if target is not None and dt in _FLOATS:
                    want = target
                if want == stored and e > b and (start + b) % stored.itemsize == 0:
                    if mapped is None:
                        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    arr = np.frombuffer(mapped, dtype=stored, count=count, offset=start + b).reshape(shape)
                else:
                    arr = np.empty(shape, dtype=want)
                    _read_into(f, start + b, stored, count, arr.reshape(-1), bf16=dt == "BF16")
            except (ValueError, OverflowError) as err:
                raise WeightsError(f"{path}: key {shown(key)}: NumPy cannot hold an array of shape "
                                   f"{shown(shape, 60)} ({shown(str(err), 80)})") from None
            except OSError as err:
                raise WeightsError(f"{path}: key {shown(key)}: cannot read the tensor data ({err})") from None
            out[key] = arr
    return out


def _read_into(f, offset: int, stored, count: int, flat, bf16: bool) -> None:
    """Read `count` values of dtype `stored` at byte `offset` of file `f` into the 1-d array `flat`,
    converting them to its dtype (bf16 bits through float32), through a buffer of at most _READ_CHUNK bytes."""
    if count == 0:
        return
    if flat.dtype == stored and not bf16:
        f.seek(offset)
        view = memoryview(flat.view(np.uint8))
        got = f.readinto(view)
        if got != view.nbytes:
            raise OSError("the file ends inside the tensor data")
        return
    step = max(1, _READ_CHUNK // stored.itemsize)
    buf = np.empty(min(step, count), dtype=stored)
    f.seek(offset)
    for i in range(0, count, step):
        part = buf[:min(step, count - i)]
        if f.readinto(memoryview(part.view(np.uint8))) != part.nbytes:
            raise OSError("the file ends inside the tensor data")
        flat[i:i + part.size] = bf16_to_float32(part) if bf16 else part


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {key: array} as a safetensors file (arrays of any backend; stored little-endian), atomically."""
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

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)

    from refldm.files import atomic_write
    atomic_write(path, write)  # a temporary file renamed over `path`: never a half-written checkpoint


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


def load_state(paths, dtype=None) -> dict:
    """Read and merge one or more safetensors files into one {key: array}; a key in two files is an error.
    dtype: convert float tensors to it while reading (see load_file)."""
    state, where = {}, {}
    for path in paths:
        for key, value in load_file(path, dtype=dtype).items():
            if key in state:
                raise WeightsError(f"key {shown(key)} appears in both {where[key]} and {path}")
            state[key], where[key] = value, path
    return state


def load_into(model, state: dict, dtype="float32", source: str = "checkpoint"):
    """Check `state` against the declared tensors of `model` (a `refldm.core.nn.Module`) and put the arrays into it.

    Every expected key must be present with the expected shape and no key may be left over; a mismatch
    raises one WeightsError listing the keys at fault. Arrays are cast to `dtype` (fp16 / bf16 files are
    upcast) and moved to the active backend; a host array already in `dtype` is used as it is (no copy:
    a view of load_file's mapping stays one), and arrays of a device backend are cast on their device.
    """
    dt = backend.resolve_dtype(dtype)
    expected = {key: (owner, attr, value) for key, owner, attr, value in model.params()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(shown(k)[1:-1] if len(k) <= 80 else shown(k) for k in set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k][2].shape)}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k][2].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            listed = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {listed}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    for key, (owner, attr, _) in expected.items():
        value = state[key]
        if hasattr(value, "bind") and attr in getattr(owner, "keeps_stored", ()):
            setattr(owner, attr, value.bind(dt))  # weights_dtype="stored": converted when the layer runs
            continue                              # (refldm.checkpoints.stored)
        on_device = type(value).__module__.split(".")[0] in ("cupy", "refldm")  # CuPy or the fake device
        if not on_device:
            value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            raise WeightsError(f"{source}: key {key!r} has non-float dtype {value.dtype}")
        if on_device:  # an array of a device backend (a model's own state_dict, upcast): cast where it lives
            arr = backend.asarray(value.astype(dt) if value.dtype != dt else value)
        else:          # a host array: cast only if needed, so a view of load_file's mapping stays one
            arr = backend.asarray(value.astype(dt, copy=False))
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
    except RecursionError:
        raise WeightsError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config
