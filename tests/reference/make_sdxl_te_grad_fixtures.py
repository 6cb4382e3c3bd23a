#!/usr/bin/env python3
"""PyTorch reference gradients for LoRA on both SDXL text encoders, through the UNet loss.

Loads tests/fixtures/sdxl-tiny (make_sdxl_fixtures.py) in f32. peft injects a rank-4 LoRA (alpha 8,
A and B drawn from N(0, 0.3²), one seed per encoder) into `q_proj`, `k_proj`, `v_proj`, `out_proj`,
`fc1`, `fc2` of every layer of `text_encoder` (CLIPTextModel) and `text_encoder_2`
(CLIPTextModelWithProjection); every base weight, the UNet's too, is frozen. The prompt is encoded
as `StableDiffusionXLPipeline.encode_prompt` does (no clip skip):
context = cat(te1.hidden_states[-2], te2.hidden_states[-2], dim=-1) (penultimate layer, no final
layer norm), pooled = te2's `text_embeds` (final layer norm at the first EOS, then the projection).
Then unet(sample, timestep, context, {text_embeds: pooled, time_ids}) with `sample`, `timestep`,
`time_ids` and `grad_target` from expected.safetensors, loss = ((unet_out - grad_target)**2).mean().
Writes tests/fixtures/sdxl-tiny/grad_text_encoders.safetensors (f32; ids int64):

- `te_input_ids`, `te2_input_ids` `[2, 77]`: BOS 49406, the same random ids in 400..40000 for both,
  EOS 49407, then padding (49407 for the first encoder, 0 = `!` for the second);
- `context` `[2, 77, 40]`, `pooled` `[2, 20]`, `unet_out`, `loss` `[1]`;
- `te1.<path>.lora_{A,B}.weight`, `te2.<path>.lora_{A,B}.weight` with <path> =
  `text_model.encoder.layers.<i>.{self_attn.{q,k,v,out}_proj,mlp.fc{1,2}}` for both encoders
  (transformers 5 drops `text_model.` from CLIPTextModel's names; it is put back here);
- `grad.te1.…`, `grad.te2.…`: their gradients; zeros where autograd gives none, those names (without
  `grad.`) listed comma-separated in the metadata key `no_grad`.

Usage (from the repository root, offline): python tests/reference/make_sdxl_te_grad_fixtures.py
"""

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

REPO_ROOT = Path(__file__).resolve().parents[2]
FOLDER = REPO_ROOT / "tests/fixtures/sdxl-tiny"
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": TARGETS}
LOSS = "((unet_out - grad_target)**2).mean()"
BOS, EOS = 49406, 49407


def add_lora(model, seed, prefix):
    torch.manual_seed(seed)
    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(**LORA), model)
    params = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            which = "lora_A" if ".lora_A." in name else "lora_B"
            path = name.split(f".{which}.")[0]
            if not params:
                print(f"{prefix}: peft names its parameters like {name}")
            if not path.startswith("text_model."):
                path = f"text_model.{path}"
            with torch.no_grad():
                p.normal_(0.0, 0.3)
            p.requires_grad_(True)
            params[f"{prefix}.{path}.{which}.weight"] = p
    assert len(params) == 2 * len(TARGETS) * model.config.num_hidden_layers, (prefix, len(params))
    return model, params


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    exp = load_file(str(FOLDER / "expected.safetensors"))
    te1 = CLIPTextModel.from_pretrained(str(FOLDER / "text_encoder")).float().eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(str(FOLDER / "text_encoder_2")).float().eval()
    unet = UNet2DConditionModel.from_pretrained(str(FOLDER / "unet")).float().eval()
    unet.requires_grad_(False)
    assert te1.config.pad_token_id == EOS and te2.config.pad_token_id == 0
    assert te1.config.eos_token_id == te2.config.eos_token_id == EOS

    def encode(ids1, ids2):
        h1 = te1(input_ids=ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(input_ids=ids2, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds

    # The same encoding, before any adapter, reproduces encode_prompt's output from expected.safetensors.
    with torch.no_grad():
        ctx, pooled = encode(exp["te_input_ids"], exp["te2_input_ids"])
    d = max((ctx - exp["prompt_embeds"]).abs().max().item(), (pooled - exp["pooled_prompt_embeds"]).abs().max().item())
    assert d <= 1e-6, d

    # BOS, a few random ids (the same for both encoders), EOS, then each encoder's padding.
    torch.manual_seed(300)
    ids1 = torch.full((2, 77), EOS, dtype=torch.long)
    ids2 = torch.zeros((2, 77), dtype=torch.long)
    for row, length in enumerate((6, 11)):
        words = torch.randint(400, 40000, (length,))
        for ids in (ids1, ids2):
            ids[row, 0] = BOS
            ids[row, 1 : length + 1] = words
            ids[row, length + 1] = EOS

    te1, p1 = add_lora(te1, 301, "te1")
    te2, p2 = add_lora(te2, 302, "te2")
    params = {**p1, **p2}
    result = {"te_input_ids": ids1, "te2_input_ids": ids2}
    result.update({k: p.detach().clone() for k, p in params.items()})
    context, pooled = encode(ids1, ids2)
    unet_out = unet(exp["sample"], exp["timestep"], encoder_hidden_states=context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": exp["time_ids"]}).sample
    loss = ((unet_out - exp["grad_target"]) ** 2).mean()
    loss.backward()
    result.update(context=context.detach(), pooled=pooled.detach(), unet_out=unet_out.detach(),
                  loss=loss.detach().reshape(1))
    no_grad = []
    for key, p in params.items():
        if p.grad is None:
            no_grad.append(key)
            result[f"grad.{key}"] = torch.zeros_like(p)
            continue
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, key
        result[f"grad.{key}"] = p.grad.detach()
    # te1's last layer feeds nothing (SDXL reads the penultimate layer); te2's feeds the pooled output.
    last = f"te1.text_model.encoder.layers.{te1.config.num_hidden_layers - 1}."
    assert no_grad == [k for k in p1 if k.startswith(last)] and len(no_grad) == 2 * len(TARGETS), no_grad
    print(f"loss {loss.item():.6f}; no gradient: {no_grad}")
    for prefix, ps in (("te1", p1), ("te2", p2)):
        top = max(p.grad.abs().max().item() for p in ps.values() if p.grad is not None)
        print(f"{prefix}: {len(ps)} LoRA tensors, max |grad| {top:.3e}")
    result = {k: (v if k.endswith("input_ids") else v.float()).contiguous() for k, v in result.items()}
    path = FOLDER / "grad_text_encoders.safetensors"
    save_file(result, str(path), metadata={
        "generator": "tests/reference/make_sdxl_te_grad_fixtures.py",
        "loss": json.dumps(LOSS),
        "lora": json.dumps({**LORA, "init": "A, B ~ N(0, 0.3^2); seeds te1 301, te2 302"}),
        "encode": "context = cat(te1.hidden_states[-2], te2.hidden_states[-2]); pooled = te2.text_embeds",
        "no_grad": ",".join(no_grad),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "diffusers": __import__("diffusers").__version__,
        "peft": __import__("peft").__version__,
    })
    print(f"wrote {path.relative_to(REPO_ROOT)} ({path.stat().st_size} bytes, {len(result)} tensors)")


if __name__ == "__main__":
    main()
