"""Weights kept as stored: a checkpoint's bfloat16 / float16 tensors left in the file, memory-mapped, and
converted to the compute dtype one layer at a time, when that layer runs.

``Model.from_pretrained(folder, weights_dtype="stored")`` reads the safetensors header as usual
(`refldm.checkpoints.weights.read_header`, every check included), maps the file read-only, and gives each
tensor as a `StoredTensor`: a view of its bytes in the mapping, nothing copied. On loading
(`refldm.checkpoints.weights.load_into`):

- the ``weight`` of a layer that declares it can convert on the fly (``keeps_stored = ("weight",)``:
  Linear and Conv2d in refldm.models.blocks, which hold almost all of a model's numbers) stays a
  `StoredTensor`, bound to the compute dtype;
- every other tensor (biases, norm scales, embedding tables, position tables) is converted once, as in the
  default mode; they are a small part of the model.

When the layer runs it calls `materialize`, which returns the weight in the compute dtype; the copy is a local
of ``forward`` and is freed when the layer returns. Memory: the file's pages (shared, clean, dropped by the
kernel under pressure) plus one layer's float32 copy at a time, instead of the whole model in float32.

The conversion is exact (every bfloat16 and float16 value is a float32), so the results equal those of the
default mode, which converts the same tensors to float32 on loading, bit for bit (tests/test_stored_weights.py).

bfloat16 by hand: a bfloat16 is the upper half of a float32 (1 sign, 8 exponent, 7 fraction bits), so

    float32 bits = bfloat16 bits << 16            (as uint32, then reinterpreted as float32)

(`refldm.checkpoints.weights.bf16_to_float32`). float16 widens with NumPy's astype (IEEE half -> single).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from refldm import backend
from refldm.checkpoints.weights import WeightsError, bf16_to_float32, read_header, shown

__all__ = ["StoredTensor", "load_file_mapped", "load_state_mapped", "materialize", "KEPT_DTYPES",
           "check_weights_dtype", "load_checkpoint", "release_mapped"]

# safetensors dtype -> the NumPy type its bytes are viewed as (bfloat16 has none: its raw 16 bits)
KEPT_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
# integer tensors (a single file's position_ids) are never a layer's weight: read as ordinary arrays
INTEGER_DTYPES = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
                  "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


class StoredTensor:
    """One tensor as the file stores it: ``raw`` is a read-only view into the memory-mapped file (uint16 bits for
    BF16, float16 for F16, float32 for F32), ``stored`` its safetensors dtype name. ``dtype`` is the compute
    dtype it converts to (float32 until `bind` says otherwise); ``shape`` is the tensor's."""

    __slots__ = ("raw", "stored", "dtype", "source")

    def __init__(self, raw, stored: str, dtype="float32", source: str = "checkpoint"):
        self.raw, self.stored, self.dtype, self.source = raw, stored, np.dtype(dtype), source

    @property
    def shape(self):
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def bind(self, dtype) -> "StoredTensor":
        """The same stored bytes, converting to `dtype` (float32 / float64 / float16)."""
        return StoredTensor(self.raw, self.stored, backend.resolve_dtype(dtype), self.source)

    def reshape(self, *shape) -> "StoredTensor":
        return StoredTensor(self.raw.reshape(*shape), self.stored, self.dtype, self.source)

    def __getitem__(self, index) -> "StoredTensor":
        return StoredTensor(self.raw[index], self.stored, self.dtype, self.source)

    def to_numpy(self) -> np.ndarray:
        """The tensor in the compute dtype, as a new host array (bfloat16: bits << 16, then the cast)."""
        wide = bf16_to_float32(self.raw) if self.stored == "BF16" else self.raw
        return np.array(wide, dtype=self.dtype, copy=True)

    def __array__(self, dtype=None, copy=None):
        out = self.to_numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __add__(self, other):
        """weight + delta (a LoRA merged into a kept weight): the sum, converted, as an ordinary array."""
        return materialize(self) + other

    __radd__ = __add__

    def __repr__(self):
        return f"StoredTensor({self.stored} {self.shape} -> {self.dtype.name})"


