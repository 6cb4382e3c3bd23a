#!/usr/bin/env python3
"""A single-file SDXL checkpoint of the tiny fixture model, in the original Stability (SGM) layout.

Writes tests/fixtures/sdxl-tiny/model_ldm.safetensors: the diffusers folder tests/fixtures/sdxl-tiny
(make_sdxl_fixtures.py) converted by this script's own diffusers→SGM mapping, laid out like
sd_xl_base_1.0.safetensors:
- `model.diffusion_model.`: the UNet (LDM numbering as in make_merge_fixtures.unet_to_ldm, plus
  SDXL's added conditioning `add_embedding.linear_{1,2}` → `label_emb.0.{0,2}`);
- `first_stage_model.`: the VAE (make_merge_fixtures.vae_to_ldm);
- `conditioner.embedders.0.transformer.text_model.`: the first text encoder (CLIP ViT-L layout,
  transformers names), with the int64 `embeddings.position_ids` real files carry;
- `conditioner.embedders.1.model.`: the second text encoder in OpenCLIP names (ViT-bigG layout;
  q/k/v stacked into `attn.in_proj_*`), its `text_projection` stored as OpenCLIP does,
  [width, projection_dim] (the transpose of transformers' `text_projection.weight`), and a scalar
  `logit_scale` that real files carry and a loader must ignore.
Every float tensor is stored in fp16 (the folder's weights are fp16 already, so values are identical).

Verified with diffusers (which only reads the file here, it does not build it):
`StableDiffusionXLPipeline.from_single_file(file, config=<folder>)` must give, for unet, vae,
text_encoder and text_encoder_2, exactly the folder's key set (position_ids aside) and every tensor
equal to the folder's; and a copy of the file with one tensor per component changed must load with
those changes (from_single_file(config=folder) silently takes a component it does not recognise in
the file from the folder). The script also prints what `infer_diffusers_model_type` makes of the file
(not `xl_base` here: its marker key is resblock 9 and the tiny second encoder has 3 layers).

Usage (from the repository root, offline): python tests/reference/make_sdxl_single_file.py
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import infer_diffusers_model_type  # noqa: E402

from make_merge_fixtures import open_clip_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FOLDER = REPO_ROOT / "tests" / "fixtures" / "sdxl-tiny"
OUT = FOLDER / "model_ldm.safetensors"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."
# OpenCLIP's logit_scale is ln(1/0.07) at initialisation, ln(100) once trained (sd_xl_base_1.0's value).
LOGIT_SCALE = 4.6052
SECTIONS = [UNET, VAE, TE1, TE2]
COMPONENTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}
# SDXL's added conditioning (text_time): an MLP the original code calls label_emb.0.
ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def log(*a):
    print(*a, flush=True)


def config(sub: str) -> dict:
    return json.loads((FOLDER / sub / "config.json").read_text())


def with_text_model(sd: dict) -> dict:
    """transformers 5 may save CLIPTextModel without the `text_model.` level; real files have it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}


def sdxl_unet_to_ldm(sd: dict, layers: int) -> dict:
    """unet_to_ldm, plus SDXL's add_embedding (which unet_to_ldm does not know)."""
    out = {}
    rest = {}
    for key, v in sd.items():
        prefix = next((d for d in ADD_EMBEDDING if key.startswith(d)), None)
        if prefix is None:
            rest[key] = v
        else:
            out[UNET + ADD_EMBEDDING[prefix] + key[len(prefix):]] = v
    assert len(out) == 4, sorted(out)
    return {**unet_to_ldm(rest, layers), **out}


