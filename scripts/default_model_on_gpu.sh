#!/usr/bin/env bash
# Trains candidate default models on a GPU machine with the CUDA `make-default-model` that
# `scripts/build_cuda_binary.sh OUT_DIR make-default-model` made elsewhere (only the NVIDIA
# driver and CUDA 13's libraries needed there):
#   scripts/default_model_on_gpu.sh BINARY.xz RESULTS_DIR
# Each candidate (CANDIDATES: space-separated NAME:CHANNELS:LAYERS_PER_BLOCK) is first timed
# alone (20 and 120 steps, the difference over 100); then all train side by side (a model this
# small leaves most of the GPU idle), each for as many steps as fit in BUDGET_S seconds (default
# 300, at most 50 000 steps) at BATCH pictures per step, and measure how they follow their
# captions when done. Writes RESULTS_DIR/NAME.tar (the UNet's config.json and weights, recipe.json and
# the run's log; the text encoder is the recipe's seeded one, which any run writes again).
set -uo pipefail
binary_xz=${1:?usage: scripts/default_model_on_gpu.sh BINARY.xz RESULTS_DIR}
results=${2:?usage: scripts/default_model_on_gpu.sh BINARY.xz RESULTS_DIR}
budget=${BUDGET_S:-300}
candidates=${CANDIDATES:-"w16:16,32,64:1 w24:24,48,96:1 w32:32,64,128:1"}
batch=${BATCH:-128}
lr=${LR:-1e-3}
warmup=${WARMUP:-200}
python=${PYTHON:-python3}
work=$(mktemp -d)
binary=$work/make-default-model
# shellcheck source=scripts/gpu_machine.sh
source "$(dirname "$0")/gpu_machine.sh"
unpack_binary "$python" "$binary_xz" "$binary" || { echo "cannot unpack $binary_xz"; exit 1; }
# shellcheck disable=SC2119 # no further libraries, not the script's arguments
use_cuda_libraries
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
mkdir -p "$results"

seconds_for() { # NAME CHANNELS LAYERS STEPS
  local start end
  start=$(date +%s.%N)
  "$binary" --device cuda --output "$work/time-$1-$4" --channels "$2" --layers-per-block "$3" \
    --steps "$4" --warmup-steps 5 --batch-size "$batch" --following-seeds 0 \
    >"$work/time-$1-$4.log" 2>&1 || { tail -n 5 "$work/time-$1-$4.log" >&2; return 1; }
  end=$(date +%s.%N)
  "$python" -c "print($end - $start)"
}

planned=()
for candidate in $candidates; do
  IFS=: read -r name channels layers <<<"$candidate"
  short=$(seconds_for "$name" "$channels" "$layers" 20) || { echo "$name: the 20-step run failed"; continue; }
  long=$(seconds_for "$name" "$channels" "$layers" 120) || { echo "$name: the 120-step run failed"; continue; }
  per_step=$("$python" -c "print(($long - $short) / 100)")
  if ! "$python" -c "import sys; sys.exit(0 if $per_step > 0 else 1)"; then
    echo "$name: no usable step time (20 steps: ${short}s, 120 steps: ${long}s)"
    continue
  fi
  # Side by side, each candidate runs slower than alone: budget 70 % of the alone rate.
  steps=$("$python" -c "print(min(max(int($budget * 0.7 / $per_step) // 100 * 100, 300), 50000))")
  echo "$name: channels $channels, $layers layer(s) per block: ${per_step}s per step alone, training $steps steps"
  planned+=("$name:$channels:$layers:$steps")
done

pids=()
for plan in "${planned[@]}"; do
  IFS=: read -r name channels layers steps <<<"$plan"
  "$binary" --device cuda --output "$work/$name" --channels "$channels" --layers-per-block "$layers" \
    --steps "$steps" --warmup-steps "$warmup" --batch-size "$batch" --lr "$lr" \
    >"$work/$name.log" 2>&1 &
  pids+=("$!:$name")
  # Should the call be cut short, the newest snapshot (every 250 steps) is already in RESULTS_DIR.
  (while sleep 30; do
    tar -C "$work" -cf "$results/$name.tar.partial" "$name.log" "$name.partial/unet" 2>/dev/null &&
      mv "$results/$name.tar.partial" "$results/$name.tar"
  done) &
done
for entry in "${pids[@]}"; do
  pid=${entry%%:*}
  name=${entry#*:}
  wait "$pid"
  echo "$name: exit $?"
  tail -n 40 "$work/$name.log"
done
# The copiers stop before the finished models are packed.
jobs -p | xargs -r kill 2>/dev/null
wait 2>/dev/null
for entry in "${pids[@]}"; do
  name=${entry#*:}
  tar -C "$work" -cf "$results/$name.tar" "$name.log" "$name/unet" "$name/recipe.json" ||
    echo "$name: no finished model"
done
ls -l "$results"
