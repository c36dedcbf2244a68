#!/usr/bin/env bash
# One prepared GPU check for a lent machine without network (Python 3.12, torch 2.11.0+cu130,
# triton 3.6, nvcc 13.0, ninja, timm preinstalled): build, GPU tests, benchmark, CUDA sanitizer,
# full test suite. Run from the repository root in ONE device call, e.g.
#
#     bash benchmarks/gpu_check.sh                  # timeout_s=600 on the device tool
#
# Everything goes to files under "$OUT" (given by the runner; default ./gpu_out), at most 8 files,
# none deeper than $OUT/x/file (the device tool's limits):
#   summary.log          environment, backends, one line per stage (rc, seconds), the bars
#   build.log            pip install -e . (CUDA extension, sm_90)
#   tests_gpu.log        TRITON_INTERPRET=0 pytest -m gpu tests
#   throughput.log       benchmarks/throughput.py --device cuda (terminal table at the end)
#   bench_results.tar.gz throughput_<gpu>.{json,csv,txt,png}: copy into benchmarks/results/
#   sanitizer.log        compute-sanitizer memcheck and racecheck on tests/cuda_memcheck_case.py
#   tests_full.log       the whole test suite
# Stages never stop the script; each has a time cap, and the whole run keeps under
# GPU_CHECK_BUDGET_S (default 560 s) so that the files come back even when a stage hangs.
# Knobs: PYTHON, GPU_CHECK_BUDGET_S, BENCH_ARGS (extra/override flags for throughput.py),
#        SKIP_BUILD=1, SKIP_FULL=1.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-560}"
T0=$(date +%s)
SUMMARY="$OUT/summary.log"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS=16
export IMSE_CUDA=1
export PYTHONUNBUFFERED=1

log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }

# stage NAME MAX_SECONDS LOGFILE CMD...: runs CMD with a cap of min(MAX, what is left of the budget)
stage() {
  local name=$1 max=$2 logfile=$3; shift 3
  local left=$(( BUDGET - ( $(date +%s) - T0 ) ))
  local cap=$(( max < left ? max : left ))
  if [ "$cap" -lt 10 ]; then
    log "$name: SKIPPED (budget spent)"
    return 0
  fi
  local s=$(date +%s)
  echo "=== $name: $* (cap ${cap}s)" >> "$logfile"
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >> "$logfile" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "$name: TIMEOUT after ${took}s (cap ${cap}s) -> $(basename "$logfile")"
  else
    log "$name: rc=$rc in ${took}s -> $(basename "$logfile")"
  fi
  return 0
}

log "gpu_check start: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc && nvcc --version | tail -2
} >> "$SUMMARY"

# ---------------------------------------------------------------------------- 1. build
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  stage build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
"$PY" -m imse_kernels >> "$SUMMARY" 2>&1 || log "python -m imse_kernels failed (see above)"

# ---------------------------------------------------------------------------- 2. GPU tests
stage tests_gpu 120 "$OUT/tests_gpu.log" env TRITON_INTERPRET=0 "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider

# ---------------------------------------------------------------------------- 3. benchmark (before the sanitizers: the lease is short, and throughput.py writes
#    what it has measured when the stage's cap stops it)
# Layer level: ViT-B/16 layers, batch 1 and 64, fp32 and bf16, all modes, every available backend.
# naive_compile is left out here: its Inductor compiles (one per mode and dtype) would take minutes of
# the lease; add it back with BENCH_ARGS="--skip-providers=" when there is time. Model level: ViT-B/16
# IMSE step at batch 8 and 64, fp32 and bf16 autocast.
BENCH_DIR="$OUT/bench"
mkdir -p "$BENCH_DIR"
# shellcheck disable=SC2086
stage throughput 300 "$OUT/throughput.log" env TRITON_INTERPRET=0 "$PY" benchmarks/throughput.py --device cuda \
  --skip-providers naive_compile --max-case-s 1.5 --rounds 9 --out-dir "$BENCH_DIR" --plot ${BENCH_ARGS:-}
if ls "$BENCH_DIR"/* >/dev/null 2>&1; then
  tar -C "$BENCH_DIR" -czf "$OUT/bench_results.tar.gz" . && rm -rf "$BENCH_DIR"
else
  rmdir "$BENCH_DIR" 2>/dev/null
fi
sed -n '/^Bars/,/^total/p' "$OUT/throughput.log" >> "$SUMMARY" 2>/dev/null

# ---------------------------------------------------------------------------- 4. CUDA sanitizer
# compute-sanitizer on a small CUDA case (tests/cuda_memcheck_case.py finds the repo itself).
stage cuda_memcheck 120 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
stage cuda_racecheck 150 "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
[ -f "$OUT/sanitizer.log" ] || echo "no sanitizer commands configured yet (see the slot in benchmarks/gpu_check.sh)" > "$OUT/sanitizer.log"

# ---------------------------------------------------------------------------- 5. full test suite
if [ "${SKIP_FULL:-0}" != "1" ]; then
  XDIST=""
  "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
  # shellcheck disable=SC2086
  stage tests_full 600 "$OUT/tests_full.log" "$PY" -m pytest tests -q -rs -p no:cacheprovider $XDIST
  tail -3 "$OUT/tests_full.log" >> "$SUMMARY" 2>/dev/null
fi

log "gpu_check done in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
tail -40 "$OUT/throughput.log" 2>/dev/null
cat "$SUMMARY"
