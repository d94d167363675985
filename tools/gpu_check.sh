#!/usr/bin/env bash
# The one command a GPU lease runs (the exact device call: docs/benchmarks.md, "On a GPU machine").
#
#   tools/gpu_check.sh [--budget SECONDS] [--out DIR] [--skip STEP,...]   on the GPU machine
#   tools/gpu_check.sh --rehearse [--budget SECONDS]                        here, without a GPU
#
# Steps in priority order, each time-boxed so that the whole run returns inside the budget (default
# 480 s) with what it finished; a step that cannot run here says why in one line:
#   bundle    .gpu-bundle's prebuilt apkernels._C put in place (tools/gpu_bundle.py install), or,
#             when it does not fit, a build for sm_90 with every core
#   smoke     (a) every op, fwd and fwd+bwd, on every GPU backend vs the reference (tools/gpu_smoke.py)
#   pytest    (b) the CUDA tests: -m "not slow" -k "cuda or triton_backend", ended cleanly at the box
#   sanitizer (c) compute-sanitizer memcheck and racecheck over tools/sanitize_kernels.py --quick
#   bench     (d) python -m benchmarks: every op at B=256, fwd and fwd+bwd, fp32 and bf16, every
#             provider incl. torch.compile; APViT / DAN inference and train step, B=1 and 256,
#             eager vs apkernels; the test counts of (b); rows not reached are listed as skipped
#   ncu       (e) Nsight Compute over the B=256 fused kernels: DRAM bytes, time, GB/s
# Output: one folder $OUT/<device>-<date>/ (else --out, else ./gpu_check_out) of at most 8 files that
# commits as it is under benchmarks/results/: summary.txt, <device>-<date>.json (+ .png), junit.xml,
# memcheck.log, racecheck.log, ncu.csv, gpu_check.log (every step's full output).
# Exit status: the number of failed steps ("unavailable" and "not run" are not failures).
#
# --rehearse: the same script on this CPU machine, in a copy of the tree made as a device call makes
# it (tracked and untracked-not-ignored files plus .gpu-bundle), in the torch 2.11 venv (.venv211,
# `make venv211`); the GPU steps run on CPU tensors or say why they cannot; then the returned files
# are checked (tools/gpu_check_report.py files). Budget 240 s by default.
# Environment: PY (default python3; .venv211/bin/python when rehearsing), MAX_JOBS (fallback build).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUDGET=480
REHEARSE=0
OUT_ROOT=${OUT:-}
SKIP_STEPS=""
while [ $# -gt 0 ]; do
  case $1 in
    --budget) BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --out) OUT_ROOT=$2; shift 2 ;;
    --skip) SKIP_STEPS=$(echo "$2" | tr ',' ' '); shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    --rehearsal-run) REHEARSE=2; shift ;;  # internal: the run inside the rehearsal's copy
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_check: --budget needs whole seconds, got '$BUDGET'" >&2; exit 64 ;; esac

if [ "$REHEARSE" = 1 ]; then
  # A copy as the device gets it, the check in it, then a check of what it would return.
  PY=${PY:-$ROOT/.venv211/bin/python}
  [ -x "$PY" ] || { echo "gpu_check --rehearse: no $PY (make venv211)" >&2; exit 2; }
  [ "$BUDGET" = 480 ] && BUDGET=240
  WORK=$(mktemp -d /tmp/gpu_check_rehearsal.XXXXXX)
  "$PY" "$ROOT/tools/gpu_bundle.py" copy-tree "$WORK/repo" || exit 2
  [ -d "$ROOT/.gpu-bundle" ] && cp -r "$ROOT/.gpu-bundle" "$WORK/repo/.gpu-bundle"
  mkdir -p "$WORK/out"
  start=$SECONDS
  (cd "$WORK/repo" && OUT="$WORK/out" PY="$PY" bash tools/gpu_check.sh --rehearsal-run --budget "$BUDGET")
  rc=$?
  echo "gpu_check --rehearse: the run took $((SECONDS - start)) s of its $BUDGET s budget, exit $rc"
  "$PY" "$ROOT/tools/gpu_check_report.py" files "$WORK/out" --rehearsal --budget "$BUDGET" --elapsed $((SECONDS - start))
  check=$?
  if [ "$check" -eq 0 ]; then rm -rf "$WORK"; else echo "gpu_check --rehearse: files kept in $WORK"; fi
  exit "$check"
