"""The bad input of issue 15, swept over every scheduler class in refldm.schedulers: each is refused with one
clear line (a ValueError; ConfigError is one) that names what is wrong.

- a config key the scheduler does not implement names the key and its value (an unknown key; a key of other
  diffusers schedulers passed explicitly; an UNSUPPORTED key at a value other than the one refldm implements);
- table_dtype other than "float32" / "float64";
- custom timesteps that are not strictly decreasing, out of [0, num_train_timesteps - 1], not finite or not
  integers (where the scheduler takes set_timesteps(timesteps=...));
- custom sigmas with NaN (where it takes set_timesteps(sigmas=...));
- an unknown sampler or schedule name lists the valid ones.
"""

from __future__ import annotations

import inspect
import re

import numpy
import pytest

from refldm import schedulers as rs
from refldm.schedulers.base import DIFFUSERS_SCHEDULER_KEYS, SchedulerMixin, passed_on
from tests.conftest import require

CLASSES = sorted((c for c in vars(rs).values()
                  if isinstance(c, type) and issubclass(c, SchedulerMixin) and c.__name__.endswith("Scheduler")
                  and c.__module__ != "refldm.schedulers.base"), key=lambda c: c.__name__)
IDS = [c.__name__ for c in CLASSES]


def refused(call, *patterns):
    """call() raises a ValueError whose message is one line and matches every pattern."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip(), message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def test_every_scheduler_class_is_swept():
    assert len(CLASSES) >= 18 and rs.DPMSolverSDEScheduler in CLASSES and rs.EDMEulerScheduler in CLASSES


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_an_unknown_key_names_the_key_and_value(cls):
    refused(lambda: cls(use_magic=7), cls.__name__, r"'use_magic' \(value 7\)", "does not implement")
    refused(lambda: cls.from_config({"use_magic": 7}), r"'use_magic' \(value 7\)")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_another_schedulers_key_is_refused_when_passed_but_carried_in_a_config(cls):
    key = sorted(DIFFUSERS_SCHEDULER_KEYS - cls.config_keys())[0]
    refused(lambda: cls(**{key: 0.5}), rf"'{key}' \(value 0.5\)", "other diffusers schedulers")
    refused(lambda: cls.from_config({}, **{key: 0.5}), rf"'{key}' \(value 0.5\)")  # an override is explicit
    scheduler = cls.from_config({key: 0.5})  # in a config (e.g. another class's): carried along unused
    assert passed_on(scheduler.config)[key] == 0.5 and scheduler.config == cls().config


UNSUPPORTED = [(cls, key, value) for cls in CLASSES for key, value in cls.UNSUPPORTED.items()]


@pytest.mark.parametrize("cls,key,value", UNSUPPORTED, ids=[f"{c.__name__}-{k}" for c, k, _ in UNSUPPORTED])
def test_an_unsupported_value_names_the_key_and_value(cls, key, value):
    other = "something else" if not isinstance(value, str) else value + "_other"
    refused(lambda: cls(**{key: other}), cls.__name__, rf"{key}='{other}' is not implemented")
    cls(**{key: value})  # the one value refldm implements (diffusers' default) is accepted


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float", numpy.float32])
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_table_dtype_other_than_float32_or_float64(cls, dtype):
    refused(lambda: cls(table_dtype=dtype), "table_dtype=", "'float64', 'float32'")


def _takes(cls, argument):
    return argument in inspect.signature(cls.set_timesteps).parameters


CUSTOM_TIMESTEPS = [c for c in CLASSES if _takes(c, "timesteps")]
BAD_TIMESTEPS = {
    "increasing": ([10, 20], "strictly decreasing"),
    "repeated": ([500, 500, 20], "strictly decreasing"),
    "above the range": ([1000, 20], r"in \[0, 999\]"),
    "below the range": ([20, -1], r"in \[0, 999\]"),
    "NaN": ([500, float("nan")], "finite"),
    "empty": ([], "non-empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_TIMESTEPS))
@pytest.mark.parametrize("cls", CUSTOM_TIMESTEPS, ids=[c.__name__ for c in CUSTOM_TIMESTEPS])
def test_bad_custom_timesteps(cls, case):
    timesteps, pattern = BAD_TIMESTEPS[case]
    if cls.__name__.startswith("FlowMatch"):  # flow time t = timestep / N runs to 1: the range ends at N
        timesteps = [1000.5, 20] if case == "above the range" else timesteps
        pattern = pattern.replace("999", "1000")
    refused(lambda: cls().set_timesteps(timesteps=timesteps), cls.__name__, "custom timesteps", pattern)


@pytest.mark.parametrize("cls", CUSTOM_TIMESTEPS, ids=[c.__name__ for c in CUSTOM_TIMESTEPS])
def test_custom_timesteps_that_are_not_integers_are_not_truncated(cls):
    """Timesteps index the training tables: 500.5 is refused, not silently taken as 500 (Euler and Heun take
    fractional timesteps, as diffusers)."""
    if cls in (rs.EulerDiscreteScheduler, rs.HeunDiscreteScheduler, rs.FlowMatchEulerDiscreteScheduler):
        cls().set_timesteps(timesteps=[500.5, 20])
        return
    refused(lambda: cls().set_timesteps(timesteps=[500.5, 20]), cls.__name__, "integers")


CUSTOM_SIGMAS = [c for c in CLASSES if _takes(c, "sigmas")]


def test_the_classes_that_take_custom_timesteps_and_sigmas():
    """The sweeps here cover at least these (diffusers' set_timesteps takes custom lists in the same classes; LCM's
    timesteps= and UniPC's sigmas= are refused by the signature, see docs/schedulers.md)."""
    assert {c.__name__ for c in CUSTOM_TIMESTEPS} >= {
        "DDPMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler", "TCDScheduler"}
    assert {c.__name__ for c in CUSTOM_SIGMAS} >= {"EulerDiscreteScheduler", "EDMEulerScheduler"}


@pytest.mark.parametrize("sigmas", [[3.0, float("nan"), 0.0], [float("nan"), 0.5], [0.9, 0.5, float("nan")]])
@pytest.mark.parametrize("cls", CUSTOM_SIGMAS, ids=[c.__name__ for c in CUSTOM_SIGMAS])
def test_custom_sigmas_with_nan(cls, sigmas):
    """NaN in custom sigmas (EDM takes `sigmas` as the ramp in [0, 1], diffusers' meaning: NaN is outside it)."""
    pattern = r"ramp .*\[0, 1\], got .*nan" if issubclass(cls, rs.EDMEulerScheduler) else "sigmas .*finite"
    refused(lambda: cls().set_timesteps(sigmas=sigmas), pattern)


@pytest.mark.parametrize("name,schedule,pattern", [
    ("euler_magic", None, "unknown sampler 'euler_magic'; choose one of .*Euler a"),
    ("DPM++ 2M Wobbly", None, "unknown sampler 'DPM\\+\\+ 2M Wobbly'; choose one of .*DPM\\+\\+ 2M"),
    ("euler", "wobbly", "unknown schedule 'wobbly'; choose one of .*karras"),
])
def test_unknown_sampler_and_schedule_names_list_the_valid_ones(name, schedule, pattern):
    refused(lambda: rs.get_scheduler(name, schedule=schedule), pattern)


def _diffusers_scheduler_keys():
    """{class name: its __init__ keys} for every scheduler class in installed diffusers' source (read, not imported:
    DPMSolverSDEScheduler's module needs torchsde)."""
    import ast
    import glob
    import os

    diffusers = require("diffusers")
    folder = os.path.join(os.path.dirname(diffusers.__file__), "schedulers")
    keys = {}
    for path in glob.glob(os.path.join(folder, "scheduling_*.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Scheduler"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        args = item.args.args[1:] + item.args.kwonlyargs
                        keys[node.name] = {a.arg for a in args}
    return keys


def test_each_class_takes_exactly_its_diffusers_keys_and_knows_every_other():
    """A refldm class takes the keys of diffusers' class of that name (implemented, or UNSUPPORTED: accepted at
    diffusers' default only) plus table_dtype; DIFFUSERS_SCHEDULER_KEYS, the keys from_config carries along unused,
    holds every key of every diffusers scheduler, so no diffusers config is refused for a key of another class."""
    keys = _diffusers_scheduler_keys()
    assert set().union(*keys.values()) <= DIFFUSERS_SCHEDULER_KEYS
    for cls in CLASSES:
        if cls.__name__ in keys:  # (refldm's k-diffusion ports have no diffusers class)
            assert cls.config_keys() == keys[cls.__name__] | {"table_dtype"}, cls.__name__
