#!/usr/bin/env bash
# The prepared GPU check: build, correctness, GPU tests, sanitizers and benchmarks in one command, within
# one time budget, writing its evidence to $OUT as it goes. From the repository root:
#
#     bash checks/gpu_check.sh                        # everything, within GPU_CHECK_BUDGET_S
#     STAGES=3,4,5 bash checks/gpu_check.sh           # resume at later stages (a fresh machine: the
#     bash checks/gpu_check.sh --from 3               #   first stage that needs the build builds it)
#     GPU_CHECK_DRY_RUN=1 bash checks/gpu_check.sh    # CPU dry run (CI): order, caps, plumbing
#
# Needs: a CUDA GPU, torch with CUDA (>= 2.11), triton (>= 3.6), nvcc; uses pytest-xdist and
# compute-sanitizer when present, never the network.
# Budget: GPU_CHECK_BUDGET_S (default 540 s) for the whole script, build included. A step past its cap gets
# TERM, then KILL 10 s later; the file check and summary after the last stage take seconds. So the script
# ends within about the budget + 15 s: under a hard wall-clock limit, set the budget 60 s below it.
# Stages, in the order of the value of their evidence. Each has a share of the budget; its cap is that
# share, plus whatever earlier stages left unused beyond the shares of the stages still to come, and
# never more than the budget left (a stage whose cap is under 10 s is skipped, and says so). With the
# default budget and all stages selected the shares are:
#   0 versions     7%   37 s  python, torch, triton, nvcc, driver, GPU; the ahead-of-time lowering of the
#                             default kernel configurations for this GPU as the JIT will specialise them
#                             (tools/triton_compile_check.py --tiers defaults, parallel processes)
#   1 build       28%  151 s  pip install -e . (IMSE_CUDA=1, this GPU's architecture), python -m imse_kernels
#   2 correctness 20%  108 s  Triton cache warm-up: the bf16 sweep split over parallel processes (40% of the
#                             cap); then checks/gpu_correctness.py --dtypes bf16 against a float64 oracle
#   3 tests_gpu   15%   81 s  TRITON_INTERPRET=0 pytest -m gpu, pytest-xdist processes (serial without it)
#   4 sanitizer   15%   81 s  compute-sanitizer memcheck, then racecheck (tests/cuda_memcheck_case.py --quick)
#   5 bench       15%   81 s  benchmarks/layer_bench.py bf16 (ViT-B, batch 64 and 1), then fp32 and
#                             benchmarks/model_bench.py
# A stage that needs the compiled extension and finds none (SKIP_BUILD=1 or STAGES without 1 on a fresh
# machine) builds it first, once per run, within its own cap.
# Files in $OUT (default ./gpu_out): flat, at most 8 files, none over 16 MiB (checked at the end), each
# appended as its stage runs, so a killed run keeps everything written before the kill:
#   summary.log          one line per stage (rc, seconds, cap), the versions, correctness and test counts
#   versions.log         stage 0: versions, nvidia-smi, the compile-check table for this GPU
#   build.log            pip install -e . and python -m imse_kernels
#   correctness.jsonl    one JSON line per check, then {"summary": true, ...}
#   tests_gpu.log        pytest -m gpu
#   sanitizer.log        memcheck and racecheck
#   bench.log            layer_bench.py and model_bench.py output
#   bench_results.tar.gz layer_gpu_*.{json,csv,txt}, model_gpu.*, triton_choices.json (rewritten atomically)
# Knobs: GPU_CHECK_BUDGET_S (540), STAGES or --stages (comma list, default 0,1,2,3,4,5), --from N,
#   SKIP_BUILD=1 (stage 1 only reports), GPU_CHECK_DRY_RUN=1 or --dry-run, PYTHON (python3), BENCH_ARGS,
#   GPU_CHECK_ASSUME_NO_BUILD=1 (treat the extension as missing: shows the build-first path in a dry run).
# Exit code: 0, or 3 when $OUT is not that layout (stage results are in summary.log).
set -u
cd "$(dirname "$0")/.."

ALL_STAGES="0,1,2,3,4,5"
STAGES="${STAGES:-$ALL_STAGES}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) STAGES="$2"; shift 2 ;;
    --stages=*) STAGES="${1#--stages=}"; shift ;;
    --from) STAGES=$(seq -s, "$2" 5); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