fi

cd "$ROOT" || exit 2
PY=${PY:-python3}
T0=$SECONDS
RESERVE=15  # the closing summary and the file check
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" APKERNELS_QUIET=1 PYTHONUNBUFFERED=1
# The check runs the bundle's real CUDA build; `make` exports the CPU-emulation switch for its own
# builds, and with it set the emulation tests demand an emulated build that the bundle never has.
unset APKERNELS_CUDA_EMULATION
# The commit, for the results JSON: a tree sent to a GPU machine may have no .git.
if [ -z "${APKERNELS_GIT_SHA:-}" ] && ! git -C "$ROOT" rev-parse HEAD > /dev/null 2>&1; then
  APKERNELS_GIT_SHA=$("$PY" tools/gpu_bundle.py source-sha 2>/dev/null) && export APKERNELS_GIT_SHA
fi

HAVE_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAVE_GPU" = 1 ]; then
  LABEL=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
else
  LABEL=cpu-$(uname -m | tr '_' '-')
  [ "$REHEARSE" = 2 ] && LABEL=rehearsal-$LABEL
fi
DIR=${OUT_ROOT:-$ROOT/gpu_check_out}/$LABEL-$(date -u +%Y-%m-%d-%H%M%S)
mkdir -p "$DIR"
SUMMARY=$DIR/summary.txt
LOG=$DIR/gpu_check.log
FAILED=0
: > "$LOG"

note() { echo "$*" | tee -a "$SUMMARY"; }  # a step's status line: summary.txt and the console
left() { echo $((BUDGET - RESERVE - (SECONDS - T0))); }
box() {  # box WANT: WANT seconds, or what is left of the budget when that is less
  local l
  l=$(left)
  if [ "$1" -lt "$l" ]; then echo "$1"; elif [ "$l" -gt 0 ]; then echo "$l"; else echo 0; fi
}
skipped() { case " $SKIP_STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
STEP_OUT=$(mktemp /tmp/gpu_check_step.XXXXXX)  # outside $OUT: a killed run must not leave it there
# run NAME BOX COMMAND...: the command under `timeout BOX` (signal RUN_SIGNAL, default TERM), its
# output into gpu_check.log; sets RC.
run() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  RC=0
  if [ "$limit" -lt 5 ]; then
    note "$name: not run (the budget is used up)"
    RC=124
    return
  fi
  echo "===== $name (box $limit s): $*" >> "$LOG"
  timeout --signal="${RUN_SIGNAL:-TERM}" --kill-after=20 "$limit" "$@" > "$STEP_OUT" 2>&1
  RC=$?
  cat "$STEP_OUT" >> "$LOG"
  local took=$((SECONDS - start))
  echo "===== $name: exit $RC after $took s" >> "$LOG"
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    note "$name: TIMED OUT after $took s (box $limit s)"
  elif [ "$RC" -eq 0 ]; then
    note "$name: ok ($took s)"
  else
    note "$name: FAILED, exit $RC ($took s)"
  fi
}
count_failure() { [ "$RC" -eq 0 ] || FAILED=$((FAILED + 1)); }

note "gpu_check on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ), budget $BUDGET s$([ "$REHEARSE" = 2 ] && echo ', REHEARSAL (no GPU)')"
{
  "$PY" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__)"
  if [ "$HAVE_GPU" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs')"
  else
    echo "no CUDA device: torch.cuda.is_available() is False"
  fi
  echo "git ${APKERNELS_GIT_SHA:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
} 2>&1 | tee -a "$LOG" | sed 's/^/  /' >> "$SUMMARY"

# ---- bundle (or build) -------------------------------------------------------------------------
run bundle "$(box 90)" "$PY" tools/gpu_bundle.py install
[ "$RC" -eq 3 ] && sed -i '$ s/FAILED, exit 3/does not fit/' "$SUMMARY"
grep '^gpu bundle:' "$STEP_OUT" | sed 's/^/  /' >> "$SUMMARY"
if [ "$RC" -ne 0 ]; then
  if [ "$HAVE_GPU" = 1 ] || [ "$REHEARSE" = 2 ]; then
    JOBS=${MAX_JOBS:-$(nproc)}
    if [ "$HAVE_GPU" = 1 ]; then ARCH=9.0; CUDA_FLAG=1; WHAT="for sm_90 with $JOBS jobs"; else ARCH=; CUDA_FLAG=0; WHAT="CPU kernels only (rehearsal, no GPU), $JOBS jobs"; fi
    note "  building apkernels._C instead: $WHAT"
    run build "$(box 400)" env APKERNELS_CUDA=$CUDA_FLAG TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS="$JOBS" "$PY" setup.py build_ext --inplace
    count_failure
  fi
