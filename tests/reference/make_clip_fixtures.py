#!/usr/bin/env python3
"""CLIP score fixtures: a tiny random transformers `CLIPModel` in the Hub layout of the OpenAI CLIP
repositories, a few image files, and what transformers and torchmetrics compute on them.

Writes tests/fixtures/clip-tiny/:
  config.json, model.safetensors       CLIPModel.save_pretrained
  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                       a CLIP tokenizer on the first MERGES merges of the CLIP BPE
  preprocessor_config.json             in the OpenAI repositories' layout (int `size`/`crop_size`)
  images/                              small PNG/JPEG files of different sizes, drawn here
  expected.safetensors, expected.json  reference outputs (see tests/reference/README.md)

Nothing expected is typed in: every value comes from transformers' CLIPProcessor and CLIPModel or
torchmetrics' CLIPScore run on these files.

Usage: python tests/reference/make_clip_fixtures.py [--out tests/fixtures/clip-tiny]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torchmetrics  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torchmetrics.functional.multimodal.clip_score import _clip_score_update  # noqa: E402
from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402

from clip_bpe import EOS_TOKEN, read_merges, write_vocabulary  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
# The first seed from here whose torchmetrics score clears MIN_SCORE is used (see `pick_seed`).
SEED_BASE = 20250301
# CLIPScore clamps the mean at 0; a clearly positive mean keeps that clamp from hiding errors.
MIN_SCORE = 5.0
# A prefix of the CLIP BPE: enough merges for common short words, a small embedding table.
MERGES = 100
# Token ids the model has beyond the tokenizer's (as added tokens would be): ids above
# <|endoftext|>, the only inputs on which transformers' two EOS pooling rules differ.
EXTRA_IDS = 4
IMAGE_SIZE = 32
PATCH_SIZE = 8
SHORTEST_EDGE = 40
# Not OpenAI's values, so that a reader ignoring the file shows.
IMAGE_MEAN = [0.5, 0.45, 0.4]
IMAGE_STD = [0.27, 0.25, 0.29]
# (file, width, height): downscaled, upscaled (smaller than SHORTEST_EDGE), and left at its size
# (short side == SHORTEST_EDGE, so only cropped); odd margins test the crop offsets' rounding.
IMAGES = [
    ("landscape.png", 64, 48),
    ("portrait.jpg", 90, 121),
    ("small.png", 24, 31),
    ("exact.jpg", 73, 40),
    ("wide.png", 144, 45),
]
PROMPTS = [
    "a red circle on a blue background",
    "a photo of a dog in the snow",
    "a small green square",
    "two cats sitting on a sofa",
    "a wide view of the sea at sunset",
]
# Longer than the 77-token context: the tokenizer keeps the first 75 tokens and the end token.
LONG_PROMPT = " ".join(["a very long description of a painting with many colours and shapes"] * 8)


def log(*a):
    print(*a, flush=True)


def draw_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Gradients, a few discs and rectangles, and mild noise: image-like, compressible."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (3, 2))
    img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
    for _ in range(3):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.15, 0.4) * min(width, height)
        colour = rng.uniform(0, 255, 3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 3, img.shape)
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, width, height in IMAGES:
        image = draw_image(rng, width, height)
        if name.endswith(".jpg"):
            image.save(folder / name, quality=90, subsampling=0)
        else:
            image.save(folder / name, optimize=True)


def read_images(folder: Path):
    """uint8 [3, H, W] tensors as torchmetrics takes them, decoded by PIL."""
    out = []
    for name, width, height in IMAGES:
        with Image.open(folder / name) as image:
            array = np.array(image.convert("RGB"))
        assert array.shape == (height, width, 3), (name, array.shape)
        out.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return out


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer folder as the OpenAI repositories have it (vocab.json + merges.txt, no
    tokenizer.json), on a prefix of the real merges."""
    src = Path(tempfile.mkdtemp(prefix="clip_tiny_tok_"))
    write_vocabulary(src, read_merges(MERGES))
    tok = CLIPTokenizer.from_pretrained(
        str(src),
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tok.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, folder / name)
    shutil.rmtree(src)
    if not (folder / "special_tokens_map.json").exists():
        (folder / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map, indent=2) + "\n")
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return CLIPTokenizer.from_pretrained(str(folder))


