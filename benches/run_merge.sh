#!/usr/bin/env bash
# lora-merge beside plain PyTorch + safetensors (benches/merge_reference.py) on the same SD
# 1.5-size fp16 folder and rank-32 adapter, alternating (ABBA), page cache warm; one JSON line
# per run and a summary line.   benches/run_merge.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
work=${MERGE_BENCH_DIR:-target/merge-bench}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo bench --bench merge --no-run >/dev/null 2>&1
ours() { cargo bench -q --bench merge -- --keep "$work" | tee -a "$log"; }
theirs() { "$python" benches/merge_reference.py "$work" | tee -a "$log"; }
ours; theirs; theirs; ours
python3 benches/abba_summary.py "lora-merge SD 1.5 fp16, rank-32 attn-mlp" "$log"
