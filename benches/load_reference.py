#!/usr/bin/env python3
"""The load of benches/load.rs done with diffusers, for comparison.

    python benches/load_reference.py DIR/base/unet

Loads the fp16 UNet folder as f32 (`UNet2DConditionModel.from_pretrained(…,
torch_dtype=torch.float32)`, safetensors memory-mapped) and prints one JSON line with the load's
wall time and the process's peak RSS.
"""

import importlib.util
import json
import resource
import sys
import time

import diffusers
import torch
from diffusers import UNet2DConditionModel


def main():
    folder = sys.argv[1]
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    seconds = time.perf_counter() - start
    assert next(unet.parameters()).dtype == torch.float32
    print(json.dumps({
        "bench": "load-sd15-unet-fp16-to-f32",
        "impl": f"diffusers {diffusers.__version__} (torch {torch.__version__})",
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Without accelerate, diffusers builds a randomly initialised model before loading.
        "accelerate": importlib.util.find_spec("accelerate") is not None,
    }))


if __name__ == "__main__":
    main()