def write_preprocessor_config(folder: Path):
    config = {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "resample": 3,
        "size": SHORTEST_EDGE,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def clip_config(vocab_size: int, eos_id: int) -> CLIPConfig:
    text = dict(
        vocab_size=vocab_size + EXTRA_IDS,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    vision = dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build_model(config: CLIPConfig, seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm scales and biases start at 1 and 0; move them so a missing or swapped norm shows.
            p.add_((0.1 if "norm" in name else 0.02) * torch.randn_like(p))
            if "patch_embedding" in name:
                # Let the pixels, rather than the class and position embeddings, drive the features.
                p.mul_(8.0)
    return model


class FeaturesAsTensors(torch.nn.Module):
    """torchmetrics 1.9.0's CLIPScore divides `model.get_image_features(...)` by its norm, written for
    transformers 4, whose get_*_features returned the projected features. transformers 5 returns a
    BaseModelOutputWithPooling with them as `pooler_output`, so CLIPScore fails (AttributeError:
    'BaseModelOutputWithPooling' object has no attribute 'norm'). This hands torchmetrics that field;
    everything else (processor calls, truncation, normalisation, mean, clamp) is torchmetrics' own."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def torchmetrics_score(folder: Path, images, prompts):
    """CLIPScore as a user would run it on the fixture folder. Its string argument accepts only the
    names it lists (a path is refused unless it contains "openai"), so the folder goes in through
    the callable form, loading exactly what its "openai" branch loads."""

    def load():
        return FeaturesAsTensors(CLIPModel.from_pretrained(str(folder))), CLIPProcessor.from_pretrained(str(folder))

    metric = CLIPScore(model_name_or_path=load)
    metric.update(images, prompts)
    mean = (metric.score / metric.n_samples).item()
    score = metric.compute().item()
    per_pair, n = _clip_score_update(images, prompts, metric.model, metric.processor)
    assert n == len(prompts)
    return score, mean, per_pair.detach().to(torch.float64)


def text_features(model: CLIPModel, ids, mask=None):
    with torch.no_grad():
        return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def image_features(model: CLIPModel, pixel_values):
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values).pooler_output


def pick_seed(folder: Path, config: CLIPConfig, images):
    """The first seed from SEED_BASE whose CLIPScore on the fixture images clears MIN_SCORE."""
    for seed in range(SEED_BASE, SEED_BASE + 200):
        model = build_model(config, seed)
        model.save_pretrained(str(folder))
        score, mean, per_pair = torchmetrics_score(folder, images, PROMPTS)
        log(f"  seed {seed}: mean {mean:.3f}, per pair {[round(v, 2) for v in per_pair.tolist()]}")
        if mean >= MIN_SCORE:
            return seed, model, score, mean, per_pair
    sys.exit("no seed gave a positive score")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO_ROOT / "tests" / "fixtures" / "clip-tiny"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    tokenizer = write_tokenizer(out)
    vocab_size = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert eos_id == vocab_size - 1 == 512 + MERGES + 1, (eos_id, vocab_size)
    write_preprocessor_config(out)
    write_images(out / "images", SEED_BASE)
    images = read_images(out / "images")

    config = clip_config(vocab_size, eos_id)
    seed, model, score, mean, per_pair = pick_seed(out, config, images)

    processor = CLIPProcessor.from_pretrained(str(out))
    image_processor = processor.image_processor
    # What torchmetrics gets from CLIPProcessor with torchvision installed: the torchvision backend.
    assert type(image_processor).__name__ == "CLIPImageProcessor", type(image_processor)
    assert image_processor.backend == "torchvision", image_processor.backend
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (len(IMAGES), 3, IMAGE_SIZE, IMAGE_SIZE)

    prompts = PROMPTS + [LONG_PROMPT]
    encoded = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert int(mask[-1].sum()) == 77, "the long prompt must be truncated"
    text = text_features(model, ids, mask)
    # Padding sits after the end token, which the causal mask already hides from it.
    assert torch.equal(text, text_features(model, ids)), "the attention mask changed the pooled output"

    # Ids (not from the tokenizer) where an id above <|endoftext|> comes before it: the legacy rule
    # (config eos_token_id == 2) pools at that id, the current one at the first <|endoftext|>.
    big = vocab_size + EXTRA_IDS - 1
    raw = torch.full((2, 77), eos_id, dtype=torch.int64)
    raw[0, :6] = torch.tensor([eos_id - 1, 320, big, 539, 600, eos_id])
    raw[1, :4] = torch.tensor([eos_id - 1, 100, 200, eos_id])
    raw_text = text_features(model, raw)
    model.text_model.eos_token_id = 2
    raw_text_legacy = text_features(model, raw)
    model.text_model.eos_token_id = eos_id
    assert not torch.allclose(raw_text[0], raw_text_legacy[0]) and torch.equal(raw_text[1], raw_text_legacy[1])

    img = image_features(model, pixel_values)

    # The cosine that CLIPScore computes, here from the recorded features, must be its own.
    cos = torch.nn.functional.cosine_similarity(img.double(), text[: len(IMAGES)].double())
    assert torch.allclose(100 * cos, per_pair, rtol=1e-4, atol=1e-4), (cos, per_pair)

    expected = {
        "pixel_values": pixel_values.contiguous(),
        "image_features": img.contiguous(),
        "text_input_ids": ids.to(torch.int64).contiguous(),
        "text_features": text.contiguous(),
        "raw_input_ids": raw,
        "raw_text_features": raw_text.contiguous(),
        "raw_text_features_legacy": raw_text_legacy.contiguous(),
        "clip_score_per_pair": per_pair.contiguous(),
        "clip_score": torch.tensor([score], dtype=torch.float64),
        "clip_score_mean": torch.tensor([mean], dtype=torch.float64),
    }
    save_file(expected, str(out / "expected.safetensors"))
    meta = {
        "seed": seed,
        "images": [name for name, _, _ in IMAGES],
        "prompts": PROMPTS,
        "long_prompt": LONG_PROMPT,
        "clip_score": score,
        "clip_score_mean": mean,
        "image_processor": f"{type(image_processor).__module__}.{type(image_processor).__name__}",
        "image_processor_backend": image_processor.backend,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "torchmetrics": torchmetrics.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")

    # The folder reloads to the same model.
    reloaded = CLIPModel.from_pretrained(str(out)).eval()
    assert torch.equal(image_features(reloaded, pixel_values), img)
    assert torch.equal(text_features(reloaded, ids, mask), text)

    log(f"seed {seed}: CLIPScore {score:.6f} (mean before the clamp {mean:.6f})")
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:>8}  {p.relative_to(out)}")
    log(f"  total {total / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
