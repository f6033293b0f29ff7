"""Shared test fixtures: backends to run on, and the cross-check packages (torch, diffusers, transformers).

In CI (CI=true) the cross-check packages are required: a missing one fails the run rather than
skipping the agreement tests. Elsewhere they are skipped with a reason.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest
from hypothesis import HealthCheck, settings

from refldm import backend

settings.register_profile("refldm", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("refldm")


def require(name: str):
    """Import a cross-check package: skip where it is absent, but fail in CI, which installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the crosscheck extra, but {name} is missing")
        pytest.skip(f"{name} is not installed (pip install 'refldm[crosscheck]')")


def _available_backends():
    names = ["numpy", "fakegpu"]
    try:
        backend.use("cupy").__exit__()
        names.append("cupy")
    except backend.BackendError:
        pass
    return names


BACKENDS = _available_backends()


@pytest.fixture(params=BACKENDS)
def on_backend(request):
    """Run the test with each available backend active (numpy, the fake device, and cupy on a GPU)."""
    with backend.use(request.param):
        yield request.param


# ---------------------------------------------------------------------------------------------------------
# The fast subset for the edit-test loop: `python -m pytest -m "not slow"`.
#
# A test is marked `slow` automatically when it needs the cross-check packages (torch, diffusers,
# transformers): its code, a fixture it uses, or a helper either calls (one of its module, or one it
# imports from another test module inside the function) reaches `require(...)`. Tests
# may also be marked `@pytest.mark.slow` by hand. CI runs everything, marked or not.

CROSSCHECK_CALL = "require("


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs torch / diffusers / transformers, or takes long; "
                                       'skip with -m "not slow" for a fast edit-test loop')


def _source(fn) -> str:
    import inspect
    try:
        return inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return ""


_NEEDING = {}


def _needing_names(module) -> set:
    """Names of the functions visible in `module` whose code reaches require(...), directly or through
    another such function (a fixpoint over the module's globals, imported helpers included)."""
    if module in _NEEDING:
        return _NEEDING[module]
    import inspect
    functions = {name: _source(obj) for name, obj in vars(module).items()
                 if inspect.isfunction(obj) and name != "require"}
    needing = {name for name, src in functions.items() if CROSSCHECK_CALL in src}
    changed = True
    while changed:
        changed = False
        for name, src in functions.items():
            if name not in needing and any(f"{n}(" in src for n in needing):
                needing.add(name)
                changed = True
    _NEEDING[module] = needing
    return needing


_LOCAL_IMPORT = re.compile(r"from (tests\.\w+) import ([\w, ]+)")


def _imports_needing(src: str) -> bool:
    """True when `src` imports, inside a function (``from tests.test_pipeline import build_tiny_sd``), a
    helper of another test module that needs the cross-check packages."""
    for module, names in _LOCAL_IMPORT.findall(src):
        needing = _needing_names(importlib.import_module(module))
        if any(name.strip() in needing for name in names.split(",")):
            return True
    return False


def _needs_crosscheck(item) -> bool:
    names = _needing_names(item.module)
    sources = [_source(item.function)]
    for defs in getattr(item, "_fixtureinfo", None).name2fixturedefs.values() if hasattr(item, "_fixtureinfo") else ():
        sources.extend(_source(d.func) for d in defs)
    return any(CROSSCHECK_CALL in src or any(f"{n}(" in src for n in names) or _imports_needing(src)
               for src in sources)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item, "module", None) is not None and _needs_crosscheck(item):
            item.add_marker(pytest.mark.slow)
