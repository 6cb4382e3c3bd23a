#!/usr/bin/env python3
"""Reference fixture generator for the Rust LoRA toolkit.

Builds two tiny Stable Diffusion models (SD1-like and SD2-like) with the
reference Python stack (diffusers + peft + transformers, PyTorch on CPU), saves
them in diffusers layout, and records expected outputs (UNet / text encoder /
VAE forwards, PEFT LoRA forwards, two-adapter mixing, LoRA gradients, and a
kohya-format LoRA loaded through diffusers' own converter).

Nothing in the fixtures is written by hand: every expected value comes from
running the reference libraries. Output goes to tests/fixtures/.

Usage: python tests/reference/make_fixtures.py [--out tests/fixtures]
"""

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from clip_bpe import read_merges, write_vocabulary  # noqa: E402

SEED = 20240601
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle on a white background", "a photo of sks dog"]
EXPECTED_SKS_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]
# Target range for "max |out_lora - out_base|" of a randomly initialised adapter.
EFFECT_TARGET = 0.2
EFFECT_RANGE = (0.05, 0.5)

CONFIGS = {
    "sd1-tiny": dict(
        seed_offset=0,
        unet=dict(
            layers_per_block=1,
            cross_attention_dim=24,
            attention_head_dim=2,
            use_linear_projection=False,
            upcast_attention=False,
        ),
        te=dict(hidden_size=24, hidden_act="quick_gelu", pad_token_id=49407),
        prediction_type="epsilon",
        tokenizer=True,
        te_pad_id=49407,
        kohya_meta=dict(ss_v2="False", ss_base_model_version="sd_v1"),
    ),
    "sd2-tiny": dict(
        seed_offset=1,
        unet=dict(
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            upcast_attention=True,
        ),
        te=dict(hidden_size=32, hidden_act="gelu", pad_token_id=0),
        prediction_type="v_prediction",
        tokenizer=False,
        te_pad_id=0,
        kohya_meta=dict(ss_v2="True", ss_base_model_version="sd_v2_v"),
    ),
}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------
# Tokenizer (OpenAI CLIP SimpleTokenizer vocabulary)
# ----------------------------------------------------------------------------


def build_tokenizer(tmp_dir: Path) -> CLIPTokenizer:
    size = write_vocabulary(tmp_dir, read_merges())
    assert size == 49408
    # transformers>=5 ignores CLIPTokenizer(vocab_file=..., merges_file=...) kwargs (its __init__ takes
    # `vocab`/`merges` objects); loading the folder goes through the regular vocab.json+merges.txt path.
    tok = CLIPTokenizer.from_pretrained(
        str(tmp_dir),
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids = tok("a photo of sks dog").input_ids
    assert ids == EXPECTED_SKS_IDS, ids
    return tok


def te_input_ids(tok: CLIPTokenizer, pad_id: int) -> torch.Tensor:
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(torch.int64)
    assert ids.shape == (2, 77)
    if pad_id != 49407:
        # SD2 (OpenCLIP) pads with "!" (id 0) after the first end-of-text token.
        for row in ids:
            first_eos = int((row == 49407).nonzero()[0])
            row[first_eos + 1 :] = pad_id
    return ids


# ----------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------


def perturb_(module: torch.nn.Module, std: float = 0.02):
    """Make every parameter non-trivial (incl. zero-init biases, norm weights)."""
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(std * torch.randn_like(p))


def build_models(cfg):
    c = cfg["unet"]
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=c["layers_per_block"],
        cross_attention_dim=c["cross_attention_dim"],
        attention_head_dim=c["attention_head_dim"],
        norm_num_groups=8,
        use_linear_projection=c["use_linear_projection"],
        flip_sin_to_cos=True,
        freq_shift=0,
        upcast_attention=c["upcast_attention"],
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
        scaling_factor=0.18215,
    )
    perturb_(vae)
    t = cfg["te"]
    te_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=t["hidden_size"],
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=t["hidden_act"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=t["pad_token_id"],
        projection_dim=t["hidden_size"],
    )
    te = CLIPTextModel(te_config)
    perturb_(te)
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=cfg["prediction_type"],
    )
    for m in (unet, vae, te):
        m.eval()
        m.requires_grad_(False)
    return unet, vae, te, sched


