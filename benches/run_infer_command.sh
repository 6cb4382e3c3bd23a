#!/usr/bin/env bash
# Whole `lora-infer` commands beside diffusers doing the same work (benches/infer_reference.py):
# load a diffusers folder, one image, DDIM, classifier-free guidance 7.5, PNG out. Each side is
# timed as a process (start-up, load, text encoder, sampling, VAE decode, PNG) with
# /usr/bin/time, in ABBA order, and one JSON line per run plus a summary line are printed.
#   benches/run_infer_command.sh FOLDER SIZE STEPS [PYTHON]
# FOLDER: a diffusers Stable Diffusion folder (tests/reference/check_full_size.py make OUT
# writes random-weight SD 1.5 and SD 2.1 ones). SIZE: width = height in pixels.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=$1 size=$2 steps=$3 python=${4:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build -q --release -p lora-infer --bin lora-infer
ours() {
  /usr/bin/time -f '%e %M' -o "$out/time" "${CARGO_TARGET_DIR:-target}/release/lora-infer" --base "$folder" \
    --prompt "a photograph of an astronaut riding a horse" --steps "$steps" --guidance 7.5 \
    --width "$size" --height "$size" --seed 0 --output "$out/ours.png" --overwrite >/dev/null
  report lora-toolkit
}
theirs() {
  /usr/bin/time -f '%e %M' -o "$out/time" "$python" benches/infer_reference.py "$folder" \
    "$out/theirs.png" --width "$size" --height "$size" --steps "$steps" >/dev/null 2>&1
  report reference
}
report() {
  read -r wall rss_kib <"$out/time"
  echo "{\"impl\": \"$1\", \"folder\": \"$folder\", \"size\": $size, \"steps\": $steps, \"seconds\": $wall, \"peak_rss_mib\": $((rss_kib / 1024))}" |
    tee -a "$out/runs"
}
ours; theirs; theirs; ours
python3 benches/abba_summary.py "lora-infer ${size}² $steps steps" "$out/runs"
