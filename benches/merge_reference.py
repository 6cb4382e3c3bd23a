#!/usr/bin/env python3
"""The merge of benches/merge.rs done with plain PyTorch + safetensors, for comparison.

    cargo bench --bench merge -- --keep DIR      # writes DIR/base and DIR/adapter.safetensors
    python benches/merge_reference.py DIR [--sync]

Reads the fp16 base folder memory-mapped (safe_open), adds alpha/rank · up @ down (computed in
fp32) to every adapted UNet weight, and writes the merged folder with `save_file`, the way a
typical script does (all output tensors held in memory until the save). Prints one JSON line
with the merge's wall time and this process's peak RSS. With `--sync` it also makes the output
durable before the clock stops (`os.fsync` of each file and folder), as lora-merge does: a
typical script does not, so its time can end before the disk has the bytes.
"""

import os

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def kohya_deltas(adapter: dict) -> dict:
    """lora_unet_<flat name> -> (up, down, scale)."""
    out = {}
    for key, down in adapter.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up = adapter[f"{name}.lora_up.weight"]
            scale = float(adapter[f"{name}.alpha"]) / down.shape[0]
            out[name] = (up.flatten(1), down.flatten(1), scale)
    return out


def fsync_path(path: Path):
    """Waits until `path` (a file or a folder's entries) is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def merge(base: Path, adapter_path: Path, output: Path, sync: bool) -> int:
    deltas = kohya_deltas(load_file(adapter_path))
    output.mkdir(parents=True)
    changed = 0
    for sub, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        prefix = "lora_unet_" if sub == "unet" else "lora_te_"
        merged = {}
        with safe_open(base / sub / file, "pt") as f:
            for key in f.keys():
                w = f.get_tensor(key)
                name = prefix + key.removesuffix(".weight").replace(".", "_")
                if key.endswith(".weight") and name in deltas:
                    up, down, scale = deltas[name]
                    w = (w.float() + scale * (up @ down).reshape(w.shape)).to(w.dtype)
                    changed += 1
                merged[key] = w
        (output / sub).mkdir()
        save_file(merged, str(output / sub / file))
        del merged
        if sync:
            fsync_path(output / sub / file)
            fsync_path(output / sub)
    if sync:
        fsync_path(output)
        fsync_path(output.parent)
    assert changed == len(deltas), (changed, len(deltas))
    return changed


def rss_mib() -> float:
    """Current resident set size (the interpreter and torch alone, before the merge)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    root, sync = Path(sys.argv[1]), "--sync" in sys.argv[2:]
    output = root / "merged_reference"
    if output.exists():
        shutil.rmtree(output)
    baseline_mib = rss_mib()
    start = time.perf_counter()
    changed = merge(root / "base", root / "adapter.safetensors", output, sync)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "bench": "merge-sd15-fp16-rank32-attn-mlp",
        "impl": f"pytorch {torch.__version__} + safetensors" + (" + fsync" if sync else ""),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "peak_rss_mib": peak_mib,
        "rss_before_merge_mib": baseline_mib,
        "tensors_changed": changed,
    }))


if __name__ == "__main__":
    main()
