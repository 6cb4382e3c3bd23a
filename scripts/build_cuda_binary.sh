#!/usr/bin/env bash
# Builds one of our binaries with CUDA on a machine with neither GPU nor CUDA toolkit (the
# toolkit comes from NVIDIA's wheels, benches/cuda_toolkit.sh), for a GPU machine with neither
# Rust nor network:
#   scripts/build_cuda_binary.sh OUT_DIR BINARY [FEATURES]
# writes OUT_DIR/BINARY.xz (stripped, about 10 MB). FEATURES defaults to `cuda`. The binaries the
# GPU scripts take:
#   scripts/build_cuda_binary.sh OUT_DIR make-default-model        # scripts/default_model_on_gpu.sh
#   scripts/build_cuda_binary.sh OUT_DIR lora-train lora-train/nccl  # scripts/nccl_on_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/build_cuda_binary.sh OUT_DIR BINARY [FEATURES]}
binary=${2:?usage: scripts/build_cuda_binary.sh OUT_DIR BINARY [FEATURES]}
# shellcheck source=benches/cuda_toolkit.sh
source benches/cuda_toolkit.sh
cargo build --release --features "${3:-cuda}" --bin "$binary"
mkdir -p "$out"
strip -o "$out/$binary" "$CARGO_TARGET_DIR/release/$binary"
xz -T0 -6 -f "$out/$binary"
ls -l "$out"
