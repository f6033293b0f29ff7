"""Checkpoint files and configs: safetensors read and written by hand (weights), original <-> diffusers key
conversion (convert), config.json into dataclasses (config), what a model folder or file holds without
loading it (inspect, `refldm info`).

May import: refldm.backend, refldm.about, refldm.errors, refldm.files. Nothing that computes: the models ask this layer
for arrays; it never asks them.
"""
