"""The smallest module system that lets a model's attribute names *be* its checkpoint keys.

A model is a tree of `Module`s. A leaf tensor is declared as ``self.weight = Param(out, in)``; the
loader (`refldm.checkpoints.weights`) walks the tree, finds ``conv_in.weight``, ``down_blocks.0.resnets.1.norm1.bias``
and so on, checks each against the checkpoint, and replaces every `Param` with the loaded array. After
loading, ``self.weight`` is a plain array of the active backend and ``forward`` reads it directly.

Calling a module runs ``forward``; when a recording is on (`refldm.core.record`, started by `refldm.crosscheck.trace`),
the output is recorded under the module's key prefix. With none on this costs one ``is None`` test per call.
"""

from __future__ import annotations

import os

from refldm.core import record
from refldm.backend import resolve_dtype
from refldm.checkpoints.weights import find_weights, load_into, load_state, read_config


class Param:
    """A placeholder for a checkpoint tensor of a known shape, replaced by the array on loading."""

    __slots__ = ("shape",)

    def __init__(self, *shape: int):
        self.shape = tuple(int(s) for s in shape)

    def __repr__(self):
        return f"Param{self.shape}"


class Module:
    """Base class: attributes that are Modules, ModuleLists or Params form the checkpoint keys."""

    _name = ""  # the key prefix, set by `assign_names` on the root

    def forward(self, *args, **kwargs):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if record.recorder is not None:
            record.recorder.record(self._name, out)
        return out

    def children(self):
        """(attribute name, child module) pairs, in definition order."""
        for key, value in vars(self).items():
            if isinstance(value, Module):
                yield key, value

    def params(self, prefix: str = ""):
        """(key, owner, attribute, value) for every leaf tensor below this module, value a Param or an array."""
        for key, value in vars(self).items():
            if key.startswith("_"):
                continue
            if isinstance(value, Module):
                yield from value.params(f"{prefix}{key}.")
            elif isinstance(value, Param) or _is_array(value):
                yield f"{prefix}{key}", self, key, value

    def assign_names(self, prefix: str = ""):
        """Give every module below this one its checkpoint key prefix (done once, by the root)."""
        self._name = prefix.rstrip(".")
        for key, child in self.children():
            child.assign_names(f"{prefix}{key}.")
        return self

    def state_dict(self):
        """{checkpoint key: array} for every loaded tensor."""
        return {key: value for key, _, _, value in self.params() if not isinstance(value, Param)}

    def num_parameters(self) -> int:
        """How many scalar weights the model has (counted from the declared shapes)."""
        total = 0
        for _, _, _, value in self.params():
            n = 1
            for s in value.shape:
                n *= s
            total += n
        return total


class ModuleList(Module):
    """A numbered list of modules: its children are keyed "0", "1", ... as in PyTorch checkpoints."""

    def __init__(self, modules=()):
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __len__(self):
        return sum(1 for _ in self.children())

    def __iter__(self):
        return (m for _, m in self.children())

    def __getitem__(self, i):
        return getattr(self, str(range(len(self))[i]))

    def forward(self, *args, **kwargs):  # pragma: no cover - a list is iterated, not called
        raise TypeError("ModuleList is not callable; iterate over it")


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


class PretrainedModel(Module):
    """What every loadable model shares, with diffusers' / transformers' method names:

        model = Class.from_config(config_dict)              # the architecture, weights not loaded
        model.load_state_dict({key: array}, dtype)          # checked key by key, cast, put on the backend
        model = Class.from_pretrained(folder, dtype)        # both, from config.json + safetensors

    A subclass sets `weights_stem` (the safetensors file name without extension), implements
    `parse_config(config_dict, where)` and may override `convert_keys` to accept older key names.
    """

    weights_stem = "diffusion_pytorch_model"
    dtype = None  # the compute dtype the weights were loaded in; None before loading

    @classmethod
    def parse_config(cls, config: dict, where: str):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, where: str = "config"):
        """Build the model from a config.json dict (unknown or unsupported keys raise ConfigError)."""
        return cls(cls.parse_config(dict(config), where))

    @classmethod
    def from_pretrained(cls, folder, dtype="float32", subfolder: str | None = None, weights_dtype: str | None = None):
        """Load `folder`/config.json and its safetensors weights (single file or shards), as `dtype`.

        weights_dtype="stored" keeps the layers' weights as the file stores them (bfloat16 / float16 / float32,
        memory-mapped, not copied); each Linear / Conv2d converts its weight to `dtype` when it runs and drops
        the copy after (refldm.checkpoints.stored). The results are those of the default mode, bit for bit."""
        if weights_dtype not in (None, "stored"):
            raise ValueError(f"{cls.__name__}.from_pretrained: weights_dtype={weights_dtype!r}; the only option is "
                             "'stored' (keep the file's dtype, convert per layer when it runs)")
        folder = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        model = cls.from_config(read_config(folder), where=os.path.join(folder, "config.json"))
        paths = find_weights(folder, cls.weights_stem)
        if weights_dtype == "stored":
            from refldm.checkpoints.stored import load_state_mapped
            state = load_state_mapped(paths)
        else:
            state = load_state(paths, dtype=dtype)
        return model.load_state_dict(state, dtype=dtype, source=", ".join(paths))

    def convert_keys(self, state: dict, source: str) -> dict:
        """Rename older checkpoint keys to the current ones; the default keeps them as they are."""
        return state

    def load_state_dict(self, state: dict, dtype="float32", source: str = "checkpoint"):
        """Put {checkpoint key: array} into the model: every key present, none left over, shapes equal."""
        load_into(self, self.convert_keys(state, source), dtype=dtype, source=source)
        self.dtype = resolve_dtype(dtype)
        return self
