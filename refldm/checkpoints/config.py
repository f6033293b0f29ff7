"""From a checkpoint's ``config.json`` to a model's config dataclass, refusing what refldm would get wrong.

Each model declares three things:

- a dataclass whose fields are the config keys it implements (with diffusers' defaults);
- ``ignored``: keys that do not change the forward math (``_class_name``, ``sample_size``, ...);
- ``fixed``: keys that *would* change the math and that refldm implements only at one value
  ({key: the only value accepted}). Any other value is an error naming the key.

A key in none of these is also an error: a new option must be looked at before it is accepted, so a
config never silently means something different in refldm than in diffusers.

Every value is checked for its type and range here, where the config is read, by one table of rules
(`RULES`, applied by field name, after the field's annotated type): an ``int`` field takes an integer
(never a bool or a float), a ``float`` field a finite number, a
``bool`` field true or false, a ``str`` field a string, a ``list`` field a flat list (or a list of flat
lists) of such values. A config class may add its own rules in a ``RULES`` class attribute. A value of
the wrong type or out of range is one ConfigError naming the key and the value; nothing is computed first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from refldm.errors import ConfigError  # one home for the error classes (still importable from here)

# Sizes: every integer config value lies in [0, MAX_SIZE] unless a rule says otherwise. The largest real
# values are vocabularies (250,112 in mT5) and layer widths (12,288 in FLUX); MAX_SIZE is above all of
# them, so that a size no checkpoint could hold is refused before anything is built.
MAX_SIZE = 1 << 20
MAX_LAYERS = 1000  # counts of repeated layers (the deepest text encoders have 24-48)

# (pattern over the field name, (low, high) for numbers, whether low is excluded). The first match wins.
RULES = [
    (r"\w*layers_per_block$", (1, MAX_LAYERS), False),               # layers_per_block (a block has one at least)
    (r"num_\w*layers$", (0, MAX_LAYERS), False),                    # num_hidden_layers, FLUX's num_layers (0 legal)
    (r"\w*_layers$", (0, MAX_LAYERS), False),                     # layer indices (SD3.5's dual_attention_layers)
    (r"(num_train_timesteps|original_inference_steps)$", (1, 100_000), False),
    (r".*(channels|groups|heads|_dim|_size|vocab_size|embeddings|num_buckets|max_distance)$",
     (1, MAX_SIZE), False),
    (r".*eps(ilon)?$", (0.0, 1.0), True),                           # norm_eps, layer_norm_eps: 0 < eps <= 1
    (r"beta_(start|end)$", (0.0, 0.5), True),    # 0 < beta <= 0.5 (real schedules stay below 0.03; 1 zeroes alpha)
    (r"(scaling_factor|sigma_max|sigma_min|sigma_data|rho|h_init|accept_safety)$", (0.0, math.inf), True),
    (r"(s_noise|eta|s_churn|s_tmin|rtol|atol)$", (0.0, math.inf), False),
]


# String keys with a fixed set of values, named in the message when another value (or type) is given.
CHOICES = {"table_dtype": ("float64", "float32")}


def parse_config(cls, config: dict, *, ignored=(), fixed=None, where: str = "config"):
    """Build dataclass `cls` from `config`; raise ConfigError naming any unsupported key or value."""
    fixed = fixed or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rules = list(getattr(cls, "RULES", [])) + RULES
    kwargs = {}
    for key, value in config.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: config key {short(key)} is not a string")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{where}: {key}={short(value)} is not supported (choose one of "
                              f"{', '.join(repr(c) for c in CHOICES[key])})")
        if key in fields:
            default = fields[key].default
            infinite_ok = isinstance(default, float) and math.isinf(default)  # lambda_min_clipped = -inf
            kwargs[key] = check_value(key, value, str(fields[key].type), rules, where, infinite_ok)
        elif key.startswith("_") or key in ignored:
            continue
        elif key in fixed:
            allowed = fixed[key]
            allowed = allowed if isinstance(allowed, (set, frozenset)) else {_freeze(allowed)}
            if _freeze(_shallow(key, value, where)) not in allowed:
                raise ConfigError(f"{where}: {key}={short(value)} is not implemented in refldm "
                                  f"(only {', '.join(repr(a) for a in allowed)})")
        else:
            raise ConfigError(f"{where}: unknown config key {key!r} (value {short(value)}); refldm does not "
                              "implement it, and ignoring it could change the result")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def check_value(key: str, value, annotation: str, rules=RULES, where: str = "config", infinite_ok: bool = False):
    """`value` checked against the field's annotated type ("int", "float | None", "int | list", ...) and
    the first rule whose pattern matches `key`; returns it unchanged (+-inf only where `infinite_ok`: a field
    whose default is infinite, such as lambda_min_clipped). Errors read
    ``{where}: {key}={value!r} must be {what it must be}``."""
    kinds = [k.strip() for k in annotation.split("|")]
    if isinstance(value, (list, tuple)) and any(k in ("list", "tuple") for k in kinds):
        scalar_kinds = [k for k in kinds if k not in ("list", "tuple", "None")] or ["int", "float", "str", "bool"]
        for item in value:
            inner = item if isinstance(item, (list, tuple)) else [item]  # one level of nesting (SDXL)
            for v in inner:
                if isinstance(v, (list, tuple, dict)):
                    raise ConfigError(f"{where}: {key}={short(value)} is nested too deeply; expected {annotation}")
                _scalar(key, v, scalar_kinds + ["None"], rules, where, infinite_ok)
        if not value and "int" in kinds:  # sample_size: [] and the like
            raise ConfigError(f"{where}: {key}=[] must be {_expect(key, kinds, rules)}")
        return value
    if "dict" in kinds and isinstance(value, dict):
        return value
    _scalar(key, value, [k for k in kinds if k not in ("list", "tuple")], rules, where, infinite_ok)
    return value


def _rule(key, rules, integer):
    for pattern, bounds, open_low in rules:
        if re.fullmatch(pattern, key):
            return bounds, open_low
    return ((0, MAX_SIZE), False) if integer else None


def _expect(key, kinds, rules) -> str:
    """What a value of this key must be, in words (the end of the error message)."""
    words = []
    if "int" in kinds:
        (low, high), _ = _rule(key, rules, True)
        words.append(f"an integer from {low:g} to {high:g}")
    elif "float" in kinds:
        rule = _rule(key, rules, False)
        if rule is None:
            words.append("a finite number")
        else:
            (low, high), open_low = rule
            sign = ">" if open_low else ">="
            words.append(f"a finite number {sign} {low:g}" + (f" and <= {high:g}" if high < math.inf else ""))
    if "bool" in kinds:
        words.append("true or false")
    if "str" in kinds:
        words.append("a string")
    if "list" in kinds:
        words.append("a list")
    if "None" in kinds:
        words.append("null")
    return " or ".join(words) or "one of " + ", ".join(kinds)


def _scalar(key, value, kinds, rules, where, infinite_ok=False):
    def fail():
        raise ConfigError(f"{where}: {key}={short(value)} must be {_expect(key, kinds, rules)}")

    if value is None:
        if "None" not in kinds and "bool" not in kinds:  # a JSON null for a flag is "off" (SDXL: upcast_attention)
            fail()
        return
    if isinstance(value, bool):
        if "bool" not in kinds:
            fail()
        return
    if isinstance(value, (int, float)):
        if math.isnan(value) or (math.isinf(value) and not (infinite_ok and "float" in kinds)):
            fail()
        if math.isinf(value):
            return
        if "int" in kinds and isinstance(value, int):
            (low, high), open_low = _rule(key, rules, True)
        elif "float" in kinds:
            rule = _rule(key, rules, False)
            if rule is None:
                return
            (low, high), open_low = rule
        else:
            fail()
        if (value <= low if open_low else value < low) or value > high:
            fail()
        return
    if isinstance(value, str) and "str" in kinds:
        return
    fail()


def _shallow(key, value, where):
    """`value` if it is a scalar or a flat list; nesting deeper than two lists is refused (never recursed)."""
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {key}={short(value)} is an object where a value belongs")
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple)) and any(isinstance(v, (list, tuple, dict)) for v in item):
                raise ConfigError(f"{where}: {key}={short(value)} is nested too deeply")
            if isinstance(item, dict):
                raise ConfigError(f"{where}: {key} holds an object where values belong")
    return value


def short(value, limit: int = 80) -> str:
    """A value's repr, cut to `limit` characters (never recursing without bound into nested lists)."""
    if isinstance(value, (list, tuple, dict)):
        try:
            text = json.dumps(value, allow_nan=True, default=repr)
        except (RecursionError, ValueError, TypeError):
            text = f"<a nested {type(value).__name__}>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
