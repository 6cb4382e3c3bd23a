"""Picks the regression inputs of one fuzz target from its fuzzing corpus.

Usage, in fuzz/:
    target/x86_64-unknown-linux-gnu/release/<target> -merge=1 -set_cover_merge=1 \
        -merge_control_file=/tmp/<target>.mcf /tmp/<empty folder> corpus/<target>
    python3 pick_regressions.py /tmp/<target>.mcf 60 regressions/<target>

libFuzzer's merge control file lists each input's coverage features; this picks, greedily, the
input adding the most features not yet covered, up to the given count, and copies them named by
content hash. The few dozen inputs that cover most of what the fuzzer reached keep the regression
test fast while still walking the paths the fuzzer found.
"""

import hashlib
import os
import shutil
import sys


def main(control_file, count, out):
    lines = open(control_file).read().split("\n")
    n_files = int(lines[0])
    files = lines[2 : 2 + n_files]
    features = {}
    for line in lines[2 + n_files :]:
        if line.startswith("FT "):
            fields = line.split()
            features[int(fields[1])] = set(map(int, fields[2:]))
    every = set().union(*features.values()) if features else set()
    covered, chosen = set(), []
    while len(chosen) < count and features:
        best = max(features, key=lambda i: len(features[i] - covered))
        if not features[best] - covered:
            break
        covered |= features[best]
        chosen.append(best)
    os.makedirs(out, exist_ok=True)
    total = 0
    for i in chosen:
        data = open(files[i], "rb").read()
        total += len(data)
        shutil.copy(files[i], os.path.join(out, hashlib.sha1(data).hexdigest()[:16]))
    print(f"{len(chosen)} inputs, {total} bytes, {len(covered)}/{len(every)} features of the corpus")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
