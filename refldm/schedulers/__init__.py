"""Schedulers: diffusers' classes and calling convention, computed in NumPy float64 on any backend.

    from refldm.schedulers import EulerDiscreteScheduler, get_scheduler
    scheduler = EulerDiscreteScheduler.from_pretrained("model", subfolder="scheduler")
    scheduler = get_scheduler("dpm++2m", scheduler.config)        # swap, keeping the model's schedule
    scheduler = get_scheduler("DPM++ 2M Karras", scheduler.config)  # the web UIs' names (refldm.schedulers.names)

See docs/schedulers.md for the math and refldm/pipelines/sampling.py for the loop that drives them.

May import: refldm.core (noise), refldm.checkpoints (config), refldm.backend, refldm.errors.
"""

from __future__ import annotations

import dataclasses
import importlib

from refldm.errors import ConfigError

# Every scheduler class -> the module that defines it. Importing refldm.schedulers imports none of them: a class is
# imported on first use (``refldm.schedulers.EulerDiscreteScheduler``, ``get_scheduler``), so a run loads its own
# scheduler only. Adding a scheduler is one line here (and one in names.SAMPLERS for a web-UI / short name).
SCHEDULER_MODULES = {
    "DDPMScheduler": "refldm.schedulers.ddpm",
    "DDIMScheduler": "refldm.schedulers.ddim",
    "PNDMScheduler": "refldm.schedulers.pndm",
    "LMSDiscreteScheduler": "refldm.schedulers.lms",
    "EulerDiscreteScheduler": "refldm.schedulers.euler",
    "EulerAncestralDiscreteScheduler": "refldm.schedulers.euler",
    "HeunDiscreteScheduler": "refldm.schedulers.heun",
    "KDPM2DiscreteScheduler": "refldm.schedulers.kdpm2",
    "KDPM2AncestralDiscreteScheduler": "refldm.schedulers.kdpm2_ancestral",
    "DPMSolverMultistepScheduler": "refldm.schedulers.dpmsolver",
    "UniPCMultistepScheduler": "refldm.schedulers.unipc",
    "LCMScheduler": "refldm.schedulers.lcm",
    "EDMEulerScheduler": "refldm.schedulers.edm_euler",
    "DPMSolverSinglestepScheduler": "refldm.schedulers.dpmsolver_singlestep",
    "DEISMultistepScheduler": "refldm.schedulers.deis",
    "TCDScheduler": "refldm.schedulers.tcd",
    "EDMDPMSolverMultistepScheduler": "refldm.schedulers.edm_dpmsolver",
    "DPMSolverSDEScheduler": "refldm.schedulers.dpmsolver_sde",
    "DPMPP2SAncestralScheduler": "refldm.schedulers.dpmpp_2s_ancestral",
    "DPMPP3MSDEScheduler": "refldm.schedulers.dpmpp_3m_sde",
    "DPMFastScheduler": "refldm.schedulers.dpm_fast",
    "DPMAdaptiveScheduler": "refldm.schedulers.dpm_adaptive",
    # rectified flow (SD3, FLUX): the web UIs' "Euler" / "Heun" on a flow model (names.FLOW_SAMPLERS)
    "FlowMatchEulerDiscreteScheduler": "refldm.schedulers.flow_match_euler",
    "FlowMatchHeunDiscreteScheduler": "refldm.schedulers.flow_match_heun",
}
# the shared base classes, also importable from here
_BASE_NAMES = {"SchedulerMixin": "refldm.schedulers.base", "SchedulerOutput": "refldm.schedulers.base",
               "SigmaScheduler": "refldm.schedulers.base"}
# the submodules a caller may reach as attributes (``refldm.schedulers.names``)
_SUBMODULES = {"names", "base", "schedule", "prediction", "multistep"} | {
    module.rsplit(".", 1)[1] for module in SCHEDULER_MODULES.values()}

__all__ = [*SCHEDULER_MODULES, *_BASE_NAMES, "SCHEDULERS", "CLASSES", "get_scheduler"]


def scheduler_class(class_name: str):
    """The scheduler class of that diffusers name (a config's "_class_name"), importing its module only."""
    module = SCHEDULER_MODULES.get(class_name)
    if module is None:
        raise ConfigError(f"unknown scheduler class {class_name!r}; refldm has {', '.join(SCHEDULER_MODULES)}")
    return getattr(importlib.import_module(module), class_name)


def __getattr__(name: str):
    """The lazy names: a scheduler class imports its module; SCHEDULERS and CLASSES (the whole tables) import all."""
    if name in SCHEDULER_MODULES:
        value = scheduler_class(name)
    elif name in _BASE_NAMES:
        value = getattr(importlib.import_module(_BASE_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name == "CLASSES":  # diffusers class names -> classes (for a config's "_class_name")
        value = {class_name: scheduler_class(class_name) for class_name in SCHEDULER_MODULES}
    elif name == "SCHEDULERS":  # short names (as on the command line) -> (class, config keys the name implies)
        from . import names
        value = {s.key: (scheduler_class(s.cls), dict(s.config)) for s in names.SAMPLERS}
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found once
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


def get_scheduler(name: str, config=None, schedule: str | None = None, **overrides):
    """A scheduler by name, built from `config` (a scheduler_config.json dict or another scheduler's .config) plus
    the keys the name implies, plus `overrides`. `name` is a short name ("euler", "dpm++2m"), a diffusers class
    name, or a web-UI name: A1111's "DPM++ 2M Karras" / "Euler a", ComfyUI's "dpmpp_2m" with schedule="karras"
    (or "dpmpp_2m karras"); see refldm.schedulers.names. Keys of other schedulers in `config` are carried along
    unused, as in diffusers' from_config; the keys the name implies and `overrides` must be the class's own.
    Only the chosen scheduler's module is imported."""
    if name in SCHEDULER_MODULES and schedule is None:
        class_name, implied = name, {}
    else:
        from . import names
        class_name, implied, _, _ = names.resolve(name, schedule)
    cls = scheduler_class(class_name)
    if config is None:
        config = {}
    elif not (dataclasses.is_dataclass(config) or isinstance(config, dict)):
        raise ConfigError(f"get_scheduler: config must be a dict, got {type(config).__name__}")
    return cls.from_config(config, **{**implied, **overrides})  # the name's keys and overrides: explicit