T0=$(date +%s)
SUMMARY="$OUT/summary.log"
BENCH_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_bench.XXXXXX")"
trap 'rm -rf "$BENCH_DIR"' EXIT

export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also before stage 1 installs it
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# compute-sanitizer lives in $CUDA_HOME/bin or $CUDA_HOME/compute-sanitizer, depending on the toolkit.
export PATH="$CUDA_HOME/bin:$CUDA_HOME/compute-sanitizer:$PATH"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU's architecture only: half the nvcc time of 8.0;9.0
  TORCH_CUDA_ARCH_LIST=$("${PYTHON:-python3}" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST
fi
export IMSE_CUDA=1
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0
export IMSE_TRITON_CACHE="$BENCH_DIR/triton_choices.json"  # tuned once, reused by later stages, packed
NPROC=$(nproc 2>/dev/null || echo 4)
PAR=$(( NPROC < 8 ? NPROC : 8 ))

# share of the budget per stage, percent
declare -A SHARE=([0]=7 [1]=28 [2]=20 [3]=15 [4]=15 [5]=15)
declare -A NAME=([0]=versions [1]=build [2]=correctness [3]=tests_gpu [4]=sanitizer [5]=bench)

selected() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
note() { echo "$*" >> "$SUMMARY"; }
left() { echo $(( BUDGET - ( $(date +%s) - T0 ) )); }

# cap_of N: stage N's share, plus what earlier stages left beyond the shares of the selected later stages
cap_of() {
  local n=$1 later=0 j
  for j in 0 1 2 3 4 5; do
    if [ "$j" -gt "$n" ] && selected "$j"; then later=$(( later + SHARE[$j] )); fi
  done
  local own=$(( BUDGET * SHARE[$n] / 100 )) rest=$(( $(left) - BUDGET * later / 100 ))
  local cap=$(( own > rest ? own : rest )) l=$(left)
  echo $(( cap < l ? cap : l ))
}

# run_capped CAP LOGFILE CMD...: CMD under a wall-clock cap, output appended to LOGFILE; prints rc
run_capped() {
  local cap=$1 logfile=$2; shift 2
  timeout --signal=TERM --kill-after=10 "$cap" "$@" >> "$logfile" 2>&1
  echo $?
}

# step LABEL CAP LOGFILE CMD...: a capped command with its one summary line
step() {
  local label=$1 cap=$2 logfile=$3; shift 3
  if [ "$cap" -lt 10 ]; then
    log "$label: SKIPPED (cap ${cap}s, budget spent)"
    return 1
  fi
  echo "=== $label: $* (cap ${cap}s)" >> "$logfile"
  local s rc took
  s=$(date +%s)
  rc=$(run_capped "$cap" "$logfile" "$@")
  took=$(( $(date +%s) - s ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "$label: TIMEOUT rc=$rc in ${took}s (cap ${cap}s) -> $(basename "$logfile")"
  else
    log "$label: rc=$rc in ${took}s (cap ${cap}s) -> $(basename "$logfile")"
  fi
  return 0
}

# ---------------------------------------------------------------------------------- the build, once
BUILT=""      # "yes" once built or found in this run, "failed" after a failed attempt
EXT_MODULE="imse_kernels._C_cuda"
[ "$DRY" = "1" ] && EXT_MODULE="imse_kernels._C"   # no GPU toolkit needed to show the path on a CPU
have_extension() {  # loadable, and built against this torch (imse_kernels._extension's rule)
  [ "${GPU_CHECK_ASSUME_NO_BUILD:-0}" = "1" ] && return 1
  local mod="${EXT_MODULE#imse_kernels.}"
  "$PY" -c "import sys, imse_kernels; from imse_kernels import _extension as e; sys.exit(0 if e.load('$mod') else 1)" \
    >/dev/null 2>&1
}
build_cmd() {
  if [ "$DRY" = "1" ]; then
    echo "echo dry run: would run $PY -m pip install --no-build-isolation --no-deps --no-index -v -e ."
  else
    echo "$PY -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e ."
  fi
}
# build LABEL CAP: build the extension (pip install -e .), then python -m imse_kernels
build() {
  local label=$1 cap=$2
  # shellcheck disable=SC2046
  step "$label" "$cap" "$OUT/build.log" $(build_cmd)
  if [ "$DRY" = "1" ] || have_extension; then BUILT=yes; else BUILT=failed; fi
  log "$label -> extension $EXT_MODULE: $BUILT"
}
# needs_build STAGE_LABEL CAP_VAR: a stage that needs the extension builds it first when it is missing
needs_build() {
  local label=$1 cap=$2
  [ -n "$BUILT" ] && return 0
  if have_extension; then BUILT=yes; return 0; fi
  local c=$(( cap * 2 / 3 ))
  log "$label: no built extension ($EXT_MODULE does not import); building it first (cap ${c}s of the stage's ${cap}s)"
  build "$label/build_first" "$c"
}

pack_bench() {  # the benchmark files, rewritten atomically (a kill mid-pack keeps the previous archive)
  if ls "$BENCH_DIR"/* >/dev/null 2>&1; then
    tar -C "$BENCH_DIR" -czf "$OUT/.bench_results.tmp" --exclude=warmup.log . && \
      mv "$OUT/.bench_results.tmp" "$OUT/bench_results.tar.gz"
  fi
}
dry_skip() {  # dry_skip LABEL LOGFILE: a step that needs a GPU
  echo "=== $1: dry run: skipped (needs a GPU)" >> "$2"
  log "$1: rc=0 in 0s (dry run: skipped (needs a GPU)) -> $(basename "$2")"
}

rm -f "$SUMMARY" "$OUT/build.log"
selected 0 && rm -f "$OUT/versions.log"
selected 2 && rm -f "$OUT/correctness.jsonl"
selected 3 && rm -f "$OUT/tests_gpu.log"
selected 4 && rm -f "$OUT/sanitizer.log"
selected 5 && rm -f "$OUT/bench.log" "$OUT/bench_results.tar.gz"

log "gpu_check start $(date -u +%FT%TZ): stages $STAGES, budget ${BUDGET}s, dry run $DRY," \
  "skip build ${SKIP_BUILD:-0}, OUT $OUT"
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet 2>/dev/null || COMMIT="$COMMIT+dirty"
else
  COMMIT="unknown (no git)"
fi
log "commit $COMMIT"
plan="plan (stage share -> cap if every earlier stage used its share):"
for n in 0 1 2 3 4 5; do
  selected "$n" && plan="$plan ${n}:${NAME[$n]} ${SHARE[$n]}%=$(( BUDGET * SHARE[$n] / 100 ))s"
done
log "$plan"

# ------------------------------------------------------------------------------ 0. versions, lowering
if selected 0; then
  CAP=$(cap_of 0)
  {
    echo "=== stage 0 versions (cap ${CAP}s)"
    "$PY" - <<'PYEOF' 2>&1
import sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU"
cap = ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else "-"
print(f"python {sys.version.split()[0]} ({sys.executable}) | torch {torch.__version__} (cuda {torch.version.cuda}) "
      f"| triton {tv} | GPU {gpu} (sm {cap})")
PYEOF
    echo "nvcc: $(command -v nvcc || echo absent) $(nvcc --version 2>/dev/null | tail -1)"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo absent)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
        | sed 's/^/driver: /'
    else
      echo "driver: nvidia-smi absent"
    fi
  } >> "$OUT/versions.log" 2>&1
  grep -E '^(python |nvcc:|compute-sanitizer:|driver:)' "$OUT/versions.log" >> "$SUMMARY"
  if [ "$DRY" = "1" ]; then  # a private, temporary triton cache
    ARCH=90; AOT_ARGS="--dtypes bf16 --shapes odd"
  else  # triton's own cache, which the JIT of the later stages may then find warm
    ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(90 if m >= 9 else 80)" \
      2>/dev/null || echo 90)
    AOT_ARGS="--dtypes bf16,fp32 --shapes vit,odd --cache-dir ${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
  fi
  # shellcheck disable=SC2086
  step "stage 0 versions/compile_check" "$CAP" "$OUT/versions.log" "$PY" tools/triton_compile_check.py \
    --tiers defaults --arch "$ARCH" $AOT_ARGS --jobs "$PAR" --budget-s $(( CAP > 20 ? CAP - 15 : 5 ))
  grep -E '^# [0-9]+/[0-9]+ lowered|^# FAILED' "$OUT/versions.log" >> "$SUMMARY"
fi

# ------------------------------------------------------------------------------------------ 1. build
if selected 1; then
  CAP=$(cap_of 1)
  if [ "${SKIP_BUILD:-0}" = "1" ]; then
    echo "=== stage 1 build: not run (SKIP_BUILD=1)" >> "$OUT/build.log"
    log "stage 1 build: not run (SKIP_BUILD=1); a later stage builds if the extension is missing"
  else
    build "stage 1 build" $(( CAP > 40 ? CAP - 30 : CAP ))
    INFO_CAP=$(cap_of 1)
    step "stage 1 build/imse_kernels_info" $(( INFO_CAP < 30 ? INFO_CAP : 30 )) "$OUT/build.log" "$PY" -m imse_kernels
  fi
fi
# What the later stages import.
"$PY" -c "import imse_kernels as m; from imse_kernels import _extension as e
print('imse_kernels', m.__file__, '| backends', m.available_backends(), '| _C', e.reason('_C') or 'loaded',
      '| _C_cuda', e.reason('_C_cuda') or 'loaded')" >> "$SUMMARY" 2>&1

# ------------------------------------------------------------------------ 2. correctness in bf16
if selected 2; then
  CAP=$(cap_of 2)
  needs_build "stage 2 correctness" "$CAP"
  CAP=$(cap_of 2)
  if [ "$DRY" = "1" ]; then C_ARGS="--device cpu --backends cpu --quick"; W_BACKENDS=cpu; W_PAR=2
  else C_ARGS="--device cuda"; W_BACKENDS=triton; W_PAR=$PAR; fi
  WARM=$(( CAP * 2 / 5 ))
  # The warm-up: every bf16 case once, split over W_PAR processes, so each Triton specialisation is
  # compiled in parallel into the on-disk cache; its results are discarded (the real pass follows).
  warm() {
    local i pids=()
    for i in $(seq 0 $(( W_PAR - 1 ))); do
      # shellcheck disable=SC2086
      "$PY" checks/gpu_correctness.py $C_ARGS --backends "$W_BACKENDS" --dtypes bf16 --shard "$i/$W_PAR" \
        --budget-s $(( WARM > 15 ? WARM - 10 : 5 )) > /dev/null 2>> "$BENCH_DIR/warmup.log" &
      pids+=($!)
    done
    wait "${pids[@]}"
    return 0
  }
  export -f warm
  export PY C_ARGS W_BACKENDS W_PAR WARM BENCH_DIR
  step "stage 2 correctness/warmup" "$WARM" "$SUMMARY" bash -c warm  # the exported function: one summary line
  note "warm-up: $(grep -c 'passed' "$BENCH_DIR/warmup.log" 2>/dev/null || echo 0) shards finished"
  CAP=$(cap_of 2)
  # stdout repeats the JSON lines of correctness.jsonl; stderr (failures, counts) goes to the summary
  # shellcheck disable=SC2086
  step "stage 2 correctness" "$CAP" "$SUMMARY" sh -c 'exec "$@" > /dev/null' sh \
    "$PY" checks/gpu_correctness.py $C_ARGS --dtypes bf16 --out "$OUT/correctness.jsonl" \
    --budget-s $(( CAP > 30 ? CAP - 20 : CAP / 2 ))
  note "correctness: $(tail -1 "$OUT/correctness.jsonl" 2>/dev/null)"
fi

# ----------------------------------------------------------------------------------- 3. GPU tests
if selected 3; then
  CAP=$(cap_of 3)
  needs_build "stage 3 tests_gpu" "$CAP"
  CAP=$(cap_of 3)
  T_ARGS=(-m gpu tests -q -rfEs -p no:cacheprovider)
  if "$PY" -c "import xdist" >/dev/null 2>&1; then
    T_ARGS+=(-n "$PAR"); note "tests_gpu: pytest-xdist, $PAR processes"
  else
    note "tests_gpu: pytest-xdist absent, serial"
  fi
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then T_ARGS+=(--timeout 90); fi
  step "stage 3 tests_gpu" "$CAP" "$OUT/tests_gpu.log" "$PY" -m pytest "${T_ARGS[@]}"
  tail -1 "$OUT/tests_gpu.log" >> "$SUMMARY" 2>/dev/null
fi

# ----------------------------------------------------------------------------------- 4. sanitizers
if selected 4; then
  CAP=$(cap_of 4)
  needs_build "stage 4 sanitizer" "$CAP"
  note "compute-sanitizer: $(command -v compute-sanitizer || echo "not on PATH ($PATH)")"
  if [ "$DRY" = "1" ]; then
    dry_skip "stage 4 sanitizer/memcheck" "$OUT/sanitizer.log"
    dry_skip "stage 4 sanitizer/racecheck" "$OUT/sanitizer.log"
  else
    CAP=$(cap_of 4)
    step "stage 4 sanitizer/memcheck" $(( CAP / 2 )) "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
    if grep -q "Device not supported" "$OUT/sanitizer.log"; then
      log "stage 4 sanitizer/racecheck: not run (compute-sanitizer refused the device in memcheck)"
    else
      step "stage 4 sanitizer/racecheck" "$(cap_of 4)" "$OUT/sanitizer.log" compute-sanitizer --tool racecheck \
        --racecheck-report hazard --error-exitcode 1 "$PY" tests/cuda_memcheck_case.py --quick
    fi
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|cases passed|Device not supported' "$OUT/sanitizer.log" \
      >> "$SUMMARY" 2>/dev/null
  fi
fi

# ----------------------------------------------------------------------------------- 5. benchmarks
if selected 5; then
  CAP=$(cap_of 5)
  needs_build "stage 5 bench" "$CAP"
  if [ "$DRY" = "1" ]; then
    B_ARGS="--device cpu --quick --nets vit_s --layers proj --batches 1 --dtypes bf16 --modes fwdbwd,infer"
    F_ARGS="--device cpu --quick --nets vit_s --layers proj --batches 1 --dtypes fp32 --modes fwdbwd"
    M_ARGS="--device cpu --quick --model-providers imse,imse_reference --model-batches 1"
  else
    L_ARGS="--device cuda --nets vit_b --batches 64,1 --modes fwdbwd,infer --skip-providers naive_compile"
    B_ARGS="$L_ARGS --dtypes bf16 --max-case-s 1.5"
    F_ARGS="$L_ARGS --dtypes fp32 --max-case-s 1.5"
    M_ARGS="--device cuda --max-case-s 3"
  fi
  CAP=$(cap_of 5)
  # shellcheck disable=SC2086
  step "stage 5 bench/bf16" $(( CAP * 3 / 5 )) "$OUT/bench.log" "$PY" benchmarks/layer_bench.py $B_ARGS \
    --out-dir "$BENCH_DIR" --tag gpu_bf16 ${BENCH_ARGS:-}
  pack_bench
  # shellcheck disable=SC2086
  step "stage 5 bench/fp32" $(( $(cap_of 5) / 2 )) "$OUT/bench.log" "$PY" benchmarks/layer_bench.py $F_ARGS \
    --out-dir "$BENCH_DIR" --tag gpu_fp32 ${BENCH_ARGS:-}
  pack_bench
  # shellcheck disable=SC2086
  step "stage 5 bench/model" "$(cap_of 5)" "$OUT/bench.log" "$PY" benchmarks/model_bench.py $M_ARGS \
    --out-dir "$BENCH_DIR" --tag gpu ${BENCH_ARGS:-}
  pack_bench
  grep -E '^\s+(PASS|FAIL)\s' "$OUT/bench.log" >> "$SUMMARY" 2>/dev/null
fi

# ---------------------------------------------------- the layout of $OUT: flat, <= 8 files, <= 16 MiB each
N_FILES=$(find "$OUT" -mindepth 1 -type f | wc -l)
N_DIRS=$(find "$OUT" -mindepth 1 -type d | wc -l)
BAD_NAMES=$(find "$OUT" -mindepth 1 -type f | sed 's#.*/##' | grep -c '[^A-Za-z0-9._-]')
BIG=$(find "$OUT" -mindepth 1 -type f -size +16M | wc -l)
RC=0
if [ "$N_FILES" -le 8 ] && [ "$N_DIRS" -eq 0 ] && [ "$BAD_NAMES" -eq 0 ] && [ "$BIG" -eq 0 ]; then
  log "file check: PASS ($N_FILES files, limit 8; no folders): $(ls "$OUT" | tr '\n' ' ')"
else
  log "file check: FAIL ($N_FILES files (limit 8), $N_DIRS folders, $BAD_NAMES odd names, $BIG over 16 MiB):" \
    "$(ls "$OUT" | tr '\n' ' ')"
  RC=3
fi
log "gpu_check done in $(( $(date +%s) - T0 ))s"
cat "$SUMMARY"
exit $RC
