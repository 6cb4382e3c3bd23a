#!/usr/bin/env python3
"""Optimizer fixtures: the parameter trajectories that the reference optimizers produce from a fixed
gradient sequence, for lora-train's `--optimizer adamw|lion|prodigy` to reproduce.

Writes tests/fixtures/optimizers/:
  trajectories.safetensors   per case: `<case>.p<i>.step<t>` the parameters after step t (t = 0 is
                             the start), shared `grad.p<i>.step<t>` (the gradient fed at step t+1)
  cases.json                 per case: the optimizer, its settings (as lora-train's flags and
                             --optimizer-args spell them), the learning rate of each step; versions

References: torch.optim.AdamW, lion-pytorch's Lion, prodigyopt's Prodigy. Three parameters: a
random matrix (LoRA's `down`), a zero matrix (`up`, as LoRA initialises it) and a vector. The
gradients are a steady direction per parameter plus noise, at scales from 1e-3 to 1, with exact zeros: the first parameter's for two
steps (as `down` gets none while `up` is still zero) and about 30 % of the vector's entries.
Nothing expected is typed in. Usage:
    python tests/reference/make_optimizer_fixtures.py [--out tests/fixtures/optimizers]
"""

import argparse
import json
import sys
from pathlib import Path

from importlib.metadata import version

import torch
from lion_pytorch import Lion
from prodigyopt import Prodigy
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261203
# Enough for Prodigy's step size to grow from d0 by orders of magnitude.
STEPS = 40
SHAPES = [(4, 8), (8, 4), (5,)]
# A warm-up then a decay: every optimizer is fed the same per-step learning rate multiplier.
LR_SHAPE = [0.25, 0.5, 0.75] + [1.0 - 0.6 * t / (STEPS - 4) for t in range(STEPS - 3)]

CASES = {
    "adamw": dict(optimizer="adamw", lr=1e-2, weight_decay=1e-2, args={}),
    "adamw_betas": dict(optimizer="adamw", lr=3e-3, weight_decay=0.0,
                        args={"betas": "0.8,0.95", "eps": "1e-6"}),
    "lion": dict(optimizer="lion", lr=1e-3, weight_decay=0.0, args={}),
    "lion_decay": dict(optimizer="lion", lr=3e-4, weight_decay=0.1, args={"betas": "0.95,0.98"}),
    "prodigy": dict(optimizer="prodigy", lr=1.0, weight_decay=0.0, args={}),
    "prodigy_kohya": dict(optimizer="prodigy", lr=1.0, weight_decay=1e-2,
                          args={"use_bias_correction": "true", "safeguard_warmup": "true",
                                "d_coef": "2.0", "d0": "1e-4"}),
    "prodigy_growth": dict(optimizer="prodigy", lr=0.5, weight_decay=1e-2,
                           args={"decouple": "false", "growth_rate": "1.5", "betas": "0.9,0.99",
                                 "beta3": "0.95", "d0": "1e-5"}),
}


def make(case, params):
    kind, lr, wd, args = case["optimizer"], case["lr"], case["weight_decay"], case["args"]
    betas = tuple(float(b) for b in args["betas"].split(",")) if "betas" in args else None
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas or (0.9, 0.999),
                                 eps=float(args.get("eps", 1e-8)))
    if kind == "lion":
        return Lion(params, lr=lr, weight_decay=wd, betas=betas or (0.9, 0.99))
    truth = {"true": True, "false": False}
    return Prodigy(params, lr=lr, weight_decay=wd, betas=betas or (0.9, 0.999),
                   beta3=float(args["beta3"]) if "beta3" in args else None,
                   d0=float(args.get("d0", 1e-6)), d_coef=float(args.get("d_coef", 1.0)),
                   growth_rate=float(args.get("growth_rate", "inf")),
                   decouple=truth[args.get("decouple", "true")],
                   use_bias_correction=truth[args.get("use_bias_correction", "false")],
                   safeguard_warmup=truth[args.get("safeguard_warmup", "false")])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/optimizers")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    start = [torch.randn(SHAPES[0], generator=gen) * 0.1, torch.zeros(SHAPES[1]),
             torch.randn(SHAPES[2], generator=gen)]
    # A steady direction per parameter plus noise, as a loss's gradients have: Prodigy's step
    # size grows only when the gradients keep agreeing with the way travelled.
    directions = [torch.randn(shape, generator=gen) for shape in SHAPES]
    grads = []
    for t in range(STEPS):
        step = []
        for i, shape in enumerate(SHAPES):
            scale = 10.0 ** float(torch.randint(-3, 1, (1,), generator=gen))
            g = (directions[i] + 0.5 * torch.randn(shape, generator=gen)) * scale
            if i == 0 and t < 2:
                g = torch.zeros(shape)  # untouched while LoRA's up is still zero
            if i == 2:
                g[torch.rand(shape, generator=gen) < 0.3] = 0.0  # some exact zeros
            step.append(g)
        grads.append(step)
    tensors = {}
    for t, step in enumerate(grads):
        for i, g in enumerate(step):
            tensors[f"grad.p{i}.step{t + 1}"] = g.contiguous()
    for name, case in CASES.items():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(case, params)
        for i, p in enumerate(params):
            tensors[f"{name}.p{i}.step0"] = p.detach().clone()
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        for t, step in enumerate(grads):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * LR_SHAPE[t]
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
            for i, p in enumerate(params):
                tensors[f"{name}.p{i}.step{t + 1}"] = p.detach().clone()
    save_file(tensors, out / "trajectories.safetensors")
    meta = {
        "seed": SEED,
        "steps": STEPS,
        "parameters": len(SHAPES),
        "lr_multipliers": LR_SHAPE,
        "cases": CASES,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "prodigyopt": version("prodigyopt"), "lion-pytorch": version("lion-pytorch")},
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(CASES)} cases to {out}")


if __name__ == "__main__":
    main()
