#!/usr/bin/env bash
# Runs each unet_step case with lora-toolkit (candle) and with diffusers + peft, one after the
# other on the same machine, and prints one JSON line per run plus the time ratio.
#   benches/run_unet_step.sh [PYTHON] [CASES...]
# PYTHON: an interpreter with torch, diffusers and peft (default: python3). A case may carry flags
# for both programs, quoted: "train-sd15-32 --gradient-checkpointing".
# BENCH and REFERENCE name another pair with the same command line and JSON (BENCH=vae
# REFERENCE=benches/vae_reference.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}; shift || true
bench=${BENCH:-unet_step}
reference=${REFERENCE:-benches/unet_step_reference.py}
cases=("$@"); [ ${#cases[@]} -gt 0 ] || cases=(train-tiny infer-tiny train-sd15-32 infer-sd15-32 infer-sd15-64)
cargo bench --bench "$bench" --no-run >/dev/null 2>&1
for case in "${cases[@]}"; do
  read -ra spec <<<"$case"
  ours=$(cargo bench -q --bench "$bench" -- "${spec[@]}")
  theirs=$("$python" "$reference" "${spec[@]}")
  echo "$ours"; echo "$theirs"
  "$python" - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
gc = (" (gradient checkpointing)" if o.get("gradient_checkpointing") else "") + (f" ({o['targets']})" if o.get("targets") else "") + (f" (batch {o['batch']})" if o.get("batch", 0) > 2 else "") + (" (DoRA)" if o.get("dora") else "") + (f" ({o['algo']})" if o.get("algo") else "")
print(f"{o['case']}{gc}: ours {o['mean_s']:.3f}s / reference {t['mean_s']:.3f}s = {o['mean_s']/t['mean_s']:.2f}x time; "
      f"peak RSS {o['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} MiB")
PY
done
