#!/usr/bin/env python3
"""Reference outputs of pytorch-fid's FID Inception-v3 for lora-core's `FidInception`.

Builds `pytorch_fid.inception.InceptionV3([3], resize_input=False, normalize_input=False,
use_fid_inception=True)` with the deterministic weights of `inception_weights.py` in place of the
downloaded ones, runs it on two deterministic images (tensor name "input", [2, 3, 299, 299],
uniform in [−1, 1)) and writes tests/fixtures/inception/:

- expected.safetensors: `pool` [2, 2048] (the 2048 block, flattened) and `logits_unbiased`
  [2, 1008] (pool · fc.weightᵀ, no bias: torch-fidelity's `logits_unbiased`), computed in f64
  and stored in f32; `f16.pool` and `f16.logits_unbiased` the same with every weight rounded to
  f16 first (what a `--fp16` weights file holds).
- expected.json: versions, the generator settings, how far PyTorch's own f32 run and the f16
  weights land from the f64 reference, and every state-dict key with its shape (the Rust side
  writes its weights file from this list).

The inputs and weights are not stored: both sides regenerate them from their names.

Usage: python3 tests/reference/make_inception_fixtures.py [--out tests/fixtures/inception]
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytorch_fid
import pytorch_fid.inception as fid
import torch
import torch_fidelity
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inception_weights  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = 2


def build_model():
    """pytorch-fid's network for the 2048 block, its weights from `inception_weights` (strictly
    loaded by pytorch-fid itself, so every key and shape must match its model), and the
    torchvision-named Inception3 it was assembled from (its modules are the network's)."""
    built = []
    original = fid._inception_v3

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    def deterministic_weights(url, progress=True):
        # fid_inception_v3 swaps its FID blocks into the model it built before it loads, so the
        # captured model has the final structure here.
        return inception_weights.fid_inception_state(built[-1])

    fid._inception_v3 = capture
    fid.load_state_dict_from_url = deterministic_weights
    model = fid.InceptionV3(
        [fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
        resize_input=False,
        normalize_input=False,
        use_fid_inception=True,
    )
    return model.eval(), built[-1]


def model_input(n):
    return inception_weights.tensor("input", (n, 3, 299, 299))


def run(model, x, fc_weight):
    with torch.no_grad():
        pool = model(x)[0].flatten(1)
        return pool, pool @ fc_weight.T


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/inception")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, inception = build_model()
    state = inception.state_dict()
    fc = state["fc.weight"]
    x = torch.from_numpy(model_input(IMAGES))

    pool32, logits32 = run(model, x, fc)
    model.double()
    pool, logits = run(model, x.double(), fc.double())
    # The same network with every weight rounded to f16 (BatchNorm statistics included).
    halves = {k: (v.half().double() if v.is_floating_point() else v) for k, v in state.items()}
    inception.load_state_dict(halves)
    pool16, logits16 = run(model, x.double(), halves["fc.weight"])

    for name, t in [("pool", pool), ("logits", logits)]:
        scale = t.abs()
        print(f"{name}: mean |x| {scale.mean():.4f}, max {scale.max():.4f}, "
              f"zeros {(t == 0).double().mean():.3f}")
    # Random weights must not wash the input out: the two images' features must differ.
    spread = rel(pool[0], pool[1])
    print(f"pool: images differ by {spread:.3f} of the largest feature")
    assert spread > 0.01, "the features no longer depend on the input"
    assert 0.05 < pool.mean() < 10 and pool.abs().max() < 100, "pool features out of O(1)"

    args.out.mkdir(parents=True, exist_ok=True)
    expected = {
        "pool": pool,
        "logits_unbiased": logits,
        "f16.pool": pool16,
        "f16.logits_unbiased": logits16,
    }
    save_file(
        {k: v.float().contiguous() for k, v in expected.items()},
        str(args.out / "expected.safetensors"),
    )
    meta = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pytorch_fid": pytorch_fid.__version__,
            "torch_fidelity": torch_fidelity.__version__,
            "numpy": np.__version__,
        },
        "model": "pytorch_fid.inception.InceptionV3([3], resize_input=False, "
                 "normalize_input=False, use_fid_inception=True), eval, f64",
        "images": IMAGES,
        "input": "inception_weights.tensor('input', (2, 3, 299, 299))",
        "conv_gain": inception_weights.CONV_GAIN,
        "max_rel_error": {
            "torch_f32_pool": rel(pool32, pool),
            "torch_f32_logits_unbiased": rel(logits32, logits),
            "f16_weights_pool": rel(pool16, pool),
            "f16_weights_logits_unbiased": rel(logits16, logits),
        },
        "state_dict": {
            k: list(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")
        },
    }
    text = json.dumps(meta, indent=1)
    # One line per shape.
    text = re.sub(r"\[\s+([0-9,\s]+?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]", text)
    (args.out / "expected.json").write_text(text + "\n")
    print(json.dumps(meta["max_rel_error"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
