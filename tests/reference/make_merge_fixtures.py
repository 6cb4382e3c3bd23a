#!/usr/bin/env python3
"""Reference fixtures for lora-merge, written to tests/fixtures/<cfg>/merge/.

Needs the fixture models of make_fixtures.py. For each of sd1-tiny and sd2-tiny:

1. `expected_kohya.safetensors`: diffusers `load_lora_weights(adapter_kohya)` +
   `fuse_lora(lora_scale=KOHYA_SCALE)` on the diffusers folder (UNet and text encoder).
2. `expected_two.safetensors`: adapters two_a and two_b (PEFT files), `set_adapters([a, b],
   TWO_WEIGHTS)` then `fuse_lora()`.
3. `model_ldm.safetensors` (sd2-tiny only, see LDM_CONFIGS): a single-file (original LDM layout) checkpoint of the same model,
   built by this script's own diffusers→LDM conversion, stored in fp16 to keep it small, and
   verified by loading it back with diffusers' `from_single_file` (every tensor must equal the
   folder's tensor rounded to fp16).
4. `expected_ldm_kohya.safetensors` (sd2-tiny only): the pipeline diffusers loaded from that single file, with
   the kohya adapter fused at KOHYA_SCALE in fp32.

5. `singular_values_kohya.safetensors`: torch.linalg.svdvals of each kohya module's ΔW.

6. (sd1-tiny only; `--lycoris` runs just this part) LyCORIS-style adapters written by this
   script with seeded random factors, and the merged weights of the tensors they touch:
   - `adapter_locon.safetensors` (kohya `conv_dim` LoCon: 3×3 resnet/sampler convs, 1×1
     `conv_shortcut`, `time_emb_proj`, one attention Linear) and `expected_locon.safetensors`:
     diffusers `load_lora_weights` + `fuse_lora(lora_scale=LOCON_SCALE)`, cross-checked against
     the plain-torch formula ΔW = alpha/r · (up.flatten(1) @ down.flatten(1)).reshape(W).
   - `adapter_loha.safetensors` / `expected_loha.safetensors` (weight LOHA_WEIGHT) and
     `adapter_lokr.safetensors` / `expected_lokr.safetensors` (weight LOKR_WEIGHT): ΔW from
     the reference implementation, `lycoris.functional.loha.diff_weight` /
     `lycoris.functional.lokr.diff_weight` (pip package lycoris-lora), W + weight · ΔW in f32.

Expected files hold only the tensors fusing changed (keys `unet.<name>` / `text_encoder.<name>`,
diffusers names), so they stay small. Run from the repository root:

    /work/pyref/bin/python tests/reference/make_merge_fixtures.py
"""

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = ["sd1-tiny", "sd2-tiny"]
# The single-file checkpoint is ~4.5 MB (the 49408-token embedding), so only the SD2 model, whose
# mapping is the harder one (OpenCLIP stacked q/k/v, 2-D proj_in, two layers per block), gets one.
LDM_CONFIGS = ["sd2-tiny"]
KOHYA_SCALE = 0.8
LOCON_SCALE = 0.8
LOHA_WEIGHT = 1.0
LOKR_WEIGHT = 0.5
TWO_WEIGHTS = [0.5, 0.7]


def log(*a):
    print(*a, flush=True)


def load_pipeline(folder: Path) -> StableDiffusionPipeline:
    """The fixture model in fp32 (the sd2 folder has no tokenizer; fusing needs none)."""
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def snapshot(pipe) -> dict:
    return {
        **{f"unet.{k}": v.detach().clone() for k, v in pipe.unet.state_dict().items()},
        **{f"text_encoder.{k}": v.detach().clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


def fused_changes(pipe, before: dict) -> dict:
    """The fused weights that differ from `before`, under their diffusers names. PEFT wraps
    adapted layers (`…to_q.base_layer.weight`); fusing keeps the wrapper, so strip that level."""
    after = {}
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for k, v in model.state_dict().items():
            if "lora_" in k:
                continue
            name = f"{comp}.{k.replace('.base_layer.', '.')}"
            after[name] = v.detach().float().clone()
    changed = {k: v.contiguous() for k, v in after.items() if not torch.equal(v, before[k].float())}
    assert changed, "fusing changed nothing"
    return changed


def fuse_kohya(pipe, folder: Path) -> dict:
    before = snapshot(pipe)
    pipe.load_lora_weights(str(folder), weight_name="adapter_kohya.safetensors", adapter_name="kohya")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=KOHYA_SCALE)
    changed = fused_changes(pipe, before)
    n_te = sum(k.startswith("text_encoder.") for k in changed)
    log(f"    kohya fused: {len(changed) - n_te} UNet + {n_te} text-encoder tensors changed")
    assert n_te > 0
    return changed


def fuse_two(pipe, folder: Path) -> dict:
    before = snapshot(pipe)
    for name in ("a", "b"):
        pipe.load_lora_weights(str(folder), weight_name=f"adapter_two_{name}_peft.safetensors", adapter_name=name)
    pipe.set_adapters(["a", "b"], TWO_WEIGHTS)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["a", "b"])
    changed = fused_changes(pipe, before)
    log(f"    two adapters fused: {len(changed)} tensors changed")
    return changed


