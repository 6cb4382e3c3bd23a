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
# Needs pip, gcc and xz. Downloads about 1.3 GB of wheels once, into $CUDA_KIT (default
# ~/.cache/lora-toolkit/cuda13). Builds into $CUDA_TARGET_DIR (default target/cuda): the first
# build takes about 25 minutes on 2 cores, most of it candle's CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benches/build_cuda_binaries.sh OUT_DIR}
kit=${CUDA_KIT:-$HOME/.cache/lora-toolkit/cuda13}
cu=$kit/nvidia/cu13
# The compute capability the kernels are built for: 90 is the H100/H200.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$cu/bin/nvcc" ]; then
  mkdir -p "$kit/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
    -d "$kit/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25 nvidia-cudnn-cu13==9.28.1.4
  for wheel in "$kit"/wheels/*.whl; do unzip -q -o "$wheel" -d "$kit"; done
  # The linker looks for the unversioned names.
  for lib in "$cu"/lib/*.so.* "$kit"/nvidia/cudnn/lib/*.so.*; do
    ln -sf "$(basename "$lib")" "${lib%%.so.*}.so"
  done
  # libcuda is the driver's and no wheel ships it: a stub with every entry point of cuda.h
  # satisfies the linker; the binaries load the real one (libcuda.so.1) on the GPU machine.
  mkdir -p "$cu/lib/stubs"
  echo '#include <cuda.h>' | gcc -E -I"$cu/include" - |
    grep -oE '\bcu[A-Za-z0-9_]+ *\(' | sed 's/ *(//' | sort -u |
    sed 's/.*/void &(void) {}/' >"$kit/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$kit/libcuda_stub.c"
fi

# CUPTI, for the kernel tracer (benches/kernel_trace.c).
if [ ! -e "$cu/lib/libcupti.so.13" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$kit/wheels" nvidia-cuda-cupti==13.0.85
  unzip -q -o "$kit"/wheels/nvidia_cuda_cupti-13.0.85-*.whl -d "$kit"
fi

export PATH=$cu/bin:$PATH CUDA_HOME=$cu CUDA_PATH=$cu CUDA_ROOT=$cu
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs:$kit/nvidia/cudnn/lib CPATH=$kit/nvidia/cudnn/include
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target/cuda}
# No debug info: the binaries travel to the GPU machine.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_BENCH_DEBUG=0

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
