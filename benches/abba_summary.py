"""Summary line of an alternating (ABBA) side-by-side runner whose programs print one JSON line
per run with `impl`, `seconds` and `peak_rss_mib` (ours: `impl` starting with "lora"). Prints
`LABEL: ours Xs / reference Ys = Rx time; peak RSS A / B MiB`, the form benches/run_all.sh
collects.

    python3 benches/abba_summary.py LABEL LOG
"""

import json
import statistics
import sys

label, log = sys.argv[1], sys.argv[2]
runs = [json.loads(line) for line in open(log) if line.startswith("{")]
ours = [r for r in runs if r["impl"].startswith("lora")]
theirs = [r for r in runs if not r["impl"].startswith("lora")]
if not ours or not theirs:
    sys.exit(f"{label}: {len(ours)} runs of ours, {len(theirs)} of the reference")
mo, mt = (statistics.mean(r["seconds"] for r in side) for side in (ours, theirs))


def peak(side):
    """The largest peak RSS of a side's runs, or n/a where none was measured (no /proc)."""
    values = [r["peak_rss_mib"] for r in side if r.get("peak_rss_mib") is not None]
    return f"{max(values):.0f}" if values else "n/a"


print(f"{label}: ours {mo:.2f}s / reference {mt:.2f}s = {mo / mt:.2f}x time; peak RSS "
      f"{peak(ours)} / {peak(theirs)} MiB")
