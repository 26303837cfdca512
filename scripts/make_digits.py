"""A digits-like folder dataset with no download: two digit classes as 32×32 grey PNGs, one sub-folder per class.

    python scripts/make_digits.py OUT [--per-class 1500] [--test-per-class 100] [--digits 3 8] [--seed 0]

writes OUT/train/<digit>/<n>.png and OUT/test/<digit>/<n>.png (the layout of a user's labelled image set with a
held-out split): each digit drawn with PIL from a DejaVu font picked at random (sans, sans bold, serif, mono,
condensed, oblique), at a random size, rotated a little, jittered in position, light stroke on a dark background
of random grey levels, with light Gaussian noise. Deterministic from (seed, split, class, index). Train on
OUT/train (`cfx train classifier|ddpm dataset=folder dataset.root=OUT/train`), explain OUT/test.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf"]
SIZE, SCALE = 32, 4  # drawn at 4× and downsampled (anti-aliased strokes)


def render(digit: str, rng: np.random.Generator) -> Image.Image:
    big = SIZE * SCALE
    font = ImageFont.truetype(str(FONT_DIR / FONTS[rng.integers(len(FONTS))]), int(rng.uniform(24, 31) * SCALE))
    bg, fg = int(rng.uniform(0, 70)), int(rng.uniform(180, 255))
    glyph = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(glyph)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
    draw.text(((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top), digit, fill=255, font=font)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC,
                         translate=tuple(rng.uniform(-3, 3, 2) * SCALE))
    alpha = np.asarray(glyph.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32) / 255
    img = bg + (fg - bg) * alpha + rng.normal(0, rng.uniform(2, 8), (SIZE, SIZE))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "L")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=1500, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=100, help="held-out test images per class")
    p.add_argument("--digits", nargs="+", default=["3", "8"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for split, n, code in (("train", a.per_class, 0), ("test", a.test_per_class, 1)):
        for c, digit in enumerate(a.digits):
            folder = Path(a.out) / split / digit
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                render(digit, np.random.default_rng([a.seed, code, c, i])).save(folder / f"{i:05d}.png")
        print(f"wrote {Path(a.out) / split}: {n} images per class ({', '.join(a.digits)})")


if __name__ == "__main__":
    main()
