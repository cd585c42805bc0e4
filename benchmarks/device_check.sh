#!/usr/bin/env bash
# One prepared check of forwardonly on a GPU: the test suite on CUDA, a throughput and memory
# table, one resumable chunk of the CIFAR-10 M/8/16 schedule, and a 1-GPU nccl run of
# --distributed data. Everything it writes goes under --out DIR (at most 8 files there).
#
#   benchmarks/device_check.sh [--smoke] [--out DIR] [--data-dir CIFAR_DIR]
#
# --smoke: every stage on the CPU at tiny sizes (about a minute); a test in CI runs it.
# Time boxes (seconds, whole run <= 10 minutes on one H200); override by environment:
#   DC_TESTS=170 DC_THROUGHPUT=170 DC_CIFAR=150 DC_DIST=60
# The Python is $PYTHON, else the repository's .venv, else python3 (a machine with torch
# already; with none, `pip install torch` is tried once, time-boxed, and recorded).
# Stages run in order and each one's exit status is recorded; a failing stage does not stop
# the others. See docs/gpu.md.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
OUT=""
DATA_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    --data-dir) DATA_DIR="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-benchmarks/results/device-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/device_check.log"
mkdir -p "$OUT/work"
STAGES="$OUT/work/stages.tsv"
: > "$STAGES"
exec > >(tee -a "$LOG") 2>&1

if [ "$SMOKE" = 1 ]; then
  T_TESTS=${DC_TESTS:-60}; T_TPUT=${DC_THROUGHPUT:-60}; T_CIFAR=${DC_CIFAR:-40}
  T_DIST=${DC_DIST:-40}; DEVICE=cpu
else
  T_TESTS=${DC_TESTS:-170}; T_TPUT=${DC_THROUGHPUT:-170}; T_CIFAR=${DC_CIFAR:-150}
  T_DIST=${DC_DIST:-60}; DEVICE=cuda
fi

# -- set-up: a Python with torch -------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "no torch for $PY: trying pip install torch (120 s at most)"
  timeout 120 "$PY" -m pip install -q torch pyyaml tqdm matplotlib scikit-learn pytest \
    || echo "pip install failed (no network?)"
fi
export PYTHONPATH="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
echo "device check: smoke=$SMOKE out=$OUT python=$PY device=$DEVICE $(date -u +%FT%TZ)"

stage() {  # stage NAME SECONDS COMMAND...: run it time-boxed, record exit status and time
  # (its output to the log, or to $STAGE_LOG when set)
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (time box ${limit}s)"
  if [ -n "${STAGE_LOG:-}" ]; then
    timeout --kill-after=10 "$limit" "$@" > "$STAGE_LOG" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  rc=$?
  [ $rc = 124 ] && echo "== $name: stopped by its time box"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STAGES"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}

stage env 60 "$PY" -m benchmarks.device_check env --out "$OUT"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"
then
  echo "torch sees no GPU: the CUDA stages would only fail; use --smoke on a CPU"
  printf 'cuda\t1\t0\n' >> "$STAGES"
fi

# 1. the test suite on the device (the smoke run: two core files on the CPU, not the whole
#    suite, which holds this very check as a test)
if [ "$SMOKE" = 1 ]; then
  TESTS=(tests/autodiff/test_forward_mode.py tests/local/test_replicated.py)
else
  TESTS=(tests)
  # pytest-xdist where installed: the suite in parallel processes, within its time box
  "$PY" -c "import xdist" 2>/dev/null && TESTS=(-n 8 tests)
fi
STAGE_LOG="$OUT/tests.log" stage tests "$T_TESTS" env FORWARDONLY_TEST_DEVICE=$DEVICE \
  "$PY" -m pytest -m "not slow" -p no:cacheprovider -p no:warnings -rs \
  -k "not device_check" "${TESTS[@]}"
tail -n 3 "$OUT/tests.log"

# 2. throughput and peak memory, eager and compiled, ratios to bp
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
stage throughput "$T_TPUT" "$PY" -m benchmarks.device_check throughput --out "$OUT" \
  --budget $((T_TPUT - 20)) "${SMOKE_FLAG[@]}"

# 3. one chunk of the CIFAR-10 M/8/16 schedule, continuing benchmarks/results/gpu-cifar/
DATA_FLAG=()
[ -n "$DATA_DIR" ] && DATA_FLAG=(--data-dir "$DATA_DIR")
stage cifar "$T_CIFAR" "$PY" -m benchmarks.device_check cifar --out "$OUT" \
  --budget $((T_CIFAR - 30)) "${SMOKE_FLAG[@]}" "${DATA_FLAG[@]}"

# 4. --distributed data on one process group of world size 1 (nccl on a GPU, gloo on a CPU)
DIST_OUT="$OUT/work/dist"
rm -rf "$DIST_OUT"
stage distributed "$T_DIST" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
  -m forwardonly train --distributed data --device "$DEVICE" --dataset digits --method fg-w \
  --directions 4 --widths 64 --epochs 2 --batch-size 64 --lr 0.003 --no-progress \
  --out "$DIST_OUT"

stage summary 60 "$PY" -m benchmarks.device_check summary --out "$OUT"
echo "device check done: $OUT"
cat "$STAGES"
rm -rf "$OUT/work"  # run directories: kept inside the cifar-*.tar archives
