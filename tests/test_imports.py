"""The module import graph of refldm has no cycle, and its layers show in it.

The graph is read from the source with `ast`, never by importing. One module imports another when:

- an ``import refldm.x`` / ``from refldm.x import y`` / relative ``from . import y`` statement names it,
  wherever the statement stands: at module level, inside a function or a method, under ``if`` or
  ``try`` (an import deferred into a function still has to succeed when the function runs, so a cycle
  held together by function-level imports is still a cycle);
- ``from refldm.p import y`` names the submodule ``refldm.p.y`` when there is one, else the module
  ``refldm.p`` itself (for ``y`` defined there);
- a module that calls ``importlib.import_module`` imports every refldm module whose dotted name appears
  in it as a string literal: ``refldm/__init__.py``'s lazy table (``_LAZY``, ``_SCHEDULERS``) and the
  CLI's table of subcommand modules count as imports by the module that holds the table. This is the
  strict reading (the lazy table runs only on attribute access, ``refldm.StableDiffusionPipeline``), so
  a module that imports the ``refldm`` package itself (for ``__version__``) sits above everything the
  table names.

Importing ``refldm.x.y`` also runs the package ``refldm/x/__init__.py`` first; that is not counted as
an edge (a package whose ``__init__`` gathers its submodules is the usual layout, not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "refldm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _target(dotted: str, where: str) -> str:
    """The refldm module a dotted name refers to (the longest prefix that is a module)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    raise AssertionError(f"{where}: imports {dotted!r}, which is no module under refldm/")


def imports_of(name: str) -> dict:
    """{imported refldm module: line of the first import} for module `name` (rules: module docstring)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {}

    def add(target, node):
        found.setdefault(target, node.lineno)

    calls_import_module = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "refldm" or alias.name.startswith("refldm."):
                    add(_target(alias.name, f"{path}:{node.lineno}"), node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if _is_package(name) else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            if not (base == "refldm" or base.startswith("refldm.")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in MODULES else _target(base, f"{path}:{node.lineno}"), node)
        elif isinstance(node, ast.Call):
            fn = node.func
            if (isinstance(fn, ast.Attribute) and fn.attr == "import_module") or (
                    isinstance(fn, ast.Name) and fn.id == "import_module"):
                calls_import_module = True
    if calls_import_module:  # name tables resolved at run time count as imports by their module
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
                add(node.value, node)
    found.pop(name, None)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict):
    """One cycle as a list of modules [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _show(cycle):
    steps = [f"{a} -> {b} ({MODULES[a].relative_to(PACKAGE.parent)}:{GRAPH[a][b]})"
             for a, b in zip(cycle, cycle[1:])]
    return "import cycle:\n  " + "\n  ".join(steps)


def test_the_graph_reader_sees_the_imports_it_must():
    """Guards the reader itself: function-level, relative and table imports are all edges."""
    assert len(MODULES) > 20 and "refldm.models.unet" in MODULES
    assert "refldm.checkpoints.weights" in GRAPH["refldm.core.nn"]  # from_pretrained's loader
    assert "refldm.schedulers.base" in GRAPH["refldm.schedulers.ddim"]  # relative: from .base import
    assert "refldm.models.unet" in GRAPH["refldm.pipelines.sd"]  # imported inside a function
    assert "refldm.cli.trace" in GRAPH["refldm.cli"]  # the CLI's table of subcommand modules
    assert "refldm.pipelines.sd" in GRAPH["refldm"]  # the lazy table
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, _show(cycle)


def _reachable(name: str) -> set:
    seen, todo = set(), [name]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("name", ["refldm.errors", "refldm.core.record"])
def test_the_bottom_modules_import_nothing_from_refldm(name):
    """The error classes and the recording hook: anything may import them, so they import nothing."""
    assert GRAPH[name] == {}, f"{name} imports {sorted(GRAPH[name])}"


CROSS_CHECK = {"refldm.crosscheck.trace", "refldm.crosscheck.compare"}  # the cross-checking layer: above the library


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(("refldm.models", "refldm.schedulers"))
                                        or n in {"refldm.core.nn", "refldm.core.ops", "refldm.core.functional",
                                                 "refldm.checkpoints.weights", "refldm.pipelines.sd",
                                                 "refldm.pipelines.sampling", "refldm.backend", "refldm.checkpoints.config"}))
def test_the_library_does_not_reach_up_into_the_cross_checking_layer_or_the_cli(name):
    """Models, samplers and the pipeline record through `refldm.core.record` only; they never import the
    tracing functions, the comparison or the CLI (those sit on top and import the library)."""
    above = sorted(m for m in _reachable(name) if m in CROSS_CHECK or m.startswith("refldm.cli"))
    assert not above, f"{name} reaches {above}"


