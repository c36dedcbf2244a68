#!/usr/bin/env bash
# The prepared GPU check: one device call on a lent machine without network (Python 3.12,
# torch 2.11 + CUDA 13, triton 3.6, nvcc 13.0, ninja, timm preinstalled). From the repository root:
#
#     bash benchmarks/gpu_check.sh                       # device tool: timeout_s=600
#     STAGES=2,3 SKIP_BUILD=1 bash benchmarks/gpu_check.sh   # immediate rerun on the still-warm machine
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # CPU dry run of the plumbing (seconds)
#
# Stages, in order of the value of their evidence; each writes into $OUT as it goes (a killed run
# keeps what it had), each is capped at min(its own maximum, budget left), none stops the script:
#   1 build        pip install --no-build-isolation --no-deps -e . (IMSE_CUDA=1, sm_90), python -m imse_kernels
#   2 correctness  benchmarks/gpu_correctness.py: every primitive of triton and cuda vs a float64 oracle
#   3 bench_bf16   layer_bench.py: ViT-B batch 64 and 1, bf16, fwdbwd + infer, every provider
#   4 sanitizer    compute-sanitizer memcheck (no caching allocator) and racecheck, tests/cuda_memcheck_case.py --quick
#   5 tests_gpu    TRITON_INTERPRET=0 pytest -m gpu tests -v
#   6 bench_more   layer_bench.py in fp32, then model_bench.py (IMSE step on ViT-B), then ViT-B b1 bf16 with
#                  CUDA graphs (imse_cudagraphs) against the eager reference step
#   7 bench_triton layer_bench.py --triton --dtypes bf16 (the triton backend's speed targets), if time is left
# Files in $OUT (default ./gpu_out), flat, 7 of the device tool's 8:
#   summary.log           environment, installed package and backends, one line per stage (rc, seconds),
#                         the correctness summary and failures, the benchmark targets, the file check
#   build.log             pip install -e . and python -m imse_kernels
#   correctness.jsonl     one JSON line per check, then {"summary": true, ...}
#   bench.log             layer_bench.py and model_bench.py output (stages 3, 6, 7)
#   bench_results.tar.gz  layer_gpu_*.{json,csv,txt,png}, model_gpu.{json,csv,txt}, triton_choices.json
#                         (the tuner's picks): unpack into benchmarks/results/
#   sanitizer.log         memcheck and racecheck
#   tests_gpu.log         pytest, one line per test
# Knobs: GPU_CHECK_BUDGET_S (default 470 s for everything, the build included), STAGES or --stages
#   (comma list, default 1,2,3,4,5,6,7), SKIP_BUILD=1 (stage 1 only reports), GPU_CHECK_DRY_RUN=1 or
#   --dry-run, PYTHON (default python3), BENCH_ARGS (extra flags for every benchmark call).
# Exit code: 0, or 3 when $OUT breaks the device tool's file limits (stage results are in summary.log).
set -u
cd "$(dirname "$0")/.."

STAGES="${STAGES:-1,2,3,4,5,6,7}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) STAGES="$2"; shift 2 ;;
    --stages=*) STAGES="${1#--stages=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
T0=$(date +%s)
SUMMARY="$OUT/summary.log"
BENCH_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_bench.XXXXXX")"
trap 'rm -rf "$BENCH_DIR"' EXIT

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS=16
export IMSE_CUDA=1
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0
export IMSE_TRITON_CACHE="$BENCH_DIR/triton_choices.json"  # tuned once, reused by later stages, packed

selected() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
note() { echo "$*" >> "$SUMMARY"; }

