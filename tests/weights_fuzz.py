"""Mutated safetensors files, and refldm's verdict on each compared with the safetensors library's.

refldm's loader must accept a file exactly when the library does, and then give the same arrays (bf16
upcast to the float32 of its bits) and the same metadata; where the library's NumPy side cannot hold a
tensor (no NumPy type for 8-bit floats, more than 64 dimensions, a size past NumPy's index type), refldm
must refuse it too, with a WeightsError. Anything else from refldm (a NumPy error, a TypeError) counts as
a disagreement.

Used by tests/test_weights.py (a few thousand mutants, seconds) and tools/fuzz_weights.py (long runs).
"""

from __future__ import annotations

import json
import math
import os
import random
import struct

import numpy as np

from refldm.checkpoints.weights import WeightsError, load_file, read_header

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "C64",
          "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "f32", "F31", "", "Q8"]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
         "U16": 2, "U8": 1, "BOOL": 1, "C64": 8, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1}


# ---------------------------------------------------------------------------------------------------------
# Seed files: (entries [(key, dtype, shape)], metadata or None), laid out contiguously in key order


SEEDS = [
    ([("a", "F32", [2, 3]), ("b", "F16", [4]), ("c", "F64", [3])], {"format": "pt"}),
    ([("w", "BF16", [3, 2]), ("z", "F32", [0, 4]), ("s", "F32", []), ("i", "I64", [2])], None),
    ([("x.weight", "F32", [1, 2, 2]), ("x.bias", "U8", [5]), ("e", "I8", [0])], {"k": "v", "n": ""}),
]


def seed_layout(entries, metadata, rng=None):
    """(pairs [(key, info dict)], metadata, data bytes) of a valid file; the data is random bytes."""
    rng = rng or random.Random(0)
    pairs, data = [], bytearray()
    for key, dt, shape in entries:
        size = SIZES[dt] * math.prod(shape)
        if dt == "BOOL":
            chunk = bytes(rng.choice((0, 1)) for _ in range(size))
        else:
            chunk = bytes(rng.randrange(256) for _ in range(size))
        pairs.append((key, {"dtype": dt, "shape": list(shape), "data_offsets": [len(data), len(data) + size]}))
        data += chunk
    return pairs, metadata, bytes(data)


def header_text(pairs, metadata, raw_pairs=()) -> str:
    """JSON text of a header given as ordered pairs (so that a key may repeat); raw_pairs are (key, text)."""
    items = []
    if metadata is not None:
        items.append(json.dumps("__metadata__") + ":" + (metadata if isinstance(metadata, str) else json.dumps(metadata)))
    for key, info in pairs:
        items.append(json.dumps(key) + ":" + (info if isinstance(info, str) else json.dumps(info)))
    for key, text in raw_pairs:
        items.append(json.dumps(key) + ":" + text)
    return "{" + ",".join(items) + "}"


def assemble(text, data: bytes, pad: int = 0, length_delta: int = 0) -> bytes:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    raw += b" " * pad
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


# ---------------------------------------------------------------------------------------------------------
# Mutations


BIG = [0, 1, 2, 3, 4, 7, 8, 255, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 19, -1, -0.0, 1.0]


def _number(rng):
    value = rng.choice(BIG)
    return value


def mutate_json(rng: random.Random, pairs, metadata, data):
    """One or two structural changes to the header; returns the file's bytes."""
    pairs = [(k, dict(v)) for k, v in pairs]
    raw_pairs, pad, delta = [], rng.choice([0, 0, 0, 4, 7]), 0
    meta = metadata
    for _ in range(rng.choice([1, 1, 2])):
        i = rng.randrange(len(pairs))
        key, info = pairs[i]
        if not isinstance(info, dict):  # already rewritten as text or a list
            continue
        op = rng.randrange(22)
        try:
            pad, delta, meta, data = _apply(rng, op, pairs, i, raw_pairs, pad, delta, meta, data)
        except (KeyError, TypeError, IndexError, AttributeError):  # an earlier change removed what this one edits
            pass
    text = header_text(pairs, meta, raw_pairs)
    if rng.random() < 0.1:
        text = rng.choice([" ", "\n", "\t", "\r"]) + text
    return assemble(text, data, pad=pad, length_delta=delta)


