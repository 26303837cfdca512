"""What every image dataset shares: reading a file (an unreadable one fails its sample alone), the papers'
torchvision preprocessing (resize, centre crop, [-1, 1] tensor), and the positive-integer keys.

torchvision is imported inside the functions, on the first image read: it costs seconds at import, which
commands that read no image (``cfx --help``, listing jobs, reports) should not pay."""
from __future__ import annotations

from pathlib import Path

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
    """RGB PIL image -> 3xHxW float in [-1, 1]: the papers' ``ToTensor()`` + ``Normalize([.5]*3, [.5]*3)``.

    ``ToTensor`` is torchvision's v1 function on purpose: it divides by 255 as the papers' loaders do, where
    v2's ``ToDtype(scale=True)`` multiplies by 1/255, which is one float32 ulp off on 126 of the 256 values."""
    from torchvision.transforms import functional as v1
    from torchvision.transforms.v2 import functional as tvf

    return tvf.normalize(v1.to_tensor(img), [0.5] * 3, [0.5] * 3)


def resize_center_crop(img: Image.Image, resize: int | list[int], crop: int,
                       interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize(resize, interpolation)`` then ``CenterCrop(crop)`` on a PIL image, as the papers'
    loaders compose them: an int ``resize`` sets the shorter side (the longer one to ``int(resize * long /
    short)``); on PIL the filter is always antialiased; the crop starts at ``int(round((size - crop) / 2))``."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    img = tvf.resize(img, resize, interpolation=InterpolationMode(interpolation))
    return tvf.center_crop(img, [crop, crop])


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
