"""Summary lines of a side-by-side runner whose programs print text lines such as
`ours folder 200 samples …: … mean 1.64 s …` and `datasets+PIL folder …: … mean 2.35 s …`
(first word: who ran, second: the case). Reads those lines on stdin and prints, per case,
`NAME CASE: ours Xs / reference Ys = Rx time`, the form benches/run_all.sh collects.

    … | python3 benches/summarise.py NAME
"""

import re
import statistics
import sys

name = sys.argv[1]
runs = {}
for line in sys.stdin:
    words = line.split()
    found = re.search(r"mean ([0-9.]+) s", line)
    if len(words) < 2 or not found:
        continue
    side = "ours" if words[0] == "ours" else "reference"
    runs.setdefault(words[1], {}).setdefault(side, []).append(float(found.group(1)))
if not runs:
    sys.exit(f"{name}: no timed runs in the output")
for case, sides in runs.items():
    if set(sides) != {"ours", "reference"}:
        sys.exit(f"{name} {case}: only {sorted(sides)} ran")
    ours, theirs = statistics.mean(sides["ours"]), statistics.mean(sides["reference"])
    print(f"{name} {case}: ours {ours:.3f}s / reference {theirs:.3f}s = {ours / theirs:.2f}x time")
