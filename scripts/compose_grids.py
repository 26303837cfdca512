"""Put the first rows of several jobs' grid.png side by side, each under a title (pictures for the README).

    python scripts/compose_grids.py OUT.png --rows 3 JOB_DIR "title" [JOB_DIR "title" ...]

Each panel is the job's own grid.png (original | counterfactual | change, each row labelled with its classes
and its outcome: real / corrected / adversarial / failed), cut after ``--rows`` rows, so the picture shows exactly what
the job wrote; nothing is re-drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cfx_cli.outputs import IMAGE_KINDS, read_samples

GRID_ROWS = 8  # JobWriter.write_grid's max_rows: a grid.png holds the first 8 samples that have images


def grid_rows(job: Path) -> int:
    """How many rows the job's grid.png has (its samples with every image, at most GRID_ROWS)."""
    idx = read_samples(job)["index"]
    n = sum(all((job / "images" / k / f"{i}.png").exists() for k in IMAGE_KINDS) for i in idx)
    return min(n, GRID_ROWS)


def panel(job: Path, rows: int, title: str, font) -> Image.Image:
    grid_png = job / "grid.png"
    if not grid_png.is_file():
        raise FileNotFoundError(f"{grid_png} does not exist: pass a finished job folder")
    n = grid_rows(job)
    if n < 1:
        raise ValueError(f"{job}: no sample has its images, so its grid.png has no row to show")
    with Image.open(grid_png) as g:
        g = g.convert("RGB")
        keep = g.crop((0, 0, g.width, g.height // n * min(rows, n)))
    title_h = font.size + 14
    out = Image.new("RGB", (keep.width, keep.height + title_h), "white")
    ImageDraw.Draw(out).text((6, 6), title, fill="black", font=font)
    out.paste(keep, (0, title_h))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("pairs", nargs="+", help="JOB_DIR TITLE, repeated")
    ap.add_argument("--rows", type=int, default=3, help="rows of each grid to keep (from the top)")
    ap.add_argument("--gap", type=int, default=16, help="white pixels between panels")
    args = ap.parse_args(argv)
    if len(args.pairs) % 2:
        ap.error(f"pairs: got {len(args.pairs)} values; give JOB_DIR TITLE pairs (an even number)")
    if args.rows < 1:
        ap.error(f"--rows {args.rows}: keep at least 1 row")
    font = ImageFont.load_default(size=18)
    try:
        panels = [panel(Path(j), args.rows, t, font) for j, t in zip(args.pairs[::2], args.pairs[1::2])]
    except (FileNotFoundError, ValueError) as e:
        print(f"compose_grids: error: {e}", file=sys.stderr)
        return 2
    w = sum(p.width for p in panels) + args.gap * (len(panels) - 1)
    canvas = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + args.gap
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.width}×{canvas.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
