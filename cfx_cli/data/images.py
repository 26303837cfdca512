"""What every image dataset shares: reading a file (an unreadable one fails its sample alone), the
[-1, 1] tensor, and the positive-integer keys."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cfx_cli.errors import CfxError, UnreadableItem


def open_rgb(path: Path, item: str, message: str | None = None) -> Image.Image:
    """The image as RGB, or ``UnreadableItem`` naming ``item`` and the reason (a truncated file, a text
    file named .png, an image too large to decode safely)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableItem(item, f"{type(e).__name__}: {e}", message) from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HxWx3 -> 3xHxW in [-1, 1], as ``ToTensor`` + ``Normalize([.5]*3, [.5]*3)``."""
    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return t.sub(0.5).div(0.5)


def positive_int(key: str, value, hint: str) -> int:
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        out = int(float(value))
    except (TypeError, ValueError, OverflowError):
        out = 0
    if out <= 0:
        raise CfxError(f"dataset.{key}={value!r} must be a positive integer ({hint})")
    return out


def dataset_root(root, layout: str, example: str) -> Path:
    """``dataset.root`` as a folder that exists, or one line saying what it must hold."""
    if root is None or str(root).strip() in ("", "???"):
        raise CfxError(f"dataset.root is not set: {layout} (e.g. dataset.root={example})")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise CfxError(f"dataset.root={root} is not a folder: {layout}")
    return path
