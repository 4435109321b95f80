#!/usr/bin/env bash
# The GPU check: certification throughput, DDP and Ray Train runs, the training steps, a whole `decrop run` and a
# resume on one GPU, in at most ~8 minutes, offline.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine, from the repository root
#   DECROP_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --quick   # validate the scripts on a CPU
#
# Environment: OUT (results folder; default benchmarks/results/gpu), PYTHON (default .venv/bin/python),
# DECROP_GPU_CHECK_DEVICE (default cuda), DECROP_GPU_CHECK_BUDGET_S (default 460: the steps' total seconds).
#
# Steps, each in its own process under `timeout` (a step gets min(its cap, what is left of the budget)):
#   env         first line: nvidia-smi, torch, CUDA, cuDNN; stops here (exit 2) if CUDA is absent and the
#               device was not overridden
#   eager       benchmarks/gpu_certify.py --family eager: bf16, bf16+folded BN, tf32, fp32 x batches 2k-20k
#   nccl_step   benchmarks/gpu_train.py: world-size-1 torch.distributed (nccl) DDP steps of DE-CROP
#   ray_train   benchmarks/gpu_train.py: one Ray Train TorchTrainer run (1 GPU worker, nccl), 1 epoch
#   train_step  benchmarks/gpu_train.py: the quick profile's training steps (DE-CROP stage 1, 2, baseline)
#   kseed_step  benchmarks/gpu_train.py: K = 1, 3, 10 seeds as one grouped-conv denoiser vs K separate ones
#   decrop_run  benchmarks/gpu_train.py: `python -m decrop run` at paper model sizes, a few steps of each
#               phase, then `python -m decrop export`
#   resume      benchmarks/gpu_train.py: a run resumed from its checkpoint continues the uninterrupted one
#   compile     benchmarks/gpu_certify.py --family compile: torch.compile reduce-overhead (Inductor + CUDA
#               graphs), then max-autotune-no-cudagraphs (slow to compile), at the best eager bf16 batch
#   report      benchmarks/gpu_report.py write: OUT/gpu_check.md (printed) and OUT/gpu_check.json
# A step's verbose output goes to OUT/logs/<step>.log (its tail is printed when it fails); every measurement is
# a JSON line in OUT/certify.jsonl or OUT/train.jsonl, appended as it is taken, so a timed-out step keeps them.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
QUICK=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=(--quick) ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (the only option is --quick)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
if [[ "$PY" != */* ]] && command -v "$PY" > /dev/null; then PY=$(command -v "$PY"); fi  # PYTHON=python3 works
if [[ -z "${PYTHON:-}" && ! -x "$PY" ]] && command -v python3 > /dev/null; then
  PY=$(command -v python3)
  echo "gpu_check: no .venv/bin/python here; trying $PY (set PYTHON to choose)"
fi
DEVICE=${DECROP_GPU_CHECK_DEVICE:-cuda}
BUDGET=${DECROP_GPU_CHECK_BUDGET_S:-460}
OUT=${OUT:-benchmarks/results/gpu}
RESERVE=20  # seconds kept for the report
if [[ ! -x "$PY" ]]; then
  echo "gpu_check: no Python at '$PY'; create the project's venv (make setup) or set PYTHON=/path/to/python" >&2
  exit 2
fi
mkdir -p "$OUT/logs" || exit 2
rm -f "$OUT/certify.jsonl" "$OUT/train.jsonl"  # one run per folder: records of an earlier run would mix in
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

# note FILE JSON-FIELDS: record a step that did not run to the end, so the report shows it
note() { printf '{%s, "device": "%s", "quick": %s}\n' "$2" "$DEVICE" "$([[ ${#QUICK[@]} -gt 0 ]] && echo true || echo false)" >> "$1"; }

# step NAME CAP RECORD-FILE RECORD-FIELDS -- COMMAND...: run COMMAND under timeout, its output into the log
step() {
  local name=$1 cap=$2 file=$3 fields=$4; shift 5
  local left=$(( BUDGET - (SECONDS - START) - RESERVE )) limit=$cap
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "gpu_check: $name skipped: ${left}s left of the ${BUDGET}s budget"
    note "$file" "$fields, \"status\": \"skipped\", \"message\": \"budget spent before it started\""
    return
  fi
  local tic=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name: exit $rc after $(( SECONDS - tic ))s (limit ${limit}s)"
  if (( rc == 124 || rc == 137 )); then
    note "$file" "$fields, \"status\": \"timeout\", \"message\": \"killed after its ${limit}s limit\""
  fi
  if (( rc != 0 )); then tail -n 15 "$OUT/logs/$name.log" | sed "s/^/  [$name] /"; fi
}

"$PY" benchmarks/gpu_report.py env --device "$DEVICE" --out "$OUT" || exit 2
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

EAGER_CAP=110
step eager "$EAGER_CAP" "$OUT/certify.jsonl" '"part": "certify", "variant": "eager (remaining)"' -- \
  "$PY" benchmarks/gpu_certify.py --family eager --device "$DEVICE" --out "$OUT/certify.jsonl" \
  --deadline-s $(( EAGER_CAP - 35 )) "${QUICK[@]}"
step nccl_step 60 "$OUT/train.jsonl" '"part": "train", "step": "nccl_step"' -- \
  "$PY" benchmarks/gpu_train.py --steps nccl_step --device "$DEVICE" --out "$OUT/train.jsonl" "${QUICK[@]}"
step ray_train 100 "$OUT/train.jsonl" '"part": "train", "step": "ray_train"' -- \
  "$PY" benchmarks/gpu_train.py --steps ray_train --device "$DEVICE" --out "$OUT/train.jsonl" "${QUICK[@]}"
for part in "train_step 40" "kseed_step 40" "decrop_run 110" "resume 60"; do
  read -r name cap <<< "$part"
  step "$name" "$cap" "$OUT/train.jsonl" "\"part\": \"train\", \"step\": \"$name\"" -- \
    "$PY" benchmarks/gpu_train.py --steps "$name" --device "$DEVICE" --out "$OUT/train.jsonl" "${QUICK[@]}"
done
for mode in reduce-overhead max-autotune-no-cudagraphs; do  # the cheaper compile first
  step "compile-$mode" 150 "$OUT/certify.jsonl" "\"part\": \"certify\", \"variant\": \"bf16-foldbn-compile[$mode]\"" -- \
    "$PY" benchmarks/gpu_certify.py --family compile --mode "$mode" --device "$DEVICE" \
    --out "$OUT/certify.jsonl" "${QUICK[@]}"
done

echo "gpu_check: steps done in $(( SECONDS - START ))s; report:"
timeout -k 5 "$RESERVE" "$PY" benchmarks/gpu_report.py write --out "$OUT"
