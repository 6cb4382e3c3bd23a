#!/bin/sh
# Training-data decoding + resizing, ours and datasets + PIL, alternating (ABBA) on the same
# images, from a folder and from its parquet file: benches/run_data_decode.sh [IMAGES] [RESOLUTION]
set -e
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cd "$(dirname "$0")/.."
images=${1:-200}
resolution=${2:-512}
work=${DATA_BENCH_DIR:-target/data-bench}
lscpu | grep -E 'Model name|^CPU\(s\)' || true
cargo bench --bench data_decode --no-run
ours() { cargo bench -q --bench data_decode -- "$1" --iters 3 --workdir "$work" --images "$images" --resolution "$resolution" | tee -a "$log"; }
theirs() { python3 benches/data_decode_reference.py "$work" "$1" --iters 3 --resolution "$resolution" | tee -a "$log"; }
ours folder
: >"$log" # that first pass wrote the images; the timed rounds follow
[ -f "$work/train.parquet" ] || python3 benches/data_decode_reference.py "$work" --make-parquet
for case in folder parquet; do
    ours $case; theirs $case; theirs $case; ours $case
done
python3 benches/summarise.py data_decode <"$log"
