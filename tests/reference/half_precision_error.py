"""How far PyTorch's own half-precision LoRA forward and gradients are from its f32 reference.

    python tests/reference/half_precision_error.py

Loads each tiny model's gradient fixture (the `adapter_grad_peft` adapter, inputs and f32
gradients from make_fixtures.py), runs the same step with an f16 and a bf16 base (f32 adapters,
autocast, as peft trains), and prints the relative errors the half-precision tolerances of
tests/lora_parity.rs are set from.
"""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file

root = str(Path(__file__).resolve().parent.parent / "fixtures") + "/"
for cfg in ["sd1-tiny", "sd2-tiny"]:
    exp = load_file(root + cfg + "/expected.safetensors")
    ad = load_file(root + cfg + "/adapter_grad_peft.safetensors")
    for dt in [torch.float16, torch.bfloat16]:
        u = UNet2DConditionModel.from_pretrained(root + cfg + "/unet")
        u.requires_grad_(False)
        u.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["net.2","proj","proj_in","proj_out","to_k","to_out.0","to_q","to_v"], init_lora_weights=False), adapter_name="grad")
        sd = {}
        for n, p in u.named_parameters():
            if ".grad." in n:
                which = "lora_A" if ".lora_A.grad." in n else "lora_B"
                path = n.split(f".{which}.grad.")[0]
                p.data = ad[f"unet.{path}.{which}.weight"].reshape(p.shape).clone()
        u.to(dt)
        params = {}
        for n, p in u.named_parameters():
            if ".grad." in n:
                p.data = p.data.float(); p.requires_grad_(True); params[n] = p
        with torch.autocast("cpu", dtype=dt):
            out = u(exp["sample"].to(dt), exp["timestep"], exp["encoder_hidden_states"].to(dt)).sample
        out = out.float()
        fe = ((out - exp["unet_out_lora_grad"]).norm() / exp["unet_out_lora_grad"].norm()).item()
        loss = ((out - exp["grad_target"]) ** 2).mean()
        loss.backward()
        errs = []
        for n, p in params.items():
            which = "lora_A" if ".lora_A.grad." in n else "lora_B"
            path = n.split(f".{which}.grad.")[0]
            ref = exp[f"grad.{path}.{which}.weight"].reshape(p.shape)
            errs.append(((p.grad - ref).norm() / ref.norm()).item())
        errs.sort()
        print(f"{cfg} {dt}: forward rel {fe:.2e}; gradient rel median {errs[len(errs)//2]:.2e} worst {errs[-1]:.2e}")

# The LoCon fixture (make_conv_grad_fixtures.py: LoRA on the resnets' and samplers' layers), the
# same way: the bounds of lora_parity's `GradReference::Conv` checks.
for cfg in ["sd1-tiny", "sd2-tiny"]:
    exp = load_file(root + cfg + "/expected.safetensors")
    conv = load_file(root + cfg + "/grad_conv.safetensors")
    targets = sorted({k[len("unet."):].rsplit(".lora_", 1)[0] for k in conv if k.startswith("unet.")})
    for dt in [torch.float16, torch.bfloat16]:
        u = UNet2DConditionModel.from_pretrained(root + cfg + "/unet")
        u.requires_grad_(False)
        u.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="conv")
        for n, p in u.named_parameters():
            if ".conv." in n and (".lora_A." in n or ".lora_B." in n):
                which = "lora_A" if ".lora_A." in n else "lora_B"
                path = n.split(f".{which}.conv.")[0]
                p.data = conv[f"unet.{path}.{which}.weight"].reshape(p.shape).clone()
        u.to(dt)
        params = {}
        for n, p in u.named_parameters():
            if ".lora_A.conv." in n or ".lora_B.conv." in n:
                p.data = p.data.float(); p.requires_grad_(True); params[n] = p
        with torch.autocast("cpu", dtype=dt):
            out = u(exp["sample"].to(dt), exp["timestep"], exp["encoder_hidden_states"].to(dt)).sample
        out = out.float()
        fe = ((out - conv["conv_lora_out"]).norm() / conv["conv_lora_out"].norm()).item()
        loss = ((out - exp["grad_target"]) ** 2).mean()
        loss.backward()
        errs = []
        for n, p in params.items():
            which = "lora_A" if ".lora_A." in n else "lora_B"
            path = n.split(f".{which}.conv.")[0]
            ref = conv[f"grad.{path}.{which}.weight"].reshape(p.shape)
            errs.append(((p.grad - ref).norm() / ref.norm()).item())
        errs.sort()
        print(f"{cfg} {dt} (LoCon): forward rel {fe:.2e}; gradient rel median {errs[len(errs)//2]:.2e} worst {errs[-1]:.2e}")