def test_the_error_classes_have_one_home_and_keep_their_old_names():
    """Each error class is defined once, in `refldm.errors`; the modules that raised it before still export it."""
    from refldm import backend, errors
    from refldm.checkpoints import config, weights
    from refldm.models import tokenizer

    assert weights.WeightsError is errors.WeightsError and issubclass(errors.WeightsError, ValueError)
    assert config.ConfigError is errors.ConfigError and issubclass(errors.ConfigError, ValueError)
    assert tokenizer.TokenizerError is errors.TokenizerError and issubclass(errors.TokenizerError, ValueError)
    assert backend.BackendError is errors.BackendError and issubclass(errors.BackendError, RuntimeError)
    defined = {name: [m for m in MODULES if f"class {name}(" in MODULES[m].read_text(encoding="utf-8")]
               for name in errors.__all__}
    assert defined == {name: ["refldm.errors"] for name in errors.__all__}


# --------------------------------------------------------------------------------------------------
# The layers: one folder each, bottom to top. A module imports only from its own layer or the layers
# below it (refldm/__init__.py, the package facade with its lazy table, stands above them all).

LAYERS = [
    {"refldm.about", "refldm.errors", "refldm.files"},  # leaves: anything may import them
    {"refldm.testing"},                                  # test doubles (the backend loads fakedevice by name)
    {"refldm.backend"},                                  # the array namespace
    {"refldm.accel"},                                    # the speed layer (threads, BLAS, ctypes)
    {"refldm.checkpoints"},                              # safetensors, configs, key conversion
    {"refldm.core"},                                     # ops, nn, random, record, images
    {"refldm.models", "refldm.schedulers"},
    {"refldm.adapters"},
    {"refldm.pipelines"},
    {"refldm.crosscheck", "refldm.analysis", "refldm.grid"},
    {"refldm.cli", "refldm.__main__"},
]
# The speed layer plugs in at these places only: functional's dispatch (the reference ops in core.ops never
# see it), the C library's float32 math for torch-compatible noise, and the CLI's --reference switch.
# Models, schedulers, pipelines never see it.
ACCEL_USERS = {"refldm.core.functional", "refldm.core.random", "refldm.cli"}


def layer_of(module: str) -> int | None:
    for rank, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return rank
    return None


def layer_violations(graph: dict) -> list:
    """Every edge that reaches up a layer, or into the speed layer from a place not in ACCEL_USERS."""
    bad = []
    for name, deps in graph.items():
        mine = layer_of(name)
        if mine is None:
            continue
        for dep, line in deps.items():
            theirs = layer_of(dep)
            if theirs is not None and theirs > mine:
                bad.append(f"{name} -> {dep} (line {line}): layer {mine} imports layer {theirs}")
            if layer_of(dep) == layer_of("refldm.accel") and layer_of(name) != theirs and name not in ACCEL_USERS:
                bad.append(f"{name} -> {dep} (line {line}): only {sorted(ACCEL_USERS)} plug in the speed layer")
    return sorted(bad)


def test_every_module_has_a_layer():
    homeless = sorted(n for n in MODULES if layer_of(n) is None and n != "refldm")
    assert not homeless, f"modules in no layer (add the folder to LAYERS): {homeless}"


def test_each_layer_imports_only_the_layers_below_it():
    """A folder imports its own layer and the layers below it, never above.

    The check can fail: a models module that imported a pipeline, or a pipeline or the reference ops that
    imported the speed layer, is reported, as the synthetic graphs below show (a rule broken on purpose).
    """
    assert layer_violations(GRAPH) == []
    broken = dict(GRAPH)
    broken["refldm.models.unet"] = {**GRAPH["refldm.models.unet"], "refldm.pipelines.sd": 1}
    broken["refldm.pipelines.sd"] = {**GRAPH["refldm.pipelines.sd"], "refldm.accel.kernels": 2}
    broken["refldm.core.ops"] = {**GRAPH["refldm.core.ops"], "refldm.models.blocks": 3, "refldm.accel": 4}
    found = layer_violations(broken)
    assert [v.split(" (")[0] for v in found] == ["refldm.core.ops -> refldm.accel",
                                                  "refldm.core.ops -> refldm.models.blocks",
                                                  "refldm.models.unet -> refldm.pipelines.sd",
                                                  "refldm.pipelines.sd -> refldm.accel.kernels"], found


def test_each_layer_folder_states_what_it_may_import():
    for layer in LAYERS:
        for top in layer:
            path = PACKAGE.parent / (top.replace(".", "/") + "/__init__.py")
            if path.exists():
                assert "May import:" in path.read_text(encoding="utf-8"), f"{path} has no 'May import:' line"


def test_the_cli_holds_no_math():
    """The CLI parses arguments and prints; no array math (numpy's linear algebra, FFTs, exp) lives there."""
    math_calls = ("np.exp(", "np.matmul(", "np.einsum(", "np.fft.", "np.linalg.", "xp.exp(")
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        found = [c for c in math_calls if c in text]
        assert not found, f"{path.name} computes {found}: move the math into a library layer"


def test_old_flat_module_paths_are_aliases_of_the_moved_modules():
    """`import refldm.pipeline` (the 0.1 layout) gives the module now at refldm/pipelines/sd.py."""
    import importlib

    import refldm
    for old, new in refldm._MOVED.items():
        assert importlib.import_module(f"refldm.{old}") is importlib.import_module(new), old
        assert getattr(refldm, old) is importlib.import_module(new), old