def clip_l_to_sgm(sd: dict) -> dict:
    out = {TE1 + k: v for k, v in with_text_model(sd).items()}
    n = out[TE1 + "text_model.embeddings.position_embedding.weight"].shape[0]
    out[TE1 + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out


def open_clip_g_to_sgm(sd: dict, layers: int) -> dict:
    """open_clip_to_ldm (SD2's `cond_stage_model.model.` names) moved to embedders.1, plus the
    projection, stored [width, projection_dim] as OpenCLIP computes `x @ text_projection`."""
    sd = with_text_model(sd)
    projection = sd.pop("text_projection.weight")
    old = "cond_stage_model.model."
    out = {TE2 + k[len(old):]: v for k, v in open_clip_to_ldm(sd, layers).items()}
    out[TE2 + "text_projection"] = projection.t()
    out[TE2 + "logit_scale"] = torch.tensor(LOGIT_SCALE)
    return out


def build_single_file() -> dict:
    weights = {c: load_file(str(FOLDER / f)) for c, f in COMPONENTS.items()}
    ckpt = {
        **sdxl_unet_to_ldm(weights["unet"], config("unet")["layers_per_block"]),
        **vae_to_ldm(weights["vae"], len(config("vae")["up_block_types"])),
        **clip_l_to_sgm(weights["text_encoder"]),
        **open_clip_g_to_sgm(weights["text_encoder_2"], config("text_encoder_2")["num_hidden_layers"]),
    }
    n_in = sum(len(w) for w in weights.values())
    n_te2_layers = config("text_encoder_2")["num_hidden_layers"]
    # +1 position_ids, +1 logit_scale, −4 per OpenCLIP layer (q/k/v weight and bias become 2).
    assert len(ckpt) == n_in + 2 - 4 * n_te2_layers, (len(ckpt), n_in)
    out = {}
    for k, v in ckpt.items():
        out[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    return out


def section_counts(keys) -> dict:
    counts = {s: sum(k.startswith(s) for k in keys) for s in SECTIONS}
    assert sum(counts.values()) == len(keys), "a key outside the four sections"
    return counts


def plain(key: str) -> str:
    """Drop the `text_model.` level, which transformers 5 keeps for CLIPTextModelWithProjection and
    drops for CLIPTextModel."""
    return key.removeprefix("text_model.")


def load_single_file(path: Path) -> StableDiffusionXLPipeline:
    # The tokenizer folders hold no vocabulary, and the weights need no tokenizer.
    return StableDiffusionXLPipeline.from_single_file(
        str(path),
        config=str(FOLDER),
        local_files_only=True,
        torch_dtype=torch.float16,
        tokenizer=None,
        tokenizer_2=None,
    )


def verify_with_diffusers(path: Path):
    pipe = load_single_file(path)
    for comp, fname in COMPONENTS.items():
        want = {plain(k): v for k, v in load_file(str(FOLDER / fname)).items() if not k.endswith("position_ids")}
        got = {plain(k): v for k, v in getattr(pipe, comp).state_dict().items() if not k.endswith("position_ids")}
        diff = set(want) ^ set(got)
        assert not diff, (comp, sorted(diff)[:8])
        for k, v in want.items():
            g = got[k]
            assert g.device.type != "meta", (comp, k, "not loaded")
            assert g.dtype == torch.float16, (comp, k, g.dtype)
            assert torch.equal(g.reshape(v.shape).float(), v.float()), (comp, k)
            assert g.shape == v.shape, (comp, k, g.shape, v.shape)
        log(f"  {comp}: from_single_file gives all {len(want)} tensors, equal to the folder's")


# One tensor per component, (file key, component, diffusers key): changed in a copy of the file, each
# must change in what diffusers loads.
TAMPER = [
    (UNET + "label_emb.0.0.weight", "unet", "add_embedding.linear_1.weight"),
    (VAE + "decoder.mid.attn_1.q.weight", "vae", "decoder.mid_block.attentions.0.to_q.weight"),
    (TE1 + "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
    (TE2 + "text_projection", "text_encoder_2", "text_projection.weight"),
]


def verify_read_from_file(ckpt: dict, tmp: Path):
    """from_single_file(config=folder) falls back to the folder's own weights for a component it does
    not find in the file; so check that a change in the file reaches every component."""
    changed = dict(ckpt)
    for key, _, _ in TAMPER:
        changed[key] = (ckpt[key].float() + 1).half().contiguous()
    save_file(changed, str(tmp), metadata={"format": "pt"})
    try:
        pipe = load_single_file(tmp)
    finally:
        tmp.unlink()
    for key, comp, name in TAMPER:
        got = getattr(pipe, comp).state_dict()[name].float()
        want = changed[key].float()
        want = want.t() if key.endswith("text_projection") else want.reshape(got.shape)
        assert torch.equal(got, want), (comp, name)
    log(f"  a change to {len(TAMPER)} tensors of the file reaches {', '.join(c for _, c, _ in TAMPER)}: read from the file")


def main():
    ckpt = build_single_file()
    save_file(ckpt, str(OUT), metadata={"format": "pt"})
    log(f"wrote {OUT.relative_to(REPO_ROOT)}: {OUT.stat().st_size} bytes, {len(ckpt)} tensors")
    for section, n in section_counts(ckpt).items():
        log(f"  {n:>4}  {section}")
    for k in sorted(ckpt):
        if "label_emb" in k or k.endswith(("text_projection", "logit_scale", "position_ids")):
            log(f"  {k} {tuple(ckpt[k].shape)} {ckpt[k].dtype}")
    verify_with_diffusers(OUT)
    verify_read_from_file(ckpt, OUT.with_name("model_ldm_tampered.safetensors"))
    log(f"infer_diffusers_model_type: {infer_diffusers_model_type(load_file(str(OUT)))}")


if __name__ == "__main__":
    main()