# stage NUM NAME MAX_SECONDS LOGFILE CMD...: CMD capped at min(MAX, budget left), output appended to LOGFILE
stage() {
  local num=$1 name=$2 max=$3 logfile=$4; shift 4
  local left=$(( BUDGET - ( $(date +%s) - T0 ) ))
  local cap=$(( max < left ? max : left ))
  if [ "$cap" -lt 10 ]; then
    log "stage $num $name: SKIPPED (budget spent, ${left}s left)"
    return 0
  fi
  local s=$(date +%s)
  echo "=== stage $num $name: $* (cap ${cap}s)" >> "$logfile"
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >> "$logfile" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "stage $num $name: TIMEOUT rc=$rc in ${took}s (cap ${cap}s) -> $(basename "$logfile")"
  else
    log "stage $num $name: rc=$rc in ${took}s (cap ${cap}s) -> $(basename "$logfile")"
  fi
  return 0
}
# left: seconds of budget left (for a stage's own inner budget)
left() { echo $(( BUDGET - ( $(date +%s) - T0 ) )); }
pack_bench() {
  if ls "$BENCH_DIR"/* >/dev/null 2>&1; then
    tar -C "$BENCH_DIR" -czf "$OUT/bench_results.tar.gz" . && log "bench_results.tar.gz: $(ls "$BENCH_DIR" | wc -l) files"
  fi
}
bench_mark() { cat "$OUT/bench.log" 2>/dev/null | wc -l; }
# bench_lines_since MARK PATTERN: the bench.log lines written after MARK that match PATTERN, into the summary
bench_lines_since() { tail -n +$(( $1 + 1 )) "$OUT/bench.log" 2>/dev/null | grep -E "$2" >> "$SUMMARY"; }

dry_skip() {  # dry_skip NUM NAME LOGFILE: the stage needs a GPU
  echo "=== stage $1 $2: dry run: skipped (needs a GPU)" >> "$3"
  log "stage $1 $2: rc=0 in 0s (dry run: skipped (needs a GPU)) -> $(basename "$3")"
}

rm -f "$SUMMARY"
selected 1 && rm -f "$OUT/build.log"
selected 2 && rm -f "$OUT/correctness.jsonl"
selected 4 && rm -f "$OUT/sanitizer.log"
selected 5 && rm -f "$OUT/tests_gpu.log"
if selected 3 || selected 6 || selected 7; then rm -f "$OUT/bench.log" "$OUT/bench_results.tar.gz"; fi

log "gpu_check start $(date -u +%FT%TZ): stages $STAGES, budget ${BUDGET}s, dry run $DRY, skip build ${SKIP_BUILD:-0}, OUT $OUT"
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then git diff --quiet 2>/dev/null || COMMIT="$COMMIT+dirty"; else COMMIT="unknown (no git)"; fi
log "commit $COMMIT"
{
  [ "$DRY" = "1" ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'PYEOF' 2>&1
import sys, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU"
print("python", sys.version.split()[0], sys.executable, "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", tv, "|", gpu)
PYEOF
  [ "$DRY" = "1" ] || { command -v nvcc && nvcc --version | tail -2; command -v compute-sanitizer; } 2>&1
} >> "$SUMMARY"

# ------------------------------------------------------------------------------ 1. build
if selected 1; then
  if [ "$DRY" = "1" ] || [ "${SKIP_BUILD:-0}" = "1" ]; then
    echo "=== stage 1 build: pip install skipped (dry run $DRY, SKIP_BUILD ${SKIP_BUILD:-0})" >> "$OUT/build.log"
    log "stage 1 build: not run (dry run $DRY, SKIP_BUILD ${SKIP_BUILD:-0}) -> build.log"
  else
    stage 1 build 240 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e .
  fi
  stage 1 imse_kernels_info 60 "$OUT/build.log" "$PY" -m imse_kernels
fi
# What every later stage imports (the installed package, not the checkout on sys.path).
(cd /tmp && "$PY" -c "import imse_kernels as m; from imse_kernels import _extension as e; print('imse_kernels', m.__file__, '| backends', m.available_backends(), '| _C', e.reason('_C') or 'loaded')") >> "$SUMMARY" 2>&1

# ------------------------------------------------------------------------------ 2. correctness
if selected 2; then
  if [ "$DRY" = "1" ]; then C_ARGS="--device cpu --backends cpu --quick"; C_MAX=60; else C_ARGS="--device cuda"; C_MAX=150; fi
  C_INNER=$(( $(left) < C_MAX ? $(left) : C_MAX )); C_INNER=$(( C_INNER > 50 ? C_INNER - 25 : C_INNER * 2 / 3 ))
  # stdout repeats the JSON lines of correctness.jsonl; stderr (failures, counts) goes to the summary
  # shellcheck disable=SC2086
  stage 2 correctness "$C_MAX" "$SUMMARY" sh -c 'exec "$@" > /dev/null' sh \
    "$PY" benchmarks/gpu_correctness.py $C_ARGS --out "$OUT/correctness.jsonl" --budget-s "$C_INNER"
  note "correctness: $(tail -1 "$OUT/correctness.jsonl" 2>/dev/null)"
fi

# ------------------------------------------------------------------------------ 3. bf16 layer benchmark
if selected 3; then
  if [ "$DRY" = "1" ]; then
    B_ARGS="--device cpu --quick --nets vit_s --layers proj --batches 1 --dtypes bf16 --modes fwdbwd,infer"
  else
    B_ARGS="--device cuda --nets vit_b --batches 64,1 --dtypes bf16 --modes fwdbwd,infer --skip-providers naive_compile --max-case-s 1.5"
  fi
  # shellcheck disable=SC2086
  MARK=$(bench_mark)
  stage 3 bench_bf16 120 "$OUT/bench.log" "$PY" benchmarks/layer_bench.py $B_ARGS --out-dir "$BENCH_DIR" --tag gpu_bf16 --plot ${BENCH_ARGS:-}
  pack_bench
  bench_lines_since "$MARK" '^\s+(PASS|FAIL)\s'
fi

# ------------------------------------------------------------------------------ 4. CUDA sanitizers
if selected 4; then
  if [ "$DRY" = "1" ]; then
    dry_skip 4 sanitizer "$OUT/sanitizer.log"
  else
    stage 4 memcheck 75 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
    stage 4 racecheck 90 "$OUT/sanitizer.log" \
      compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|cases passed' "$OUT/sanitizer.log" >> "$SUMMARY" 2>/dev/null
  fi
fi

# ------------------------------------------------------------------------------ 5. GPU tests
if selected 5; then
  if [ "$DRY" = "1" ]; then
    dry_skip 5 tests_gpu "$OUT/tests_gpu.log"
  else
    stage 5 tests_gpu 150 "$OUT/tests_gpu.log" "$PY" -m pytest -m gpu tests -v -p no:cacheprovider -rs
    tail -1 "$OUT/tests_gpu.log" >> "$SUMMARY" 2>/dev/null
  fi
fi

# ------------------------------------------------------------------------------ 6. fp32 layers, model level
if selected 6; then
  if [ "$DRY" = "1" ]; then
    F_ARGS="--device cpu --quick --nets vit_s --layers proj --batches 1 --dtypes fp32 --modes fwdbwd"
    M_ARGS="--device cpu --quick --model-providers imse,imse_reference --model-batches 1"
  else
    F_ARGS="--device cuda --nets vit_b --batches 64,1 --dtypes fp32 --modes fwdbwd,infer --skip-providers naive_compile --max-case-s 1.5"
    M_ARGS="--device cuda --max-case-s 3"
  fi
  MARK=$(bench_mark)
  # shellcheck disable=SC2086
  stage 6 bench_fp32 100 "$OUT/bench.log" "$PY" benchmarks/layer_bench.py $F_ARGS --out-dir "$BENCH_DIR" --tag gpu_fp32 --plot ${BENCH_ARGS:-}
  pack_bench
  # shellcheck disable=SC2086
  stage 6 bench_model 150 "$OUT/bench.log" "$PY" benchmarks/model_bench.py $M_ARGS --out-dir "$BENCH_DIR" --tag gpu ${BENCH_ARGS:-}
  pack_bench
  if [ "$DRY" != "1" ]; then
    # the CUDA-graphs target: ViT-B batch 1, bf16, imse_cudagraphs against the eager reference step
    stage 6 bench_graphs 90 "$OUT/bench.log" "$PY" benchmarks/model_bench.py --device cuda --models vit_base \
      --model-batches 1 --precisions bf16 --model-providers imse,imse_cudagraphs,imse_reference --max-case-s 3 \
      --no-memory --out-dir "$BENCH_DIR" --tag gpu_graphs ${BENCH_ARGS:-}
    pack_bench
  fi
  bench_lines_since "$MARK" '^\s+(PASS|FAIL)\s'
fi

# ------------------------------------------------------------------------------ 7. triton speed targets
if selected 7; then
  if [ "$DRY" = "1" ]; then  # the preset's plumbing on the CPU, through the auto backend (no triton there)
    T_ARGS="--device cpu --quick --nets vit_s --batches 1 --dtypes fp32 --providers linear,reference,fused_auto,fused_auto_F,fused_auto_R"
  else
    T_ARGS="--device cuda --dtypes bf16 --rounds 3 --max-case-s 1.5 --no-memory"
  fi
  MARK=$(bench_mark)
  # shellcheck disable=SC2086
  stage 7 bench_triton 90 "$OUT/bench.log" "$PY" benchmarks/layer_bench.py --triton $T_ARGS --out-dir "$BENCH_DIR" --tag gpu_triton ${BENCH_ARGS:-}
  pack_bench
  bench_lines_since "$MARK" '^\s+(PASS|FAIL)\s'
fi

# ------------------------------------------------------------------------------ the device tool's limits
N_FILES=$(find "$OUT" -mindepth 1 -type f | wc -l)
N_DIRS=$(find "$OUT" -mindepth 1 -type d | wc -l)
BAD_NAMES=$(find "$OUT" -mindepth 1 -type f | sed 's#.*/##' | grep -c '[^A-Za-z0-9._-]')
BIG=$(find "$OUT" -mindepth 1 -type f -size +16M | wc -l)
RC=0
if [ "$N_FILES" -le 8 ] && [ "$N_DIRS" -eq 0 ] && [ "$BAD_NAMES" -eq 0 ] && [ "$BIG" -eq 0 ]; then
  log "file check: PASS ($N_FILES files, limit 8; no folders): $(ls "$OUT" | tr '\n' ' ')"
else
  log "file check: FAIL ($N_FILES files (limit 8), $N_DIRS folders, $BAD_NAMES odd names, $BIG over 16 MiB): $(ls "$OUT" | tr '\n' ' ')"
  RC=3
fi
log "gpu_check done in $(( $(date +%s) - T0 ))s"
cat "$SUMMARY"
exit $RC
