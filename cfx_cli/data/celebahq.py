"""CelebA-HQ with CelebAMask-HQ's attribute annotations, as LDCE and the regression paper read it.

Layout under ``root`` (CelebAMask-HQ's release)::

    root/CelebA-HQ-img/0.jpg ... 29999.jpg           (1024×1024)
    root/CelebAMask-HQ-attribute-anno.txt            (count line, 40 names, then "0.jpg  1 -1 ...")
    root/CelebA-HQ-to-CelebA-mapping.txt             ("idx orig_idx orig_file": 0 119613 119614.jpg)
    root/list_eval_partition.txt | .csv              (CelebA's split, by CelebA filename)

The split is CelebA's, carried over through the mapping file (an HQ image belongs to the split of
its CelebA original; test = partition 2), in HQ index order — what both papers' loaders do
(LDCE ``data/datasets.py``; the regression paper ``diff_cf_ir/celebahq_dataset.py``). A CSV with
columns ``idx,split`` (LDCE's own partition file) is read too.

Images: torchvision ``Resize(image_size)`` + ``CenterCrop`` (square images: a resize), bilinear with
antialiasing on PIL as torchvision, then [-1, 1].

Labels: ``label`` is the queried attribute (0/1). For the regression paper's age task there are no
real ages in CelebA-HQ: its targets come from the ``Young`` attribute (y* = 0.8 for young faces,
0.1 for the others; ``target=young_old``), and ``value`` is NaN.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfx_cli.data.celeba import (SPLITS, AttributeItems, _read_attributes, _read_partition, attribute_options,
                                 resize_center_crop)
from cfx_cli.data.images import open_rgb, to_tensor
from cfx_cli.errors import CfxError

_LAYOUT = ("point dataset.root to CelebAMask-HQ's folder: CelebA-HQ-img/, CelebAMask-HQ-attribute-anno.txt, "
           "CelebA-HQ-to-CelebA-mapping.txt and CelebA's list_eval_partition.txt (or .csv)")


def _read_mapping(path: Path, root) -> pd.DataFrame:
    """DataFrame idx (int) → orig_file (CelebA filename)."""
    try:
        df = pd.read_csv(path, sep=r"\s+", engine="python")
        df.columns = [str(c).strip() for c in df.columns]
        if not {"idx", "orig_file"} <= set(df.columns):
            raise ValueError(f"columns {list(df.columns)}")
        return pd.DataFrame({"idx": df["idx"].astype(int), "orig_file": df["orig_file"].astype(str)})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise CfxError(f"dataset.root={root}: cannot read {path.name} ({e}); it must hold 'idx orig_idx orig_file' "
                       f"rows (CelebAMask-HQ's CelebA-HQ-to-CelebA-mapping.txt)") from None


def _split_of(root: Path, mapping: pd.DataFrame) -> np.ndarray:
    """CelebA's partition (0/1/2; −1 unknown) of every HQ index, from a CelebA partition file through the
    mapping, or from LDCE's ``idx,split`` CSV."""
    for name in ("list_eval_partition.csv", "list_eval_partition.txt"):
        path = root / name
        if not path.is_file():
            continue
        head = pd.read_csv(path, nrows=1) if path.suffix == ".csv" else None
        if head is not None and {"idx", "split"} <= set(head.columns):  # LDCE's own file, by HQ index
            part = pd.read_csv(path).set_index("idx")["split"]
            return part.reindex(mapping["idx"].to_numpy()).fillna(-1).astype(int).to_numpy()
        part = _read_partition(path, root)
        return part.reindex(mapping["orig_file"].to_numpy()).fillna(-1).astype(int).to_numpy()
    raise CfxError(f"dataset.root={root} has no list_eval_partition.txt or .csv (CelebA's split, which selects "
                   f"CelebA-HQ's test images through the mapping file): {_LAYOUT}")


class CelebAHQDataset(AttributeItems):
    has_factors = False

    def __init__(self, root: str, split: str = "test", query="smile", image_size: int = 256,
                 num_images: int | None = None, name: str = "celebahq", **unknown):
        if unknown:
            raise CfxError(f"dataset.{sorted(unknown)[0]} is not a celebahq option; use root, split, query, "
                           f"image_size, num_images")
        num_images = attribute_options(self, root, split, query, image_size, num_images, name, _LAYOUT,
                                       "/data/CelebAMask-HQ", "256 for the papers' models")

        attr_path = self.root / "CelebAMask-HQ-attribute-anno.txt"
        map_path = self.root / "CelebA-HQ-to-CelebA-mapping.txt"
        for p in (attr_path, map_path):
            if not p.is_file():
                raise CfxError(f"dataset.root={root} has no {p.name}: {_LAYOUT}")
        attrs = _read_attributes(attr_path, root)  # image_id = "<idx>.jpg"
        idx = pd.to_numeric(attrs["image_id"].str.replace(r"\.jpg$", "", regex=True), errors="coerce")
        if idx.isna().any():
            raise CfxError(f"dataset.root={root}: {attr_path.name} names files that are not '<index>.jpg' "
                           f"(e.g. {attrs['image_id'][idx.isna()].iloc[0]})")
        mapping = _read_mapping(map_path, root).set_index("idx").reindex(idx.astype(int).to_numpy()).reset_index()
        rows = np.arange(len(attrs))
        if SPLITS[self.split] is not None:
            rows = np.flatnonzero(_split_of(self.root, mapping) == SPLITS[self.split])
        if len(rows) == 0:
            raise CfxError(f"dataset.split={self.split} selects no CelebA-HQ image (no CelebA original of the mapping "
                           f"file is in that partition): check dataset.root={root}")
        if num_images is not None:
            rows = rows[:num_images]
        self.files = attrs["image_id"].to_numpy()[rows].tolist()
        self._attributes = (attrs.iloc[rows, 1:].to_numpy() > 0).astype(np.int8)
        self.image_dir = self.root / "CelebA-HQ-img"
        if not (self.image_dir / self.files[0]).is_file():
            raise CfxError(f"dataset.root={root} has no CelebA-HQ-img/{self.files[0]}: {_LAYOUT}")

    def _load(self, filename: str) -> torch.Tensor:
        path = self.image_dir / filename
        img = open_rgb(path, str(path), f"dataset.root={self.root}: cannot read image {path}; is CelebA-HQ-img/ "
                                        f"complete?")
        return to_tensor(resize_center_crop(img, self.image_size))
