"""Checking refldm, or another implementation, layer by layer: trace (record every layer's output to a
safetensors file), compare (find the first layer that disagrees), and the porting kit: tiny (random-weight
models of every architecture, built by refldm), vectors (conformance bundles of golden inputs and outputs)
and verify (scoring a port's outputs against a bundle; docs/porting.md).

May import: every library layer below (pipelines, models, core, ...). Nothing in the library imports it.
"""
