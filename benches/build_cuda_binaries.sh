#!/usr/bin/env bash
# Builds the CUDA benchmark and the CUDA gradient-parity test on a machine with neither GPU nor
# CUDA toolkit, for a GPU machine with neither Rust nor network. CUDA 13's compiler,
# headers and libraries come from NVIDIA's PyPI wheels; the driver library, libcuda, is linked
# against a stub generated from cuda.h, and the GPU machine's own driver is used at run time.
#   benches/build_cuda_binaries.sh OUT_DIR
# Writes to OUT_DIR (xz-compressed, about 6 MB each):
#   unet_step_cuda.xz   the unet_step benchmark, `--features cuda`
#   unet_step_cudnn.xz  the same with cuDNN convolutions, `--features cudnn`, only when CUDNN=1
#                       (slower: candle asks cuDNN for f32 compute on bf16 convolutions)
#   lora_parity.xz      the lora_parity test binary, `--features cuda`
#   lora_core_tests.xz  lora-core's unit tests, `--features cuda` (our CUDA kernels' tests)
#   kernel_trace.so     benches/kernel_trace.c, with the libcupti.so.13 it needs
#   checkout            the path these were built in (they read configs and fixtures there)
# then `benches/gpu_prebuilt.sh OUT_DIR` runs them on the GPU machine.
# Needs pip, gcc and xz. Downloads about 1.5 GB of wheels once and unpacks them into $CUDA_KIT
# (default ~/.cache/lora-toolkit/cuda13, 2.4 GB). Builds into $CUDA_TARGET_DIR (default target/cuda): the first
# build takes about 25 minutes on 2 cores, most of it candle's CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benches/build_cuda_binaries.sh OUT_DIR}
# shellcheck source=benches/cuda_toolkit.sh
source benches/cuda_toolkit.sh

mkdir -p "$out"
pack() {
  strip -o "$out/$1" "$2"
  xz -T0 -6 -f "$out/$1"
}
pack unet_step_cuda "$(cargo bench --features cuda --bench unet_step --no-run \
  --message-format=json | python3 benches/cargo_executable.py unet_step)"
pack lora_parity "$(cargo test --release --features cuda --test lora_parity --no-run \
  --message-format=json | python3 benches/cargo_executable.py lora_parity)"
pack lora_core_tests "$(cargo test --release --features cuda -p lora-core --lib --no-run \
  --message-format=json | python3 benches/cargo_executable.py lora_core)"
if [ "${CUDNN:-0}" = 1 ]; then
  pack unet_step_cudnn "$(cargo bench --features cudnn --bench unet_step --no-run \
    --message-format=json | python3 benches/cargo_executable.py unet_step)"
fi
# The tracer and the libcupti it was built against travel together (gpu.sh, TRACE=1).
gcc -O2 -Wall -shared -fPIC -o "$out/kernel_trace.so" benches/kernel_trace.c \
  -I"$cu/include" -L"$cu/lib" -l:libcupti.so.13
cp "$cu/lib/libcupti.so.13" "$out/"
pwd >"$out/checkout"
ls -l "$out"
