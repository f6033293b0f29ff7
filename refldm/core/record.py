"""The recording hook: named intermediate values, kept when a recorder is active, free when not.

The library calls this module at the places worth looking at; the cross-checking toolkit
(`refldm.crosscheck.trace`) turns a recording on and writes it to a trace file. Three kinds of call:

    module output   `refldm.core.nn.Module.__call__` hands every module's output to the active recorder,
                    under the module's checkpoint key prefix (``down_blocks.1.attentions.0``)
    value           ``record.value("steps.3.guided", eps)``: a value that is no module's output
                    (a sampler step's latents, the guided noise prediction)
    scope           ``with record.scope("text_encoder"):`` names everything recorded inside
                    ``text_encoder.<name>`` (a module called at the root of a scope gets the scope's name)

With no recorder active each call is one ``is None`` test (`value`, `Module.__call__`) or an empty
context (`scope`): nothing is copied, nothing named. A recorder keeps a host (NumPy) copy of each
value, so later in-place updates do not change what was recorded.

Names follow the checkpoint keys, hence diffusers' ``named_modules()``; a name recorded again in one
recording gets ``#2``, ``#3``, ... in call order (a U-Net called once per step). Outputs are recorded
after ``forward`` returns, children before parents, the order in which PyTorch forward hooks fire.

This module imports nothing from refldm, so every layer may call it without an import cycle.
"""

from __future__ import annotations

import contextlib
import fnmatch

import numpy

__all__ = ["recorder", "Recorder", "active", "value", "scope", "main_array", "host_copy", "base_name", "ROOT"]

recorder = None  # the active Recorder, or None

ROOT = "<root>"  # the name of a model's own output (its key prefix is empty)


def active() -> bool:
    """Whether a recorder is on (code that would record in another order, e.g. threads, checks this)."""
    return recorder is not None


def main_array(value):
    """The one array that stands for a module's output, or None if it has none.

    An array is itself; a tuple stands for its first element (diffusers' and refldm's down blocks return
    ``(hidden_states, skip_states)``, transformers' layers ``(hidden_states,)``); a list stands for its
    last element (refldm's CLIP encoder returns the list of every layer's output, and its output is the
    last one, as transformers' encoder's ``last_hidden_state``); an output object stands for its first
    array field among ``last_hidden_state``, ``sample``, ``prev_sample``, ``mean`` (CLIP, UNet, scheduler
    and VAE outputs); a Python number (a timestep) is a float64 scalar array.
    """
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return numpy.asarray(value, dtype=numpy.float64)
    if isinstance(value, tuple):
        return main_array(value[0]) if value else None
    if isinstance(value, list):
        return main_array(value[-1]) if value else None
    for field in ("last_hidden_state", "sample", "prev_sample", "mean"):
        inner = getattr(value, field, None)
        if hasattr(inner, "shape") and hasattr(inner, "dtype"):
            return inner
    return None


def host_copy(array) -> numpy.ndarray:
    """A NumPy copy of an array of any backend (CuPy's and the fake device's arrays come back by ``.get()``)."""
    if not isinstance(array, numpy.ndarray) and hasattr(array, "get"):
        array = array.get()
    return numpy.asarray(array).copy()


def base_name(name: str) -> str:
    """A recorded name without its call-count suffix: ``"attn1#3"`` -> ``"attn1"``."""
    return name.split("#", 1)[0]


class Recorder:
    """Collects (name, array) pairs in execution order; a name seen again gets a ``#2``, ``#3`` suffix.

    ``with Recorder() as r:`` makes it the active recorder (nested ``with`` blocks restore the one before);
    then ``r.activations`` is {name: NumPy array}.
    `include`: optional glob patterns (``"down_blocks.*.resnets.*"``); only names matching one are kept
    (the pattern sees the name without its ``#n`` suffix). `scope(prefix)` puts names recorded inside
    it under ``prefix.`` (the whole-pipeline trace uses ``text_encoder``, ``steps.<i>.unet``, ``vae``).
    """

    def __init__(self, include=None):
        self.activations = {}
        self.include = tuple(include) if include else None
        self._counts = {}
        self._scopes = []
        self._previous = []  # the recorders active before each (possibly nested) `with`

    def record(self, name: str, value):
        """Store a host copy of `value`'s main array (see `main_array`) under `name` (+ ``#n``)."""
        array = main_array(value)
        if array is None:
            return
        name = name or ROOT
        if self._scopes:
            name = self._scopes[-1] if name == ROOT else f"{self._scopes[-1]}.{name}"
        if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return
        n = self._counts.get(name, 0) + 1
        self._counts[name] = n
        self.activations[name if n == 1 else f"{name}#{n}"] = host_copy(array)

    @contextlib.contextmanager
    def scope(self, prefix: str):
        """Record everything inside under ``prefix.<name>`` (nested scopes join with dots)."""
        full = f"{self._scopes[-1]}.{prefix}" if self._scopes else prefix
        self._scopes.append(full)
        try:
            yield self
        finally:
            self._scopes.pop()

    def __enter__(self):
        global recorder
        self._previous.append(recorder)
        recorder = self
        return self

    def __exit__(self, *exc):
        global recorder
        recorder = self._previous.pop()
        return False


def value(name: str, x) -> None:
    """Record `x` (an array, an output object, a number) under `name` when a recorder is active."""
    if recorder is not None:
        recorder.record(name, x)


@contextlib.contextmanager
def scope(prefix: str):
    """``with record.scope("vae"):`` records what happens inside as ``vae.<name>``; free when not recording."""
    if recorder is None:
        yield None
    else:
        with recorder.scope(prefix) as r:
            yield r
