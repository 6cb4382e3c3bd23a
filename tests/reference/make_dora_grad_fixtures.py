#!/usr/bin/env python3
"""PyTorch reference for DoRA (`--dora`, weight-decomposed LoRA) on the UNet: output, gradients,
and the adapter as diffusers and LyCORIS files.

For each tiny pipeline's UNet, peft (`use_dora=True`) injects a rank-4 adapter (alpha 8; A, B
drawn from N(0, 0.2²); the magnitude drawn as ‖W + s·B·A‖ per output channel times
1 + 0.1·N(0, 1), so it matters) into every transformer-layer Linear / 1×1 conv (lora-train's
`attn-mlp` set) and kohya's conv_dim set of the resnets and resamplers (`--conv-rank`). peft's
DoRA: `y = b + m / ‖W + s·B·A‖ · (x·Wᵀ + s·x·Aᵀ·Bᵀ)`, the norm per output channel and detached
from the gradient. The UNet runs the inputs of `expected.safetensors`; the loss is the MSE
against its `grad_target`. Writes to `tests/fixtures/<cfg>/`:

- `grad_dora.safetensors`: `unet.<path>.lora_A.weight` / `.lora_B.weight` /
  `.lora_magnitude_vector` (peft's shapes), `dora_out` (the UNet's output), `dora_loss`, and
  `grad.<path>.<same names>`: every adapter gradient;
- `adapter_dora_peft.safetensors`: the adapter as diffusers' `save_lora_weights` writes it
  (checked: diffusers' loader, `lora_state_dict` + `load_lora_into_unet` as `load_lora_weights`
  calls them, injects every module as DoRA into a fresh UNet, which reproduces `dora_out`);
- `adapter_dora_kohya.safetensors`: the adapter in kohya/LyCORIS layout (`lora_down`,
  `lora_up`, `alpha`, `dora_scale` of shape `[out, 1(, 1, 1)]`, LyCORIS' default
  `wd_on_output`), checked: LyCORIS' kohya loader (`lycoris.kohya.create_network_from_weights`)
  resolves every module (`get_module` / `make_module`, as its `create_network_from_weights`
  does; the network object itself cannot be built on a diffusers UNet) and the UNet with every
  module merged (`merge_to`) reproduces `dora_out`.

Usage: python tests/reference/make_dora_grad_fixtures.py [--out tests/fixtures]
"""

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
ADAPTER = "dora"
TRANSFORMER_LAYERS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def targets_of(unet):
    """lora-train's attn-mlp set plus kohya's conv_dim set, by module path."""
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        transformer = ".attentions." in name and name.endswith(TRANSFORMER_LAYERS)
        resnet = name.endswith((".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut"))
        if transformer or resnet or name.endswith("samplers.0.conv"):
            names.append(name)
    return sorted(names)


def unet_out(unet, exp):
    return unet(exp["sample"], exp["timestep"], encoder_hidden_states=exp["encoder_hidden_states"]).sample


