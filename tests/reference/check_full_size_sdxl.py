"""Full-size SDXL base 1.0 with random weights: the check CI cannot run (the weights are GBs).
Outside CI; the Rust side is `tests/full_size.rs` (`sdxl_single_file_and_folder_reproduce_diffusers`,
ignored).

    python3 tests/reference/check_full_size_sdxl.py make OUT     # OUT/sdxl: a diffusers folder, fp16
    python3 tests/reference/check_full_size_sdxl.py record OUT   # OUT/sdxl-expected.safetensors
    lora-merge --base OUT/sdxl --to single-file --output OUT/sdxl.safetensors   # ours
    python3 tests/reference/check_full_size_sdxl.py verify OUT tests/fixtures/checkpoint_headers
    LORA_FULL_SIZE_DIR=OUT cargo test --release --test full_size sdxl -- --ignored --nocapture

`make` builds the pipeline from the config values of stabilityai/stable-diffusion-xl-base-1.0
(copied below from its unet/, text_encoder/, text_encoder_2/, vae/ config.json and
scheduler/scheduler_config.json; the values SD 1.5's have too come from check_full_size.py) with seeded random weights. `record` runs diffusers in f32 on
it: both text encoders' prompt encoding (`encode_prompt`), the UNet at 32×32 latents with the
pooled embedding and micro-conditioning, a VAE decode of a 16×16 latent, and 2 Euler steps with
guidance 5 at 256×256, from fixed latents. `verify` loads our single file with diffusers' own
`from_single_file`, given a folder holding only the config files (so no weight can come from
anywhere but the file), compares every tensor with the folder's, records which model type diffusers
infers from the file, and writes the file's header (tensor names and shapes) as the fixture CI's
detection tests read (`sdxl.json`).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file, save_file
import tempfile
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from check_full_size import SCHEDULER as SCHEDULER_COMMON
from check_full_size import header_shapes
from check_full_size import TEXT_COMMON, randomize
from check_full_size import VAE as VAE_COMMON

UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
TEXT = dict(TEXT_COMMON, hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
            num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
TEXT_2 = dict(TEXT_COMMON, hidden_act="gelu", hidden_size=1280, intermediate_size=5120,
              num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
VAE = dict(VAE_COMMON, force_upcast=True, sample_size=1024, scaling_factor=0.13025)
SCHEDULER = dict(SCHEDULER_COMMON, interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0,
                 timestep_spacing="leading", use_karras_sigmas=False)
PROMPT = "a photograph of an astronaut riding a horse"


def add_tokenizer(folder, sub, pad_token):
    """OpenAI CLIP's vocabulary (the sd1-tiny fixture's), padding as SDXL's tokenizers do."""
    source = Path(__file__).parent.parent / "fixtures" / "sd1-tiny" / "tokenizer"
    target = folder / sub
    target.mkdir(exist_ok=True)
    for name in ["vocab.json", "merges.txt"]:
        shutil.copy(source / name, target / name)
    for name in ["special_tokens_map.json", "tokenizer_config.json"]:
        settings = json.loads((source / name).read_text())
        settings["pad_token"] = pad_token
        (target / name).write_text(json.dumps(settings, indent=2))
    assert CLIPTokenizer.from_pretrained(str(target)).pad_token == pad_token


def make(out):
    folder = out / "sdxl"
    if folder.exists():
        sys.exit(f"{folder} exists; remove it to remake the model")
    parts = [
        ("unet", UNet2DConditionModel(**UNET), 1),
        ("text_encoder", CLIPTextModel(CLIPTextConfig(**TEXT)), 2),
        ("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)), 4),
        ("vae", AutoencoderKL(**VAE), 3),
    ]
    for part, model, seed in parts:
        randomize(model, seed)
        model.to(torch.float16).save_pretrained(folder / part)
        del model
    EulerDiscreteScheduler.from_config(SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    add_tokenizer(folder, "tokenizer", "<|endoftext|>")
    add_tokenizer(folder, "tokenizer_2", "!")
    print(f"wrote {folder}")


def record(out):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "sdxl"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True)
        latents32 = torch.randn((1, 4, 32, 32), generator=gen)
        time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])
        unet_out = pipe.unet(latents32, torch.tensor([500]), encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        latents16 = torch.randn((1, 4, 16, 16), generator=gen)
        decoded = pipe.vae.decode(latents16 / pipe.vae.config.scaling_factor).sample
        init = torch.randn((1, 4, 32, 32), generator=gen)
        final = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, latents=init.clone(),
                     output_type="latent", height=256, width=256).images
    tensors = {
        "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "unet_latents": latents32,
        "unet_time_ids": time_ids, "unet_out": unet_out, "vae_latents": latents16, "vae_decoded": decoded,
        "euler_init": init, "euler_final": final,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "sdxl-expected.safetensors")
    print(f"recorded diffusers' outputs: unet_out max {unet_out.abs().max():.3f}, final latents std {final.std():.3f}")


def verify(out, fixtures):
    folder, single = out / "sdxl", out / "sdxl.safetensors"
    shapes = header_shapes(single)
    # diffusers' model-type inference reads shapes only; meta tensors carry them.
    inferred = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert inferred == "xl_base", inferred
    fixtures.mkdir(parents=True, exist_ok=True)
    (fixtures / "sdxl.json").write_text(json.dumps(shapes, sort_keys=True))
    with tempfile.TemporaryDirectory() as configs:
        # The folder's config and tokenizer files only.
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".txt"):
                target = Path(configs) / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(single), config=configs, local_files_only=True, torch_dtype=torch.float16
        )
    counts = {}
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        stem = "model" if part.startswith("text_encoder") else "diffusion_pytorch_model"
        reference = load_file(folder / part / f"{stem}.safetensors")
        loaded = getattr(pipe, part).state_dict()
        strip = lambda k: k.removeprefix("text_model.")
        reference = {strip(k): v for k, v in reference.items()}
        loaded = {strip(k): v for k, v in loaded.items() if not k.endswith("position_ids")}
        assert set(reference) == set(loaded), (part, sorted(set(reference) ^ set(loaded))[:5])
        for key, value in reference.items():
            assert torch.equal(loaded[key].reshape(value.shape), value), (part, key)
        counts[part] = len(reference)
    print(f"sdxl: diffusers infers `{inferred}`; every tensor it reads from the file = the folder's {counts}")


if __name__ == "__main__":
    stage, out = sys.argv[1], Path(sys.argv[2])
    if stage == "make":
        make(out)
    elif stage == "record":
        record(out)
    elif stage == "verify":
        verify(out, Path(sys.argv[3]))
    else:
        sys.exit(f"unknown stage {stage}: expected make, record or verify")
