#!/usr/bin/env python3
"""EMA fixtures: what diffusers' `EMAModel` (training_utils, default settings: no warm-up power,
update_after_step 0, min_decay 0, foreach off) keeps of a sequence of parameter values, for
lora-train's `--ema-decay` to reproduce.

Writes tests/fixtures/ema/ema.safetensors: `param.p<i>.step<t>` the parameters after optimizer
step t (t = 0 the start) and `ema<decay>.p<i>.step<t>` the EMA after `step()` at step t, for two
decays; and ema.json (decays, steps, versions). Usage:
    python tests/reference/make_ema_fixtures.py [--out tests/fixtures/ema]
"""

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261203
STEPS = 30
SHAPES = [(4, 8), (8, 4)]
DECAYS = ["0.9", "0.999"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/ema")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    tensors = {}
    emas = {d: EMAModel(params, decay=float(d), foreach=False) for d in DECAYS}
    for i, p in enumerate(params):
        tensors[f"param.p{i}.step0"] = p.detach().clone()
    for t in range(1, STEPS + 1):
        with torch.no_grad():
            for p in params:  # a training step's change: a drift plus noise
                p.add_(0.05 * torch.randn(p.shape, generator=gen) + 0.01)
        for i, p in enumerate(params):
            tensors[f"param.p{i}.step{t}"] = p.detach().clone()
        for d, ema in emas.items():
            ema.step(params)
            for i, s in enumerate(ema.shadow_params):
                tensors[f"ema{d}.p{i}.step{t}"] = s.detach().clone()
    save_file(tensors, out / "ema.safetensors")
    meta = {"seed": SEED, "steps": STEPS, "parameters": len(SHAPES), "decays": DECAYS,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "diffusers": version("diffusers")}}
    (out / "ema.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
