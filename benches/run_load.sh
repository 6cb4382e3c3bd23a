#!/usr/bin/env bash
# Model load beside diffusers (benches/load.rs, benches/load_reference.py): the SD 1.5 UNet from
# the merge bench's fp16 folder into f32, alternating (ABBA), page cache warm; one JSON line per
# run and a summary line.   benches/run_load.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
work=${MERGE_BENCH_DIR:-target/merge-bench}
unet=$work/base/unet
[ -f "$unet/config.json" ] || cargo bench -q --bench merge -- --keep "$work" >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo bench --bench load --no-run >/dev/null
ours() { cargo bench -q --bench load -- "$unet" | tee -a "$log"; }
theirs() { "$python" benches/load_reference.py "$unet" | tee -a "$log"; }
ours; theirs; theirs; ours
python3 benches/abba_summary.py "load SD 1.5 UNet fp16 to f32" "$log"
