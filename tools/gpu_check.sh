#!/usr/bin/env bash
# The GPU check in one command: refldm on CuPy against torch on CUDA (agreement, timings, peak GPU
# memory) and the test suite with REFLDM_BACKEND=cupy; the Python parts are tools/gpu_check.py.
#
#   tools/gpu_check.sh                          # a machine with an NVIDIA GPU, CuPy and torch (CUDA)
#   tools/gpu_check.sh --wheels DIR             # install DIR's wheels (CuPy, ...) into a temporary target first
#   tools/gpu_check.sh --out DIR                # where the logs and gpu_check.json go (default: $OUT, else a new
#                                               # folder under /tmp, printed at the end)
#   tools/gpu_check.sh --fake --quick           # the same steps on the CPU against the fake device, tiny
#                                               # models: proves the script works before a GPU is lent
#   tools/gpu_check.sh --estimate               # print the duration estimate, run nothing
#   PYTHON=python3.11 tools/gpu_check.sh ...    # the interpreter (default: python3)
#
# Other arguments go to tools/gpu_check.py (--budget SECONDS, default 480; --dtypes; --repeats; --suite
# "PYTEST ARGS"; --skip agreement,timings,suite). Writes gpu_check.log (this whole run), suite.log and
# gpu_check.json into the output folder. Exit status: 0 all agreed and the suite passed, 1 a check
# failed (listed at the end of the log and under "failures" in the JSON), 2 the check could not start
# (no GPU, no CuPy, a wheel that did not install), each said in one line.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUTDIR="${OUT:-}"
FAKE=0
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --fake) FAKE=1; ARGS+=("$1"); shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
        --out) OUTDIR="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUTDIR="${1#--out=}"; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    OUTDIR="$(mktemp -d /tmp/gpu_check.XXXXXX)"
fi
mkdir -p "$OUTDIR" || { echo "gpu_check.sh: cannot create the output folder $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check.sh] $*" | tee -a "$LOG"; }
fail() { echo "gpu_check.sh: $*" | tee -a "$LOG" >&2; exit 2; }

say "start $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUTDIR"

if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || fail "--wheels $WHEELS: no such folder"
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    [ ${#wheels[@]} -gt 0 ] || fail "--wheels $WHEELS: the folder holds no .whl file"
    TARGET="$(mktemp -d /tmp/gpu_check_wheels.XXXXXX)"
    say "installing ${#wheels[@]} wheel(s) from $WHEELS into $TARGET"
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --target "$TARGET" --quiet "${wheels[@]}" \
        >>"$LOG" 2>&1 || fail "pip could not install the wheels of $WHEELS (see $LOG)"
    export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_CHECK_WHEELS="$WHEELS -> $TARGET: $(cd "$WHEELS" && ls -1 *.whl | tr '\n' ' ')"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$FAKE" = 1 ]; then
    say "fake device: REFLDM_BACKEND=fakegpu, torch on the CPU"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >>"$LOG" 2>&1; then
        fail "no NVIDIA GPU visible (nvidia-smi -L failed); run with --fake to check the script on the CPU"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
    msg="$(REFLDM_BACKEND=cupy "$PYTHON" -c "from refldm import backend; backend.xp()" 2>&1 | tail -n 1)" \
        || fail "${msg:-REFLDM_BACKEND=cupy does not start}"
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1 \
        || fail "torch cannot see the GPU (torch.cuda.is_available() is False); install a CUDA build of torch"
fi

# the Python steps (they keep to their --budget themselves)
"$PYTHON" -u tools/gpu_check.py --out "$OUTDIR" ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "exit status $rc; log $LOG, figures $OUTDIR/gpu_check.json"
exit "$rc"