fi

# ---- (a) smoke ---------------------------------------------------------------------------------
SMOKE_DEVICE=cuda
[ "$HAVE_GPU" = 1 ] || SMOKE_DEVICE=cpu
if skipped smoke; then note "smoke: skipped (--skip)"
elif [ "$HAVE_GPU" = 1 ] || [ "$REHEARSE" = 2 ]; then
  run smoke "$(box $((BUDGET * 12 / 100)))" "$PY" tools/gpu_smoke.py --device $SMOKE_DEVICE
  [ "$HAVE_GPU" = 1 ] || sed -i '$ s/$/  [no CUDA device: rehearsed on CPU tensors]/' "$SUMMARY"
  grep -E '^(FAIL|skip|gpu_smoke:)' "$STEP_OUT" | head -n 30 | sed 's/^/  /' >> "$SUMMARY"
  count_failure
else
  note "smoke: unavailable: no CUDA device"
fi

# ---- (b) the CUDA tests ------------------------------------------------------------------------
JUNIT=$DIR/junit.xml
if skipped pytest; then note "pytest: skipped (--skip)"
else
  if [ "$HAVE_GPU" = 1 ]; then PBOX=$(box $((BUDGET * 30 / 100))); else PBOX=$(box 60); fi
  # No test starts in the last 15 s of the box, so pytest normally ends by itself; a test still
  # running at the end gets SIGINT, on which pytest stops and still writes the junit XML. The
  # plugin is loaded by its module name from tools/ (a `tools` package elsewhere could shadow it).
  RUN_SIGNAL=INT run pytest "$PBOX" env PYTHONPATH="$ROOT/tools:$PYTHONPATH" "$PY" -m pytest tests -q -p no:cacheprovider -p gpu_pytest -rfE \
    -m "not slow" -k "cuda or triton_backend" --gpu-deadline-at $(($(date +%s) + PBOX - 15)) \
    --junitxml="$JUNIT" --durations=10
  [ "$HAVE_GPU" = 1 ] || sed -i '$ s/$/  [no CUDA device: the same selection on CPU tensors, Triton interpreted]/' "$SUMMARY"
  grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|deselected)' "$STEP_OUT" | tail -n 25 | sed 's/^/  /' >> "$SUMMARY"
  count_failure
fi

# ---- (c) compute-sanitizer ---------------------------------------------------------------------
find_tool() {  # find_tool NAME: on PATH, else in the CUDA toolkit / Nsight folders
  local found
  found=$(command -v "$1" 2>/dev/null) && { echo "$found"; return; }
  for found in /usr/local/cuda/bin/"$1" /usr/local/cuda-*/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" \
    /usr/local/cuda/compute-sanitizer/"$1"; do
    [ -x "$found" ] && { echo "$found"; return; }
  done
}
if skipped sanitizer; then note "sanitizer: skipped (--skip)"
elif [ "$HAVE_GPU" != 1 ]; then note "sanitizer unavailable: no CUDA device"
elif [ -z "$(find_tool compute-sanitizer)" ]; then note "sanitizer unavailable: compute-sanitizer not found"
else
  SANITIZER=$(find_tool compute-sanitizer)
  note "sanitizer: $SANITIZER, memcheck and racecheck over tools/sanitize_kernels.py --quick"
  SBOX=$(box $((BUDGET * 18 / 100)))
  for tool in memcheck racecheck; do
    # memcheck without the caching allocator, so that it sees every tensor's true bounds
    if [ $tool = memcheck ]; then
      tbox=$((SBOX * 6 / 10)); prefix=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    else
      tbox=$(box $((SBOX * 4 / 10))); prefix=()
    fi
    run $tool "$tbox" "${prefix[@]}" "$SANITIZER" --tool $tool --error-exitcode 1 \
      --log-file "$DIR/$tool.log" "$PY" tools/sanitize_kernels.py --quick
    if [ "$RC" -ne 0 ] && ! grep -q '^sanitize_kernels:' "$STEP_OUT" && [ "$RC" -ne 124 ]; then
      # it never reached the end of the script: the sanitizer could not attach (e.g. gVisor)
      why=$(grep -h -m1 -iE 'error|not supported|unable|failed' "$DIR/$tool.log" "$STEP_OUT" 2>/dev/null | head -n1 | sed 's/^=* *//')
      sed -i '$d' "$SUMMARY"
      note "  sanitizer unavailable: ${why:-$tool exited $RC before the script ran}"
      break
    fi
    grep -h -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$DIR/$tool.log" 2>/dev/null | head -n 2 | sed 's/^=* */  /' >> "$SUMMARY"
    grep -E '^(MISMATCH|sanitize_kernels:)' "$STEP_OUT" | head -n 10 | sed 's/^/  /' >> "$SUMMARY"
    count_failure
  done
