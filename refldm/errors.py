"""The errors refldm raises for bad input, in one module that imports nothing from refldm.

Each names what is at fault in one line (the file, the key, the value). They subclass the built-in
errors a caller would expect (a bad file or value is a ValueError), so ``except ValueError`` catches
them, and the CLI prints them as ``refldm: error: ...``. Every module that raises one imports it from
here; the old homes (``refldm.checkpoints.weights.WeightsError``, ``refldm.checkpoints.config.ConfigError``, ...) still export
the same class.
"""

from __future__ import annotations

__all__ = ["WeightsError", "ConfigError", "TokenizerError", "BackendError", "TooLargeError"]


class WeightsError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


class ConfigError(ValueError):
    """A config key or value that refldm does not implement."""


class TokenizerError(ValueError):
    """A tokenizer folder or a call that refldm cannot tokenize faithfully."""


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here."""


class TooLargeError(ValueError):
    """A run would need more memory than the machine has (estimated from the sizes before it starts)."""
