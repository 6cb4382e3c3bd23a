#!/usr/bin/env bash
# One-shot GPU benchmark: checks the CUDA build against PyTorch's gradients, then runs
# every CUDA case with lora-toolkit and with diffusers + peft (PyTorch) right after, printing one
# table.
#   benches/gpu.sh [PYTHON]
# PYTHON (default python3) must have torch; diffusers and peft, when missing, are installed into a
# temporary folder from the wheels in $WHEELS. The GPU machine has no network and, often, no Rust:
#   UNET_STEP_BINS  our builds to compare, as space-separated LABEL=PATH pairs of the unet_step
#                   benchmark built with `--features cuda` (or `cudnn`) elsewhere; without it,
#                   built here with cargo (needs nvcc and the crates available offline), with
#                   cuDNN when CUDNN=1
#   PARITY_BIN      the lora_parity test binary built with `--features cuda`; without it, run
#                   with cargo
#   KERNEL_TESTS_BIN  lora-core's unit-test binary built with `--features cuda` (our CUDA
#                   kernels against candle's ops); without it, run with cargo
#   COMPARE_CANDLE_KERNELS=1  also runs each build with LORA_CUDA_KERNELS=0 (candle's generic
#                   kernels in place of ours), labelled BUILD-candle
#   TRACE=1         then runs every case again (2 steps after a warm-up), ours and PyTorch's,
#                   with the kernel tracer KERNEL_TRACE (benches/kernel_trace.c built as a
#                   shared library beside its libcupti.so.13) preloaded, and prints each
#                   process's device time by kernel (also kept in TRACE_OUT); doubles the time;
#                   TRACE=ours traces only our builds
#                   KTRACE_BY_GRID=1 also splits each kernel by grid size (tensor size)
# benches/build_cuda_binaries.sh builds both on a machine without GPU or CUDA toolkit, and
# benches/gpu_prebuilt.sh runs this script with them on the GPU machine. The binaries find the
# fixtures and configs at the checkout path they were built in.
# Budget: about 5 minutes on an H100/H200 once the build is done.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
if ! "$python" -c "import diffusers, peft" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "${WHEELS:?set WHEELS to a folder of diffusers/peft wheels}"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
features=cuda
[ "${CUDNN:-0}" = 1 ] && features=cudnn
if [ -z "${UNET_STEP_BINS:-}" ]; then
  built=$(cargo bench --features "$features" --bench unet_step --no-run --message-format=json |
    "$python" benches/cargo_executable.py unet_step)
  UNET_STEP_BINS="$features=$built"
fi

# Correctness first: our CUDA kernels against candle's ops, then adapter gradients on the GPU
# (f32 and a bf16 base) against PyTorch autograd.
if [ -n "${KERNEL_TESTS_BIN:-}" ]; then
  "$KERNEL_TESTS_BIN" kernels::cuda || echo "CUDA KERNEL TESTS FAILED"
else
  cargo test --release --features "$features" -p lora-core --lib kernels::cuda ||
    echo "CUDA KERNEL TESTS FAILED"
fi
if [ -n "${PARITY_BIN:-}" ]; then
  "$PARITY_BIN" --nocapture on_cuda || echo "CUDA GRADIENT PARITY FAILED"
else
  cargo test --release --features "$features" --test lora_parity -- --nocapture on_cuda ||
    echo "CUDA GRADIENT PARITY FAILED"
fi

# Runs one benchmark command and adds the peak device memory seen while it ran: nvidia-smi's used
# memory sampled every 20 ms, the same measure for both implementations (CUDA context and any
# allocator cache included). A case that fails or outlasts CASE_TIMEOUT seconds (default 150) is
# reported and the others still run.
measure() {
  local log json status=0
  log=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 >"$log" &
  local smi=$!
  json=$(timeout "${CASE_TIMEOUT:-150}" "$@") || status=$?
  kill "$smi"
  wait "$smi" 2>/dev/null || true
  if [ "$status" != 0 ] || [ -z "$json" ]; then
    echo "{\"failed\": \"exit status $status: $*\"}"
    return
  fi
  "$python" - "$json" "$log" <<'PY'
import json, sys
row = json.loads(sys.argv[1])
used = [int(l) for l in open(sys.argv[2]) if l.strip().isdigit()]
row["sampled_peak_gpu_mib"] = max(used) if used else None
print(json.dumps(row))
PY
}

