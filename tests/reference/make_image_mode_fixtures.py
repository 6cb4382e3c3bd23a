"""Writes tests/fixtures/image-modes/: tiny images in every mode a training folder meets (grayscale,
alpha, palette, 16-bit, CMYK, EXIF-rotated) and what Pillow makes of each, for
lora-train/tests/image_modes.rs (run once; the output is committed).

Every image is 16x12 (not square, so a rotation shows in the size) with four coloured quadrants and
a gradient along the top row, so a wrong orientation or channel order shows in the pixels.

expected.json has, per file, what `ImageOps.exif_transpose(Image.open(f)).convert("RGB")` gives:
`size` [width, height] of the upright image, and
- for lossless files (PNG): `rgb_sha256`, the SHA-256 of the RGB bytes (row-major), compared
  exactly;
- for images with transparency also `on_white_rgb_sha256`: transformers' `convert_to_rgb`
  (transparency composited onto white by Pillow's `alpha_composite`), what captioning sees;
- for JPEGs: `rgb_hex`, the RGB bytes themselves (hex), compared with a tolerance (`jpeg_tolerance`,
  the largest absolute difference per channel allowed): JPEG decoders differ by a level or two
  (IDCT rounding, chroma upsampling), and no decoder is more right than another there.

16-bit files are the one deliberate difference from Pillow. Pillow's `convert("RGB")` of a 16-bit
grayscale image ("I;16") clips each value to 255 instead of scaling it, so any real 16-bit photo
comes out almost all white; of a 16-bit RGB PNG it keeps the high byte (v >> 8). lora-train scales
every 16-bit sample to 8 bits as round(v / 257) (the `image` crate's rule, exact: 65535 -> 255),
which is what a user who trains on a 16-bit photo expects. For those files `rgb_sha256` is computed
here from the 16-bit values with that rule (numpy, independent of both decoders), and
`pil_rgb_sha256` records what Pillow gives, for the record.

Usage: python3 tests/reference/make_image_mode_fixtures.py  (Pillow, numpy; under a second)
"""

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "image-modes"
W, H = 16, 12
JPEG_TOLERANCE = 3
ORIENTATION_TAG = 0x0112