# ----------------------------------------------------------------------------
# LoRA helpers
# ----------------------------------------------------------------------------


def transformer_linear_modules(unet):
    """Full module names of every Linear / 1x1 Conv2d inside Transformer2DModel blocks."""
    names = []
    for tname, tmod in unet.named_modules():
        if not isinstance(tmod, Transformer2DModel):
            continue
        for cname, cmod in tmod.named_modules():
            if isinstance(cmod, torch.nn.Linear) or (
                isinstance(cmod, torch.nn.Conv2d) and tuple(cmod.kernel_size) == (1, 1)
            ):
                names.append(f"{tname}.{cname}")
    suffixes = {n.split(".transformer_blocks.0.")[-1] if ".transformer_blocks." in n else n.rsplit(".", 1)[-1] for n in names}
    expected = {
        "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        *(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    }
    assert suffixes == expected, suffixes
    return names


def preset_modules(unet, preset):
    allm = transformer_linear_modules(unet)
    attn_suffix = ("to_q", "to_k", "to_v", "to_out.0")
    if preset == "attn-mlp":
        return allm
    attns = ("attn2",) if preset == "attn2" else ("attn1", "attn2")
    sel = [n for n in allm if any(n.endswith(f".{a}.{s}") for a in attns for s in attn_suffix)]
    return sel


def lora_config(base_unet, preset, r, alpha):
    # Module list is taken from the adapter-free base UNet. Note: peft (>=0.14) may shrink a long explicit
    # list to a minimal equivalent suffix set (`_find_minimal_target_modules`); check_injected() verifies
    # that exactly the intended modules were adapted.
    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=preset_modules(base_unet, preset))


def check_injected(model, adapter, expected_modules):
    got = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)
    assert got == sorted(expected_modules), (adapter, set(got) ^ set(expected_modules))


def config_metadata(config: LoraConfig):
    d = config.to_dict()
    # Sets are serialised as lists by diffusers; sort them so the file is reproducible.
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    return d


def scale_lora_B_(model, adapter, factor):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{adapter}." in n:
                p.mul_(factor)


def calibrate(run, base, rescale, what):
    """Rescale an adapter's up/B weights until max|run()-base| ~ EFFECT_TARGET."""
    for _ in range(6):
        d = (run() - base).abs().max().item()
        f = EFFECT_TARGET / d
        if 0.8 < f < 1.25:
            break
        rescale(f)
    d = (run() - base).abs().max().item()
    assert EFFECT_RANGE[0] <= d <= EFFECT_RANGE[1], (what, d)
    log(f"    {what}: max|delta| = {d:.4f}")
    return d


def save_peft_adapter(unet, adapter, out_path: Path):
    sd = get_peft_model_state_dict(unet, adapter_name=adapter)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    tmp = out_path.parent / f"_tmp_lora_{adapter}"
    if tmp.exists():
        shutil.rmtree(tmp)
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=sd,
        unet_lora_adapter_metadata=config_metadata(unet.peft_config[adapter]),
        safe_serialization=True,
    )
    shutil.move(str(tmp / "pytorch_lora_weights.safetensors"), out_path)
    shutil.rmtree(tmp)
    return sd


class CaptureLogs(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


# ----------------------------------------------------------------------------
# Main per-config generation
# ----------------------------------------------------------------------------


def fix_text_encoder_keys(te_dir: Path):
    """Rewrite text_encoder/model.safetensors to the real-world `text_model.` layout."""
    path = te_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    sd = load_file(str(path))
    had_prefix = all(k.startswith("text_model.") for k in keys)
    if not had_prefix:
        sd = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous() for k, v in sd.items()}
        save_file(sd, str(path), metadata=meta or {"format": "pt"})
    return had_prefix, sorted(keys)[:3]


def unet_fwd(unet, sample, timestep, ehs):
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=ehs).sample.float()


