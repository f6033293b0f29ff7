#!/usr/bin/env bash
# Run the op and backend tests on a machine with an NVIDIA GPU, with the cupy backend active.
#
#   tools/gpu_tests.sh                 # from the repository root
#   PYTHON=python3.11 tools/gpu_tests.sh -x      # extra arguments go to pytest
#
# The `on_backend` fixture (tests/conftest.py) adds "cupy" to its backends when CuPy imports and sees
# a GPU, so every op test also runs on the device; `-k cupy` selects those runs, and the backend tests
# and bad-input tests run as well. Torch agreement tests need torch (CPU is enough): they compare
# the GPU result, brought back with to_numpy, with torch on the host.
# CuPy comes from the `gpu` extra (cupy-cuda12x); where it is missing and no package index can be
# reached, the script says so and stops.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_tests.sh: no NVIDIA GPU visible (nvidia-smi -L failed); nothing to run" >&2
    exit 2
fi
nvidia-smi -L

if ! "$PYTHON" -c "import cupy" >/dev/null 2>&1; then
    echo "gpu_tests.sh: installing the gpu extra (cupy-cuda12x)"
    "$PYTHON" -m pip install --quiet -e ".[gpu,test]" || {
        echo "gpu_tests.sh: could not install cupy-cuda12x; install it (pip install 'refldm[gpu]') and rerun" >&2
        exit 2
    }
fi
"$PYTHON" -m pip install --quiet -e ".[test]" >/dev/null 2>&1 || true

# the backend itself: the switch must reach the GPU, and arrays must really live there
"$PYTHON" - <<'EOF'
import numpy as np
from refldm import backend, ops
with backend.use("cupy") as cp:
    x = backend.asarray(np.random.default_rng(0).standard_normal((2, 4, 8, 8)), dtype="float32")
    assert type(x).__module__.startswith("cupy"), type(x)
    y = ops.conv2d(x, backend.asarray(np.ones((3, 4, 3, 3), np.float32)), padding=1)
    assert type(y).__module__.startswith("cupy"), type(y)
    print("cupy backend:", cp.__version__, "device", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
          "conv2d output", y.shape, y.dtype)
EOF

# every op test on the cupy backend, then the backend tests and the same op files on the host for contrast
"$PYTHON" -m pytest -q tests/test_ops.py tests/test_ops_attention.py tests/test_ops_errors.py -k cupy "$@"
REFLDM_BACKEND=cupy "$PYTHON" -c "from refldm import backend; assert backend.name() == 'cupy'; print('REFLDM_BACKEND=cupy ok')"
"$PYTHON" -m pytest -q tests/test_backend.py "$@"
