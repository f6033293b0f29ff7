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

from refldm.checkpoints.config import ConfigError

from . import names
from .base import SchedulerMixin, SchedulerOutput, SigmaScheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .dpmsolver_sde import DPMSolverSDEScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .dpm_adaptive import DPMAdaptiveScheduler
from .dpm_fast import DPMFastScheduler
from .dpmpp_2s_ancestral import DPMPP2SAncestralScheduler
from .dpmpp_3m_sde import DPMPP3MSDEScheduler
from .edm_dpmsolver import EDMDPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow_match_euler import FlowMatchEulerDiscreteScheduler
from .flow_match_heun import FlowMatchHeunDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
    "EDMEulerScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "TCDScheduler",
    "EDMDPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "DPMPP2SAncestralScheduler", "DPMPP3MSDEScheduler",
    "DPMFastScheduler", "DPMAdaptiveScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
    "SchedulerMixin", "SchedulerOutput", "SigmaScheduler",
    "SCHEDULERS", "CLASSES", "get_scheduler",
]

# Short names (as on the command line) -> (class, config keys the name implies).
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS, as Stable Diffusion ships it
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m_sde_heun": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                        "solver_type": "heun"}),
    "dpm++sde": (DPMSolverSDEScheduler, {}),
    # k-diffusion's samplers without a diffusers class (refldm's own classes, same calling convention)
    "dpm++2s_a": (DPMPP2SAncestralScheduler, {}),
    "dpm++3m_sde": (DPMPP3MSDEScheduler, {}),
    "dpm_fast": (DPMFastScheduler, {}),
    "dpm_adaptive": (DPMAdaptiveScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

# diffusers class names -> classes (for a config's "_class_name").
CLASSES = {cls.__name__: cls for cls, _ in SCHEDULERS.values()}
# schedulers without a web-UI name, for models trained for them (EDM: sigma_data, c_in / c_skip / c_out)
CLASSES.update({cls.__name__: cls for cls in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler,
                                                  DPMSolverSinglestepScheduler)})
# rectified-flow samplers (SD3, FLUX): the web UIs' "Euler" / "Heun" on a flow model (names.FLOW_SAMPLERS)
CLASSES.update({cls.__name__: cls for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)})


def get_scheduler(name: str, config=None, schedule: str | None = None, **overrides):
    """A scheduler by name, built from `config` (a scheduler_config.json dict or another scheduler's .config) plus
    the keys the name implies, plus `overrides`. `name` is a short name ("euler", "dpm++2m"), a diffusers class
    name, or a web-UI name: A1111's "DPM++ 2M Karras" / "Euler a", ComfyUI's "dpmpp_2m" with schedule="karras"
    (or "dpmpp_2m karras"); see refldm.schedulers.names. Keys of other schedulers in `config` are carried along
    unused, as in diffusers' from_config; the keys the name implies and `overrides` must be the class's own."""
    if name in CLASSES and schedule is None:
        cls, implied = CLASSES[name], {}
    else:
        class_name, implied, _, _ = names.resolve(name, schedule)
        cls = CLASSES[class_name]
    if config is None:
        config = {}
    elif not (dataclasses.is_dataclass(config) or isinstance(config, dict)):
        raise ConfigError(f"get_scheduler: config must be a dict, got {type(config).__name__}")
    return cls.from_config(config, **{**implied, **overrides})  # the name's keys and overrides: explicit
