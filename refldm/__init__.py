"""refldm: a minimal, NumPy-first reference implementation of latent diffusion (Stable Diffusion).

The public classes carry the diffusers / transformers names, so code can swap one for the other:

    from refldm import StableDiffusionPipeline, AutoencoderKL, UNet2DConditionModel
    from refldm import CLIPTextModel, CLIPTokenizer, EulerDiscreteScheduler

They are imported on first use, so ``import refldm`` stays cheap.

``refldm.DEFAULT_MODEL`` is the folder of the small model shipped inside the package (a diffusers
layout), usable from anywhere:

    pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
"""

from __future__ import annotations

import importlib

from refldm.about import DEFAULT_MODEL, __version__  # noqa: F401  (re-exported)

_LAZY = {
    "AutoencoderKL": "refldm.models.vae",
    "UNet2DConditionModel": "refldm.models.unet",
    "CLIPTextModel": "refldm.models.clip",
    "CLIPTextModelWithProjection": "refldm.models.clip",
    "CLIPTokenizer": "refldm.tokenizer",
    "StableDiffusionPipeline": "refldm.pipeline",
    "StableDiffusionXLPipeline": "refldm.pipeline_xl",
    "StableDiffusionXLImg2ImgPipeline": "refldm.pipeline_xl",
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