# case, dtype, batch[, flags for both programs]: training at 64x64 latents (batch 1 and 4) in bf16,
# batch 4 also with gradient checkpointing on both sides, inference (CFG batch 2) at 64x64 latents
# (512x512 pixels) in f16 and bf16.
runs=(
  "train-sd15-64 bf16 1"
  "train-sd15-64 bf16 4"
  "train-sd15-64 bf16 4 --gradient-checkpointing"
  "infer-sd15-64 f16 2"
  "infer-sd15-64 bf16 2"
)
results=()
for run in "${runs[@]}"; do
  read -r case dtype batch flags <<<"$run"
  # shellcheck disable=SC2206 # flags holds several words, meant to split
  args=("$case" --device cuda --dtype "$dtype" --batch "$batch" --iters 10 $flags)
  theirs=$(measure "$python" benches/unet_step_reference.py "${args[@]}")
  echo "$theirs"
  for build in $UNET_STEP_BINS; do
    ours=$(measure "${build#*=}" "${args[@]}")
    echo "$ours"
    results+=("${build%%=*}" "$ours" "$theirs")
    if [ "${COMPARE_CANDLE_KERNELS:-0}" = 1 ]; then
      ours=$(measure env LORA_CUDA_KERNELS=0 "${build#*=}" "${args[@]}")
      echo "$ours"
      results+=("${build%%=*}-candle" "$ours" "$theirs")
    fi
  done
done
"$python" - "${results[@]}" <<'PY'
import json, sys
args = sys.argv[1:]
print(f"{'case':<18} {'dtype':<5} {'batch':>5} {'build':<12} {'ours it/s':>10} {'torch it/s':>10} {'speed':>7} {'ours MiB':>9} {'torch MiB':>9} {'ours act':>9} {'torch act':>9}")
print("(MiB: peak nvidia-smi used memory sampled every 20 ms while each process ran, CUDA context included;")
print(" act: memory a training forward pass leaves for the backward pass, ours by the device's used memory")
print(" after a synchronisation, torch's by torch.cuda.memory_allocated)")

def activations(row, before, after):
    if before in row and after in row:
        return f"{row[after] - row[before]:>9.0f}"
    return f"{'-':>9}"

for build, o, t in zip(args[::3], args[1::3], args[2::3]):
    o, t = json.loads(o), json.loads(t)
    if "failed" in o or "failed" in t:
        print(f"{build} failed:", o.get("failed", ""), t.get("failed", ""))
        continue
    case = o["case"] + (" gc" if o.get("gradient_checkpointing") else "")
    print(f"{case:<18} {o['dtype']:<5} {o['batch']:>5} {build:<12} {1/o['mean_s']:>10.2f} {1/t['mean_s']:>10.2f} "
          f"{t['mean_s']/o['mean_s']:>6.2f}x {o['sampled_peak_gpu_mib'] or 0:>9.0f} {t['sampled_peak_gpu_mib'] or 0:>9.0f} "
          f"{activations(o, 'gpu_used_before_mib', 'gpu_used_after_forward_mib')} "
          f"{activations(t, 'gpu_allocated_before_mib', 'gpu_allocated_after_forward_mib')}")
PY

if [ "${TRACE:-0}" != 0 ]; then
  trace_out=${TRACE_OUT:-$(mktemp)}
  tracer_libs=$(dirname "${KERNEL_TRACE:?set KERNEL_TRACE}"):${LD_LIBRARY_PATH:-}
  traced() {
    local label=$1
    shift
    KTRACE_LABEL=$label KTRACE_OUT=$trace_out LD_LIBRARY_PATH=$tracer_libs \
      LD_PRELOAD=$KERNEL_TRACE timeout "${CASE_TIMEOUT:-150}" "$@" >/dev/null ||
      echo "trace failed: $label"
  }
  for run in "${runs[@]}"; do
    read -r case dtype batch flags <<<"$run"
    # shellcheck disable=SC2206 # as above
    args=("$case" --device cuda --dtype "$dtype" --batch "$batch" --iters 2 $flags)
    if [ "$TRACE" != ours ]; then
      traced "reference, $run (warm-up + 2 steps)" "$python" benches/unet_step_reference.py "${args[@]}"
    fi
    for build in $UNET_STEP_BINS; do
      traced "${build%%=*}, $run (warm-up + 2 steps)" "${build#*=}" "${args[@]}"
    done
  done
  if [ -s "$trace_out" ]; then cat "$trace_out"; else echo "no kernel trace written"; fi
fi