def kohya_state_dict(tensors):
    """The adapter in kohya/LyCORIS layout, from the peft-named tensors of `grad_dora`."""
    sd = {}
    for key, value in tensors.items():
        if not (key.startswith("unet.") and key.endswith(".lora_magnitude_vector")):
            continue
        path = key[len("unet."):-len(".lora_magnitude_vector")]
        name = "lora_unet_" + path.replace(".", "_")
        down = tensors[f"unet.{path}.lora_A.weight"]
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = tensors[f"unet.{path}.lora_B.weight"]
        sd[f"{name}.alpha"] = torch.tensor(8.0)
        out = value.numel()
        sd[f"{name}.dora_scale"] = value.reshape(out, *[1] * (down.dim() - 1)).contiguous()
    return sd


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures")
    args = parser.parse_args()
    for seed, cfg in enumerate(("sd1-tiny", "sd2-tiny")):
        torch.manual_seed(300 + seed)
        folder = args.out / cfg
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
        unet.requires_grad_(False)
        exp = load_file(str(folder / "expected.safetensors"))
        targets = targets_of(unet)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, target_modules=targets)
        unet.add_adapter(config, adapter_name=ADAPTER)
        modules = dict(unet.named_modules())
        result, params = {}, {}
        for path in targets:
            layer = modules[path]
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            m = layer.lora_magnitude_vector[ADAPTER].weight
            with torch.no_grad():
                a.normal_(0.0, 0.2)
                b.normal_(0.0, 0.2)
                w = layer.base_layer.weight
                merged = (w + 2.0 * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)).flatten(1)
                norm = merged.norm(dim=1)
                m.copy_((norm * (1 + 0.1 * torch.randn_like(norm))).reshape(m.shape))
            for which, p in (("lora_A.weight", a), ("lora_B.weight", b), ("lora_magnitude_vector", m)):
                p.requires_grad_(True)
                result[f"unet.{path}.{which}"] = p.detach().clone().contiguous()
                params[f"grad.{path}.{which}"] = p
        out = unet_out(unet, exp)
        loss = ((out.float() - exp["grad_target"]) ** 2).mean()
        loss.backward()
        result["dora_out"] = out.detach().float().contiguous()
        result["dora_loss"] = loss.detach().reshape(1)
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, key
            result[key] = p.grad.detach().float().contiguous()
        meta = {
            "generator": "tests/reference/make_dora_grad_fixtures.py",
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "peft": __import__("peft").__version__,
        }
        save_file(result, str(folder / "grad_dora.safetensors"), metadata=meta)

        # The peft file, as diffusers saves it, and its check through load_lora_weights.
        sd = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
        d = config.to_dict()
        for k, v in list(d.items()):
            if isinstance(v, set):
                d[k] = sorted(v)
        tmp = folder / "_tmp_dora"
        shutil.rmtree(tmp, ignore_errors=True)
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=sd, unet_lora_adapter_metadata=d, safe_serialization=True)
        peft_file = folder / "adapter_dora_peft.safetensors"
        shutil.move(str(tmp / "pytorch_lora_weights.safetensors"), peft_file)
        shutil.rmtree(tmp)
        reloaded = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(peft_file), return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, reloaded, adapter_name="check", metadata=metadata)
        injected = sum(1 for _, mod in reloaded.named_modules() if hasattr(mod, "lora_magnitude_vector") and "check" in mod.lora_magnitude_vector)
        assert injected == len(targets), (cfg, injected, len(targets))
        with torch.no_grad():
            err = (unet_out(reloaded, exp) - out).abs().max().item()
        assert err < 1e-5, (cfg, "diffusers reload", err)

        # The kohya/LyCORIS file, and its check through LyCORIS' kohya loader (merged).
        from lycoris.modules import get_module, make_module
        kohya = kohya_state_dict(result)
        kohya_file = folder / "adapter_dora_kohya.safetensors"
        save_file(kohya, str(kohya_file), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lora", "dora_wd": "True"}', **meta})
        fresh = UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval()
        weights_sd = load_file(str(kohya_file))
        loaded = 0
        for path, module in fresh.named_modules():
            name = "lora_unet_" + path.replace(".", "_")
            if f"{name}.dora_scale" not in weights_sd:
                continue
            lyco_type, params = get_module(weights_sd, name)
            lyco = make_module(lyco_type, params, name, module)
            assert lyco.wd, (cfg, name, "not loaded as DoRA")
            lyco.merge_to(1.0)
            loaded += 1
        assert loaded == len(targets), (cfg, loaded, len(targets))
        with torch.no_grad():
            err_lycoris = (unet_out(fresh, exp) - out).abs().max().item()
        assert err_lycoris < 1e-4, (cfg, "LyCORIS merge", err_lycoris)
        print(f"{cfg}: {len(targets)} modules, loss {loss.item():.6f}, diffusers reload {err:.1e}, LyCORIS merge {err_lycoris:.1e}")


if __name__ == "__main__":
    main()
