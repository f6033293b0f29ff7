"""Shared test fixtures: backends to run on, and the cross-check packages (torch, diffusers, transformers).

In CI (CI=true) the cross-check packages are required: a missing one fails the run rather than
skipping the agreement tests. Elsewhere they are skipped with a reason.
"""

from __future__ import annotations

import importlib
import os

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
