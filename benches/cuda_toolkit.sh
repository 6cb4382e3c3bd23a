#!/usr/bin/env bash
# Sourced by the scripts that build CUDA binaries on a machine with neither GPU nor CUDA toolkit
# (benches/build_cuda_binaries.sh, scripts/build_cuda_binary.sh): fetches CUDA 13's
# compiler, headers and libraries from NVIDIA's PyPI wheels once, into $CUDA_KIT (default
# ~/.cache/lora-toolkit/cuda13, about 2.4 GB unpacked; the 1.5 GB of wheels are deleted once
# unpacked), links libcuda against a stub generated from cuda.h (the GPU machine's own driver is
# used at run time), and exports the variables cargo and candle's build scripts need. Builds go
# to $CUDA_TARGET_DIR (default target/cuda).
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
  rm -rf "$kit/wheels"
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
  rm -rf "$kit/wheels"
fi

# NCCL, for data-parallel training across GPUs (lora-train's `nccl` feature links it).
if [ ! -e "$kit/nvidia/nccl/lib/libnccl.so" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_18_x86_64 --platform manylinux2014_x86_64 \
    -d "$kit/wheels" nvidia-nccl-cu13==2.31.2
  unzip -q -o "$kit"/wheels/nvidia_nccl_cu13-2.31.2-*.whl -d "$kit"
  rm -rf "$kit/wheels"
  ln -sf libnccl.so.2 "$kit/nvidia/nccl/lib/libnccl.so"
fi

export PATH=$cu/bin:$PATH CUDA_HOME=$cu CUDA_PATH=$cu CUDA_ROOT=$cu
export LIBRARY_PATH=$cu/lib:$cu/lib/stubs:$kit/nvidia/cudnn/lib:$kit/nvidia/nccl/lib
export CPATH=$kit/nvidia/cudnn/include
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$PWD/target/cuda}
# No debug info: the binaries travel to the GPU machine.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_BENCH_DEBUG=0

