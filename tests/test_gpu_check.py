"""tools/gpu_check.sh, the GPU check in one command, run end to end on the CPU against the fake device; and
REFLDM_BACKEND=cupy where CuPy is installed but sees no GPU: one line naming the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_end_to_end_on_the_fake_device(tmp_path):
    require("torch")
    require("diffusers")
    require("transformers")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("REFLDM_BACKEND", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--fake", "--quick", "--dtypes",
                          "float32", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert (out / "gpu_check.log").stat().st_size > 0 and (out / "suite.log").is_file()
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["mode"] == "fakegpu" and data["ok"] is True and data["failures"] == []
    assert set(data["estimate_s"]) >= {"models", "agreement", "timings", "suite", "total"}
    assert data["environment"]["torch"] and data["environment"]["device"].startswith("fakegpu")
    parts = {r["part"].split("_")[0]: r for r in data["agreement"]}
    assert set(parts) == {"vae", "unet", "clip", "pipeline"}
    for r in data["agreement"]:
        assert r["dtype"] == "float32" and r["tol"] == 1e-4 and 0 <= r["rel_err"] <= 1e-4 and r["ok"]
    cases = {r["case"].split("_")[0] + ("_" + r["case"].split("_")[1] if r["case"].startswith("vae") else "")
             for r in data["timings"]}
    assert cases == {"conv3x3", "attention", "unet", "vae_decode", "txt2img"}
    assert len(data["timings"]) == 6  # the VAE decode at two sizes
    for r in data["timings"]:
        assert "error" not in r, r
        assert len(r["refldm_runs_ms"]) == len(r["torch_runs_ms"]) == 2
        assert r["refldm_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0
        assert r["refldm_peak_bytes"] >= r["refldm_bytes_before"] >= 0
    suite = data["suite"]
    assert suite["backend"] == "fakegpu" and suite["passed"] > 0 and suite["failed"] == 0 and not suite["timed_out"]


def test_gpu_check_without_a_gpu_is_one_line(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PATH="/usr/bin:/bin")  # no nvidia-smi on this PATH
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    if run.returncode == 0:
        pytest.skip("an NVIDIA GPU is visible here")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "no NVIDIA GPU visible" in run.stderr


def test_wheels_folder_without_wheels_is_one_line(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--fake", "--wheels", str(empty),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert run.returncode == 2 and run.stderr.strip() == f"gpu_check.sh: --wheels {empty}: the folder holds no .whl file"


def test_cupy_backend_with_cupy_but_no_gpu_is_one_line(tmp_path):
    """A CuPy that imports but finds no usable GPU (here a stand-in package whose runtime raises, as
    CuPy's does without a driver): REFLDM_BACKEND=cupy fails on first use with one line, and the CLI
    prints that line alone."""
    fake = tmp_path / "cupy"
    (fake / "cuda").mkdir(parents=True)
    (fake / "__init__.py").write_text("from cupy import cuda\n__version__ = '0-standin'\n")
    (fake / "cuda" / "__init__.py").write_text(
        "class _Runtime:\n"
        "    @staticmethod\n"
        "    def getDeviceCount():\n"
        "        raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')\n"
        "runtime = _Runtime()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLDM_")}
    env.update(REFLDM_BACKEND="cupy", PYTHONPATH=str(tmp_path) + os.pathsep + ROOT)
    run = subprocess.run([sys.executable, "-c", "from refldm import backend; backend.xp()"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0
    assert last.startswith("refldm.errors.BackendError: REFLDM_BACKEND=cupy: backend 'cupy': CuPy is installed "
                           "but no CUDA GPU is usable"), last
    cli = subprocess.run([sys.executable, "-m", "refldm", "txt2img", "-p", "a cat", "-q", "-o",
                          str(tmp_path / "x.png")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert cli.returncode != 0
    assert cli.stderr.strip().count("\n") == 0 and "REFLDM_BACKEND=cupy" in cli.stderr, cli.stderr
