#!/usr/bin/env python3
"""BLIP captioning fixtures: a tiny random transformers `BlipForConditionalGeneration` in the layout
of Salesforce/blip-image-captioning-large, two small images, and what transformers computes on them.

Writes tests/fixtures/blip-tiny/:
  config.json, model.safetensors, generation_config.json   save_pretrained
  vocab.txt, tokenizer_config.json, tokenizer.json, ...     a BERT WordPiece tokenizer on a small
                                                            vocabulary written here
  preprocessor_config.json                                  BlipImageProcessor (explicit values)
  images/*.png                                              drawn here with PIL
  expected.safetensors, expected.json                       reference outputs (README.md)

Nothing expected is typed in: every value comes from transformers' BlipProcessor and
BlipForConditionalGeneration run on these files.

Usage: python tests/reference/make_blip_fixtures.py [--out tests/fixtures/blip-tiny]
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261203
IMAGE_SIZE = 32
PATCH_SIZE = 8
MAX_NEW_TOKENS = 12
PROMPT = "a picture of"
# The special tokens of BLIP's BERT tokenizer; [DEC] is the decoder's bos token, as in
# Salesforce/blip-image-captioning-large (where it is an added token, id 30522).
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = (
    "a an the of in on at with and picture photo image painting drawing dog cat man woman "
    "person people child car tree house street sky water table room red blue green white black "
    "yellow small large big old young two three sitting standing running looking next to near "
    "front top under over by is are there field grass beach road building window door wall "
    "flower flowers bird horse boat train plane bike food plate bowl cup kitchen bed couch chair "
    "snow mountain city night day sun light"
).split()
PIECES = ["##s", "##ing", "##ed", "##er", "##y", "##ly", "##es", "##a", "##e", "##n", "##t"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]


def vocabulary():
    seen, vocab = set(), []
    for token in SPECIALS + [".", ",", "'"] + WORDS + PIECES + LETTERS:
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def draw_images(folder: Path):
    """Two small RGB images of different sizes and aspect ratios, so resizing does real work."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    first = Image.new("RGB", (48, 40), (30, 120, 200))
    draw = ImageDraw.Draw(first)
    draw.ellipse((8, 6, 34, 30), fill=(240, 200, 40))
    draw.rectangle((26, 20, 46, 38), fill=(20, 160, 60))
    noise = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    second = Image.fromarray(noise, "RGB")
    names = ["shapes.png", "noise.png"]
    first.save(folder / names[0])
    second.save(folder / names[1])
    return names


def decode_cases(tokenizer, vocab_size):
    """Random id sequences (special tokens, word pieces, punctuation among them) and transformers'
    `decode(ids, skip_special_tokens=True)` of each."""
    rng = np.random.default_rng(SEED + 1)
    cases = []
    for length in [1, 3, 6, 10, 16, 24]:
        ids = rng.integers(0, vocab_size, size=length).tolist()
        cases.append({"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True)})
    return cases


def pick_images(out: Path):
    """The test images as pixel values, for choosing the stop token's bias before saving."""
    names = draw_images(out / "images")
    processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    images = [Image.open(out / "images" / n) for n in names]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def raise_stop_token(model, pixel_values, sep):
    """Raise the LM head's bias for [SEP] until greedy decoding stops the two captions at different
    lengths, one after a few words, so that the stop and the padding after it are checked."""
    bias = model.text_decoder.cls.predictions.bias
    base = float(bias[sep].detach())
    for step in range(200):
        with torch.no_grad():
            bias[sep] = base + 0.05 * step
            ids = model.generate(pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS)
        ended = [sep in row[1:].tolist() for row in ids]
        first = [row[1:].tolist().index(sep) if e else None for row, e in zip(ids, ended)]
        stops = [MAX_NEW_TOKENS if f is None else f for f in first]
        if stops[0] != stops[1] and any(2 <= f < MAX_NEW_TOKENS for f in stops):
            return
    raise SystemExit("no [SEP] bias makes the captions stop at different lengths")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/blip-tiny")
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    vocab = vocabulary()
    ids = {token: i for i, token in enumerate(vocab)}
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    # transformers 5's BertTokenizer takes the vocabulary itself (`vocab=`), not a file name.
    tokenizer = BertTokenizer(vocab=ids, do_lower_case=True, bos_token="[DEC]")
    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            pad_token_id=ids["[PAD]"],
            bos_token_id=ids["[DEC]"],
            eos_token_id=ids["[SEP]"],
            sep_token_id=ids["[SEP]"],
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(config).eval()
    # Random init leaves some parameters at constants (layer norms at 1/0, biases at 0); make every
    # parameter random so that a weight read from the wrong place shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name or "weight" in name and p.dim() > 1:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0 if "bias" in name else 1.0, 0.2)
    raise_stop_token(model, pick_images(out), config.text_config.sep_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # The Hub repositories also have the image processor's own file; write it as they do.
    processor.image_processor.save_pretrained(out)

    names = draw_images(out / "images")
    images = [Image.open(out / "images" / n) for n in names]

    # Reload what was written, as a user would.
    model = BlipForConditionalGeneration.from_pretrained(out).eval()
    processor = BlipProcessor.from_pretrained(out)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE), pixel_values.shape
    # The PIL image processor, for comparison (recorded, not the one AutoProcessor picks).
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    pil_processor = BlipImageProcessorPil(
        **{k: getattr(processor.image_processor, k) for k in ("size", "image_mean", "image_std")}
    )
    pixel_values_pil = torch.as_tensor(
        np.asarray(pil_processor(images=images, return_tensors="np")["pixel_values"])
    )

    prompt_ids = processor(text=PROMPT, return_tensors="pt")["input_ids"]
    assert ids["[UNK]"] not in prompt_ids[0].tolist(), prompt_ids
    expected = {"pixel_values": pixel_values, "pixel_values_pil": pixel_values_pil}
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values)
        expected["vision_last_hidden_state"] = vision.last_hidden_state
        # Decoder logits for a prefix: [DEC] then the prompt's words, both images.
        prefix = prompt_ids.clone()[:, :-1]
        prefix[:, 0] = config.text_config.bos_token_id
        prefix = prefix.repeat(2, 1)
        logits = model(pixel_values=pixel_values, input_ids=prefix).logits
        expected["prefix_ids"] = prefix.to(torch.int64)
        expected["prefix_logits"] = logits
        generated = model.generate(
            pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS, num_beams=1, do_sample=False
        )
        generated_prompt = model.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids.repeat(2, 1),
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=1,
            do_sample=False,
        )
    expected["generated_ids"] = generated.to(torch.int64)
    expected["generated_prompt_ids"] = generated_prompt.to(torch.int64)
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")

    meta = {
        "seed": SEED,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
        },
        "images": names,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids[0].tolist(),
        "max_new_tokens": MAX_NEW_TOKENS,
        "image_processor": type(processor.image_processor).__name__,
        "generated_ids": generated.tolist(),
        "generated_text": processor.batch_decode(generated, skip_special_tokens=True),
        "generated_prompt_ids": generated_prompt.tolist(),
        "generated_prompt_text": processor.batch_decode(generated_prompt, skip_special_tokens=True),
        "weight_keys": sorted(model.state_dict().keys()),
        "decode_cases": decode_cases(processor.tokenizer, len(vocab)),
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 1_000_000, size
    print(json.dumps({k: meta[k] for k in ("generated_ids", "generated_prompt_ids",
                                           "generated_text", "image_processor")}, indent=1))
    print(f"wrote {out} ({size} bytes)")


if __name__ == "__main__":
    main()
