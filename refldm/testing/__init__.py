"""Test doubles that ship with the package: fakedevice, a NumPy-backed stand-in for a GPU array library that
fails wherever CuPy would (implicit host conversion, mixed devices), so CPU-only CI catches GPU bugs.

May import: nothing from refldm (the backend module loads it by name).
"""
