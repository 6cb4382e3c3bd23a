"""What `lora-train` does by default, with diffusers + peft: load a Stable Diffusion folder in f32,
attach a rank-4 LoRA to the UNet's cross-attention projections, cache every image's VAE latent
distribution and caption embedding once (as lora-train and kohya's --cache_latents do), train
with the DDPM epsilon loss, AdamW and gradient clipping at 1.0, and save the adapter as
safetensors. `benches/run_train_command.sh` times this whole process (imports, load and caching
pass included) beside the same `lora-train` command.

    python benches/train_reference.py FOLDER DATA OUTPUT.safetensors --resolution R --steps N
                                      [--batch-size B] [--lr LR] [--seed S]

DATA: a folder of images, each with a .txt caption beside it.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer


def image_tensor(path, resolution):
    """The image resized (shorter side to `resolution`) and centre-cropped, in [-1, 1]."""
    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    folder = Path(args.folder)

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]

    # The caching pass: latent distributions and caption embeddings, once per image.
    images = sorted(p for p in Path(args.data).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    cache = []
    with torch.no_grad():
        for path in images:
            dist = vae.encode(image_tensor(path, args.resolution)[None]).latent_dist
            ids = tokenizer(
                path.with_suffix(".txt").read_text().strip(),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            cache.append((dist.mean, dist.std, text_encoder(ids)[0]))

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    scaling = vae.config.scaling_factor
    order = []
    for _ in range(args.steps):
        batch = []
        for _ in range(args.batch_size):
            if not order:
                order = torch.randperm(len(cache)).tolist()
            batch.append(cache[order.pop()])
        mean = torch.cat([b[0] for b in batch])
        std = torch.cat([b[1] for b in batch])
        context = torch.cat([b[2] for b in batch])
        latents = (mean + std * torch.randn_like(mean)) * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, context).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    save_file(get_peft_model_state_dict(unet), args.output)


if __name__ == "__main__":
    main()
