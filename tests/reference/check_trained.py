"""Independent check that lora-train learns: diffusers' own denoising loss on the training images
falls when the adapter our trainer wrote is loaded.

Usage (from the repository root, after training with the committed recipe):

    target/debug/lora-train --config tests/fixtures/train-check/recipe.toml \
        --output tests/fixtures/train-check/adapter.safetensors --metrics /tmp/check.jsonl
    /work/pyref/bin/python tests/reference/check_trained.py

The fixture model (sd1-tiny) is loaded with diffusers' StableDiffusionPipeline. For every image of
tests/fixtures/train-data (captions from the sidecar .txt, else the kohya folder's words), 16 fixed
(timestep, noise) draws from torch's seeded generator are noised with DDPMScheduler.add_noise on the
VAE latent mean x scaling factor, and the UNet's epsilon MSE is averaged: once without an adapter,
once after `load_lora_weights` of the kohya file (any missing/unexpected-key complaint fails the
check). The check fails unless the adapter lowers the loss. The verdict, with the sha256 of the
adapter file checked, goes to tests/fixtures/train-check/train-check.json; the Rust test
`reference_recipe_reproduces_the_checked_adapter` retrains with the recipe and asserts it gets
exactly this file's tensors.
"""

import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL = FIXTURES / "sd1-tiny"
DATA = FIXTURES / "train-data"
CHECK_DIR = FIXTURES / "train-check"
DRAWS = 16
SEED = 1234
BAD_WORDS = ("unexpected", "missing", "not been correctly", "mismatch", "unsuccessful")


class CaptureLogs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def dataset():
    """(image path, caption) as lora-train reads the folder: top-level images with .txt
    captions, kohya `N_words` folders with the words as fallback caption."""
    items = []
    for folder in [DATA] + sorted(p for p in DATA.iterdir() if p.is_dir()):
        fallback = folder.name.split("_", 1)[1] if folder != DATA else None
        for img in sorted(folder.glob("*.png")):
            txt = img.with_suffix(".txt")
            caption = " ".join(txt.read_text().split()) if txt.exists() else fallback
            assert caption is not None, img
            items.append((img, caption))
    return items


def pixels(path):
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert img.shape == (32, 32, 3), "fixture images are already at the training resolution"
    return torch.from_numpy(img / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def denoising_loss(pipe, batches, draws):
    losses = []
    for (latents, context), (ts, noises) in zip(batches, draws):
        for t, noise in zip(ts, noises):
            noisy = pipe.noise_scheduler.add_noise(latents, noise, t.view(1))
            pred = pipe.unet(noisy, t.view(1), encoder_hidden_states=context).sample
            losses.append(torch.nn.functional.mse_loss(pred.float(), noise).item())
    return float(np.mean(losses))


def main(adapter: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False)
    pipe.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert pipe.noise_scheduler.config.prediction_type == "epsilon"
    batches = []
    with torch.no_grad():
        for path, caption in dataset():
            latents = pipe.vae.encode(pixels(path)).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(caption, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            batches.append((latents, pipe.text_encoder(ids).last_hidden_state))
    gen = torch.Generator().manual_seed(SEED)
    draws = [
        (torch.randint(0, pipe.noise_scheduler.config.num_train_timesteps, (DRAWS,), generator=gen),
         torch.randn((DRAWS,) + tuple(latents.shape), generator=gen))
        for latents, _ in batches
    ]
    without = denoising_loss(pipe, batches, draws)

    cap = CaptureLogs()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(cap)
    with warnings.catch_warnings(record=True) as wrec:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="trained")
    for lg in loggers:
        lg.removeHandler(cap)
    # A UNet-only adapter makes diffusers note that the text encoder got no LoRA keys: expected.
    complaints = [
        m for m in cap.records + [str(w.message) for w in wrec]
        if any(b in m.lower() for b in BAD_WORDS) and "No LoRA keys associated to CLIPTextModel" not in m
    ]
    assert not complaints, f"diffusers complained loading {adapter}: {complaints}"
    with_adapter = denoising_loss(pipe, batches, draws)

    drop = (without - with_adapter) / without
    print(f"diffusers denoising loss on the training images: no adapter {without:.5f}, "
          f"with the trained adapter {with_adapter:.5f} ({drop:+.2%} lower)")
    assert with_adapter < without, "the trained adapter does not lower diffusers' loss"
    verdict = {
        "adapter": str(adapter.relative_to(ROOT)),
        "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(),
        "recipe": "tests/fixtures/train-check/recipe.toml",
        "model": "tests/fixtures/sd1-tiny",
        "images": len(batches),
        "draws_per_image": DRAWS,
        "torch_seed": SEED,
        "loss_without_adapter": without,
        "loss_with_adapter": with_adapter,
        "relative_drop": drop,
        "loader_complaints": complaints,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }
    out = CHECK_DIR / "train-check.json"
    out.write_text(json.dumps(verdict, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else CHECK_DIR / "adapter.safetensors")
