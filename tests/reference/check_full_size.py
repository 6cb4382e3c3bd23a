"""Full-size SD 1.5 and SD 2.1 (768, v-prediction) with random weights: the check of real
checkpoint loading that CI cannot run (the weights are GBs). Outside CI; see README.md here.

    python3 tests/reference/check_full_size.py make OUT            # diffusers folders, fp16
    lora-merge --base OUT/sd15 --to single-file --output OUT/sd15.safetensors   # ours (and sd21)
    python3 tests/reference/check_full_size.py verify OUT tests/fixtures/checkpoint_headers

`make` builds each pipeline from the real models' config values (copied below from
`unet/config.json`, `text_encoder/config.json`, `vae/config.json` and
`scheduler/scheduler_config.json` of stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1)
with seeded random weights, and saves it as a diffusers folder. `verify` loads our single file
with diffusers' own `from_single_file(config=folder)`, compares every tensor with the folder's,
records which model type diffusers infers from the file, and writes the file's header (tensor
names and shapes, no data) as the fixture CI's detection tests read. It also records diffusers'
outputs (UNet at 64×64 latents, text encoder, VAE decode of a 32×32 latent, 2 DDIM steps with
CFG) in OUT/NAME-expected.safetensors for the comparison with ours.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

UNET_COMMON = dict(
    act_fn="silu",
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
TEXT_COMMON = dict(
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    initializer_factor=1.0,
    initializer_range=0.02,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    pad_token_id=1,
    vocab_size=49408,
)
VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)
MODELS = {
    "sd15": dict(
        unet=dict(UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        text=dict(
            TEXT_COMMON,
            hidden_act="quick_gelu",
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
        ),
        vae=dict(VAE, sample_size=512),
        scheduler=(PNDMScheduler, dict(SCHEDULER, prediction_type="epsilon")),
        pad_token="<|endoftext|>",
        diffusers_type="v1",
    ),
    "sd21": dict(
        unet=dict(
            UNET_COMMON,
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            dual_cross_attention=False,
            num_class_embeds=None,
            only_cross_attention=False,
            sample_size=96,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        text=dict(
            TEXT_COMMON,
            hidden_act="gelu",
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            projection_dim=512,
        ),
        vae=dict(VAE, sample_size=768),
        scheduler=(DDIMScheduler, dict(SCHEDULER, prediction_type="v_prediction")),
        pad_token="!",
        diffusers_type="v2",
    ),
}


def randomize(module, seed):
    """Weights with the spread of trained ones, so outputs are neither zero nor huge."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # norm scales
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def add_tokenizer(folder, pad_token):
    """The CLIP vocabulary of the sd1-tiny fixture (OpenAI's, all 49408 tokens), padding as the
    real model's tokenizer does."""
    source = Path(__file__).parent.parent / "fixtures" / "sd1-tiny" / "tokenizer"
    target = folder / "tokenizer"
    target.mkdir(exist_ok=True)
    for name in ["vocab.json", "merges.txt"]:
        shutil.copy(source / name, target / name)
    for name in ["special_tokens_map.json", "tokenizer_config.json"]:
        settings = json.loads((source / name).read_text())
        settings["pad_token"] = pad_token
        (target / name).write_text(json.dumps(settings, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def make(out):
    for name, spec in MODELS.items():
        folder = out / name
        if folder.exists():
            print(f"{folder} exists; model not remade")
            add_tokenizer(folder, spec["pad_token"])
            continue
        unet = UNet2DConditionModel(**spec["unet"])
        randomize(unet, 1)
        text = CLIPTextModel(CLIPTextConfig(**spec["text"]))
        randomize(text, 2)
        vae = AutoencoderKL(**spec["vae"])
        randomize(vae, 3)
        scheduler_class, scheduler_config = spec["scheduler"]
        for part, model in [("unet", unet), ("text_encoder", text), ("vae", vae)]:
            model.to(torch.float16).save_pretrained(folder / part)
        scheduler_class.from_config(scheduler_config).save_pretrained(folder / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", scheduler_class.__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        add_tokenizer(folder, spec["pad_token"])
        print(f"wrote {folder}")


def header_shapes(path):
    with safe_open(path, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def verify(out, fixtures):
    fixtures.mkdir(parents=True, exist_ok=True)
    for name, spec in MODELS.items():
        folder, single = out / name, out / f"{name}.safetensors"
        shapes = header_shapes(single)
        # diffusers' model-type inference reads shapes only; meta tensors carry them.
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        inferred = infer_diffusers_model_type(meta)
        assert inferred == spec["diffusers_type"], (name, inferred)
        (fixtures / f"{name}.json").write_text(json.dumps(shapes, sort_keys=True))

        # Every tensor diffusers reads from our single file equals the folder's.
        pipe = StableDiffusionPipeline.from_single_file(
            str(single), config=str(folder), torch_dtype=torch.float16, safety_checker=None
        )
        worst = 0.0
        for part in ["unet", "text_encoder", "vae"]:
            stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
            reference = load_file(folder / part / f"{stem}.safetensors")
            loaded = getattr(pipe, part).state_dict()
            missing = sorted(set(reference) - set(loaded))
            assert not missing, (name, part, missing[:5])
            for key, value in reference.items():
                diff = (loaded[key].float().reshape(value.shape) - value.float()).abs().max()
                worst = max(worst, float(diff))
        assert worst == 0.0, (name, worst)
        print(f"{name}: diffusers infers `{inferred}`; every tensor it reads from the file = the folder's")
        record_outputs(name, spec, folder, out)


def record_outputs(name, spec, folder, out):
    """Diffusers' outputs in f32 from the folder, for the comparison with ours."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    gen = torch.Generator().manual_seed(0)
    latents64 = torch.randn((1, 4, 64, 64), generator=gen)
    ids = torch.randint(0, 49407, (1, 77), generator=gen)
    timestep = torch.tensor([500])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        unet_out = pipe.unet(latents64, timestep, encoder_hidden_states=hidden).sample
        latents32 = torch.randn((1, 4, 32, 32), generator=gen)
        decoded = pipe.vae.decode(latents32 / pipe.vae.config.scaling_factor).sample
    init = torch.randn((1, 4, 64, 64), generator=gen)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    final = pipe(
        "a photograph of an astronaut riding a horse",
        negative_prompt="",
        num_inference_steps=2,
        guidance_scale=7.5,
        latents=init.clone(),
        output_type="latent",
        height=512,
        width=512,
    ).images
    tensors = {
        "token_ids": ids.to(torch.int64),
        "text_hidden": hidden.contiguous(),
        "unet_latents": latents64.contiguous(),
        "unet_timestep": timestep.to(torch.int64),
        "unet_out": unet_out.contiguous(),
        "vae_latents": latents32.contiguous(),
        "vae_decoded": decoded.contiguous(),
        "ddim_init": init.contiguous(),
        "ddim_final": final.contiguous(),
    }
    save_file(tensors, out / f"{name}-expected.safetensors")
    print(f"{name}: recorded diffusers' outputs")


if __name__ == "__main__":
    stage, out = sys.argv[1], Path(sys.argv[2])
    if stage == "make":
        make(out)
    elif stage == "verify":
        verify(out, Path(sys.argv[3]))
    else:
        sys.exit(f"unknown stage {stage}: expected make or verify")