def _apply(rng, op, pairs, i, raw_pairs, pad, delta, meta, data):
    key, info = pairs[i]
    if True:
        if op == 0:    # another dtype, same byte range
            info["dtype"] = rng.choice(DTYPES)
        elif op == 1:  # another dtype and the byte range resized to fit its shape
            dt = rng.choice(list(SIZES))
            info["dtype"] = dt
            b = info["data_offsets"][0]
            info["data_offsets"] = [b, b + SIZES[dt] * math.prod(info["shape"])]
        elif op == 2:  # a dimension changed
            shape = list(info["shape"]) or [1]
            shape[rng.randrange(len(shape))] = _number(rng)
            info["shape"] = shape
        elif op == 3:  # a dimension added or removed
            shape = list(info["shape"])
            if shape and rng.random() < 0.5:
                shape.pop(rng.randrange(len(shape)))
            else:
                shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, 1, 2, 10 ** 19, 2 ** 63 - 1]))
            info["shape"] = shape
        elif op == 4:  # an offset changed
            j = rng.randrange(2)
            info["data_offsets"][j] = rng.choice([info["data_offsets"][j] + rng.choice([-4, -2, -1, 1, 2, 4]),
                                                  _number(rng)])
        elif op == 5:  # offsets swapped between two tensors
            k2, info2 = pairs[rng.randrange(len(pairs))]
            if isinstance(info2, dict):
                info["data_offsets"], info2["data_offsets"] = info2["data_offsets"], info["data_offsets"]
        elif op == 6:  # a tensor removed
            if len(pairs) > 1:
                pairs.pop(i)
        elif op == 7:  # an extra zero-size tensor, somewhere
            at = rng.choice([0, len(data), rng.randrange(len(data) + 1)])
            shape = rng.choice([[0], [0] * 65, [0, 10 ** 19], [0, 2 ** 63 - 1], [2 ** 32, 2 ** 32, 0], [0, 2 ** 64 - 1],
                                [1] * 65, [0, 3]])
            pairs.insert(rng.randrange(len(pairs) + 1),
                         (f"extra{rng.randrange(99)}", {"dtype": rng.choice(DTYPES[:14]), "shape": shape,
                                                        "data_offsets": [at, at]}))
        elif op == 8:  # an unknown field
            info[rng.choice(["extra", "offsets", "name"])] = rng.choice([1, "x", None, [1, [2]], {"a": 1}])
        elif op == 9:  # a field repeated (the text keeps both)
            field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
            body = json.dumps(info)[1:-1]
            value = json.dumps(info.get(field, 1))
            pairs[i] = (key, "{" + body + f',"{field}":{value}' + "}")
        elif op == 10:  # the entry as a list
            values = [info["dtype"], info["shape"], info["data_offsets"]]
            pairs[i] = (key, rng.choice([values, values[:2], values + [1]]))
        elif op == 11:  # a field missing or null
            field = rng.choice(["dtype", "shape", "data_offsets"])
            if rng.random() < 0.5:
                info.pop(field)
            else:
                info[field] = None
        elif op == 12:  # metadata variants
            meta = rng.choice([None, {}, {"a": "b"}, {"a": 1}, [], "null", '{"a":"1","a":"2"}', "1",
                               {"format": "pt", "x": ""}, '{"a":"\\ud800"}'])
        elif op == 13:  # the same key twice at the top level
            pairs.append((key, rng.choice([info, pairs[rng.randrange(len(pairs))][1]])))
        elif op == 14:  # __metadata__ twice
            raw_pairs.append(("__metadata__", rng.choice(['{"x":"y"}', "null", "{}"])))
        elif op == 15:  # a key with control characters, escapes, a lone surrogate or a surrogate pair
            new_key = rng.choice(["\x1b[31mred\x1b[0m", "a\rb", "\x00", "\ud800", "\ud83d\ude00", "é", "", "k" * 300])
            pairs[i] = (new_key, info)
        elif op == 16:  # numbers that Python's json reads and serde_json does not
            info["extra"] = "__RAW__"
            pairs[i] = (key, json.dumps(info).replace('"__RAW__"', rng.choice(
                ["NaN", "Infinity", "-Infinity", "1e400", "-0", "1e-400", "123456789012345678901234567890", "-1"])))
        elif op == 17:  # deep nesting in an unknown field
            depth = rng.choice([100, 124, 125, 126, 127, 128, 130, 2000])
            info["extra"] = "__RAW__"
            pairs[i] = (key, json.dumps(info).replace('"__RAW__"', "[" * depth + "]" * depth))
        elif op == 18:  # the header length field moved
            delta = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
            pad = max(pad, 8)
        elif op == 19:  # data bytes added or removed at the end
            data = data + bytes(rng.randrange(1, 9)) if rng.random() < 0.5 else data[:-rng.randrange(1, 5)]
        elif op == 20:  # a float or a boolean where an integer belongs
            field = rng.choice(["shape", "data_offsets"])
            values = list(info[field]) or [0]
            values[rng.randrange(len(values))] = rng.choice([2.0, True, False, "2", None])
            info[field] = values
        else:  # whitespace before and after
            pad = rng.choice([0, 1, 3, 8])
    return pad, delta, meta, data


def mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    """A few bytes of the length prefix or the header overwritten, inserted or deleted; or a truncation."""
    blob = bytearray(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    op = rng.randrange(4)
    if op == 0:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(min(len(blob), 8 + n))
            blob[i] = rng.choice(list(b'0123456789[]{}":,-. eEtfn\\\x00\x7f\xff') + [blob[i] ^ (1 << rng.randrange(8))])
    elif op == 1:
        del blob[rng.randrange(len(blob)):]
    elif op == 2:  # a byte inserted in the header, the length prefix kept or fixed
        i = rng.randrange(8, 8 + n)
        blob[i:i] = bytes([rng.choice(b' 0"{}[],')])
        if rng.random() < 0.5:
            blob[:8] = struct.pack("<Q", n + 1)
    else:
        blob[:8] = struct.pack("<Q", max(0, n + rng.choice([-5, -4, -1, 1, 4, 2 ** 32, 10 ** 9])))
    return bytes(blob)


def mutant(rng: random.Random) -> bytes:
    pairs, metadata, data = seed_layout(*rng.choice(SEEDS), rng=rng)
    if rng.random() < 0.75:
        return mutate_json(rng, pairs, metadata, data)
    return mutate_bytes(rng, assemble(header_text(pairs, metadata), data, pad=rng.choice([0, 4, 6])))


# ---------------------------------------------------------------------------------------------------------
# The two verdicts


# what NumPy calls each dtype the library can hand over (BF16 as its 16 bits; 8/6/4-bit floats: none)
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
         "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8"}


def library_verdict(blob: bytes, path):
    """(header accepted, metadata, {key: (dtype, shape, bytes)} or None where NumPy cannot hold a tensor),
    by the safetensors library."""
    import safetensors
    try:
        tensors = safetensors.deserialize(blob)
    except safetensors.SafetensorError:
        return False, None, None
    with safetensors.safe_open(path, "np") as f:
        metadata = f.metadata() or {}
    out = {}
    for key, t in tensors:
        if t["dtype"] not in NUMPY:
            return True, metadata, None
        try:  # NumPy's own limits (64 dimensions, sizes within its index type)
            np.frombuffer(bytes(t["data"]), NUMPY[t["dtype"]]).reshape(t["shape"])
        except ValueError:
            return True, metadata, None
        out[key] = (t["dtype"], list(t["shape"]), bytes(t["data"]))
    return True, metadata, out


def refldm_verdict(path):
    """(header accepted, metadata, {key: array} or None where it refuses to load); other exceptions propagate."""
    try:
        _, metadata, _ = read_header(path)
    except WeightsError:
        return False, None, None
    try:
        return True, metadata, load_file(path)
    except WeightsError:
        return True, metadata, None


def disagreement(blob: bytes, path):
    """(None when refldm and the library agree on the file, else what differs; the library's verdict)."""
    with open(path, "wb") as f:
        f.write(blob)
    theirs = library_verdict(blob, path)
    try:
        ours = refldm_verdict(path)
    except Exception as e:  # noqa: BLE001 -- any other exception is a bug
        return f"refldm raised {type(e).__name__}: {str(e)[:200]}", theirs
    if ours[0] != theirs[0]:
        return (f"header: refldm {'accepts' if ours[0] else 'refuses'}, "
                f"safetensors {'accepts' if theirs[0] else 'refuses'}"), theirs
    if not ours[0]:
        return None, theirs
    if ours[1] != theirs[1]:
        return f"metadata: refldm {ours[1]!r:.200}, safetensors {theirs[1]!r:.200}", theirs
    if (ours[2] is None) != (theirs[2] is None):
        return f"tensors: refldm {'refuses' if ours[2] is None else 'loads'} them, NumPy " \
               f"{'cannot' if theirs[2] is None else 'can'} hold them", theirs
    if ours[2] is None:
        return None, theirs
    if set(ours[2]) != set(theirs[2]):
        return f"keys: refldm {sorted(ours[2])!r:.200}, safetensors {sorted(theirs[2])!r:.200}", theirs
    for key, (dtype, shape, data) in theirs[2].items():
        a = ours[2][key]
        if dtype == "BF16":  # refldm upcasts: its float32 must be exactly the bf16 bits shifted up
            a = (a.view(np.uint32) >> 16).astype("<u2") if a.dtype == np.float32 else a
        if list(a.shape) != shape or a.dtype != np.dtype(NUMPY[dtype]) or a.tobytes() != data:
            return f"tensor {key!r:.80}: refldm {a.dtype}{a.shape}, safetensors {dtype}{shape} or other bytes", theirs
    return None, theirs


def run(count: int, seed: int, folder, stop_at_first: bool = True):
    """Compare on `count` mutants; returns (counts {"accepted", "refused", "load refused"}, failures)."""
    rng = random.Random(seed)
    path = os.path.join(os.fspath(folder), f"refldm-mutant-{os.getpid()}-{seed}.safetensors")
    counts, failures = {"accepted": 0, "refused": 0, "load refused": 0}, []
    try:
        for i in range(count):
            blob = mutant(rng)
            problem, (accepted, _, arrays) = disagreement(blob, path)
            if problem is not None:
                failures.append((i, problem, blob))
                if stop_at_first:
                    break
                continue
            counts["accepted" if accepted and arrays is not None else "load refused" if accepted else "refused"] += 1
    finally:
        if os.path.exists(path):
            os.remove(path)
    return counts, failures
