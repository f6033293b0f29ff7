"""The lazy name registry of refldm.schedulers: a run imports its own scheduler only, every public name still
imports, and every scheduler class is in the table (refldm/schedulers/__init__.py)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import refldm
from refldm import schedulers as rs
from refldm.schedulers.base import SchedulerMixin

ROOT = Path(__file__).resolve().parent.parent

# the scheduler modules a txt2img run with the built-in model needs: the package (its table), the default model's
# scheduler (DDIM) and what DDIM imports (base, schedule, prediction), and names (the parameters text's label)
TXT2IMG_MODULES = ["refldm.schedulers", "refldm.schedulers.base", "refldm.schedulers.ddim",
                   "refldm.schedulers.names", "refldm.schedulers.prediction", "refldm.schedulers.schedule"]

_PROBE = """
import sys
def loaded():
    return sorted(m for m in sys.modules if m == "refldm.schedulers" or m.startswith("refldm.schedulers."))
import refldm
from refldm import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)
pipe("a", num_inference_steps=2)
print(",".join(loaded()))
from refldm.schedulers import get_scheduler
get_scheduler("DPM++ 2M Karras", {})
print(",".join(loaded()))
"""


def test_a_txt2img_run_imports_only_the_scheduler_it_uses():
    """`StableDiffusionPipeline.from_pretrained(refldm.DEFAULT_MODEL)("a")` in a fresh interpreter loads the default
    model's scheduler (DDIM) and the modules it needs, none of the other 21; get_scheduler then loads its own
    (DPM-Solver and the multistep helpers it imports) and nothing else."""
    model_config = Path(refldm.DEFAULT_MODEL) / "scheduler" / "scheduler_config.json"
    assert '"DDIMScheduler"' in model_config.read_text(encoding="utf-8")  # what TXT2IMG_MODULES assumes
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after_run, after_swap = [line.split(",") for line in result.stdout.strip().splitlines()[-2:]]
    assert after_run == TXT2IMG_MODULES
    assert sorted(set(after_swap) - set(after_run)) == ["refldm.schedulers.dpmsolver", "refldm.schedulers.multistep"]


def _scheduler_classes_defined_in_the_package():
    """Every concrete scheduler class (one with a step method) defined in a refldm.schedulers module."""
    found = {}
    for info in pkgutil.iter_modules(rs.__path__):
        module = importlib.import_module(f"refldm.schedulers.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, SchedulerMixin) and value.__module__ == module.__name__
                    and callable(getattr(value, "step", None))):
                found[value.__name__] = module.__name__
    return found


def test_every_scheduler_class_is_in_the_table_under_its_module():
    assert _scheduler_classes_defined_in_the_package() == rs.SCHEDULER_MODULES


@pytest.mark.parametrize("name", rs.__all__)
def test_every_public_name_imports_and_is_listed(name):
    namespace = {}
    exec(f"from refldm.schedulers import {name}", namespace)  # the documented spelling
    assert namespace[name] is getattr(rs, name)
    assert name in dir(rs)
    if name in rs.SCHEDULER_MODULES:
        assert namespace[name].__name__ == name and getattr(refldm, name) is namespace[name]


def test_the_tables_and_unknown_names():
    assert set(rs.CLASSES) == set(rs.SCHEDULER_MODULES)
    assert rs.SCHEDULERS["pndm"] == (rs.PNDMScheduler, {"skip_prk_steps": True})
    assert "names" in dir(rs) and rs.names.resolve("euler")[0] == "EulerDiscreteScheduler"
    with pytest.raises(AttributeError, match="NoSuchScheduler"):
        rs.NoSuchScheduler  # noqa: B018
    with pytest.raises(ValueError, match="unknown scheduler class 'NoSuchScheduler'"):
        rs.scheduler_class("NoSuchScheduler")
