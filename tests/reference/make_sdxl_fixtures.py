#!/usr/bin/env python3
"""Reference fixtures for SDXL: a tiny random StableDiffusionXLPipeline and what diffusers computes
with it.

The pipeline has the SDXL architecture at toy sizes: a UNet with a plain first down block,
`transformer_layers_per_block` > 1, linear projections and the `text_time` added conditioning
(pooled text embedding + six micro-conditioning ids); CLIPTextModel (quick-GELU) and
CLIPTextModelWithProjection (exact GELU, pads with "!") whose penultimate hidden states are
concatenated; a VAE with SDXL's scaling factor; SDXL's Euler scheduler config. Latents are not
square. Weights are rounded to and stored in half precision; the tokenizer folders keep only their
config files (the vocabulary is OpenAI CLIP's, which the toolkit embeds).

Recorded in tests/fixtures/sdxl-tiny/expected.safetensors (all values from diffusers/peft/transformers):
- unet_out: UNet forward with added conditioning;
- grad_*: gradients of a PEFT LoRA on every transformer Linear of the UNet and of the pooled text
  embedding, for a squared-error loss;
- prompt_embeds / pooled_prompt_embeds (and their negatives, empty and non-empty) from
  `StableDiffusionXLPipeline.encode_prompt`, with both tokenizers' ids;
- pipeline_*: the whole StableDiffusionXLPipeline (Euler, CFG) from given latents, with no negative
  prompt (zeros) and with one: final latents and images; with the PEFT adapter loaded by
  `load_lora_weights`; and with a kohya SDXL adapter (adapter_kohya.safetensors: LDM UNet names,
  lora_te1_ / lora_te2_ text-encoder modules, written here) that diffusers' loader injects
  completely, with the prompt embeddings it gives.

Usage: python tests/reference/make_sdxl_fixtures.py [--out tests/fixtures]
"""

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from make_fixtures import (  # noqa: E402
    EXPECTED_SKS_IDS,
    build_tokenizer,
    check_injected,
    fix_text_encoder_keys,
    log,
    perturb_,
    save_peft_adapter,
    versions,
)

SEED = 20261204
REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "sdxl-tiny"
PROMPTS = ["a red circle on a white background", "a photo of sks dog"]
NEGATIVES = ["blurry", "a dark photo"]
TE1 = dict(hidden=16, layers=3, act="quick_gelu")
TE2 = dict(hidden=24, layers=3, act="gelu", projection=20)
TIME_DIM = 8
# The pipeline case: (height, width) in pixels, Euler steps, guidance scale.
PIPELINE_SIZE = (16, 24)
PIPELINE_STEPS = 3
PIPELINE_GUIDANCE = 5.0
LORA_SCALE = 0.8


def text_config(t, pad_token_id):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=t["hidden"],
        intermediate_size=32,
        num_hidden_layers=t["layers"],
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=t["act"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        projection_dim=t.get("projection", t["hidden"]),
    )


def build_pipeline(tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer) -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TE1["hidden"] + TE2["hidden"],
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TE2["projection"] + 6 * TIME_DIM,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    perturb_(unet)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    perturb_(vae)
    te = CLIPTextModel(text_config(TE1, 49407))
    te2 = CLIPTextModelWithProjection(text_config(TE2, 0))
    perturb_(te)
    perturb_(te2)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )
    for m in (unet, vae, te, te2):
        m.eval()
        m.requires_grad_(False)
        # The weights are stored in half precision to keep the fixture small; every reference value is
        # computed in f32 from the rounded weights, so loading the f16 files into f32 is exact.
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def transformer_linears(unet):
    """Every Linear inside the Transformer2DModels (the attn-mlp preset; SDXL projects linearly)."""
    names = [f"{tname}.{cname}" for tname, tmod in unet.named_modules() if isinstance(tmod, Transformer2DModel)
             for cname, cmod in tmod.named_modules() if isinstance(cmod, torch.nn.Linear)]
    assert any(".transformer_blocks.1." in n for n in names) and any(n.endswith("proj_in") for n in names)
    return names


def sdxl_ldm_path(path: str) -> str:
    """The single-file (SGM) name of an SDXL UNet transformer module, as kohya names SDXL LoRAs:
    two resnets per block, so each down block takes three input_blocks rows (the first is conv_in)
    and each up block three output_blocks rows."""
    parts = path.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        row = 3 * int(parts[1]) + int(parts[3]) + 1
        return ".".join(["input_blocks", str(row), "1", *parts[4:]])
    if parts[0] == "up_blocks" and parts[2] == "attentions":
        row = 3 * int(parts[1]) + int(parts[3])
        return ".".join(["output_blocks", str(row), "1", *parts[4:]])
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    raise ValueError(path)


