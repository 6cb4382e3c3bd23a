#!/usr/bin/env python3
"""Resampling fixtures: small 8-bit images and what Pillow's `Image.resize` (LANCZOS, BICUBIC) and
torchvision's antialiased bicubic `resize` of uint8 tensors make of them, as PNGs (lossless).

Writes tests/fixtures/resample/:
  source-*.png          the inputs (noise, and drawn shapes with hard edges), RGB and RGBA
  pil-*.png             Pillow's resize of an input, one axis at a time, width first:
                        Image.resize((w, H), filter).resize((w, h), filter)
  torchvision-*.png     torchvision.transforms.v2.functional.resize(uint8 tensor, (h, w),
                        BICUBIC, antialias=True) of an input
  cases.json            one entry per output: source, tool, filter, size, output file

Why one axis at a time: Pillow's resampler is two one-axis passes, the width first (Resample.c up
to Pillow 12, and torchvision's kernel), but Pillow 13's `Image.resize` runs the height pass first
for some sizes, by a rule it does not document. A one-axis resize has no order, so each pass is
Pillow's own; `cases.json` records, per case, whether Pillow 13's direct `resize` gave the same
pixels and by how much it differs otherwise.

Nothing expected is typed in: every output is the library's. Usage:
    python tests/reference/make_resample_fixtures.py [--out tests/fixtures/resample]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261203
# Output sizes: down- and upscales, one axis unchanged, strong downscales (wide filters), 1 pixel.
SIZES = [(32, 32), (19, 41), (61, 23), (8, 5), (37, 64), (3, 1), (120, 90)]


def sources():
    rng = np.random.default_rng(SEED)
    noise = Image.fromarray(rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8), "RGB")
    shapes = Image.new("RGB", (64, 48), (30, 120, 200))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((8, 6, 40, 38), fill=(250, 210, 20))
    draw.rectangle((30, 20, 62, 46), fill=(0, 0, 0))
    draw.line((0, 47, 63, 0), fill=(255, 255, 255), width=2)
    # Opaque RGBA: Pillow premultiplies alpha, which changes nothing when alpha is 255 everywhere.
    alpha = np.full((23, 37, 1), 255, dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([np.asarray(noise)[::-1], alpha], axis=2), "RGBA")
    return {"noise": noise, "shapes": shapes, "opaque-rgba": rgba}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/resample")
    out = parser.parse_args().out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cases = []
    for name, image in sources().items():
        source = f"source-{name}.png"
        image.save(out / source)
        for w, h in SIZES:
            if (w, h) == image.size:
                continue
            for filter_name, pil_filter in [("lanczos3", Image.LANCZOS), ("bicubic", Image.BICUBIC)]:
                file = f"pil-{filter_name}-{name}-{w}x{h}.png"
                width_first = image.resize((w, image.height), pil_filter).resize((w, h), pil_filter)
                width_first.save(out / file)
                direct = np.asarray(image.resize((w, h), pil_filter)).astype(int)
                difference = int(np.abs(direct - np.asarray(width_first).astype(int)).max())
                cases.append(dict(source=source, tool="pillow", filter=filter_name, size=[w, h],
                                  file=file, direct_resize_max_difference=difference))
            if image.mode == "RGB":
                tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
                resized = F.resize(tensor, [h, w], InterpolationMode.BICUBIC, antialias=True)
                file = f"torchvision-bicubic-{name}-{w}x{h}.png"
                Image.fromarray(resized.permute(1, 2, 0).numpy(), "RGB").save(out / file)
                cases.append(dict(source=source, tool="torchvision", filter="bicubic", size=[w, h], file=file))
    meta = {
        "seed": SEED,
        "versions": {
            "python": sys.version.split()[0],
            "pillow": PIL.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {len(cases)} cases to {out} ({size} bytes)")


if __name__ == "__main__":
    main()
