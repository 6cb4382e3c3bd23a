#!/usr/bin/env bash
# Whole `lora-train` commands beside diffusers + peft doing the same work
# (benches/train_reference.py): load a diffusers folder in f32, rank-4 LoRA on the cross-attention
# projections, the caching pass (VAE latents and caption embeddings of every image), STEPS steps
# of AdamW at batch 1, the adapter written. Each side is timed as a process (start-up, load,
# caching pass, training, save) with /usr/bin/time, in ABBA order, on the same IMAGES random
# SIZE² images with captions; one JSON line per run plus a summary line are printed.
#   benches/run_train_command.sh FOLDER SIZE STEPS [PYTHON] [IMAGES]
# FOLDER: a diffusers Stable Diffusion folder (tests/reference/check_full_size.py make OUT
# writes random-weight SD 1.5 and SD 2.1 ones). IMAGES: 8 unless given.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=$1 size=$2 steps=$3 python=${4:-python3} images=${5:-8}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build -q --release -p lora-train --bin lora-train
"$python" - "$out/data" "$size" "$images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
data, size, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data.mkdir()
rng = np.random.default_rng(0)
for i in range(count):
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
    (data / f"{i}.txt").write_text(f"a photograph of thing number {i}")
PY
ours() {
  /usr/bin/time -f '%e %M' -o "$out/time" "${CARGO_TARGET_DIR:-target}/release/lora-train" \
    --base "$folder" --data "$out/data" --output "$out/ours.safetensors" --resolution "$size" \
    --steps "$steps" --seed 0 --overwrite >/dev/null 2>&1
  report lora-toolkit
}
theirs() {
  /usr/bin/time -f '%e %M' -o "$out/time" "$python" benches/train_reference.py "$folder" \
    "$out/data" "$out/theirs.safetensors" --resolution "$size" --steps "$steps" >/dev/null 2>&1
  report reference
}
report() {
  read -r wall rss_kib <"$out/time"
  echo "{\"impl\": \"$1\", \"folder\": \"$folder\", \"size\": $size, \"steps\": $steps, \"images\": $images, \"seconds\": $wall, \"peak_rss_mib\": $((rss_kib / 1024))}" |
    tee -a "$out/runs"
}
ours; theirs; theirs; ours
python3 benches/abba_summary.py "lora-train ${size}² $images images $steps steps" "$out/runs"
