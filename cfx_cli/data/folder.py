"""A folder of images (optionally one sub-folder per class), for running methods on your own data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfx_cli.data.images import open_rgb, to_tensor
from cfx_cli.errors import CfxError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class FolderDataset:
    has_factors = False

    SUBSETS = ("first", "random", "balanced")

    def __init__(self, root: str, image_size: int = 32, num_images: int | None = None, name: str = "folder",
                 subset: str = "first", seed: int = 0, files: str | None = None):
        """``subset`` picks the ``num_images``: ``first`` (sorted paths), ``random`` (a seeded draw),
        ``balanced`` (a seeded draw taking the classes in turn); ``files``: a text file of paths relative
        to ``root`` (one per line) instead of the whole folder."""
        if subset not in self.SUBSETS:
            raise CfxError(f"dataset.subset={subset!r} is unknown; use one of {list(self.SUBSETS)}")
        if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int)
                                       or num_images < 1):
            raise CfxError(f"dataset.num_images={num_images} must be a positive integer, or null for every image")
        self.root = Path(root)
        if not self.root.is_dir():
            raise CfxError(f"dataset.root={root} is not a folder: point it to a folder of images "
                           f"(e.g. dataset.root=/data/my_images)")
        every = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        files = self._listed(Path(files)) if files else every
        if not files:
            raise CfxError(f"dataset.root={root} holds no images ({', '.join(sorted(EXTENSIONS))})")
        # classes from every file of the folder, so that the mapping does not depend on which are explained
        self.classes = sorted({p.parent.name for p in every if p.parent != self.root})
        self.files = self._pick(files, num_images, subset, int(seed))
        self.image_size = int(image_size)

    def _listed(self, listing: Path) -> list[Path]:
        if not listing.is_file():
            raise CfxError(f"dataset.files={listing} does not exist: give a text file of image paths relative to "
                           f"dataset.root, one per line")
        names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        paths = [self.root / n for n in names]
        absent = [n for n, p in zip(names, paths) if not p.is_file()]
        if absent:
            raise CfxError(f"dataset.files={listing}: {len(absent)} listed file(s) are not under dataset.root="
                           f"{self.root} (first: {absent[0]})")
        return paths

    def _pick(self, files: list[Path], n: int | None, subset: str, seed: int) -> list[Path]:
        """The explained files, in a fixed order (so that a dataset index always names the same file)."""
        if not n or n >= len(files) or subset == "first":
            return files[:n] if n else files
        rng = np.random.default_rng(seed)
        if subset == "random":
            return sorted(files[i] for i in rng.choice(len(files), size=n, replace=False))
        by_class: dict[str, list[Path]] = {}
        for p in files:
            by_class.setdefault(p.parent.name, []).append(p)
        queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_class.items())]
        picked: list[Path] = []
        while len(picked) < n:  # the classes in turn, each in its own seeded order
            for q in queues:
                if q and len(picked) < n:
                    picked.append(q.pop(0))
        return sorted(picked)

    def __len__(self):
        return len(self.files)

    def _load(self, path: Path) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        img = open_rgb(path, str(path.relative_to(self.root)))
        # the largest centred square, then bicubic to image_size (nothing of the image is squeezed). The square
        # starts at floor((size - side) / 2), as guided-diffusion's center_crop_arr, not CenterCrop's
        # round-half-even, which is one pixel further on some odd margins: earlier jobs' inputs stay the same.
        s = min(img.size)
        img = tvf.crop(img, (img.height - s) // 2, (img.width - s) // 2, s, s)
        return to_tensor(tvf.resize(img, [self.image_size] * 2, interpolation=InterpolationMode.BICUBIC))

    def ids(self, indices) -> list[str]:
        """The items' ids without loading them (a resumed job checks that its done rows still match)."""
        return [str(self.files[int(i)].relative_to(self.root)) for i in indices]

    def batch(self, indices) -> dict:
        files = [self.files[i] for i in indices]
        label = [self.classes.index(p.parent.name) if p.parent.name in self.classes else -1 for p in files]
        return {"index": list(indices), "id": [str(p.relative_to(self.root)) for p in files],
                "x": torch.stack([self._load(p) for p in files]), "label": torch.as_tensor(label),
                "value": torch.full((len(files),), float("nan")), "factors": None}
