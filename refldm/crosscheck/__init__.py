"""Checking refldm, or another implementation, layer by layer: trace (record every layer's output to a
safetensors file) and compare (find the first layer that disagrees).

May import: every library layer below (pipelines, models, core, ...). Nothing in the library imports it.
"""
