"""k-diffusion's own ``sampling.py``, loaded without its package ``__init__``.

``import k_diffusion`` imports every module of the package (models, training, evaluation), which need wandb,
kornia, clip, torchvision, accelerate, jsonmerge ...; ``sampling.py`` needs only torch, scipy, torchdiffeq, torchsde,
tqdm and ``utils.append_dims``. So the tests load the installed package's ``sampling.py`` file by path, as a module
of a stand-in package whose ``utils`` holds ``append_dims`` taken from the installed ``utils.py`` source (parsed,
not run: the rest of utils.py imports torchvision, whose PyPI wheels do not load on the CPU build of torch).

Install: ``pip install --no-deps -r tests/requirements-kdiffusion.txt`` (README's test command); torchsde,
trampoline and torchdiffeq come with the crosscheck extra.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
import types

from tests.conftest import require

PACKAGE = "_kdiffusion_sampling_only"


def load_sampling():
    """k_diffusion/sampling.py of the installed k-diffusion, as a module (fails in CI if not installed)."""
    if PACKAGE + ".sampling" in sys.modules:
        return sys.modules[PACKAGE + ".sampling"]
    for dep in ("torch", "scipy", "torchsde", "torchdiffeq"):
        require(dep)
    spec = importlib.util.find_spec("k_diffusion")  # finds the folder; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        require("k_diffusion")  # the import error: skip here, fail in CI
    folder = list(spec.submodule_search_locations)[0]
    package = types.ModuleType(PACKAGE)
    package.__path__ = []  # a package with no files of its own
    utils = types.ModuleType(PACKAGE + ".utils")
    with open(os.path.join(folder, "utils.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "append_dims"]
    assert len(wanted) == 1, "k_diffusion/utils.py has no append_dims"
    exec(compile(ast.Module(body=wanted, type_ignores=[]), os.path.join(folder, "utils.py"), "exec"), utils.__dict__)
    package.utils = utils
    sys.modules[PACKAGE], sys.modules[PACKAGE + ".utils"] = package, utils
    spec = importlib.util.spec_from_file_location(PACKAGE + ".sampling", os.path.join(folder, "sampling.py"))
    sampling = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sampling
    spec.loader.exec_module(sampling)
    return sampling
