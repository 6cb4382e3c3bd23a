"""The unet_step benchmark cases measured with diffusers + peft (PyTorch), printing the same JSON.

    python benches/unet_step_reference.py <case> [--iters N]

Same shapes, LoRA (rank 4, attn2 to_q/to_k/to_v/to_out.0, AdamW lr 1e-4), warm-up and timing as
benches/unet_step.rs; default attention processor (SDPA).
"""

import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None


def load_case(name):
    if name in ("train-sd15-32", "train-sd15-64", "infer-sd15-64"):
        config = json.loads((ROOT / "benches/sd15_unet_config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**config)
        latent, batch, train = {"train-sd15-32": (32, 1, True), "train-sd15-64": (64, 1, True), "infer-sd15-64": (64, 2, False)}[name]
    elif name in ("train-tiny", "infer-tiny"):
        unet = UNet2DConditionModel.from_pretrained(str(ROOT / "tests/fixtures/sd1-tiny/unet"))
        latent, batch, train = 16, (1 if name == "train-tiny" else 2), name == "train-tiny"
    else:
        raise SystemExit(f"unknown case {name}")
    return unet, latent, batch, train


def main():
    args = sys.argv[1:]
    case = args[0]
    iters = int(args[args.index("--iters") + 1]) if "--iters" in args else 3
    torch.manual_seed(0)
    unet, s, b, train = load_case(case)
    unet.requires_grad_(False)
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = unet.config
    sample = torch.randn(b, c.in_channels, s, s)
    context = torch.randn(b, 77, c.cross_attention_dim)
    timesteps = torch.full((b,), 500.0)
    target = torch.randn(b, c.out_channels, s, s)

    def step():
        if train:
            unet.train()
            out = unet(sample, timesteps, context).sample
            loss = torch.nn.functional.mse_loss(out, target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            unet.eval()
            with torch.no_grad():
                unet(sample, timesteps, context).sample.sum().item()

    step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "case": case,
        "impl": f"diffusers {__import__('diffusers').__version__} + peft (torch {torch.__version__})",
        "device": f"cpu, {torch.get_num_threads()} threads",
        "iters": iters,
        "mean_s": sum(times) / len(times),
        "min_s": min(times),
        "peak_rss_mib": peak_rss_mib(),
    }, sort_keys=True))


if __name__ == "__main__":
    main()