def kohya_singular_values(folder: Path) -> dict:
    """Singular values (descending, float64) of every module's ΔW = alpha/rank · up·down in
    adapter_kohya, keyed by the kohya module name: the reference for resize and svd."""
    sd = load_file(folder / "adapter_kohya.safetensors")
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down = sd[key].double().flatten(1)
        up = sd[f"{name}.lora_up.weight"].double().flatten(1)
        scale = sd[f"{name}.alpha"].double() / down.shape[0]
        out[name] = torch.linalg.svdvals(scale * up @ down).contiguous()
    return out


# ----------------------------------------------------------------------------
# Our own diffusers -> LDM conversion (verified below by diffusers' single-file loader)
# ----------------------------------------------------------------------------

RESNET_RENAMES = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def resnet_rest(rest: str) -> str:
    for d, l in RESNET_RENAMES:
        if rest.startswith(d + "."):
            return l + rest[len(d):]
    return rest


def unet_to_ldm(sd: dict, layers: int) -> dict:
    per = layers + 1
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    top = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    out = {}
    for key, v in sd.items():
        new = None
        for d, l in top.items():
            if key.startswith(d):
                new = l + key[len(d):]
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{resnet_rest(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{resnet_rest(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            i = int(m[1])
            new = f"output_blocks.{i * per + layers}.{2 if i in up_has_attn else 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{resnet_rest(m[2])}"
        assert new is not None, key
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: dict, n_up: int) -> dict:
    out = {}
    for key, v in sd.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", new)
        attn = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", new)
        if attn:
            part, rest = attn[1], attn[2]
            for d, l in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                if rest.startswith(d):
                    rest = l + rest[len(d):]
            new = f"{part}.mid.attn_1.{rest}"
            # LDM's VAE attention projections are 1×1 convolutions.
            if v.ndim == 2:
                v = v[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        out["first_stage_model." + new] = v
    return out


def clip_to_ldm(sd: dict) -> dict:
    """SD1: the transformers CLIPTextModel under `cond_stage_model.transformer.`."""
    return {"cond_stage_model.transformer." + k: v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, layers: int) -> dict:
    """SD2: OpenCLIP names, q/k/v stacked into in_proj_weight/in_proj_bias."""
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    for n in range(layers):
        d, l = f"text_model.encoder.layers.{n}.", f"{p}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[l + f"attn.in_proj_{kind}"] = torch.cat([sd[d + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for dn, ln in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[l + f"{ln}.{kind}"] = sd[d + f"{dn}.{kind}"]
    unused = {k for k in sd if k != "text_model.embeddings.position_ids"} - {
        k for k in sd if k.startswith("text_model.encoder.layers.") or k.startswith("text_model.embeddings.")
        or k.startswith("text_model.final_layer_norm.")
    }
    assert not unused, unused
    return out


def build_ldm(folder: Path, is_sd2: bool) -> dict:
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    te_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    te = load_file(folder / "text_encoder" / "model.safetensors")
    te = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in te.items()}
    ckpt = {
        **unet_to_ldm(unet, unet_cfg["layers_per_block"]),
        **vae_to_ldm(vae, len(vae_cfg["up_block_types"])),
        **(open_clip_to_ldm(te, te_cfg["num_hidden_layers"]) if is_sd2 else clip_to_ldm(te)),
    }
    return {k: v.to(torch.float16).contiguous() for k, v in ckpt.items()}


def verify_with_diffusers(path: Path, folder: Path, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(folder),
        local_files_only=True,
        torch_dtype=torch.float32,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference = load_pipeline(folder)
    n = 0
    for comp in ("unet", "vae", "text_encoder"):
        ours = getattr(pipe, comp).state_dict()
        theirs = getattr(reference, comp).state_dict()
        missing = set(theirs) ^ set(ours)
        assert not missing, (comp, sorted(missing)[:5])
        for k, v in theirs.items():
            if k.endswith("position_ids"):
                continue
            want = v.to(torch.float16).float()
            assert ours[k].shape == want.shape, (comp, k, ours[k].shape, want.shape)
            assert torch.equal(ours[k].float(), want), (comp, k)
            n += 1
    log(f"    from_single_file reproduces all {n} tensors (fp16-rounded)")
    return pipe


# ----------------------------------------------------------------------------
# LyCORIS-style adapters (LoCon, LoHa, LoKr) for sd1-tiny
# ----------------------------------------------------------------------------

LOCON_MODULES = [
    # (UNet module, rank, alpha)
    ("down_blocks.0.resnets.0.conv1", 4, 2.0),
    ("down_blocks.1.resnets.0.conv2", 2, 1.0),
    ("down_blocks.1.resnets.0.time_emb_proj", 4, 4.0),
    ("down_blocks.1.resnets.0.conv_shortcut", 2, 1.0),
    ("down_blocks.0.downsamplers.0.conv", 4, 8.0),
    ("up_blocks.1.upsamplers.0.conv", 3, 3.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 4.0),
]


def kohya_key(comp: str, module: str) -> str:
    return ("lora_unet_" if comp == "unet" else "lora_te_") + module.replace(".", "_")


def model_weights(folder: Path) -> dict:
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    te = load_file(folder / "text_encoder" / "model.safetensors")
    te = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in te.items()}
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in te.items()}}


def rand(*shape) -> torch.Tensor:
    return (torch.randn(*shape) * 0.1).float().contiguous()


def locon_fixture(folder: Path, out: Path):
    weights = model_weights(folder)
    adapter, formula = {}, {}
    for module, r, alpha in LOCON_MODULES:
        w = weights[f"unet.{module}.weight"]
        name = kohya_key("unet", module)
        kernel = tuple(w.shape[2:])
        down = rand(r, w.shape[1], *kernel)
        up = rand(w.shape[0], r, *([1, 1] if kernel else []))
        adapter[f"{name}.lora_down.weight"] = down
        adapter[f"{name}.lora_up.weight"] = up
        adapter[f"{name}.alpha"] = torch.tensor(alpha)
        delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape) * (alpha / r)
        formula[f"unet.{module}.weight"] = (w.double() + LOCON_SCALE * delta).float()
    metadata = {"ss_network_module": "networks.lora", "ss_network_args": json.dumps({"conv_dim": "4"})}
    save_file(adapter, str(out / "adapter_locon.safetensors"), metadata)

    pipe = load_pipeline(folder)
    before = snapshot(pipe)
    pipe.load_lora_weights(str(out), weight_name="adapter_locon.safetensors", adapter_name="locon")
    pipe.fuse_lora(components=["unet"], lora_scale=LOCON_SCALE)
    changed = fused_changes(pipe, before)
    assert set(changed) == set(formula), (sorted(changed), sorted(formula))
    worst = max((changed[k] - formula[k]).abs().max().item() for k in formula)
    assert worst < 1e-5, worst
    log(f"    LoCon: diffusers fuse_lora changed {len(changed)} tensors; |fuse_lora - formula| <= {worst:.1e}")
    save_file(changed, str(out / "expected_locon.safetensors"))


