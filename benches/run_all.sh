#!/usr/bin/env bash
# Every case of issue 19, ours beside the PyTorch tool doing the same work in the same run, and
# one table at the end (paste it into benches/RESULTS.md with the machine line above it).
#   benches/run_all.sh [--avx2] [PYTHON] [SECTION...]
# SECTION: unet, attention, vae, infer, train, load, merge, data, fid (default: all). PYTHON: an
# interpreter with torch, diffusers, peft and pytorch-fid (tests/reference/requirements.txt;
# default python3).
# --avx2 measures the AVX2 path on an AVX-512 machine: ours built with
# RUSTFLAGS="--cfg lora_avx2_only" (our kernels' and gemm's AVX-512 copies left out) into
# target/avx2, PyTorch capped with ATEN_CPU_CAPABILITY=avx2 (and oneDNN/MKL likewise).
# The infer and train sections need random-weight SD 1.5 and SD 2.1 folders: FULL_SIZE_DIR (default
# target/full-size) is made with tests/reference/check_full_size.py when they are missing (4.5 GB).
# Takes about two hours on a 2-core machine; run it on an otherwise idle one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --avx2 ]; then
  shift
  export RUSTFLAGS="--cfg lora_avx2_only" CARGO_TARGET_DIR=target/avx2
  export ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
  build="AVX2 path (ours built with --cfg lora_avx2_only; PyTorch ATEN_CPU_CAPABILITY=avx2)"
else
  build="default build (run-time dispatch to the widest vector unit)"
fi
python=${1:-python3}; shift || true
sections=("$@"); [ ${#sections[@]} -gt 0 ] || sections=(unet attention vae infer train load merge data fid)
full_size=${FULL_SIZE_DIR:-target/full-size}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs a side-by-side runner, keeping its summary lines (`… x time …`) for the table.
side_by_side() { "$@" | tee -a "$log"; }

for section in "${sections[@]}"; do
  case $section in
    unet)
      side_by_side benches/run_unet_step.sh "$python" \
        "train-sd15-32" "train-sd15-32 --targets attn" \
        "train-sd15-32 --batch 4" "train-sd15-32 --targets attn --batch 4" \
        "train-sd15-64 --iters 2" "train-sd15-64 --targets attn --iters 2" \
        "train-sd15-64 --batch 4 --iters 1" "train-sd15-64 --targets attn --batch 4 --iters 1" \
        "infer-sd15-32" "infer-sd15-64 --iters 2" ;;
    attention)
      BENCH=attention REFERENCE=benches/attention_reference.py side_by_side \
        benches/run_unet_step.sh "$python" "self-4096" "cross-4096 --iters 10" \
        "self-1024 --iters 10" "cross-1024 --iters 10" "self-256 --iters 10" \
        "self-9216 --iters 2" ;;
    vae)
      BENCH=vae REFERENCE=benches/vae_reference.py side_by_side benches/run_unet_step.sh \
        "$python" "encode-256" "encode-512 --iters 2" "decode-64 --iters 2" ;;
    infer)
      [ -d "$full_size/sd15" ] && [ -d "$full_size/sd21" ] ||
        "$python" tests/reference/check_full_size.py make "$full_size"
      side_by_side benches/run_infer_command.sh "$full_size/sd15" 512 20 "$python"
      side_by_side benches/run_infer_command.sh "$full_size/sd21" 768 20 "$python" ;;
    train)
      [ -d "$full_size/sd15" ] ||
        "$python" tests/reference/check_full_size.py make "$full_size"
      side_by_side benches/run_train_command.sh "$full_size/sd15" 256 20 "$python"
      side_by_side benches/run_train_command.sh "$full_size/sd15" 512 10 "$python" ;;
    load)
      side_by_side benches/run_load.sh "$python" ;;
    merge)
      side_by_side benches/run_merge.sh "$python" ;;
    data)
      side_by_side benches/run_data_decode.sh 200 512 ;;
    fid)
      side_by_side benches/run_fid_features.sh 64 32 ;;
    *)
      echo "unknown section $section: expected unet, attention, vae, infer, train, load, merge, data or fid" >&2
      exit 2 ;;
  esac
done

echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), $build"
echo "lscpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs," \
  "$(grep -o -w -E 'avx2|avx512f|avx512bw|avx512_bf16|amx_tile|asimd|sve' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo
echo "| case | ours | reference | time ratio | peak RSS ours / reference |"
echo "|---|---|---|---|---|"
sed -n -E 's/^(.*): ours ([0-9.]+s) \/ reference ([0-9.]+s) = ([0-9.]+x) time(; peak RSS (.*))?$/| \1 | \2 | \3 | \4 | \6 |/p' "$log"
