"""pytorch-fid's feature extraction over the images `benches/fid_features.rs` wrote, with the same
deterministic stand-in weights: `python3 benches/fid_features_reference.py DIR [--batch B]
[--iters K]`. Prints images per second (one warm-up pass, then K timed passes)."""

import argparse
import os
import sys
import time

import torch
from pytorch_fid.fid_score import get_activations

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from make_inception_fixtures import build_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    model, _ = build_model()
    # pytorch-fid's own input path, as `lora-eval` runs it: resize to 299², scale to [-1, 1].
    model.resize_input, model.normalize_input = True, True
    folder = os.path.join(args.workdir, "images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    def run():
        return get_activations(files, model, args.batch, 2048, "cpu", num_workers=0)

    run()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    print(
        f"pytorch-fid extract {len(files)} images batch {args.batch}: mean {mean:.2f} s "
        f"({len(files) / mean:.2f} images/s), min {min(times):.2f} s (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
