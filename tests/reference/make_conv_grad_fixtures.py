#!/usr/bin/env python3
"""PyTorch reference for LoRA on the UNet's resnets and samplers (kohya `conv_dim` / LoCon,
`--conv-rank`): output and gradients.

For each tiny pipeline's UNet, peft injects a rank-4 LoRA (alpha 8; A, B drawn from N(0, 0.2²))
into kohya's conv_dim set: every resnet `conv1` / `conv2` (3×3), `time_emb_proj` (Linear) and
`conv_shortcut` (1×1), and every `downsamplers.0.conv` / `upsamplers.0.conv` (3×3): peft's
Conv2d LoRA, A a `[r, in, k, k]` convolution with the layer's stride and padding and B a 1×1
`[out, r]` one, as kohya's LoCon. The UNet runs the inputs of `expected.safetensors`; the
loss is the MSE against its `grad_target`. Writes `tests/fixtures/<cfg>/grad_conv.safetensors`:

- `unet.<path>.lora_A.weight` / `.lora_B.weight`: the adapter, as peft saves it;
- `conv_lora_out` (the UNet's output with it), `conv_lora_loss`;
- `grad.<path>.lora_A.weight` / `grad.<path>.lora_B.weight`: every adapter gradient.

Usage: python tests/reference/make_conv_grad_fixtures.py [--out tests/fixtures]
"""

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def conv_targets(unet):
    """kohya's conv_dim set of the resnets and resamplers, by module path."""
    return sorted(
        name for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
        and (name.endswith((".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut"))
             or name.endswith("samplers.0.conv"))
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures")
    args = parser.parse_args()
    for seed, cfg in enumerate(("sd1-tiny", "sd2-tiny")):
        torch.manual_seed(200 + seed)
        folder = args.out / cfg
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
        unet.requires_grad_(False)
        exp = load_file(str(folder / "expected.safetensors"))
        targets = conv_targets(unet)
        unet.add_adapter(
            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets),
            adapter_name="conv",
        )
        result, params = {}, {}
        for name, p in unet.named_parameters():
            if ".lora_A.conv." in name or ".lora_B.conv." in name:
                which = "lora_A" if ".lora_A.conv." in name else "lora_B"
                path = name.split(f".{which}.conv.")[0]
                with torch.no_grad():
                    p.normal_(0.0, 0.2)
                p.requires_grad_(True)
                result[f"unet.{path}.{which}.weight"] = p.detach().clone().contiguous()
                params[f"grad.{path}.{which}.weight"] = p
        assert len(params) == 2 * len(targets), (cfg, len(params), len(targets))
        out = unet(exp["sample"], exp["timestep"], encoder_hidden_states=exp["encoder_hidden_states"]).sample
        loss = ((out.float() - exp["grad_target"]) ** 2).mean()
        loss.backward()
        result["conv_lora_out"] = out.detach().float().contiguous()
        result["conv_lora_loss"] = loss.detach().reshape(1)
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, key
            result[key] = p.grad.detach().float().contiguous()
        save_file(result, str(folder / "grad_conv.safetensors"), metadata={
            "generator": "tests/reference/make_conv_grad_fixtures.py",
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "peft": __import__("peft").__version__,
        })
        print(f"{cfg}: {len(targets)} resnet and sampler modules, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
