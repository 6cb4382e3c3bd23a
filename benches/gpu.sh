#!/usr/bin/env bash
# One-shot GPU benchmark (issue #7): builds the UNet step benchmark with CUDA and runs every CUDA
# case with lora-toolkit and with diffusers + peft (PyTorch) right after, printing one table.
#   benches/gpu.sh [PYTHON]
# Needs nvcc (for `--features cuda`), the crates available to cargo (a populated CARGO_HOME or a
# `cargo vendor` directory configured in .cargo/config.toml: the GPU machine has no network),
# and PYTHON with torch; diffusers and peft are installed from $WHEELS (a folder of wheels) when
# they are missing. Budget: about 8 minutes on an H100/H200 once the build is done.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
if ! "$python" -c "import diffusers, peft" 2>/dev/null; then
  "$python" -m pip install --no-index --find-links "${WHEELS:?set WHEELS to a folder of diffusers/peft wheels}" diffusers peft
fi
features=cuda
[ "${CUDNN:-0}" = 1 ] && features=cudnn
cargo bench --features "$features" --bench unet_step --no-run
# case, dtype, batch: training at 64x64 latents (batch 1 and 4) in bf16, inference (CFG batch 2)
# at 64x64 latents (512x512 pixels) in f16 and bf16.
runs=(
  "train-sd15-64 bf16 1"
  "train-sd15-64 bf16 4"
  "infer-sd15-64 f16 2"
  "infer-sd15-64 bf16 2"
)
results=()
for run in "${runs[@]}"; do
  read -r case dtype batch <<<"$run"
  args=("$case" --device cuda --dtype "$dtype" --batch "$batch" --iters 10)
  ours=$(cargo bench -q --features "$features" --bench unet_step -- "${args[@]}")
  theirs=$("$python" benches/unet_step_reference.py "${args[@]}")
  echo "$ours"; echo "$theirs"
  results+=("$ours" "$theirs")
done
"$python" - "${results[@]}" <<'PY'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:]]
print(f"{'case':<15} {'dtype':<5} {'batch':>5} {'ours it/s':>10} {'torch it/s':>10} {'speed':>7} {'ours MiB':>9} {'torch MiB':>9}")
print("(memory: ours = nvidia-smi used after the run, CUDA context included; torch = max_memory_allocated)")
for o, t in zip(rows[::2], rows[1::2]):
    print(f"{o['case']:<15} {o['dtype']:<5} {o['batch']:>5} {1/o['mean_s']:>10.2f} {1/t['mean_s']:>10.2f} "
          f"{t['mean_s']/o['mean_s']:>6.2f}x {o.get('peak_gpu_mib') or 0:>9.0f} {t.get('peak_gpu_mib') or 0:>9.0f}")
PY
