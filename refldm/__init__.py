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
import importlib.abc
import importlib.util
import sys

from refldm.about import DEFAULT_MODEL, __version__  # noqa: F401  (re-exported)

_LAZY = {
    "AutoencoderKL": "refldm.models.vae",
    "UNet2DConditionModel": "refldm.models.unet",
    "CLIPTextModel": "refldm.models.clip",
    "CLIPTextModelWithProjection": "refldm.models.clip",
    "CLIPTokenizer": "refldm.models.tokenizer",
    "T5EncoderModel": "refldm.models.t5",
    "T5TokenizerFast": "refldm.models.t5_tokenizer",
    "StableDiffusionPipeline": "refldm.pipelines.sd",
    "StableDiffusionXLPipeline": "refldm.pipelines.sdxl",
    "StableDiffusionXLImg2ImgPipeline": "refldm.pipelines.sdxl",
    "StableDiffusionInpaintPipeline": "refldm.pipelines.inpaint",
    "SD3Transformer2DModel": "refldm.models.sd3_transformer",
    "StableDiffusion3Pipeline": "refldm.pipelines.sd3",
    "StableDiffusion3Img2ImgPipeline": "refldm.pipelines.sd3",
    "ControlNetModel": "refldm.models.controlnet",
    "MultiControlNetModel": "refldm.models.controlnet",
    "StableDiffusionControlNetPipeline": "refldm.pipelines.controlnet",
    "StableDiffusionControlNetImg2ImgPipeline": "refldm.pipelines.controlnet",
    "StableDiffusionControlNetInpaintPipeline": "refldm.pipelines.controlnet",
    "StableDiffusionXLControlNetPipeline": "refldm.pipelines.controlnet",
    "StableDiffusionXLControlNetImg2ImgPipeline": "refldm.pipelines.controlnet",
    "T2IAdapter": "refldm.models.t2i_adapter",
    "MultiAdapter": "refldm.models.t2i_adapter",
    "StableDiffusionAdapterPipeline": "refldm.pipelines.t2i_adapter",
    "StableDiffusionXLAdapterPipeline": "refldm.pipelines.t2i_adapter",
    "FluxTransformer2DModel": "refldm.models.flux_transformer",
    "FluxPipeline": "refldm.pipelines.flux",
    "FluxImg2ImgPipeline": "refldm.pipelines.flux",
}
_SCHEDULERS = "refldm.schedulers"

# The flat module paths of refldm 0.1 and the layer folder each module lives in now (docs/README.md has
# the map). ``import refldm.pipeline`` / ``from refldm import lora`` keep working: the old name is an
# alias of the same module object.
_MOVED = {
    "ops": "refldm.core.ops", "nn": "refldm.core.nn", "random": "refldm.core.random",
    "record": "refldm.core.record", "images": "refldm.core.images",
    "sampling": "refldm.pipelines.sampling", "pipeline": "refldm.pipelines.sd",
    "pipeline_xl": "refldm.pipelines.sdxl", "pipeline_inpaint": "refldm.pipelines.inpaint",
    "lora": "refldm.adapters.lora", "textual_inversion": "refldm.adapters.textual_inversion",
    "prompt_weighting": "refldm.adapters.prompt_weighting",
    "weights": "refldm.checkpoints.weights", "convert": "refldm.checkpoints.convert",
    "config": "refldm.checkpoints.config", "trace": "refldm.crosscheck.trace",
    "compare": "refldm.crosscheck.compare", "cost": "refldm.analysis.cost",
    "vae_report": "refldm.analysis.vae_report", "probe_images": "refldm.analysis.probe_images",
    "fakedevice": "refldm.testing.fakedevice", "tokenizer": "refldm.models.tokenizer",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``refldm.<old name>`` and hands back the module now at its new path (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head == "refldm" and old in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name.partition(".")[2]])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MOVED:
        return importlib.import_module(_MOVED[name])
    if name.endswith("Scheduler"):
        module = importlib.import_module(_SCHEDULERS)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'refldm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
