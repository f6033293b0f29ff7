"""The networks, one file each, holding their arrays under the checkpoint's key names: unet, vae, clip, the
tokenizer, and the blocks they share.

May import: refldm.core, refldm.checkpoints, refldm.backend, refldm.errors. Never schedulers,
adapters, pipelines, refldm.accel or anything above.
"""
