"""Render a `cfx report` page to a PNG with headless Chromium (what a reader sees, offline).

    python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280] [--height 2400] [--trim]
        [--scale 0.75] [--only-rows "method=dime, model=synthetic_shape" ...]

Chromium runs with no network features, a throw-away profile and no sandbox (for containers);
``--trim`` cuts the blank page below the content, ``--scale`` resizes the result (for docs/report.png).
``--only-rows`` keeps only those table rows' sections of the Counterfactuals part (a style added to a copy of
the page; the tables, plots and header stay whole), so that the screenshot's height reaches the grids that
matter: the first section is otherwise the alphabetically first method's.
Debian: ``apt-get install chromium`` (/usr/bin/chromium).
"""
from __future__ import annotations

import argparse
import html as html_lib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def find_chromium() -> str | None:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int = 2400, timeout: float = 180,
               chromium: str | None = None) -> Path:
    """Chromium's screenshot of the page's first ``width`` × ``height`` CSS pixels, written to ``png``."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    with tempfile.TemporaryDirectory(prefix="cfx-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return png


def only_rows(page: str, rows: list[str]) -> str:
    """The report page with every Counterfactuals section but those of ``rows`` hidden (by a style, so the
    page is otherwise byte for byte the report). A row not on the page is an error listing those that are."""
    present = [html_lib.unescape(r) for r in re.findall(r'<section data-row="([^"]*)"', page)]
    missing = [r for r in rows if r not in present]
    if missing:
        raise ValueError(f"--only-rows {missing[0]!r} is not a row of this report; its rows: "
                         + "; ".join(repr(r) for r in present))
    keep = ",".join(f'section[data-row="{html_lib.escape(r, quote=True)}"]' for r in rows)
    style = f"<style>section[data-row]{{display:none}} {keep}{{display:block}}</style>"
    head_end = page.find("</head>")
    return page[:head_end] + style + page[head_end:] if head_end >= 0 else style + page


def trim(png: str | Path, margin: int = 24) -> None:
    """Cut the uniform background below (and right of) the content, keeping ``margin`` pixels."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    bg = a[-1, -1]
    content = np.abs(a - bg).sum(-1) > 12
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    if not len(rows):
        return
    bottom = min(a.shape[0], rows[-1] + 1 + margin)
    right = min(a.shape[1], cols[-1] + 1 + margin)
    Image.fromarray(a[:bottom, :right].astype("uint8")).save(png, optimize=True)


def rescale(png: str | Path, factor: float) -> None:
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
        im = im.resize((round(im.width * factor), round(im.height * factor)), Image.LANCZOS)
    im.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--trim", action="store_true", help="cut the blank page below the content")
    ap.add_argument("--scale", type=float, default=1.0, help="resize the screenshot by this factor")
    ap.add_argument("--only-rows", nargs="+", metavar="ROW", default=None,
                    help="show only these rows' counterfactual sections (as the report names them, e.g. "
                         "'method=dime, model=synthetic_shape')")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="cfx-report-") as tmp:
            page = args.html
            if args.only_rows:
                page = Path(tmp) / Path(args.html).name
                page.write_text(only_rows(Path(args.html).read_text(encoding="utf-8"), args.only_rows),
                                encoding="utf-8")
            out = screenshot(page, args.png, args.width, args.height)
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot_report: error: {e}", file=sys.stderr)
        return 2
    if args.trim:
        trim(out)
    if args.scale != 1.0:
        rescale(out, args.scale)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
