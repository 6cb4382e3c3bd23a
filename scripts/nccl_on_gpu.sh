#!/usr/bin/env bash
# Data-parallel training through NCCL, checked on a GPU machine with the lora-train that
#   scripts/build_cuda_binary.sh OUT_DIR lora-train lora-train/nccl
# made elsewhere (only the NVIDIA driver, CUDA 13's libraries and NCCL needed there: PyTorch's
# wheels bring both). From the checkout's root:
#   scripts/nccl_on_gpu.sh LORA_TRAIN.xz RESULTS_DIR [SD15_FOLDER]
# 1. Equality on the tiny fixtures (10 steps, every random draw of tests/distributed.rs's recipe):
#    one plain process on --device cuda against (a) a torchrun-style launch of one process
#    (RANK=0 WORLD_SIZE=1: NCCL's all-reduce in every step) and (b) `lora-train launch --nproc N`
#    on the machine's N GPUs at batch 1 each, against one process at batch N. Every adapter value
#    within 1e-6 (compare_adapters below fails on NaN and on an empty file).
# 2. With SD15_FOLDER (a diffusers SD 1.5 folder, e.g. from tests/reference/check_full_size.py
#    make, run there: 4 GB do not travel, so diffusers goes as a wheel), 20 steps at 512² on 8
#    random images, plain and as one NCCL process: the mean step and the all-reduce's share of it
#    (the metrics' reduce_seconds).
# With one GPU, (b) compares batch 1 with batch 1 and the kill check (two GPUs or more) is skipped.
# Logs and metrics go to RESULTS_DIR; the last line says PASS or FAIL.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
binary_xz=${1:?usage: scripts/nccl_on_gpu.sh LORA_TRAIN.xz RESULTS_DIR [SD15_FOLDER]}
results=${2:?usage: scripts/nccl_on_gpu.sh LORA_TRAIN.xz RESULTS_DIR [SD15_FOLDER]}
sd15=${3:-}
python=${PYTHON:-python3}
mkdir -p "$results"
work=$(mktemp -d)
binary=$work/lora-train
# shellcheck source=scripts/gpu_machine.sh
source scripts/gpu_machine.sh
unpack_binary "$python" "$binary_xz" "$binary" || { echo "FAIL: cannot unpack $binary_xz"; exit 1; }
use_cuda_libraries libnccl.so.2
if ldd "$binary" | grep 'not found'; then echo "FAIL: libraries missing"; exit 1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$results/gpus.csv"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
failed=0

fixtures=tests/fixtures
recipe() { # OUT BATCH [STEPS]
  echo --base $fixtures/sd1-tiny --data $fixtures/train-data --output "$1" --resolution 32 \
    --skip-bad --device cuda --steps "${3:-10}" --lr 1e-4 --seed 5 --flip --caption-dropout 0.3 \
    --noise-offset 0.1 --batch-size "$2"
}
compare_adapters() { # NAME A B
  "$python" - "$@" <<'PY' | tee -a "$results/equality.txt"
import sys
import numpy as np
from safetensors.numpy import load_file
name, a, b = sys.argv[1], load_file(sys.argv[2]), load_file(sys.argv[3])
assert a and sorted(a) == sorted(b), f"{name}: the adapters' tensors differ"
worst = 0.0
for key in a:
    x, y = a[key].astype(np.float64), b[key].astype(np.float64)
    assert x.size and x.shape == y.shape, key
    d = np.abs(x - y)
    assert np.isfinite(d).all(), f"{name}: {key} is not finite"
    worst = max(worst, float(d.max()))
verdict = "ok" if worst <= 1e-6 else "OVER 1e-6"
print(f"{name}: {len(a)} tensors, largest difference {worst:.3e} ({verdict})")
sys.exit(0 if worst <= 1e-6 else 1)
PY
}
run() { # NAME COMMAND…
  local name=$1; shift
  local start=$SECONDS
  if "$@" >"$results/$name.log" 2>&1; then
    echo "$name: ok in $((SECONDS - start)) s"
  else
    echo "$name: FAILED (exit $?, $results/$name.log)"; tail -5 "$results/$name.log"; failed=1
  fi
}

# shellcheck disable=SC2046 # recipe's words are meant to split
run plain "$binary" $(recipe "$work/plain.safetensors" 1)
# shellcheck disable=SC2046
run nccl_one env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
  "$binary" $(recipe "$work/nccl_one.safetensors" 1)
compare_adapters "one NCCL process vs plain" "$work/plain.safetensors" "$work/nccl_one.safetensors" ||
  failed=1
# shellcheck disable=SC2046
run plain_batch_n "$binary" $(recipe "$work/plain_n.safetensors" "$gpus")
# shellcheck disable=SC2046
run launch_n "$binary" launch --nproc "$gpus" $(recipe "$work/launch_n.safetensors" 1)
compare_adapters "launch --nproc $gpus at batch 1 vs one process at batch $gpus" \
  "$work/plain_n.safetensors" "$work/launch_n.safetensors" || failed=1
# A killed process stops the run: the launcher ends the others (10 s later) and exits 137.
if [ "$gpus" -ge 2 ]; then
  # shellcheck disable=SC2046
  "$binary" launch --nproc "$gpus" $(recipe "$work/killed.safetensors" 1 100000) \
    >"$results/killed.log" 2>&1 &
  launcher=$!
  sleep 20
  # The newest match: the last process the launcher started, not the launcher.
  pkill -KILL -n -f "killed.safetensors"
  wait "$launcher"; code=$?
  echo "one process killed: the launch exited $code" | tee -a "$results/equality.txt"
  if [ "$code" -ne 137 ] || ! grep -q "ended (signal: 9" "$results/killed.log" ||
    [ -e "$work/killed.safetensors" ]; then
    echo "FAILED: the kill did not end the launch as it should ($results/killed.log)"; failed=1
  fi
fi

if [ -n "$sd15" ]; then
  data=$work/data
  "$python" - "$data" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
data = Path(sys.argv[1]); data.mkdir()
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray((rng.random((512, 512, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
    (data / f"{i}.txt").write_text(f"a photograph of thing number {i}")
PY
  sd_args=(--base "$sd15" --data "$data" --resolution 512 --device cuda --steps 20 --seed 0)
  run sd15_plain "$binary" "${sd_args[@]}" --output "$work/sd_plain.safetensors" \
    --metrics "$results/sd15_plain.metrics.jsonl"
  run sd15_nccl_one env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \
    "$binary" "${sd_args[@]}" --output "$work/sd_nccl.safetensors" \
    --metrics "$results/sd15_nccl_one.metrics.jsonl"
  "$python" - "$results"/sd15_plain.metrics.jsonl "$results"/sd15_nccl_one.metrics.jsonl <<'PY' |
import json, sys
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path) if l.strip()]
    steps = [r for r in rows if "seconds" in r and "loss" in r][5:]  # the first five warm up
    assert steps, f"{path}: no step rows"
    step = sum(r["seconds"] for r in steps) / len(steps)
    reduce = [r["reduce_seconds"] for r in steps if r.get("reduce_seconds") is not None]
    share = f", the sum {1e3 * sum(reduce) / len(reduce):.2f} ms ({100 * sum(reduce) / len(reduce) / step:.2f} % of a step)" if reduce else ""
    print(f"{path.rsplit('/', 1)[-1]}: mean step {step:.3f} s over {len(steps)} steps{share}")
PY
    tee -a "$results/sd15.txt"
fi

if [ "$failed" = 0 ]; then echo PASS; else echo FAIL; fi
