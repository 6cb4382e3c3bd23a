#!/usr/bin/env python3
"""Full-size BLIP check (outside CI): a BlipForConditionalGeneration with the configuration of
Salesforce/blip-image-captioning-large (values copied below; weights random, transformers' own
initialisation, as the real ones cannot be downloaded here), a BERT WordPiece tokenizer of the
same vocabulary size, and what transformers makes of three images: the vision tower's output and
greedy captions of transformers' default length.

Writes OUT/ (about 1.9 GB): config.json, model.safetensors, tokenizer files,
preprocessor_config.json, images/, expected.safetensors, expected.json. Then run

    BLIP_FULL_SIZE_DIR=OUT cargo test --release -p lora-core --test blip_parity -- --ignored

Usage: python tests/reference/check_blip_full_size.py OUT
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
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

SEED = 20261203
# Salesforce/blip-image-captioning-large, config.json and preprocessor_config.json.
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu",
            layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=30522, sep_token_id=102,
            eos_token_id=2)
PROCESSOR = dict(size={"height": 384, "width": 384}, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711])


def vocabulary():
    """BERT's layout: [PAD] 0, [unused…], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then words;
    30522 entries, then BLIP's added [DEC] (30522) and [ENC] (30523)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(vocab) < 30522:
        word = "".join(letters[(i // 26 ** k) % 26] for k in range(4))
        vocab.append(word if i % 3 else "##" + word)
        i += 1
    return vocab


def images(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    first = Image.new("RGB", (640, 480), (30, 120, 200))
    draw = ImageDraw.Draw(first)
    draw.ellipse((80, 60, 340, 300), fill=(240, 200, 40))
    draw.rectangle((300, 200, 600, 460), fill=(20, 160, 60))
    second = Image.fromarray(rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8), "RGB")
    third = Image.fromarray(np.linspace(0, 255, 384 * 384 * 3).reshape(384, 384, 3).astype(np.uint8))
    names = ["shapes.png", "noise.png", "gradient.png"]
    for name, image in zip(names, [first, second, third]):
        image.save(folder / name)
    return names


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tokenizer.convert_tokens_to_ids("[DEC]") == 30522, tokenizer.convert_tokens_to_ids("[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(**PROCESSOR), tokenizer=tokenizer)
    config = BlipConfig(vision_config=VISION, text_config=TEXT, projection_dim=512,
                        image_text_hidden_size=256)
    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    names = images(out / "images")
    pil = [Image.open(out / "images" / n).convert("RGB") for n in names]
    pixel_values = processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.set_num_threads(os.cpu_count())
    with torch.no_grad():
        start = time.perf_counter()
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        vision_s = time.perf_counter() - start
        start = time.perf_counter()
        generated = model.generate(pixel_values=pixel_values, num_beams=1, do_sample=False)
        generate_s = time.perf_counter() - start
    save_file({"pixel_values": pixel_values.contiguous(), "vision_last_hidden_state": vision.contiguous(),
               "generated_ids": generated.to(torch.int64).contiguous()}, out / "expected.safetensors")
    meta = {
        "seed": SEED,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "images": names,
        "generated_ids": generated.tolist(),
        "generated_text": processor.batch_decode(generated, skip_special_tokens=True),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": {"vision_3_images": vision_s, "generate_3_images": generate_s,
                    "threads": torch.get_num_threads()},
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("generated_text", "parameters", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
