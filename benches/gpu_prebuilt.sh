#!/usr/bin/env bash
# Runs benches/gpu.sh on a GPU machine with the binaries benches/build_cuda_binaries.sh made
# elsewhere (no Rust or network needed there, only the NVIDIA driver, CUDA 13's libraries and
# PyTorch), from the checkout's root:
#   benches/gpu_prebuilt.sh BIN_DIR [PYTHON]
# WHEELS (diffusers and its missing dependencies as wheels) and TRACE as for benches/gpu.sh. The
# table and every JSON line also go to $OUT/gpu.log when OUT is set, kernel traces to
# $OUT/kernel_trace.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=$(cd "${1:?usage: benches/gpu_prebuilt.sh BIN_DIR [PYTHON]}" && pwd)
python=${2:-python3}
# The binaries read configs and fixtures at the path they were built in.
built_in=$(cat "$bins/checkout")
if [ "$(cd "$built_in" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
  mkdir -p "$(dirname "$built_in")"
  ln -sfn "$PWD" "$built_in"
fi
run=$(mktemp -d)
# shellcheck source=scripts/gpu_machine.sh
source scripts/gpu_machine.sh
for packed in "$bins"/*.xz; do
  unpack_binary "$python" "$packed" "$run/$(basename "$packed" .xz)"
done
use_cuda_libraries libcudnn.so.9
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
for binary in "$run"/*; do
  if ldd "$binary" | grep 'not found'; then echo "$binary: libraries missing"; fi
done
builds=""
for binary in "$run"/unet_step_*; do builds="$builds ${binary##*/unet_step_}=$binary"; done
export UNET_STEP_BINS=$builds PARITY_BIN=$run/lora_parity KERNEL_TESTS_BIN=$run/lora_core_tests
if [ -e "$bins/kernel_trace.so" ]; then
  export KERNEL_TRACE=$bins/kernel_trace.so TRACE_OUT=${OUT:-$run}/kernel_trace.txt
fi
bash benches/gpu.sh "$python" 2>&1 | tee "${OUT:-$run}/gpu.log"