KOHYA_RANK = 4
KOHYA_ALPHA = {"lora_unet": 2.0, "lora_te1": 4.0, "lora_te2": 3.0}


def te_lora_modules(te):
    return [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n.endswith(s) for s in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))]


def kohya_sdxl_adapter(unet_modules_of, te, te2, unet_modules):
    """Random LoRA tensors for every UNet transformer Linear (LDM names) and every attention/MLP
    Linear of both text encoders, as a kohya SDXL file has them."""
    named = {"lora_unet": dict(unet_modules_of.named_modules()), "lora_te1": dict(te.named_modules()),
             "lora_te2": dict(te2.named_modules())}
    targets = [("lora_unet", p, sdxl_ldm_path(p)) for p in unet_modules]
    for prefix, model in (("lora_te1", te), ("lora_te2", te2)):
        targets += [(prefix, p, p if p.startswith("text_model.") else f"text_model.{p}") for p in te_lora_modules(model)]
    tensors = {}
    for prefix, path, spelled in targets:
        m = named[prefix][path]
        name = f"{prefix}_{spelled.replace('.', '_')}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(KOHYA_RANK, m.in_features) / m.in_features ** 0.5
        tensors[f"{name}.lora_up.weight"] = 0.3 * torch.randn(m.out_features, KOHYA_RANK) / KOHYA_RANK ** 0.5
        tensors[f"{name}.alpha"] = torch.tensor(KOHYA_ALPHA[prefix])
    return tensors


