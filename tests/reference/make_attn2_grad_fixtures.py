#!/usr/bin/env python3
"""PyTorch reference gradients for LoRA on the default `attn2` preset.

`make_fixtures.py`'s gradient fixture adapts every transformer layer (`attn-mlp`), so the
frozen layers between adapters never appear in it. This script takes that adapter's attn2
modules only (the preset lora-train uses by default: every other transformer layer frozen, as
our fused frozen nodes in `engine/fused.rs` see it), runs the same inputs and loss through diffusers +
peft, and writes the output, the loss and every adapter gradient to
`tests/fixtures/<cfg>/grad_attn2.safetensors` (keys as in `expected.safetensors`).

Usage: python tests/reference/make_attn2_grad_fixtures.py [--out tests/fixtures]
"""

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures")
    args = parser.parse_args()
    torch.manual_seed(0)
    for cfg in ("sd1-tiny", "sd2-tiny"):
        folder = args.out / cfg
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
        unet.requires_grad_(False)
        adapter = load_file(str(folder / "adapter_grad_peft.safetensors"))
        exp = load_file(str(folder / "expected.safetensors"))
        # The attn2 part of the gradient adapter, keyed by module path.
        modules = sorted({
            k[len("unet."):].rsplit(".lora_", 1)[0]
            for k in adapter
            if ".attn2." in k and k.rsplit(".lora_", 1)[0].endswith(TARGETS)
        })
        unet.add_adapter(
            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=modules),
            adapter_name="grad",
        )
        params = {}
        for name, p in unet.named_parameters():
            if ".lora_A.grad." in name or ".lora_B.grad." in name:
                which = "lora_A" if ".lora_A.grad." in name else "lora_B"
                path = name.split(f".{which}.grad.")[0]
                with torch.no_grad():
                    p.copy_(adapter[f"unet.{path}.{which}.weight"])
                p.requires_grad_(True)
                params[f"grad.{path}.{which}.weight"] = p
        assert len(params) == 2 * len(modules), (cfg, len(params), len(modules))
        out = unet(exp["sample"], exp["timestep"], encoder_hidden_states=exp["encoder_hidden_states"]).sample
        loss = ((out.float() - exp["grad_target"]) ** 2).mean()
        loss.backward()
        result = {"unet_out_lora_grad": out.detach().float().contiguous(), "grad_loss": loss.detach().reshape(1)}
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, key
            result[key] = p.grad.detach().float().contiguous()
        save_file(result, str(folder / "grad_attn2.safetensors"), metadata={
            "generator": "tests/reference/make_attn2_grad_fixtures.py",
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "peft": __import__("peft").__version__,
        })
        print(f"{cfg}: {len(modules)} attn2 modules, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
