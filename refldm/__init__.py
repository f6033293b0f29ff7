"""refldm: a minimal, NumPy-first reference implementation of latent diffusion (Stable Diffusion).

The public classes carry the diffusers / transformers names, so code can swap one for the other:

    from refldm import StableDiffusionPipeline, AutoencoderKL, UNet2DConditionModel
    from refldm import CLIPTextModel, CLIPTokenizer, EulerDiscreteScheduler

They are imported on first use, so ``import refldm`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AutoencoderKL": "refldm.models.vae",
    "UNet2DConditionModel": "refldm.models.unet",
    "CLIPTextModel": "refldm.models.clip",
    "CLIPTokenizer": "refldm.tokenizer",
    "StableDiffusionPipeline": "refldm.pipeline",
    "StableDiffusionInpaintPipeline": "refldm.pipeline_inpaint",
}
_SCHEDULERS = "refldm.schedulers"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name.endswith("Scheduler"):
        module = importlib.import_module(_SCHEDULERS)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'refldm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
