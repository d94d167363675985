#!/usr/bin/env bash
# The one script a GPU session runs to check the CUDA side of apkernels:
#   1. build apkernels._C in place for the visible arch (default sm_90; ARCH=8.0 etc. to change)
#   2. the whole pytest suite (on a GPU the tests pick the cuda and triton backends too)
#   3. compute-sanitizer memcheck, racecheck and synccheck over tools/sanitize_kernels.py
#      (every compiled CUDA op forward and backward, odd shapes, compared with the reference)
#   4. python -m benchmarks, when the benchmarks package is present
# Logs: one file per step plus summary.txt under $1, else $OUT, else ./gpu_check_logs.
# Steps run on even when one fails; the exit status is the number of failed steps.
#
#   tools/gpu_check.sh [LOG_DIR]
# Environment: PY (python, default .venv/bin/python or python3), ARCH (TORCH_CUDA_ARCH_LIST, default
# 9.0), MAX_JOBS (default: CPU count), SKIP (space-separated step names to skip: build pytest
# memcheck racecheck synccheck bench), PYTEST_ARGS (extra pytest arguments).
set -u
cd "$(dirname "$0")/.."
LOG_DIR=${1:-${OUT:-gpu_check_logs}}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export APKERNELS_QUIET=1
SUMMARY="$LOG_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "$name: skipped" | tee -a "$SUMMARY"; return 0 ;; esac
  echo "== $name: $*" | tee -a "$SUMMARY"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
  tail -n 5 "$LOG_DIR/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
  return 0
}

{ nvidia-smi || true; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$LOG_DIR/device.txt" 2>&1

SANITIZER=$(command -v compute-sanitizer || true)
for root in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  [ -n "$SANITIZER" ] && break
  [ -n "$root" ] && [ -x "$root/bin/compute-sanitizer" ] && SANITIZER="$root/bin/compute-sanitizer"
done

step build 900 env APKERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace
step import 120 "$PY" -c "import apkernels, json; from apkernels import _extension as e; \
print(json.dumps(e.build_config())); print('CUDA kernels:', sorted(e.NATIVE['CUDA'])); \
assert {'patch_pool', 'token_pool', 'pool_backward'} <= e.NATIVE['CUDA']"
# shellcheck disable=SC2086
step pytest 1800 "$PY" -m pytest tests -q -p no:cacheprovider -rs --durations=15 \
  --junitxml="$LOG_DIR/pytest.xml" ${PYTEST_ARGS:-}

if [ -n "$SANITIZER" ]; then
  # No caching allocator, so that memcheck sees every tensor's true bounds.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck 1200 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" tools/sanitize_kernels.py
  step racecheck 1200 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" tools/sanitize_kernels.py --quick
  step synccheck 900 "$SANITIZER" --tool synccheck --error-exitcode 1 \
    "$PY" tools/sanitize_kernels.py --quick
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  echo "compute-sanitizer not found: memcheck/racecheck/synccheck not run" | tee -a "$SUMMARY"
  FAILED=$((FAILED + 1))
fi

if [ -f benchmarks/__main__.py ]; then
  step bench 1200 "$PY" -m benchmarks
fi

echo "gpu_check: $FAILED failed step(s); logs in $LOG_DIR" | tee -a "$SUMMARY"
exit "$FAILED"
