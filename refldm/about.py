"""Facts about the package that any layer may name: its version and the built-in model's folder.

This module imports nothing from refldm, so naming these never makes an import cycle.
"""

import os

__version__ = "0.1.0"

# The folder of the small model shipped inside the package (a diffusers folder; docs/default-model.md).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