def finish_tokenizer_folder(tdir: Path, tok_src: Path, tokenizer, quirks):
    """Make the saved tokenizer folder look like a real SD1.x `tokenizer/` folder.

    transformers>=5 save_pretrained writes only tokenizer.json + tokenizer_config.json. Real SD repos have
    vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (no tokenizer.json)."""
    written = sorted(p.name for p in tdir.iterdir())
    quirks["tokenizer save_pretrained wrote"] = written
    for fname in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_src / fname, tdir / fname)
    if not (tdir / "special_tokens_map.json").exists():
        (tdir / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2) + "\n")
    if (tdir / "tokenizer.json").exists():
        (tdir / "tokenizer.json").unlink()
    reloaded = CLIPTokenizer.from_pretrained(str(tdir))
    assert reloaded("a photo of sks dog").input_ids == EXPECTED_SKS_IDS
    assert reloaded.model_max_length == 77


def generate(name, cfg, out_root: Path, tokenizer: CLIPTokenizer, tok_src: Path, quirks: dict):
    log(f"== {name}")
    seed = SEED + cfg["seed_offset"]
    torch.manual_seed(seed)
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    unet, vae, te, sched = build_models(cfg)
    cross_dim = cfg["unet"]["cross_attention_dim"]

    # -- save the pipeline folder ------------------------------------------------
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer if cfg["tokenizer"] else None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    had_prefix, sample_keys = fix_text_encoder_keys(folder / "text_encoder")
    quirks[f"{name}: text_encoder keys as saved by transformers"] = (
        f"{'with' if had_prefix else 'WITHOUT'} 'text_model.' prefix, e.g. {sample_keys}"
        + ("" if had_prefix else " -> rewritten with 'text_model.' prefix")
    )
    if cfg["tokenizer"]:
        finish_tokenizer_folder(folder / "tokenizer", tok_src, tokenizer, quirks)
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        assert (folder / sub).is_dir(), sub

    # -- inputs -----------------------------------------------------------------
    exp = {}
    sample = torch.randn(2, 4, 16, 16)
    timestep = torch.tensor([10.0, 737.0], dtype=torch.float32)
    ehs = torch.randn(2, 7, cross_dim)
    exp["sample"], exp["timestep"], exp["encoder_hidden_states"] = sample, timestep, ehs

    base = unet_fwd(unet, sample, timestep, ehs)
    assert torch.isfinite(base).all()
    log(f"  unet_out: std {base.std():.3f} max {base.abs().max():.3f}")
    assert 0.05 < base.std() < 10, base.std()
    exp["unet_out"] = base

    # -- text encoder / VAE ---------------------------------------------------------
    ids = te_input_ids(tokenizer, cfg["te_pad_id"])
    exp["te_input_ids"] = ids
    with torch.no_grad():
        te_out = te(input_ids=ids).last_hidden_state.float()
    assert torch.isfinite(te_out).all()
    exp["te_out"] = te_out
    vae_latents = torch.randn(1, 4, 8, 8)
    vae_image = (torch.rand(1, 3, 16, 16) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        exp["vae_decoded"] = vae.decode(vae_latents).sample.float()
        exp["vae_latent_mean"] = vae.encode(vae_image).latent_dist.mean.float()
    exp["vae_latents"], exp["vae_image"] = vae_latents, vae_image
    assert exp["vae_decoded"].shape == (1, 3, 16, 16) and exp["vae_latent_mean"].shape == (1, 4, 8, 8)

    # -- single-adapter presets ---------------------------------------------------
    for preset in ("attn2", "attn", "attn-mlp"):
        u = copy.deepcopy(unet)
        cfg_l = lora_config(unet, preset, r=4, alpha=8)
        u.add_adapter(cfg_l, adapter_name=preset)
        check_injected(u, preset, preset_modules(unet, preset))
        calibrate(
            lambda: unet_fwd(u, sample, timestep, ehs), base,
            lambda f: scale_lora_B_(u, preset, f), f"lora {preset}",
        )
        exp[f"unet_out_lora_{preset}"] = unet_fwd(u, sample, timestep, ehs)
        sd = save_peft_adapter(u, preset, folder / f"adapter_{preset}_peft.safetensors")
        log(f"    adapter_{preset}_peft: {len(sd)} tensors, target_modules in config: {sorted(cfg_l.target_modules)}")
        del u

    # -- two adapters at once -----------------------------------------------------
    u = copy.deepcopy(unet)
    u.add_adapter(lora_config(unet, "attn2", r=4, alpha=4), adapter_name="a")
    check_injected(u, "a", preset_modules(unet, "attn2"))
    calibrate(lambda: unet_fwd(u, sample, timestep, ehs), base, lambda f: scale_lora_B_(u, "a", f), "two/a")
    u.add_adapter(lora_config(unet, "attn", r=2, alpha=1), adapter_name="b")
    check_injected(u, "b", preset_modules(unet, "attn"))
    u.set_adapters(["b"])
    calibrate(lambda: unet_fwd(u, sample, timestep, ehs), base, lambda f: scale_lora_B_(u, "b", f), "two/b")
    u.set_adapters(["a", "b"], [0.5, 0.7])
    exp["unet_out_two"] = unet_fwd(u, sample, timestep, ehs)
    log(f"    two: max|delta| = {(exp['unet_out_two'] - base).abs().max():.4f}")
    save_peft_adapter(u, "a", folder / "adapter_two_a_peft.safetensors")
    save_peft_adapter(u, "b", folder / "adapter_two_b_peft.safetensors")
    del u

    # -- gradients ----------------------------------------------------------------
    u = copy.deepcopy(unet)
    u.add_adapter(lora_config(unet, "attn-mlp", r=4, alpha=8), adapter_name="grad")
    check_injected(u, "grad", preset_modules(unet, "attn-mlp"))
    calibrate(lambda: unet_fwd(u, sample, timestep, ehs), base, lambda f: scale_lora_B_(u, "grad", f), "grad adapter")
    grad_target = torch.randn(2, 4, 16, 16)
    exp["grad_target"] = grad_target
    lora_params = {}
    for n, p in u.named_parameters():
        if ".lora_A.grad." in n or ".lora_B.grad." in n:
            p.requires_grad_(True)
            p.grad = None
            lora_params[n] = p
        else:
            p.requires_grad_(False)
    out = u(sample, timestep, encoder_hidden_states=ehs).sample
    loss = ((out - grad_target) ** 2).mean()
    loss.backward()
    exp["unet_out_lora_grad"] = out.detach().float()
    exp["grad_loss"] = loss.detach().float().reshape(1)
    n_grad = 0
    for n, p in lora_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        which = "lora_A" if ".lora_A.grad." in n else "lora_B"
        path = n.split(f".{which}.grad.")[0]
        exp[f"grad.{path}.{which}.weight"] = p.grad.detach().float()
        n_grad += 1
    log(f"    grad: loss {loss.item():.5f}, {n_grad} gradient tensors")
    save_peft_adapter(u, "grad", folder / "adapter_grad_peft.safetensors")
    del u

    # -- kohya / A1111 format through diffusers' loader ------------------------------
    unet_mods = transformer_linear_modules(unet)
    te_mods = [f"text_model.encoder.layers.{i}.{s}" for i in range(2)
               for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    r_k = 4
    unet_alpha, te_alpha = 2.0, 4.0
    kohya = {}  # kohya_name -> (down, up, alpha)
    te_named = dict(te.named_modules())

    def te_module(path):
        return te_named.get(path) or te_named[path.removeprefix("text_model.")]

    for prefix, mods, get, alpha in (
        ("lora_unet", unet_mods, dict(unet.named_modules()).__getitem__, unet_alpha),
        ("lora_te", te_mods, te_module, te_alpha),
    ):
        for path in mods:
            m = get(path)
            if isinstance(m, torch.nn.Conv2d):
                fin, fout = m.in_channels, m.out_channels
                down = torch.randn(r_k, fin, 1, 1) / fin**0.5
                up = torch.randn(fout, r_k, 1, 1) / r_k**0.5
            else:
                fin, fout = m.in_features, m.out_features
                down = torch.randn(r_k, fin) / fin**0.5
                up = torch.randn(fout, r_k) / r_k**0.5
            kohya[f"{prefix}_{path.replace('.', '_')}"] = [down, up, torch.tensor(alpha, dtype=torch.float32)]

    kohya_meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(r_k),
        "ss_network_alpha": str(unet_alpha),
        **cfg["kohya_meta"],
    }
    kohya_path = folder / "adapter_kohya.safetensors"

    def write_kohya():
        sd = {}
        for k, (d, u_, a) in sorted(kohya.items()):
            sd[f"{k}.lora_down.weight"] = d.contiguous()
            sd[f"{k}.lora_up.weight"] = u_.contiguous()
            sd[f"{k}.alpha"] = a
        save_file(sd, str(kohya_path), metadata=kohya_meta)

    def load_kohya():
        p = StableDiffusionPipeline(
            vae=vae, text_encoder=copy.deepcopy(te), tokenizer=tokenizer, unet=copy.deepcopy(unet),
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        cap = CaptureLogs()
        loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
        for lg in loggers:
            lg.addHandler(cap)
        try:
            with warnings.catch_warnings(record=True) as wrec:
                warnings.simplefilter("always")
                p.load_lora_weights(str(folder), weight_name=kohya_path.name, adapter_name="kohya")
        finally:
            for lg in loggers:
                lg.removeHandler(cap)
        msgs = cap.records + [str(w.message) for w in wrec]
        bad_words = ("unexpected", "missing", "not been correctly", "mismatch", "load report", "unsuccessful")
        bad = [m for m in msgs if any(w in m.lower() for w in bad_words)]
        assert not bad, bad
        return p, msgs

    def kohya_outputs(p):
        with torch.no_grad():
            return unet_fwd(p.unet, sample, timestep, ehs), p.text_encoder(input_ids=ids).last_hidden_state.float()

    # calibrate UNet ups and TE ups separately (both are linear in the up factor to first order)
    for _ in range(6):
        write_kohya()
        p, _msgs = load_kohya()
        u_out, t_out = kohya_outputs(p)
        du = (u_out - base).abs().max().item()
        dt = (t_out - te_out).abs().max().item()
        fu, ft = EFFECT_TARGET / du, EFFECT_TARGET / dt
        if 0.8 < fu < 1.25 and 0.8 < ft < 1.25:
            break
        for k, v in kohya.items():
            v[1] = v[1] * (fu if k.startswith("lora_unet_") else ft)
    assert EFFECT_RANGE[0] <= du <= EFFECT_RANGE[1] and EFFECT_RANGE[0] <= dt <= EFFECT_RANGE[1], (du, dt)
    log(f"    kohya: unet max|delta| {du:.4f}, te max|delta| {dt:.4f}; loader messages: {_msgs}")

    # independent check that the reference loader picked up every module with the right weights/scale
    def check_loaded(model, prefix, mods, alpha, strip_text_model):
        named = dict(model.named_modules())
        n_lora = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
        assert n_lora == len(mods), (prefix, n_lora, len(mods))
        for path in mods:
            mp = path.removeprefix("text_model.") if (strip_text_model and path not in named) else path
            m = named[mp]
            assert isinstance(m, LoraLayer), path
            d, u_, _ = kohya[f"{prefix}_{path.replace('.', '_')}"]
            assert torch.equal(m.lora_A["kohya"].weight, d), path
            assert torch.equal(m.lora_B["kohya"].weight, u_), path
            assert abs(m.scaling["kohya"] - alpha / r_k) < 1e-12, (path, m.scaling["kohya"])

    check_loaded(p.unet, "lora_unet", unet_mods, unet_alpha, False)
    check_loaded(p.text_encoder, "lora_te", te_mods, te_alpha, True)
    exp["unet_out_kohya"] = u_out
    exp["te_out_kohya"] = t_out
    del p

    # -- write expected -------------------------------------------------------------
    out = {}
    for k, v in exp.items():
        v = v.detach()
        if k != "te_input_ids":
            v = v.to(torch.float32)
        out[k] = v.contiguous()
    # Single metadata entry: safetensors writes __metadata__ from a hash map, so with several entries the
    # header byte order (not the tensors) changes from run to run. Config/seed live in expected_meta.json.
    save_file(out, str(folder / "expected.safetensors"), metadata={"format": "pt"})
    meta = {
        "config": name,
        "seed": seed,
        "versions": versions(),
        "prediction_type": cfg["prediction_type"],
        "effect_target_max_abs": EFFECT_TARGET,
        "adapters": {
            "attn2": {"r": 4, "lora_alpha": 8},
            "attn": {"r": 4, "lora_alpha": 8},
            "attn-mlp": {"r": 4, "lora_alpha": 8},
            "two": {"a": {"preset": "attn2", "r": 4, "lora_alpha": 4, "weight": 0.5},
                    "b": {"preset": "attn", "r": 2, "lora_alpha": 1, "weight": 0.7}},
            "grad": {"preset": "attn-mlp", "r": 4, "lora_alpha": 8, "loss": "((unet_out - grad_target)**2).mean()"},
            "kohya": {"r": r_k, "unet_alpha": unet_alpha, "te_alpha": te_alpha, "unet_preset": "attn-mlp",
                      "te_modules": "self_attn.{q,k,v,out}_proj, mlp.fc1/fc2", "metadata": kohya_meta},
        },
        "prompts": PROMPTS,
        "notes": [
            "te_out = CLIPTextModel(input_ids).last_hidden_state, no attention_mask (as SD pipelines do)",
            "timestep passed to the UNet as float32 tensor",
            "LoRA B/up weights were rescaled after random init so max|delta out| ~ effect_target",
        ],
        "expected_keys": {k: list(v.shape) for k, v in sorted(out.items())},
    }
    (folder / "expected_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return base, te_out


def versions():
    import numpy
    import safetensors

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def verify(name, out_root: Path):
    folder = out_root / name
    exp = load_file(str(folder / "expected.safetensors"))
    kw = {}
    if not (folder / "tokenizer").exists():
        # model_index.json says "tokenizer": [null, null]; diffusers still insists on an explicit None.
        kw["tokenizer"] = None
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True, **kw)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    u = unet_fwd(pipe.unet, exp["sample"], exp["timestep"], exp["encoder_hidden_states"])
    du = (u - exp["unet_out"]).abs().max().item()
    with torch.no_grad():
        t = pipe.text_encoder(input_ids=exp["te_input_ids"]).last_hidden_state
        dv = (pipe.vae.decode(exp["vae_latents"]).sample - exp["vae_decoded"]).abs().max().item()
    dt = (t - exp["te_out"]).abs().max().item()
    log(f"  verify {name}: unet {du:.2e}, te {dt:.2e}, vae {dv:.2e}, tokenizer={type(pipe.tokenizer).__name__}")
    assert du <= 1e-6 and dt <= 1e-6 and dv <= 1e-6, (du, dt, dv)
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "fixtures"))
    args = ap.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)

    quirks = {}
    tok_dir = out_root / "sd1-tiny" / "tokenizer"
    tmp = Path(tempfile.mkdtemp(prefix="clip_tok_src_"))
    tokenizer = build_tokenizer(tmp)
    for name, cfg in CONFIGS.items():
        generate(name, cfg, out_root, tokenizer, tmp, quirks)
    shutil.rmtree(tmp)
    assert (tok_dir / "vocab.json").exists() and (tok_dir / "merges.txt").exists()
    assert not (out_root / "sd2-tiny" / "tokenizer").exists()
    reloaded = CLIPTokenizer.from_pretrained(str(tok_dir))
    assert reloaded("a photo of sks dog").input_ids == EXPECTED_SKS_IDS

    for name in CONFIGS:
        verify(name, out_root)
    for k, v in quirks.items():
        log(f"  quirk: {k}: {v}")
    total = 0
    for p in sorted(out_root.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:>10}  {p.relative_to(out_root)}")
    log(f"  total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
