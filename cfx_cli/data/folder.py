"""A folder of images (optionally one sub-folder per class), for running methods on your own data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cfx_cli.errors import CfxError, UnreadableItem

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class FolderDataset:
    has_factors = False

    def __init__(self, root: str, image_size: int = 32, num_images: int | None = None, name: str = "folder"):
        if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)
                                       or num_images < 1):
            raise CfxError(f"dataset.num_images={num_images} must be a positive integer, or null for every image")
        self.root = Path(root)
        if not self.root.is_dir():
            raise CfxError(f"dataset.root={root} is not a folder: point it to a folder of images "
                           f"(e.g. dataset.root=/data/my_images)")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise CfxError(f"dataset.root={root} holds no images ({', '.join(sorted(EXTENSIONS))})")
        # classes from every file, so that the mapping does not depend on how many images are explained
        self.classes = sorted({p.parent.name for p in files if p.parent != self.root})
        self.files = files[:num_images] if num_images else files
        self.image_size = int(image_size)

    def __len__(self):
        return len(self.files)

    def _load(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, ...
            raise UnreadableItem(str(path.relative_to(self.root)), f"{type(e).__name__}: {e}") from None
        s = min(img.size)  # centre crop, then resize
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((self.image_size,) * 2, Image.BICUBIC)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1

    def ids(self, indices) -> list[str]:
        """The items' ids without loading them (a resumed job checks that its done rows still match)."""
        return [str(self.files[int(i)].relative_to(self.root)) for i in indices]

    def batch(self, indices) -> dict:
        files = [self.files[i] for i in indices]
        label = [self.classes.index(p.parent.name) if p.parent.name in self.classes else -1 for p in files]
        return {"index": list(indices), "id": [str(p.relative_to(self.root)) for p in files],
                "x": torch.stack([self._load(p) for p in files]), "label": torch.as_tensor(label),
                "value": torch.full((len(files),), float("nan")), "factors": None}