LOHA_MODULES = [
    # (component, module, rank, alpha)
    ("unet", "down_blocks.0.resnets.0.conv1", 3, 1.5),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2, 2.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 2, 1.0),
]


def loha_fixture(folder: Path, out: Path):
    from lycoris.functional import loha

    weights = model_weights(folder)
    adapter, expected = {}, {}
    for comp, module, r, alpha in LOHA_MODULES:
        w = weights[f"{comp}.{module}.weight"]
        name = kohya_key(comp, module)
        fan_in = w[0].numel()
        t = {
            "hada_w1_a": rand(w.shape[0], r),
            "hada_w1_b": rand(r, fan_in),
            "hada_w2_a": rand(w.shape[0], r),
            "hada_w2_b": rand(r, fan_in),
        }
        adapter.update({f"{name}.{k}": v for k, v in t.items()})
        adapter[f"{name}.alpha"] = torch.tensor(alpha)
        delta = loha.diff_weight(
            t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
            gamma=alpha / r, backend="torch",
        ).reshape(w.shape)
        expected[f"{comp}.{module}.weight"] = (w.float() + LOHA_WEIGHT * delta.float()).contiguous()
    save_file(adapter, str(out / "adapter_loha.safetensors"), {"ss_network_module": "lycoris.kohya",
                                                               "ss_network_args": json.dumps({"algo": "loha"})})
    save_file(expected, str(out / "expected_loha.safetensors"))
    log(f"    LoHa: {len(expected)} tensors (lycoris.functional.loha)")