def check_kohya_loaded(pipe, kohya):
    """Every module of the file was injected by diffusers with its weights and alpha / rank."""
    expected = {prefix: sum(1 for k in kohya if k.startswith(prefix) and k.endswith(".alpha"))
                for prefix in KOHYA_ALPHA}
    for prefix, model in (("lora_unet", pipe.unet), ("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "kohya" in m.lora_A]
        assert len(layers) == expected[prefix], (prefix, len(layers), expected[prefix])
        downs = {tuple(t.shape): None for k, t in kohya.items() if k.startswith(prefix) and "lora_down" in k}
        for m in layers:
            assert tuple(m.lora_A["kohya"].weight.shape) in downs
            assert abs(m.scaling["kohya"] - KOHYA_ALPHA[prefix] / KOHYA_RANK) < 1e-12, (prefix, m.scaling)
    # The weights themselves: diffusers holds each down matrix of the file somewhere.
    held = [m.lora_A["kohya"].weight for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
            for m in model.modules() if isinstance(m, LoraLayer) and "kohya" in m.lora_A]
    for k, t in kohya.items():
        if "lora_down" in k:
            assert any(h.shape == t.shape and torch.equal(h, t) for h in held), k


def unet_forward(unet, sample, timestep, ehs, text_embeds, time_ids):
    return unet(
        sample,
        timestep,
        encoder_hidden_states=ehs,
        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
    ).sample


def finish_tokenizer(folder: Path, tok_src: Path, pad: str):
    """A real SDXL repo's tokenizer folder: vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json; no tokenizer.json."""
    for fname in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_src / fname, folder / fname)
    if (folder / "tokenizer.json").exists():
        (folder / "tokenizer.json").unlink()
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    reloaded = CLIPTokenizer.from_pretrained(str(folder))
    assert reloaded("a photo of sks dog").input_ids == EXPECTED_SKS_IDS
    assert reloaded.pad_token == pad, reloaded.pad_token


def generate(out_root: Path):
    torch.manual_seed(SEED)
    folder = out_root / NAME
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok_src = Path(tempfile.mkdtemp(prefix="clip_tok_src_"))
    tokenizer = build_tokenizer(tok_src)
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"
    assert tokenizer_2.pad_token_id == 0

    pipe = build_pipeline(tokenizer, tokenizer_2)
    pipe.save_pretrained(folder, safe_serialization=True)
    fix_text_encoder_keys(folder / "text_encoder")
    finish_tokenizer(folder / "tokenizer", tok_src, "<|endoftext|>")
    finish_tokenizer(folder / "tokenizer_2", tok_src, "!")
    shutil.rmtree(tok_src)
    unet = pipe.unet
    exp = {}

    # -- UNet forward with added conditioning (non-square latents) -------------------
    sample = torch.randn(2, 4, 8, 12)
    timestep = torch.tensor([10.0, 737.0])
    ehs = torch.randn(2, 7, TE1["hidden"] + TE2["hidden"])
    text_embeds = torch.randn(2, TE2["projection"])
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [80.0, 120.0, 8.0, 12.0, 64.0, 96.0]])
    with torch.no_grad():
        out = unet_forward(unet, sample, timestep, ehs, text_embeds, time_ids)
    assert torch.isfinite(out).all() and 0.05 < out.std() < 10, out.std()
    exp.update(sample=sample, timestep=timestep, encoder_hidden_states=ehs, text_embeds=text_embeds,
               time_ids=time_ids, unet_out=out)
    with torch.no_grad():
        other = unet_forward(unet, sample, timestep, ehs, text_embeds, time_ids.flip(0))
    log(f"  unet_out std {out.std():.3f}; changing time ids moves it by {(other - out).abs().max():.3f}")

    # -- LoRA and pooled-embedding gradients -----------------------------------------
    u = copy.deepcopy(unet)
    modules = transformer_linears(unet)
    u.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=modules),
                  adapter_name="grad")
    check_injected(u, "grad", modules)
    with torch.no_grad():
        for n, p in u.named_parameters():
            if ".lora_B.grad." in n:
                p.copy_(0.1 * torch.randn_like(p))
    lora_params = {}
    for n, p in u.named_parameters():
        trainable = ".lora_A.grad." in n or ".lora_B.grad." in n
        p.requires_grad_(trainable)
        if trainable:
            lora_params[n] = p
    pooled = text_embeds.clone().requires_grad_(True)
    grad_target = torch.randn_like(out)
    lora_out = unet_forward(u, sample, timestep, ehs, pooled, time_ids)
    loss = ((lora_out - grad_target) ** 2).mean()
    loss.backward()
    exp.update(grad_target=grad_target, unet_out_lora_grad=lora_out.detach(), grad_loss=loss.detach().reshape(1),
               grad_text_embeds=pooled.grad.detach())
    for n, p in lora_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
        which = "lora_A" if ".lora_A.grad." in n else "lora_B"
        path = n.split(f".{which}.grad.")[0]
        exp[f"grad.{path}.{which}.weight"] = p.grad.detach()
    log(f"  grad: loss {loss.item():.5f}, {len(lora_params)} LoRA tensors, |d pooled| {pooled.grad.abs().max():.2e}")
    save_peft_adapter(u, "grad", folder / "adapter_grad_peft.safetensors")
    del u

    # -- prompt encoding ---------------------------------------------------------------
    for name, tok in (("te_input_ids", tokenizer), ("te2_input_ids", tokenizer_2)):
        exp[name] = tok(PROMPTS, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(torch.int64)
    assert (exp["te2_input_ids"] == 0).any() and not (exp["te_input_ids"] == 0).any()
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True)
        assert torch.count_nonzero(npe) == 0 and torch.count_nonzero(nppe) == 0
        _, npe2, _, nppe2 = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
    exp.update(prompt_embeds=pe, pooled_prompt_embeds=ppe, negative_prompt_embeds=npe2,
               negative_pooled_prompt_embeds=nppe2)
    log(f"  prompt_embeds {tuple(pe.shape)}, pooled {tuple(ppe.shape)}")

    # -- the whole pipeline: Euler, guidance 5, two images, from given latents --------
    init_latents = torch.randn(2, 4, PIPELINE_SIZE[0] // 2, PIPELINE_SIZE[1] // 2)
    exp["pipeline_init_latents"] = init_latents
    for case, negative in (("pipeline", None), ("pipeline_negative", NEGATIVES[0])):
        common = dict(prompt=PROMPTS[0], negative_prompt=negative, height=PIPELINE_SIZE[0],
                      width=PIPELINE_SIZE[1], num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                      num_images_per_prompt=2)
        with torch.no_grad():
            latents = pipe(**common, latents=init_latents.clone(), output_type="latent").images
            images = pipe(**common, latents=init_latents.clone(), output_type="pt").images
        assert torch.isfinite(latents).all() and torch.isfinite(images).all()
        exp[f"{case}_latents"] = latents
        exp[f"{case}_images"] = images
        log(f"  {case}: latents std {latents.std():.3f}, images in [{images.min():.3f}, {images.max():.3f}]")
    assert (exp["pipeline_latents"] - exp["pipeline_negative_latents"]).abs().max() > 1e-3

    # -- the PEFT UNet adapter through diffusers' SDXL loader, at scale 0.8 ---------------
    pipe.load_lora_weights(str(folder), weight_name="adapter_grad_peft.safetensors", adapter_name="grad")
    pipe.set_adapters(["grad"], adapter_weights=[LORA_SCALE])
    check_injected(pipe.unet, "grad", modules)
    common = dict(prompt=PROMPTS[0], height=PIPELINE_SIZE[0], width=PIPELINE_SIZE[1],
                  num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE, num_images_per_prompt=2)
    with torch.no_grad():
        exp["pipeline_lora_latents"] = pipe(**common, latents=init_latents.clone(), output_type="latent").images
    effect = (exp["pipeline_lora_latents"] - exp["pipeline_latents"]).abs().max()
    assert effect > 1e-2, effect
    log(f"  pipeline_lora: the adapter moves the latents by {effect:.3f}")
    pipe.unload_lora_weights()

    # -- a kohya SDXL adapter (LDM UNet names, lora_te1_ / lora_te2_) through diffusers' loader -----
    kohya = kohya_sdxl_adapter(unet, pipe.text_encoder, pipe.text_encoder_2, modules)
    kohya_path = folder / "adapter_kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(kohya_path),
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    pipe.load_lora_weights(str(folder), weight_name=kohya_path.name, adapter_name="kohya")
    check_kohya_loaded(pipe, kohya)
    with torch.no_grad():
        exp["pipeline_kohya_latents"] = pipe(**common, latents=init_latents.clone(), output_type="latent").images
        kohya_pe, _, kohya_ppe, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
    exp["kohya_prompt_embeds"], exp["kohya_pooled_prompt_embeds"] = kohya_pe, kohya_ppe
    effect = (exp["pipeline_kohya_latents"] - exp["pipeline_latents"]).abs().max()
    te_effect = (kohya_pe - exp["prompt_embeds"]).abs().max()
    assert effect > 1e-2 and te_effect > 1e-2, (effect, te_effect)
    log(f"  pipeline_kohya: moves the latents by {effect:.3f}, the prompt embeddings by {te_effect:.3f}")
    pipe.unload_lora_weights()

    out = {k: (v if k.endswith("input_ids") else v.float()).detach().contiguous() for k, v in exp.items()}
    save_file(out, str(folder / "expected.safetensors"), metadata={"format": "pt"})
    meta = {
        "config": NAME,
        "seed": SEED,
        "versions": versions(),
        "prompts": PROMPTS,
        "negative_prompts": NEGATIVES,
        "pipeline": {"prompt": PROMPTS[0], "negative_prompt": [None, NEGATIVES[0]], "height": PIPELINE_SIZE[0],
                     "width": PIPELINE_SIZE[1], "steps": PIPELINE_STEPS, "guidance": PIPELINE_GUIDANCE,
                     "num_images_per_prompt": 2, "scheduler": "EulerDiscreteScheduler (the folder's)",
                     "outputs": "pipeline*_latents: output_type='latent'; pipeline*_images: output_type='pt' (in [0, 1])",
                     "lora": f"pipeline_lora_latents: adapter_grad_peft.safetensors through load_lora_weights at {LORA_SCALE}, "
                             "no negative prompt",
                     "kohya": "pipeline_kohya_latents, kohya_(pooled_)prompt_embeds: adapter_kohya.safetensors at 1.0 "
                              f"(rank {KOHYA_RANK}, alphas {KOHYA_ALPHA})"},
        "adapters": {"grad": {"preset": "attn-mlp", "r": 4, "lora_alpha": 8,
                              "loss": "((unet_out - grad_target)**2).mean()",
                              "also": "grad_text_embeds: d loss / d text_embeds"}},
        "notes": [
            "prompt_embeds etc. from StableDiffusionXLPipeline.encode_prompt (force_zeros_for_empty_prompt: "
            "the negatives for no negative prompt are zeros); negative_* with negative_prompt=negative_prompts",
            "time_ids rows: original (h, w), crop (top, left), target (h, w)",
        ],
        "expected_keys": {k: list(v.shape) for k, v in sorted(out.items())},
    }
    (folder / "expected_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def store_half(folder: Path):
    for path in folder.glob("*/*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        assert all(torch.equal(t.half().float(), t) for t in tensors.values()), path
        save_file({k: t.half().contiguous() for k, t in tensors.items()}, str(path), metadata=meta)


def strip_vocabulary(folder: Path):
    """The tokenizer folders keep their config files only: vocab.json and merges.txt (1.5 MB each
    copy) are OpenAI CLIP's, which the toolkit embeds; `verify` has already run on the full folders."""
    for sub in ("tokenizer", "tokenizer_2"):
        for fname in ("vocab.json", "merges.txt"):
            (folder / sub / fname).unlink()


def verify(folder: Path):
    exp = load_file(str(folder / "expected.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        u = unet_forward(pipe.unet, exp["sample"], exp["timestep"], exp["encoder_hidden_states"],
                         exp["text_embeds"], exp["time_ids"])
        pe, _, ppe, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True)
    du = (u - exp["unet_out"]).abs().max().item()
    dp = (pe - exp["prompt_embeds"]).abs().max().item()
    dq = (ppe - exp["pooled_prompt_embeds"]).abs().max().item()
    log(f"  verify: unet {du:.2e}, prompt_embeds {dp:.2e}, pooled {dq:.2e}")
    assert du <= 1e-6 and dp <= 1e-6 and dq <= 1e-6, (du, dp, dq)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    folder = generate(Path(args.out))
    store_half(folder)
    verify(folder)
    strip_vocabulary(folder)
    total = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:>10}  {p.relative_to(folder)}")
    log(f"  total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
