"""Recording named intermediate activations (the cross-checking toolkit builds on this).

``with refldm.trace.record() as t: model(x)`` collects every module output under its checkpoint key
prefix, in execution order; ``t.activations`` is an ordered dict {name: numpy array}. With no
recording active, `recorder` is None and `Module.__call__` does nothing extra.
"""

from __future__ import annotations

recorder = None  # the active Recorder, or None


class Recorder:
    """Collects (name, array) pairs in execution order; a name seen again gets a ``#2`` suffix."""

    def __init__(self):
        self.activations = {}

    def record(self, name: str, value):
        from refldm.backend import to_numpy

        if isinstance(value, tuple):  # modules that return several arrays record the first
            value = value[0]
        if not hasattr(value, "shape"):
            return
        key, n = name or "<root>", 1
        while key in self.activations:
            n += 1
            key = f"{name or '<root>'}#{n}"
        self.activations[key] = to_numpy(value).copy()

    def __enter__(self):
        global recorder
        self._previous, recorder = recorder, self
        return self

    def __exit__(self, *exc):
        global recorder
        recorder = self._previous
        return False


def record() -> Recorder:
    """Start recording activations: ``with record() as t: ...``."""
    return Recorder()