LOKR_MODULES = [
    # (component, module, alpha, tensors as name -> shape); W = kron(W1, W2)
    # W1 full, W2 = w2_a @ w2_b (rank 2): scale alpha / 2.
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", 1.0,
     {"lokr_w1": (2, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 4)}),
    # W1 = w1_a @ w1_b (rank 2), W2 a full 3×3 kernel [8, 8, 3, 3]: scale alpha / 2.
    ("unet", "down_blocks.1.resnets.0.conv2", 3.0,
     {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2": (8, 8, 3, 3)}),
    # W2 = w2_a @ w2_b with a 3×3 w2_b [r, in/c, 3, 3]: scale alpha / 2.
    ("unet", "down_blocks.0.resnets.0.conv2", 1.0,
     {"lokr_w1": (4, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 8, 3, 3)}),
    # Both full: scale 1 whatever alpha says.
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", 7.0,
     {"lokr_w1": (2, 2), "lokr_w2": None}),
]


def lokr_fixture(folder: Path, out: Path):
    from lycoris.functional import lokr

    weights = model_weights(folder)
    adapter, expected = {}, {}
    for comp, module, alpha, shapes in LOKR_MODULES:
        w = weights[f"{comp}.{module}.weight"]
        name = kohya_key(comp, module)
        if shapes.get("lokr_w2", 0) is None:
            shapes = {**shapes, "lokr_w2": (w.shape[0] // 2, w.shape[1] // 2)}
        t = {k: rand(*v) for k, v in shapes.items()}
        adapter.update({f"{name}.{k}": v for k, v in t.items()})
        adapter[f"{name}.alpha"] = torch.tensor(alpha)
        delta = lokr.diff_weight(
            t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"),
            t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), None,
            gamma=alpha, backend="torch",
        )
        assert delta.numel() == w.numel(), (module, delta.shape, w.shape)
        expected[f"{comp}.{module}.weight"] = (w.float() + LOKR_WEIGHT * delta.reshape(w.shape).float()).contiguous()
    save_file(adapter, str(out / "adapter_lokr.safetensors"), {"ss_network_module": "lycoris.kohya",
                                                               "ss_network_args": json.dumps({"algo": "lokr"})})
    save_file(expected, str(out / "expected_lokr.safetensors"))
    log(f"    LoKr: {len(expected)} tensors (lycoris.functional.lokr)")


def lycoris_fixtures():
    torch.manual_seed(1234)
    folder = FIXTURES / "sd1-tiny"
    out = folder / "merge"
    out.mkdir(exist_ok=True)
    log("[sd1-tiny lycoris]")
    locon_fixture(folder, out)
    loha_fixture(folder, out)
    lokr_fixture(folder, out)
    import lycoris

    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "lycoris": getattr(lycoris, "__version__", "unknown"),
        "locon_scale": LOCON_SCALE,
        "loha_weight": LOHA_WEIGHT,
        "lokr_weight": LOKR_WEIGHT,
    }
    (out / "meta_lycoris.json").write_text(json.dumps(meta, indent=2) + "\n")


def main():
    if "--lycoris" in sys.argv[1:]:
        lycoris_fixtures()
        log("done")
        return
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(FIXTURES / "sd1-tiny" / "tokenizer")
    for cfg in CONFIGS:
        folder = FIXTURES / cfg
        out = folder / "merge"
        out.mkdir(exist_ok=True)
        log(f"[{cfg}]")
        save_file(fuse_kohya(load_pipeline(folder), folder), str(out / "expected_kohya.safetensors"))
        save_file(fuse_two(load_pipeline(folder), folder), str(out / "expected_two.safetensors"))

        save_file(kohya_singular_values(folder), str(out / "singular_values_kohya.safetensors"))
        if cfg in LDM_CONFIGS:
            ldm_path = out / "model_ldm.safetensors"
            save_file(build_ldm(folder, cfg == "sd2-tiny"), str(ldm_path))
            pipe = verify_with_diffusers(ldm_path, folder, tokenizer)
            save_file(fuse_kohya(pipe, folder), str(out / "expected_ldm_kohya.safetensors"))
        meta = {
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "kohya_scale": KOHYA_SCALE,
            "two_weights": TWO_WEIGHTS,
            "ldm_dtype": "float16",
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    lycoris_fixtures()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
