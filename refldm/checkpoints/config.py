"""From a checkpoint's ``config.json`` to a model's config dataclass, refusing what refldm would get wrong.

Each model declares three things:

- a dataclass whose fields are the config keys it implements (with diffusers' defaults);
- ``ignored``: keys that do not change the forward math (``_class_name``, ``sample_size``, ...);
- ``fixed``: keys that *would* change the math and that refldm implements only at one value
  ({key: the only value accepted}). Any other value is an error naming the key.

A key in none of these is also an error: a new option must be looked at before it is accepted, so a
config never silently means something different in refldm than in diffusers.
"""

from __future__ import annotations

import dataclasses

from refldm.errors import ConfigError  # one home for the error classes (still importable from here)


def parse_config(cls, config: dict, *, ignored=(), fixed=None, where: str = "config"):
    """Build dataclass `cls` from `config`; raise ConfigError naming any unsupported key or value."""
    fixed = fixed or {}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
        if key in names:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
        elif key.startswith("_") or key in ignored:
            continue
        elif key in fixed:
            allowed = fixed[key]
            allowed = allowed if isinstance(allowed, (set, frozenset)) else {_freeze(allowed)}
            if _freeze(value) not in allowed:
                raise ConfigError(f"{where}: {key}={value!r} is not implemented in refldm "
                                  f"(only {', '.join(repr(a) for a in allowed)})")
        else:
            raise ConfigError(f"{where}: unknown config key {key!r} (value {value!r}); refldm does not "
                              "implement it, and ignoring it could change the result")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
