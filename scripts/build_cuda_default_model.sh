#!/usr/bin/env bash
# Builds `make-default-model` with CUDA on a machine with neither GPU nor CUDA toolkit (the
# toolkit comes from NVIDIA's wheels, benches/cuda_toolkit.sh), for a GPU machine with neither
# Rust nor network:
#   scripts/build_cuda_default_model.sh OUT_DIR
# writes OUT_DIR/make-default-model.xz (stripped, about 10 MB); then, on the GPU machine,
# scripts/default_model_on_gpu.sh OUT_DIR/make-default-model.xz RESULTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/build_cuda_default_model.sh OUT_DIR}
# shellcheck source=benches/cuda_toolkit.sh
source benches/cuda_toolkit.sh
cargo build --release --features cuda --bin make-default-model
mkdir -p "$out"
strip -o "$out/make-default-model" "$CARGO_TARGET_DIR/release/make-default-model"
xz -T0 -6 -f "$out/make-default-model"
ls -l "$out"
