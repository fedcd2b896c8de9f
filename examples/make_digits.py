"""Write the sample images in examples/digits/ (the README's predict examples).

Three are MNIST test digits (test images 0, 1 and 2: a 7, a 2 and a 1) saved the ways users hand in
their own: dark ink on white paper, enlarged and off centre, as JPEG, or as is; the fourth is a 4 drawn
with thick strokes in blue ink. Run: DATA_DIR=/path/to/data python examples/make_digits.py
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mnist_adder.data import load_mnist

OUT = Path(__file__).resolve().parent / "digits"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    images, _ = load_mnist(os.environ.get("DATA_DIR", "data"), train=False)
    pixels = images[:3].numpy()

    page = Image.new("RGB", (200, 150), (255, 255, 255))  # a 7 on white paper, 5x larger, off centre
    page.paste(Image.fromarray(255 - pixels[0]).resize((140, 140), Image.Resampling.BILINEAR), (45, 3))
    page.save(OUT / "seven_on_paper.png")

    ink = np.asarray(Image.fromarray(pixels[1]).resize((112, 112), Image.Resampling.BILINEAR), np.float32)
    scan = Image.fromarray((230 - ink / 255 * 180).astype(np.uint8)).convert("RGB")  # gray paper
    canvas = Image.new("RGB", (160, 180), (230, 230, 230))
    canvas.paste(scan, (30, 50))
    canvas.save(OUT / "two_scan.jpg", quality=80)

    Image.fromarray(pixels[2]).save(OUT / "one_mnist.png")  # as MNIST stores it: light on black, 28x28

    drawn = Image.new("RGB", (240, 300), (250, 248, 240))
    pen = ImageDraw.Draw(drawn)
    for line in [((150, 40), (50, 190)), ((50, 190), (200, 190)), ((150, 40), (150, 270))]:
        pen.line(line, fill=(20, 40, 140), width=18, joint="curve")
    drawn.save(OUT / "four_drawn.png")


if __name__ == "__main__":
    main()
