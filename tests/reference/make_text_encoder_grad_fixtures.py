#!/usr/bin/env python3
"""PyTorch reference gradients for text-encoder LoRA (`--train-text-encoder`).

For each tiny pipeline's `text_encoder/` (transformers' `CLIPTextModel`: quick-GELU in sd1-tiny,
GELU in sd2-tiny), peft injects a rank-4 LoRA (alpha 8, random non-zero A and B) into every
module kohya's `lora_te_` keys and peft's text-encoder adapters name: `q_proj`, `k_proj`,
`v_proj`, `out_proj`, `fc1`, `fc2` of every layer. The loss is Σ last_hidden_state ⊙ upstream
over two prompts of token ids padded to 77 (the padding id of the model's config), so every
token position and every adapter parameter gets a gradient. Writes
`tests/fixtures/<cfg>/grad_text_encoder.safetensors`:

- `input_ids` `[2, 77]` (int64), `upstream` `[2, 77, hidden]`;
- `base_hidden_state` (no adapter) and `lora_hidden_state` (with the adapter);
- `<path>.lora_A.weight` / `<path>.lora_B.weight`: the adapter (peft names; transformers 5
  names the modules without the `text_model.` level);
- `grad.<path>.lora_A.weight` / `grad.<path>.lora_B.weight`: their gradients.

With `--dora`, the same with peft's DoRA (`use_dora=True`; the magnitude of each module drawn as
its ‖W + s·B·A‖ per output channel times 1 + 0.1·N(0, 1)), other seeds, written to
`grad_text_encoder_dora.safetensors` with `<path>.lora_magnitude_vector` and its gradient too.

Usage: python tests/reference/make_text_encoder_grad_fixtures.py [--out tests/fixtures] [--dora]
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures")
    parser.add_argument("--dora", action="store_true")
    args = parser.parse_args()
    for seed, cfg in enumerate(("sd1-tiny", "sd2-tiny")):
        torch.manual_seed(100 + seed + (10 if args.dora else 0))
        folder = args.out / cfg
        te = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).float().eval()
        te.requires_grad_(False)
        c = te.config
        # BOS, a few random tokens, EOS, then padding, as the tokenizer lays out a prompt.
        ids = torch.full((2, 77), c.pad_token_id, dtype=torch.long)
        for row, length in enumerate((6, 11)):
            ids[row, 0] = c.bos_token_id
            ids[row, 1 : length + 1] = torch.randint(400, 40000, (length,))
            ids[row, length + 1] = c.eos_token_id
        with torch.no_grad():
            base = te(input_ids=ids).last_hidden_state
        te = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS, use_dora=args.dora), te
        )
        result = {"input_ids": ids, "base_hidden_state": base.contiguous()}
        params = {}
        for name, p in te.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                which = "lora_A" if ".lora_A." in name else "lora_B"
                path = name.split(f".{which}.")[0]
                with torch.no_grad():
                    p.normal_(0.0, 0.3)
                p.requires_grad_(True)
                key = f"{path}.{which}.weight"
                result[key] = p.detach().clone().contiguous()
                params[key] = p
        if args.dora:
            modules = dict(te.named_modules())
            for name, p in list(te.named_parameters()):
                if ".lora_magnitude_vector." not in name:
                    continue
                path = name.split(".lora_magnitude_vector.")[0]
                layer = modules[path]
                with torch.no_grad():
                    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                    norm = (layer.base_layer.weight + 2.0 * b @ a).norm(dim=1)
                    p.copy_(norm * (1 + 0.1 * torch.randn_like(norm)))
                p.requires_grad_(True)
                key = f"{path}.lora_magnitude_vector"
                result[key] = p.detach().clone().contiguous()
                params[key] = p
        per_module = 3 if args.dora else 2
        assert len(params) == per_module * len(TARGETS) * c.num_hidden_layers, (cfg, len(params))
        out = te(input_ids=ids).last_hidden_state
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
        result["upstream"] = upstream
        result["lora_hidden_state"] = out.detach().contiguous()
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, key
            result[f"grad.{key}"] = p.grad.detach().contiguous()
        name = "grad_text_encoder_dora" if args.dora else "grad_text_encoder"
        save_file(result, str(folder / f"{name}.safetensors"), metadata={
            "generator": "tests/reference/make_text_encoder_grad_fixtures.py",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        })
        print(f"{cfg}: {len(params) // per_module} modules, |lora - base| = {(out - base).abs().max().item():.4f}")


if __name__ == "__main__":
    main()
