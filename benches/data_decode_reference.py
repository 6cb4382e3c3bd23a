"""`datasets` + PIL doing what `benches/data_decode.rs` times: every image of the dataset decoded
and resized/cropped to the training size (Lanczos, as lora-train resizes; then the [-1, 1]
tensor), one process, from the imagefolder of JPEGs and from its parquet file.

    python3 benches/data_decode_reference.py DIR --make-parquet   # DIR/train.parquet, once
    python3 benches/data_decode_reference.py DIR {folder|parquet} [--resolution R] [--iters K]

The transform is diffusers' train_text_to_image one (Resize of the shorter side, CenterCrop,
ToTensor, Normalize) with Lanczos instead of its bilinear default, so both sides do the same work.
"""

import argparse
import os
import time

import datasets
from datasets.table import embed_table_storage
from torchvision import transforms


def make_parquet(workdir):
    ds = datasets.load_dataset(
        "imagefolder", data_dir=os.path.join(workdir, "images"), split="train"
    )
    ds = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    ds.to_parquet(os.path.join(workdir, "train.parquet"))


def load(workdir, case):
    if case == "folder":
        return datasets.load_dataset(
            "imagefolder", data_dir=os.path.join(workdir, "images"), split="train"
        )
    return datasets.load_dataset(
        "parquet", data_files=os.path.join(workdir, "train.parquet"), split="train"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("case", nargs="?", choices=["folder", "parquet"])
    parser.add_argument("--make-parquet", action="store_true")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    if args.make_parquet:
        make_parquet(args.workdir)
        return
    started = time.perf_counter()
    ds = load(args.workdir, args.case)
    load_seconds = time.perf_counter() - started
    transform = transforms.Compose(
        [
            transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.LANCZOS),
            transforms.CenterCrop(args.resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )

    def run():
        done = 0
        for row in ds:
            pixels = transform(row["image"].convert("RGB"))
            assert tuple(pixels.shape) == (3, args.resolution, args.resolution)
            done += 1
        assert done == len(ds) > 0

    run()
    times = []
    for _ in range(args.iters):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    mean = sum(times) / len(times)
    print(
        f"datasets+PIL {args.case} {len(ds)} samples at {args.resolution}²: load {load_seconds:.2f} s; "
        f"pass mean {mean:.2f} s ({len(ds) / mean:.1f} samples/s), min {min(times):.2f} s"
    )


if __name__ == "__main__":
    main()
