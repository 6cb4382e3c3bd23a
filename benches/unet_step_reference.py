"""The unet_step benchmark cases measured with diffusers + peft (PyTorch), printing the same JSON.

    python benches/unet_step_reference.py <case> [--iters N] [--device cpu|cuda] [--dtype f32|f16|bf16]
                                                [--batch N] [--gradient-checkpointing] [--dora] [--algo loha|lokr]
                                                [--targets attn2|attn|attn-mlp]
                                                [--saved-tensors]

Same shapes, LoRA (rank 4, attn2 to_q/to_k/to_v/to_out.0, AdamW lr 1e-4), warm-up and timing as
benches/unet_step.rs; default attention processor (SDPA).

`--saved-tensors` (training cases) adds `saved_tensors_mib`: after the timed steps, one more forward
pass counts the distinct storages autograd saves for the backward pass (parameters excluded), the
activations a training step holds; compare `heap_after_forward_mib` of ours on the CPU.
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


def saved_tensors_mib(forward, parameters):
    """MiB of the distinct storages autograd saves while `forward()` runs, `parameters` excluded."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    for p in parameters:
        seen.pop(p.untyped_storage().data_ptr(), None)
    del out
    return sum(seen.values()) / 2**20


def load_case(name):
    if name in ("train-sd15-32", "train-sd15-64", "infer-sd15-32", "infer-sd15-64"):
        config = json.loads((ROOT / "benches/sd15_unet_config.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**config)
        latent, batch, train = {
            "train-sd15-32": (32, 1, True),
            "train-sd15-64": (64, 1, True),
            "infer-sd15-32": (32, 2, False),
            "infer-sd15-64": (64, 2, False),
        }[name]
    elif name in ("train-sdxl-32", "infer-sdxl-32", "train-sdxl-128", "infer-sdxl-128"):
        config = json.loads((ROOT / "benches/sdxl_unet_config.json").read_text())
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        latent = 128 if name.endswith("-128") else 32
        train = name.startswith("train-")
        batch = 1 if train else 2
    elif name in ("train-tiny", "infer-tiny"):
        unet = UNet2DConditionModel.from_pretrained(str(ROOT / "tests/fixtures/sd1-tiny/unet"))
        latent, batch, train = 16, (1 if name == "train-tiny" else 2), name == "train-tiny"
    else:
        raise SystemExit(f"unknown case {name}")
    return unet, latent, batch, train


def main():
    args = sys.argv[1:]
    case = args[0]
    flag = lambda name, default: args[args.index(name) + 1] if name in args else default
    iters = int(flag("--iters", 3))
    device = torch.device(flag("--device", "cpu"))
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[flag("--dtype", "f32")]
    torch.manual_seed(0)
    unet, s, b, train = load_case(case)
    b = int(flag("--batch", b))
    unet.requires_grad_(False)
    unet.to(device, dtype)
    # lora-train's target presets (lora_core::adapters::LoraTargets).
    projections = ["to_q", "to_k", "to_v", "to_out.0"]
    preset = flag("--targets", "attn2")
    targets = {
        "attn2": [f"attn2.{p}" for p in projections],
        "attn": [f"{a}.{p}" for a in ("attn1", "attn2") for p in projections],
        "attn-mlp": [f"{a}.{p}" for a in ("attn1", "attn2") for p in projections]
        + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    }[preset]
    dora = "--dora" in args
    algo = flag("--algo", "lora")
    if algo == "lora":
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, use_dora=dora))
    else:
        # LyCORIS' own modules (lycoris-lora), as its kohya network applies them.
        from lycoris.modules.loha import LohaModule
        from lycoris.modules.lokr import LokrModule
        make = {"loha": LohaModule, "lokr": LokrModule}[algo]
        unet.lycoris_modules = torch.nn.ModuleList()
        for name, module in list(unet.named_modules()):
            if name.endswith(tuple(f".{t}" for t in targets)):
                lyco = make("lora_unet_" + name.replace(".", "_"), module, 1.0, lora_dim=4, alpha=4)
                lyco.apply_to()
                unet.lycoris_modules.append(lyco)
    checkpointing = "--gradient-checkpointing" in args
    if checkpointing:
        unet.enable_gradient_checkpointing()
    # LoRA weights in f32 over the half-precision base, as ours (peft's autocast_adapter_dtype).
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = unet.config
    sample = torch.randn(b, c.in_channels, s, s, device=device, dtype=dtype)
    context = torch.randn(b, 77, c.cross_attention_dim, device=device, dtype=dtype)
    timesteps = torch.full((b,), 500.0, device=device)
    # SDXL: a pooled embedding and fixed size ids (those of a 256² image whatever the latents: the
    # values do not change the cost; ours uses the same).
    added = None
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * b, device=device)}
    target = torch.randn(b, c.out_channels, s, s, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    forward_times = []
    # CUDA: the most memory allocated at the end of a timed training forward pass, and before the
    # timed steps (weights, optimizer state): their difference is what the backward pass is left.
    allocated = {"after_forward": 0.0, "before": 0.0}

    def step():
        if train:
            unet.train()
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = unet(sample, timesteps, context, added_cond_kwargs=added).sample
            sync()
            forward_times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                mib = torch.cuda.memory_allocated() / 2**20
                allocated["after_forward"] = max(allocated["after_forward"], mib)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            unet.eval()
            with torch.no_grad():
                unet(sample, timesteps, context, added_cond_kwargs=added).sample.sum().item()

    step()
    forward_times.clear()
    if device.type == "cuda":
        allocated["before"] = torch.cuda.memory_allocated() / 2**20
        allocated["after_forward"] = 0.0
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    saved = None
    if train and "--saved-tensors" in args:
        def forward():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return unet(sample, timesteps, context, added_cond_kwargs=added).sample
        saved = saved_tensors_mib(forward, unet.parameters())
    print(json.dumps({
        "case": case,
        "impl": f"diffusers {__import__('diffusers').__version__} + "
                + ("peft" if algo == "lora" else f"lycoris-lora {__import__('importlib.metadata').metadata.version('lycoris-lora')}")
                + f" (torch {torch.__version__})",
        "device": f"cpu, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device),
        "dtype": {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype],
        "batch": b,
        **({"gradient_checkpointing": True} if checkpointing else {}),
        **({"targets": preset} if preset != "attn2" else {}),
        **({"dora": True} if dora else {}),
        **({"algo": algo} if algo != "lora" else {}),
        **({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if device.type == "cuda" else {}),
        **({"gpu_allocated_before_mib": allocated["before"],
            "gpu_allocated_after_forward_mib": allocated["after_forward"]}
           if device.type == "cuda" and train else {}),
        "iters": iters,
        "mean_s": sum(times) / len(times),
        "min_s": min(times),
        **({"forward_mean_s": sum(forward_times) / len(forward_times)} if train else {}),
        "peak_rss_mib": peak_rss_mib(),
        **({"saved_tensors_mib": saved} if saved is not None else {}),
    }, sort_keys=True))


if __name__ == "__main__":
    main()