def materialize(weight):
    """`weight` in the compute dtype on the active backend: a StoredTensor is converted (a fresh array the caller
    drops after use); anything else is returned as it is."""
    if isinstance(weight, StoredTensor):
        return backend.asarray(weight.to_numpy())
    return weight


def load_file_mapped(path) -> dict:
    """{key: StoredTensor} for a safetensors file, each a view into one read-only memory mapping of it.

    The header is parsed and checked by `read_header` (the same rules as `load_file`). A tensor of a dtype
    other than BF16, F16 or F32 is refused, naming the key and the dtype."""
    path = os.fspath(path)
    header, _, start = read_header(path)
    for key, info in header.items():
        if info["dtype"] not in KEPT_DTYPES and info["dtype"] not in INTEGER_DTYPES:
            raise WeightsError(f"{path}: key {shown(key)} is stored as {info['dtype']}; weights_dtype='stored' "
                               "keeps BF16, F16 and F32 tensors only (load without it to convert on reading)")
    size = os.path.getsize(path)
    if size == 0 or not header:
        return {}
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)    # stays valid after the file is closed
    data = np.frombuffer(mapping, dtype=np.uint8)
    out = {}
    for key, info in header.items():
        b, e = info["data_offsets"]
        if info["dtype"] in INTEGER_DTYPES:  # an index table, not a weight: an ordinary array
            out[key] = data[start + b:start + e].view(INTEGER_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
            continue
        view = data[start + b:start + e].view(KEPT_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[key] = StoredTensor(view, info["dtype"], source=path)
    return out


def load_state_mapped(paths) -> dict:
    """`load_file_mapped` over one or more shards, merged; a key in two files is an error."""
    state, where = {}, {}
    for path in paths:
        for key, value in load_file_mapped(path).items():
            if key in state:
                raise WeightsError(f"key {shown(key)} appears in both {where[key]} and {path}")
            state[key], where[key] = value, path
    return state


def check_weights_dtype(weights_dtype, where: str) -> None:
    """The one option: None (convert on loading) or "stored"; anything else is one line naming `where`."""
    if weights_dtype not in (None, "stored"):
        raise ValueError(f"{where}: weights_dtype={weights_dtype!r}; the only option is 'stored' (keep the file's "
                         "dtype, convert per layer when it runs)")


def load_checkpoint(path, weights_dtype=None, where: str = "from_single_file") -> dict:
    """A single-file checkpoint's tensors: converted on reading (`load_file`), or with weights_dtype="stored"
    mapped as `StoredTensor`s (`load_file_mapped`); the key converters keep them mapped where they only rename
    or take rows."""
    from refldm.checkpoints.weights import load_file, refuse_pickle
    check_weights_dtype(weights_dtype, where)
    refuse_pickle(path)
    return load_file_mapped(path) if weights_dtype == "stored" else load_file(path)


def _mapping_of(raw):
    """The mmap object under a StoredTensor's view (view -> uint8 array -> memoryview -> mmap), or None."""
    base = raw
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def release_mapped(*models) -> int:
    """Drop the pages of the models' memory-mapped weight files from this process's resident set
    (``madvise(MADV_DONTNEED)``); returns the number of files. A pipeline calls it when it is done with a model
    (the text encoders after the prompt is encoded, the denoiser before the decode): the pages stay in the kernel's
    page cache, nothing is copied or lost, and the next call of the model reads them in again as its layers run.
    Models loaded without weights_dtype="stored", and systems without madvise, are left as they are."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - Linux and macOS have it
        return 0
    seen = {}
    for model in models:
        if not hasattr(model, "params"):  # None, or a wrapper (the ControlNet pipelines' controlled U-Net): skipped
            continue
        for _, _, _, value in model.params():
            if isinstance(value, StoredTensor):
                mapping = _mapping_of(value.raw)
                if mapping is not None:
                    seen[id(mapping)] = mapping
    for mapping in seen.values():
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - a closed mapping or a refusing kernel: nothing to drop
            pass
    return len(seen)
