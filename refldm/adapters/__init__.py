"""What changes a model without being one: LoRA, textual inversion, the web UI's prompt weighting.

May import: refldm.models, refldm.core, refldm.checkpoints, refldm.backend, refldm.errors.
"""