def rgb_pattern() -> np.ndarray:
    """H x W x 3 uint8: red, green, blue and white quadrants, a grey ramp along the top row."""
    a = np.zeros((H, W, 3), np.uint8)
    a[: H // 2, : W // 2] = (220, 30, 30)
    a[: H // 2, W // 2 :] = (30, 200, 40)
    a[H // 2 :, : W // 2] = (40, 50, 210)
    a[H // 2 :, W // 2 :] = (240, 240, 240)
    a[0, :] = np.linspace(0, 255, W).astype(np.uint8)[:, None]
    return a


def gray_pattern() -> np.ndarray:
    """H x W uint8: a diagonal ramp, different in every pixel."""
    y, x = np.mgrid[0:H, 0:W]
    return ((x * 11 + y * 7) % 256).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, bit depth 16), which Pillow cannot write."""
    h, w, _ = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif


def scale16(values: np.ndarray) -> np.ndarray:
    """round(v / 257) in integers; v / 257 is never exactly halfway (257 is odd)."""
    return ((values.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)


def pil_rgb(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def has_alpha(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    return "A" in image.getbands() or image.info.get("transparency") is not None


def on_white(data: bytes) -> Image.Image:
    """transformers' `convert_to_rgb` (image processors' do_convert_rgb, what BLIP captioning
    sees): transparency composited onto white with Pillow's alpha_composite."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def sha(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb, np.uint8).tobytes()).hexdigest()


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    rgb = Image.fromarray(rgb_pattern(), "RGB")
    gray = Image.fromarray(gray_pattern(), "L")
    alpha = Image.fromarray(np.uint8(gray_pattern()[::-1] ^ 0x5A), "L")
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = Image.merge("LA", (gray, alpha))
    palette = rgb.quantize(colors=6)

    y, x = np.mgrid[0:H, 0:W]
    gray16 = (x * 4099 + y * 257 * 3 + 1).astype(np.uint16)
    gray16[0, 0], gray16[0, 1] = 0, 65535
    rgb16 = np.stack([gray16, 65535 - gray16, (x * 3000 + 128).astype(np.uint16)], axis=-1)

    jpeg = {"quality": 92}
    files: dict[str, bytes] = {
        "gray.png": encode(gray, "PNG"),
        "gray-alpha.png": encode(la, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(palette, "PNG"),
        "gray16.png": encode(Image.fromarray(gray16), "PNG"),
        "rgb16.png": raw_png_rgb16(rgb16),
        "orientation-6.png": encode(rgb, "PNG", exif=exif_with_orientation(6)),
        "rgb.jpg": encode(rgb, "JPEG", **jpeg),
        "gray.jpg": encode(gray, "JPEG", **jpeg),
        # Pillow writes CMYK JPEGs as Photoshop does: an Adobe APP14 marker (transform 0) and
        # inverted ink values, the kind of CMYK file users have.
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", **jpeg),
    }
    for orientation in (3, 5, 6, 8):
        files[f"orientation-{orientation}.jpg"] = encode(
            rgb, "JPEG", exif=exif_with_orientation(orientation), **jpeg
        )

    # What the 16-bit files must give under lora-train's rule, from the values themselves.
    ours16 = {
        "gray16.png": np.repeat(scale16(gray16)[..., None], 3, axis=-1),
        "rgb16.png": scale16(rgb16),
    }

    expected: dict = {
        "pillow": PIL.__version__,
        "jpeg_tolerance": JPEG_TOLERANCE,
        "files": {},
    }
    for name, data in sorted(files.items()):
        (OUT / name).write_bytes(data)
        upright = pil_rgb(data)
        pixels = np.asarray(upright)
        entry: dict = {"mode": Image.open(io.BytesIO(data)).mode, "size": list(upright.size)}
        if name in ours16:
            entry["rgb_sha256"] = sha(ours16[name])
            entry["pil_rgb_sha256"] = sha(pixels)
            entry["rule"] = "round(v / 257)"
        elif name.endswith(".png"):
            entry["rgb_sha256"] = sha(pixels)
        else:
            entry["rgb_hex"] = pixels.tobytes().hex()
        if has_alpha(data):
            entry["on_white_rgb_sha256"] = sha(np.asarray(on_white(data)))
        expected["files"][name] = entry

    # Sanity checks: the rotated files are upright (what Pillow gives matches the plain image,
    # turned), the 16-bit rule is not Pillow's (else the note above is stale), the CMYK file shows
    # the pattern's colours (within 12 levels: JPEG loss on four channels and the CMYK round trip).
    plain = np.asarray(pil_rgb(files["rgb.jpg"])).astype(int)
    assert expected["files"]["orientation-6.jpg"]["size"] == [H, W]
    turns = {3: np.rot90(plain, 2), 6: np.rot90(plain, -1), 8: np.rot90(plain, 1)}
    for orientation, turned in turns.items():
        got = np.asarray(pil_rgb(files[f"orientation-{orientation}.jpg"])).astype(int)
        assert np.abs(got - turned).max() <= JPEG_TOLERANCE, orientation
    png6 = np.asarray(pil_rgb(files["orientation-6.png"]))
    assert (png6 == np.rot90(rgb_pattern(), -1)).all()
    assert Image.open(io.BytesIO(files["gray16.png"])).mode == "I;16"
    for name in ours16:
        assert expected["files"][name]["rgb_sha256"] != expected["files"][name]["pil_rgb_sha256"]
    cmyk = np.asarray(pil_rgb(files["cmyk.jpg"])).astype(int)
    assert np.abs(cmyk - rgb_pattern().astype(int)).max() <= 12

    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(files)} images and expected.json to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
