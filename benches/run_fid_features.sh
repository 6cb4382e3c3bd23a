#!/bin/sh
# FID feature extraction, ours and pytorch-fid's, alternating (ABBA) on the same images and
# weights: benches/run_fid_features.sh [IMAGES] [BATCH]
set -e
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cd "$(dirname "$0")/.."
images=${1:-64}
batch=${2:-32}
work=${FID_BENCH_DIR:-target/fid-bench}
lscpu | grep -E 'Model name|^CPU\(s\)' || true
cargo bench --bench fid_features --no-run
ours() { cargo bench -q --bench fid_features -- extract --iters 3 --workdir "$work" --images "$images" --batch "$batch" | tee -a "$log"; }
theirs() { python3 benches/fid_features_reference.py "$work" --batch "$batch" | tee -a "$log"; }
ours; theirs; theirs; ours
python3 benches/summarise.py fid_features <"$log"
