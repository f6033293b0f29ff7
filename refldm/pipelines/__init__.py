"""Text (and image) in, image out: the pipeline core every pipeline shares (common: argument checks, seed,
noise, NaN guard, output and parameters text), the sampling loop (sampling), Stable Diffusion 1.x/2.x (sd),
SDXL (sdxl), inpainting (inpaint), SD3 (sd3), ControlNet (controlnet), T2I-Adapter (t2i_adapter).

May import: refldm.models, refldm.schedulers, refldm.adapters, refldm.core, refldm.checkpoints,
refldm.backend, refldm.errors, refldm.about. Never refldm.accel: the speed layer sits under the ops.
"""