fi

# ---- (d) benchmarks ----------------------------------------------------------------------------
NCU=$(find_tool ncu)
NCU_BOX=0
[ "$HAVE_GPU" = 1 ] && [ -n "$NCU" ] && ! skipped ncu && NCU_BOX=$((BUDGET * 10 / 100))
if skipped bench; then note "bench: skipped (--skip)"
else
  BBOX=$(box $(($(left) - NCU_BOX)))
  if [ "$HAVE_GPU" = 1 ]; then
    BENCH_ARGS=(--device cuda --batches 256 --passes fwd fwd+bwd --dtypes fp32 bf16
      --providers eager compile cuda triton --models --model-batch 1 256 --model-providers eager apkernels)
  else  # rehearsal: one cheap op on the CPU, every field of a row, no compile (minutes on a CPU)
    BENCH_ARGS=(--device cpu --ops dan_head_fusion --batches 64 --passes fwd fwd+bwd
      --providers eager cpu --reps 3 --no-models)
  fi
  JUNIT_ARG=()
  [ -s "$JUNIT" ] && JUNIT_ARG=(--junit "$JUNIT")
  run bench "$BBOX" "$PY" -m benchmarks "${BENCH_ARGS[@]}" "${JUNIT_ARG[@]}" \
    --deadline-s $((BBOX > 100 ? BBOX - 40 : BBOX / 2)) --out "$DIR"
  [ "$HAVE_GPU" = 1 ] || sed -i '$ s/$/  [no CUDA device: one CPU op instead of the GPU rows]/' "$SUMMARY"
  # the tables (op rows, model rows), the copy bandwidth and what was skipped, as printed
  sed -n '/^copy bandwidth/p; /^op  /,$p' "$STEP_OUT" | grep -v '^rows:\|^chart:' | sed 's/^/  /' >> "$SUMMARY"
  count_failure
fi

# ---- (e) Nsight Compute ------------------------------------------------------------------------
if skipped ncu; then note "ncu: skipped (--skip)"
elif [ "$HAVE_GPU" != 1 ]; then note "ncu unavailable: no CUDA device"
elif [ -z "$NCU" ]; then note "ncu unavailable: ncu not found"
else
  run ncu "$(box "$(left)")" "$NCU" --profile-from-start off --clock-control none \
    --metrics "$("$PY" tools/ncu_kernels.py --print-metrics)" --csv --page raw --log-file "$DIR/ncu.csv" \
    "$PY" tools/ncu_kernels.py
  if [ "$RC" -ne 0 ] && ! grep -q '^ncu_kernels:' "$STEP_OUT"; then
    why=$(grep -h -m1 -E '==ERROR==|==WARNING==|rror' "$DIR/ncu.csv" "$STEP_OUT" 2>/dev/null | head -n1)
    sed -i '$d' "$SUMMARY"
    note "ncu unavailable: ${why:-ncu exited $RC}"
  else
    "$PY" tools/ncu_kernels.py --report "$DIR/ncu.csv" 2>&1 | sed 's/^/  /' >> "$SUMMARY"
    count_failure
  fi
fi

rm -f "$STEP_OUT"
note "gpu_check: $FAILED failed step(s), $((SECONDS - T0)) s of the $BUDGET s budget; files in $DIR:"
(cd "$DIR" && ls -l | tail -n +2 | awk '{print "  " $5 "\t" $NF}') | tee -a "$SUMMARY"
if [ "$REHEARSE" != 2 ]; then  # what the lease would return: $OUT holds this run's folder only
  "$PY" tools/gpu_check_report.py files "${OUT_ROOT:-$DIR}" 2>&1 | tee -a "$SUMMARY"
fi
echo "===== $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
