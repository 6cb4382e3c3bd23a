#!/usr/bin/env python3
"""PyTorch reference for LyCORIS LoHa and LoKr (`--algo loha|lokr`) on the UNet: output,
gradients, and the adapter as LyCORIS' kohya module saves it.

For each tiny pipeline's UNet, lycoris-lora's own modules (`LohaModule`: rank 4, alpha 8;
`LokrModule`: rank 2, alpha 8, factor 2, LyCORIS' defaults otherwise, so its second Kronecker
half is low-rank on every module here; `lokr_full`: rank 4, alpha 8, factor −1, both halves
whole, so the scale is 1) are applied
(`apply_to`) to every transformer-layer Linear / 1×1 conv (lora-train's `attn-mlp` set) and
kohya's conv_dim set of the resnets and resamplers (`--conv-rank`). Every factor is drawn from
N(0, 0.1²). The UNet runs the inputs of `expected.safetensors`; the loss is the MSE against its
`grad_target`. Writes to `tests/fixtures/<cfg>/`:

- `grad_<algo>.safetensors`: `unet.<path>.<factor>` (LyCORIS' names and shapes: `hada_w1_a`, …,
  `lokr_w1`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`), `<algo>_out` (the UNet's output),
  `<algo>_loss`, and `grad.<path>.<factor>`: every factor's gradient;
- `adapter_<algo>_kohya.safetensors`: the adapter as LyCORIS' kohya module saves it (each
  module's `custom_state_dict` under `lora_unet_<flattened path>.`).

Usage: python tests/reference/make_lycoris_grad_fixtures.py [--out tests/fixtures]
"""

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import load_file, save_file

# The DoRA fixture's layer set: lora-train's attn-mlp set plus kohya's conv_dim set.
from make_dora_grad_fixtures import targets_of

REPO_ROOT = Path(__file__).resolve().parents[2]
ALGORITHMS = {
    "loha": lambda name, module: LohaModule(name, module, 1.0, lora_dim=4, alpha=8),
    "lokr": lambda name, module: LokrModule(name, module, 1.0, lora_dim=2, alpha=8, factor=2),
    "lokr_full": lambda name, module: LokrModule(name, module, 1.0, lora_dim=4, alpha=8),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures")
    args = parser.parse_args()
    for seed, cfg in enumerate(("sd1-tiny", "sd2-tiny")):
        folder = args.out / cfg
        exp = load_file(str(folder / "expected.safetensors"))
        for offset, (algo, make) in enumerate(ALGORITHMS.items()):
            torch.manual_seed(400 + 10 * seed + offset)
            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
            unet.requires_grad_(False)
            modules = dict(unet.named_modules())
            result, params, kohya, lycoris_modules = {}, {}, {}, []
            for path in targets_of(unet):
                name = "lora_unet_" + path.replace(".", "_")
                lyco = make(name, modules[path])
                lyco.apply_to()
                lycoris_modules.append(lyco)
                for pname, p in lyco.named_parameters():
                    if pname.startswith("org_module"):
                        continue
                    with torch.no_grad():
                        p.normal_(0.0, 0.1)
                    p.requires_grad_(True)
                    result[f"unet.{path}.{pname}"] = p.detach().clone().contiguous()
                    params[f"grad.{path}.{pname}"] = p
            out = unet(exp["sample"], exp["timestep"], encoder_hidden_states=exp["encoder_hidden_states"]).sample
            loss = ((out.float() - exp["grad_target"]) ** 2).mean()
            loss.backward()
            result[f"{algo}_out"] = out.detach().float().contiguous()
            result[f"{algo}_loss"] = loss.detach().reshape(1)
            for key, p in params.items():
                assert p.grad is not None and p.grad.abs().max() > 0, key
                result[key] = p.grad.detach().float().contiguous()
            meta = {
                "generator": "tests/reference/make_lycoris_grad_fixtures.py",
                "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__,
                "lycoris-lora": __import__("importlib.metadata").metadata.version("lycoris-lora"),
            }
            save_file(result, str(folder / f"grad_{algo}.safetensors"), metadata=meta)
            for lyco in lycoris_modules:
                for key, value in lyco.custom_state_dict().items():
                    kohya[f"{lyco.lora_name}.{key}"] = value.detach().float().contiguous()
            save_file(kohya, str(folder / f"adapter_{algo}_kohya.safetensors"), metadata={
                "ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo[:4]}"}}', **meta})
            print(f"{cfg} {algo}: {len(lycoris_modules)} modules, {len(params)} factors, loss {loss.item():.6f}, "
                  f"|out| {out.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
