"""Writes the tiny training dataset tests/fixtures/train-data/ (run once; the output is committed).

Five 32x32 PNGs of flat shapes on plain backgrounds: three at the top level with .txt captions, and
a kohya `3_green triangle` folder (repeated 3 times) holding one captioned image and one without a
caption, which takes the folder's words. Deterministic: plain geometry, no randomness.
"""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "train-data"
SIZE = 32


def shape(kind, colour, background):
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    if kind == "circle":
        d.ellipse((6, 6, 25, 25), fill=colour)
    elif kind == "square":
        d.rectangle((8, 8, 23, 23), fill=colour)
    else:
        d.polygon([(16, 5), (27, 26), (5, 26)], fill=colour)
    return img


def write(relative, img, caption=None):
    path = OUT / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=False)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")


write("red_circle.png", shape("circle", (220, 30, 30), (255, 255, 255)), "a red circle on a white background")
write("blue_square.png", shape("square", (30, 60, 220), (255, 255, 255)), "a blue square on a white background")
write("yellow_circle.png", shape("circle", (240, 210, 20), (20, 20, 20)), "a yellow circle on a black background")
write("3_green triangle/small.png", shape("triangle", (30, 170, 60), (255, 255, 255)), "a green triangle on a white background")
write("3_green triangle/uncaptioned.png", shape("triangle", (20, 120, 40), (230, 230, 230)))
