#!/usr/bin/env bash
# lora-merge beside plain PyTorch + safetensors (benches/merge_reference.py) on the same SD
# 1.5-size fp16 folder and rank-32 adapter, alternating (ABBA), page cache warm; one JSON line
# per run and two summary lines: against the script as people write it (no sync), and against
# the same script syncing its output to disk as lora-merge does (`--sync`).
#   benches/run_merge.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
work=${MERGE_BENCH_DIR:-target/merge-bench}
log=$(mktemp); synced_log=$(mktemp)
trap 'rm -f "$log" "$synced_log"' EXIT
cargo bench --bench merge --no-run >/dev/null 2>&1
# `sync` first, untimed: a run that leaves its output in the page cache has the kernel write it
# back during the next run, which would pay for it.
ours() { sync; cargo bench -q --bench merge -- --keep "$work" | tee -a "$1"; }
theirs() { sync; "$python" benches/merge_reference.py "$work" "${@:2}" | tee -a "$1"; }
ours "$log"; theirs "$log"; theirs "$log"; ours "$log"
ours "$synced_log"; theirs "$synced_log" --sync; theirs "$synced_log" --sync; ours "$synced_log"
python3 benches/abba_summary.py "lora-merge SD 1.5 fp16, rank-32 attn-mlp" "$log"
python3 benches/abba_summary.py "lora-merge SD 1.5 fp16, rank-32 attn-mlp (reference syncs too)" \
  "$synced_log"
