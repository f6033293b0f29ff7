"""Sampler names as people type them: refldm's short names, diffusers' class names, the AUTOMATIC1111 web UI's
labels ("DPM++ 2M Karras", "Euler a") and ComfyUI's sampler + scheduler names ("dpmpp_2m" + "karras"), each
mapped to a refldm scheduler class and the config keys it implies.

    resolve("DPM++ 2M Karras")            -> ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ...)
    resolve("dpmpp_2m", schedule="karras") -> the same
    label("dpm++2m", "karras")             -> "DPM++ 2M Karras"   (what the PNG parameters chunk records)

The equivalences follow diffusers' documentation of the A1111 / k-diffusion names (docs "Schedulers" overview)
and k-diffusion's sampling.py function names; `refldm samplers` prints the table. Names the web UIs offer that
refldm does not implement yet are listed in MISSING, and asking for one says so.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sampler:
    key: str            # refldm's short name (the CLI's --sampler)
    label: str          # A1111's name
    comfy: str          # ComfyUI's sampler_name
    cls: str            # refldm / diffusers scheduler class
    config: dict        # config keys the name implies
    k_diffusion: str    # k-diffusion's sampling.py function


SAMPLERS = [
    Sampler("euler", "Euler", "euler", "EulerDiscreteScheduler", {}, "sample_euler"),
    Sampler("euler_a", "Euler a", "euler_ancestral", "EulerAncestralDiscreteScheduler", {},
            "sample_euler_ancestral"),
    Sampler("heun", "Heun", "heun", "HeunDiscreteScheduler", {}, "sample_heun"),
    Sampler("lms", "LMS", "lms", "LMSDiscreteScheduler", {}, "sample_lms"),
    Sampler("dpm2", "DPM2", "dpm_2", "KDPM2DiscreteScheduler", {}, "sample_dpm_2"),
    Sampler("dpm2_a", "DPM2 a", "dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", {}, "sample_dpm_2_ancestral"),
    Sampler("dpm++2m", "DPM++ 2M", "dpmpp_2m", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2}, "sample_dpmpp_2m"),
    Sampler("dpm++2m_sde", "DPM++ 2M SDE", "dpmpp_2m_sde", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "sample_dpmpp_2m_sde (midpoint)"),
    Sampler("dpm++2m_sde_heun", "DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
            "sample_dpmpp_2m_sde (heun)"),
    # Brownian noise as k-diffusion's (same distribution; its torchsde numbers are not reproduced)
    Sampler("dpm++sde", "DPM++ SDE", "dpmpp_sde", "DPMSolverSDEScheduler", {}, "sample_dpmpp_sde"),
    # k-diffusion's samplers that diffusers lacks: refldm's own classes (refldm/schedulers/ksampler.py)
    Sampler("dpm++2s_a", "DPM++ 2S a", "dpmpp_2s_ancestral", "DPMPP2SAncestralScheduler", {},
            "sample_dpmpp_2s_ancestral"),
    # Brownian-tree noise in k-diffusion: the same distribution (independent normals per step), not its numbers
    Sampler("dpm++3m_sde", "DPM++ 3M SDE", "dpmpp_3m_sde", "DPMPP3MSDEScheduler", {}, "sample_dpmpp_3m_sde"),
    Sampler("dpm_fast", "DPM fast", "dpm_fast", "DPMFastScheduler", {}, "sample_dpm_fast"),
    Sampler("dpm_adaptive", "DPM adaptive", "dpm_adaptive", "DPMAdaptiveScheduler", {}, "sample_dpm_adaptive"),
    Sampler("ddim", "DDIM", "ddim", "DDIMScheduler", {}, "-"),
    Sampler("pndm", "PLMS", "plms", "PNDMScheduler", {"skip_prk_steps": True}, "-"),
    Sampler("unipc", "UniPC", "uni_pc_bh2", "UniPCMultistepScheduler", {}, "-"),
    # ComfyUI's "deis" is its own sample_deis (tAB-DEIS by default); diffusers' (and refldm's) is rhoAB log-rho
    Sampler("deis", "DEIS", "deis", "DEISMultistepScheduler", {}, "-"),
    Sampler("ddpm", "DDPM", "ddpm", "DDPMScheduler", {}, "-"),
    Sampler("lcm", "LCM", "lcm", "LCMScheduler", {}, "sample_lcm"),
    # ComfyUI's "tcd" is its own port (sample_tcd, on the model's sigmas); this is diffusers' TCDScheduler
    Sampler("tcd", "TCD", "tcd", "TCDScheduler", {}, "-"),
]

# schedule name (A1111 "Schedule type" / suffix, ComfyUI scheduler) -> config keys; "normal"/"automatic": the model's
SCHEDULES = {
    "normal": {}, "automatic": {}, "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"}, "simple": {"timestep_spacing": "trailing"},
    "uniform": {"timestep_spacing": "linspace"}, "ddim_uniform": {"timestep_spacing": "leading"},
}
SCHEDULE_LABELS = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "uniform": "Uniform", "ddim_uniform": "DDIM"}
# which schedulers take the sigma-grid keys (the others refuse them, naming the key)
SIGMA_GRID_CLASSES = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                      "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
                      "DPMSolverSDEScheduler", "DPMPP2SAncestralScheduler", "DPMPP3MSDEScheduler",
                      "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"}

# On a rectified-flow model (SD3, FLUX; scheduler FlowMatch*) the web UIs keep the sampler names and integrate the
# flow ODE instead: A1111/Forge "Euler", ComfyUI "euler" with ModelSamplingSD3. name -> class on such a model.
# (class, the config keys the name implies; "flow_shift" is taken from the model's scheduler "shift")
FLOW_SAMPLERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}


def resolve_flow(name: str):
    """(class name, config keys) of the flow-matching version of a sampler name (any spelling of Euler, Heun,
    DPM++ 2M, or a FlowMatch class name) on a rectified-flow model; other names are refused naming those that work."""
    for cls, implied in FLOW_SAMPLERS.values():
        if name == cls and cls.startswith("FlowMatch"):
            return cls, dict(implied)
    sampler = _BY_NAME.get(_norm(name))
    if sampler is None or sampler.key not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {name!r} has no rectified-flow version in refldm; on a flow model (SD3) "
                         f"choose one of {', '.join(FLOW_SAMPLERS)}")
    cls, implied = FLOW_SAMPLERS[sampler.key]
    return cls, dict(implied)


# samplers of the web UIs that refldm does not implement (yet): name -> what diffusers / k-diffusion call it
MISSING = {
    "Restart": ("restart", "none in diffusers; -"),
}


def _norm(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


# more spellings: ComfyUI's "_gpu" samplers are the same solvers with the Brownian noise drawn on the GPU (refldm
# draws its noise with refldm.core.random wherever the arrays live); A1111's old "k_" names
ALIASES = {"dpmpp_sde_gpu": "dpm++sde", "dpmpp_2m_sde_gpu": "dpm++2m_sde", "dpmpp_3m_sde_gpu": "dpm++3m_sde",
           "dpmpp_2m_sde_heun_gpu": "dpm++2m_sde_heun",
           "k_euler": "euler", "k_euler_a": "euler_a"}


def _index():
    out = {}
    for s in SAMPLERS:
        for alias in (s.key, s.label, s.comfy, s.cls):
            out.setdefault(_norm(alias), s)
    for alias, key in ALIASES.items():
        out.setdefault(_norm(alias), out[_norm(key)])
    return out


_BY_NAME = _index()
_SCHEDULE_BY_NAME = {_norm(k): k for k in SCHEDULES} | {_norm(v): k for k, v in SCHEDULE_LABELS.items()}


def valid_names() -> str:
    return (", ".join(s.label for s in SAMPLERS) + "; or ComfyUI's " + ", ".join(s.comfy for s in SAMPLERS)
            + "; or refldm's " + ", ".join(s.key for s in SAMPLERS)
            + "; optionally followed by a schedule: " + ", ".join(SCHEDULES))


def _split(name: str, schedule: str | None):
    """"DPM++ 2M Karras" -> ("DPM++ 2M", "karras"); a trailing schedule word is taken off the sampler name."""
    norm = _norm(name)
    if schedule is None and norm not in _BY_NAME:
        for key in sorted(_SCHEDULE_BY_NAME, key=len, reverse=True):
            if norm.endswith(" " + key) and _norm(norm[: -len(key) - 1]) in _BY_NAME:
                return norm[: -len(key) - 1], _SCHEDULE_BY_NAME[key]
    if schedule is not None:
        key = _SCHEDULE_BY_NAME.get(_norm(schedule))
        if key is None:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        return norm, key
    return norm, None


def resolve(name: str, schedule: str | None = None):
    """(class name, config keys, Sampler, schedule key or None) for a sampler name (any spelling above) and an
    optional schedule. Unknown names list the valid ones; web-UI names refldm lacks say so."""
    norm, schedule_key = _split(name, schedule)
    sampler = _BY_NAME.get(norm)
    if sampler is None:
        for label, (comfy, equivalent) in MISSING.items():
            if norm in (_norm(label), _norm(comfy)) or any(norm == _norm(label) + " " + s for s in _SCHEDULE_BY_NAME):
                raise ValueError(f"sampler {name!r} ({equivalent}) is not implemented in refldm; "
                                 f"choose one of {valid_names()}")
        raise ValueError(f"unknown sampler {name!r}; choose one of {valid_names()}")
    config = dict(sampler.config)
    if schedule_key is not None:
        implied = SCHEDULES[schedule_key]
        if any(k.startswith("use_") for k in implied) and sampler.cls not in SIGMA_GRID_CLASSES:
            raise ValueError(f"schedule {schedule_key!r} needs a sigma sampler; {sampler.label} ({sampler.cls}) "
                             f"has no {next(iter(implied))}")
        config.update(implied)
    return sampler.cls, config, sampler, schedule_key


def label(name: str, schedule: str | None = None) -> str:
    """The A1111 label for a sampler name (and schedule): what the PNG "parameters" chunk records."""
    _, _, sampler, schedule_key = resolve(name, schedule)
    suffix = SCHEDULE_LABELS.get(schedule_key) if schedule_key else None
    return f"{sampler.label} {suffix}" if suffix else sampler.label


def table():
    """Rows (A1111 label, ComfyUI names, refldm name, class + config, k-diffusion) for `refldm samplers`."""
    rows = []
    for s in SAMPLERS:
        config = ", ".join(f"{k}={v!r}" for k, v in s.config.items())
        rows.append((s.label, s.comfy, s.key, s.cls + (f"({config})" if config else ""), s.k_diffusion))
        if s.cls in SIGMA_GRID_CLASSES:
            for key in ("karras", "exponential", "beta"):
                extra = ", ".join(f"{k}={v!r}" for k, v in {**s.config, **SCHEDULES[key]}.items())
                rows.append((f"{s.label} {SCHEDULE_LABELS[key]}", f"{s.comfy} + {key}", f"{s.key} {key}",
                             f"{s.cls}({extra})", s.k_diffusion))
    return rows
