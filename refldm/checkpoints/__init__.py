"""Checkpoint files and configs: safetensors read and written by hand (weights), original <-> diffusers key
conversion (convert), config.json into dataclasses (config).

May import: refldm.backend, refldm.errors, refldm.files. Nothing that computes: the models ask this layer
for arrays; it never asks them.
"""
