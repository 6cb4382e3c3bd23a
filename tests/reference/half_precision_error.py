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


def measure(cfg, label, targets, weights, reference, dora=False):
    """Loads `cfg`'s UNet with a rank-4 LoRA (alpha 8) on `targets` set to `weights`
    (`unet.<path>.lora_A/B.weight`), runs the fixture's step with an f16 and a bf16 base (f32
    adapters, autocast, as peft trains) and prints its errors against the f32 `reference`
    (`out`: the output; `grad.<path>.lora_A/B.weight`: the gradients). With `dora`, peft's DoRA
    with the magnitudes of `weights` (`unet.<path>.lora_magnitude_vector`) too."""
    exp = load_file(root + cfg + "/expected.safetensors")
    for dt in [torch.float16, torch.bfloat16]:
        u = UNet2DConditionModel.from_pretrained(root + cfg + "/unet")
        u.requires_grad_(False)
        u.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=dora), adapter_name="m")
        params = {}
        for n, p in u.named_parameters():
            for which, key in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"),
                               ("lora_magnitude_vector", "lora_magnitude_vector")):
                if f".{which}.m." in n:
                    path = n.split(f".{which}.m.")[0]
                    params[(path, key)] = p
                    p.data = weights[f"unet.{path}.{key}"].reshape(p.shape).clone()
        u.to(dt)
        for p in params.values():
            p.data = p.data.float(); p.requires_grad_(True)
        with torch.autocast("cpu", dtype=dt):
            out = u(exp["sample"].to(dt), exp["timestep"], exp["encoder_hidden_states"].to(dt)).sample
        out = out.float()
        fe = ((out - reference["out"]).norm() / reference["out"].norm()).item()
        loss = ((out - exp["grad_target"]) ** 2).mean()
        loss.backward()
        errs = []
        for (path, which), p in params.items():
            ref = reference[f"grad.{path}.{which}"].reshape(p.shape)
            errs.append(((p.grad - ref).norm() / ref.norm()).item())
        errs.sort()
        print(f"{cfg} {dt}{label}: forward rel {fe:.2e}; gradient rel median {errs[len(errs)//2]:.2e} worst {errs[-1]:.2e}")


for cfg in ["sd1-tiny", "sd2-tiny"]:
    exp = load_file(root + cfg + "/expected.safetensors")
    measure(cfg, "", ["net.2", "proj", "proj_in", "proj_out", "to_k", "to_out.0", "to_q", "to_v"],
            load_file(root + cfg + "/adapter_grad_peft.safetensors"),
            {**exp, "out": exp["unet_out_lora_grad"]})

# The LoCon fixture (make_conv_grad_fixtures.py: LoRA on the resnets' and samplers' layers), the
# same way: the bounds of lora_parity's `GradReference::Conv` checks.
for cfg in ["sd1-tiny", "sd2-tiny"]:
    conv = load_file(root + cfg + "/grad_conv.safetensors")
    targets = sorted({k[len("unet."):].rsplit(".lora_", 1)[0] for k in conv if k.startswith("unet.")})
    measure(cfg, " (LoCon)", targets, conv, {**conv, "out": conv["conv_lora_out"]})

# The DoRA fixture (make_dora_grad_fixtures.py: peft `use_dora` on the transformer layers and the
# resnets' and samplers' layers).
for cfg in ["sd1-tiny", "sd2-tiny"]:
    dora = load_file(root + cfg + "/grad_dora.safetensors")
    targets = sorted({k[len("unet."):].rsplit(".lora_", 1)[0] for k in dora if k.startswith("unet.")})
    measure(cfg, " (DoRA)", targets, dora, {**dora, "out": dora["dora_out"]}, dora=True)
