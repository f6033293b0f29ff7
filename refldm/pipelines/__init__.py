"""Text (and image) in, image out: the sampling loop (sampling), Stable Diffusion 1.x/2.x (sd), SDXL (sdxl),
inpainting (inpaint), ControlNet (controlnet).

May import: refldm.models, refldm.schedulers, refldm.adapters, refldm.core, refldm.checkpoints,
refldm.backend, refldm.errors, refldm.about. Never refldm.accel: the speed layer sits under the ops.
"""
