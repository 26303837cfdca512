"""CelebA as the DiME / ACE / FastDiME papers use it.

Layout under ``root`` (the official one, the Kaggle one, or torchvision's)::

    root/img_align_celeba/000001.jpg ...          (Kaggle zip: img_align_celeba/img_align_celeba/)
    root/list_attr_celeba.txt   or  .csv          (40 attributes, values -1/1)
    root/list_eval_partition.txt or .csv          (0 train, 1 val, 2 test)

The official Google-Drive sub-folders (``Anno/``, ``Eval/``, ``Img/img_align_celeba/``) and
torchvision's ``root/celeba/`` are also looked in.

Items of a split keep the attribute file's order (000001.jpg, 000002.jpg, ...), as the papers'
code does (``data[partition_df['partition'] == p]``). Sizes of the official partition: train
162,770, val 19,867, test 19,962.

Preprocessing is the papers' torchvision ``Resize(image_size)`` then ``CenterCrop(image_size)``
then ``ToTensor`` and ``Normalize(0.5, 0.5)`` (DiME ``core/image_datasets.py``, class
``CelebADataset``; ACE ``guided_diffusion/image_datasets.py``), by torchvision on the PIL image as
there: the shorter side is resized to ``image_size`` and the longer one to
``int(image_size * long / short)`` (178x218 -> 128x156) with the bilinear filter (torchvision's
default; on PIL images always antialiased), then the centre crop starts at
``int(round((size - crop) / 2))`` (178x218 -> top 14), and ``x = (uint8 / 255 - 0.5) / 0.5``.
(guided-diffusion's BOX+BICUBIC ``center_crop_arr`` is not what the CelebA papers' data loaders use.)

``subset="mini_val"`` is the papers' "mini-val": DiME/ACE ``utils/create-mini-val.py`` draws
``random.seed(5); indexes = random.choices(list(range(len(val))), k=1000); indexes.sort()``
with Python's *standard-library* ``random`` (not numpy), i.e. 1000 positions in the split,
with replacement, sorted, duplicates kept (966 distinct images on the official val split).
:func:`draw_subset` repeats that call on a private ``random.Random(seed)``, so it gives the
same positions without touching the global random state; on the official val split
(19,867 images) it reproduces ACE's published ``utils/minival.csv`` row for row (first row
position 8 = 162779.jpg). Duplicated draws keep their filename as ``id``: an item's unique key
is its ``index``.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cfx_cli.data import images
from cfx_cli.data.images import dataset_root, open_rgb, positive_int, to_tensor
from cfx_cli.errors import CfxError

ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

# Short names used in the papers and on the command line (keys are normalised: lower case, '_').
ALIASES = {
    "smile": "Smiling", "young": "Young", "age": "Young", "male": "Male", "gender": "Male", "sex": "Male",
    "glasses": "Eyeglasses", "eyeglasses": "Eyeglasses", "hat": "Wearing_Hat", "lipstick": "Wearing_Lipstick",
    "makeup": "Heavy_Makeup", "blond": "Blond_Hair", "blonde": "Blond_Hair", "necktie": "Wearing_Necktie",
    "earrings": "Wearing_Earrings", "necklace": "Wearing_Necklace", "mouth_open": "Mouth_Slightly_Open",
    "cheekbones": "High_Cheekbones", "5_o'clock_shadow": "5_o_Clock_Shadow",
}

SPLITS = {"train": 0, "val": 1, "test": 2, "all": None}
SPLIT_ALIASES = {"valid": "val", "validation": "val", "training": "train"}
SUBSETS = {"mini_val": "mini_val", "minival": "mini_val", "mini-val": "mini_val"}

_ANNOTATION_DIRS = (".", "Anno", "Eval", "celeba")
_IMAGE_DIRS = ("img_align_celeba", "img_align_celeba/img_align_celeba", "Img/img_align_celeba",
               "celeba/img_align_celeba")
_LAYOUT = ("point dataset.root to the folder that holds img_align_celeba/, list_attr_celeba.txt (or .csv) "
           "and list_eval_partition.txt (or .csv)")


def _norm(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def resolve_query(query, names=ATTRIBUTE_NAMES) -> int:
    """Index (0..39) of an attribute given by name (any case), alias (smile, young, ...) or index."""
    if isinstance(query, bool):
        query = str(query)
    if isinstance(query, (int, np.integer)) or (isinstance(query, str) and query.strip().lstrip("-").isdigit()):
        q = int(query)
        if 0 <= q < len(names):
            return q
        raise CfxError(f"dataset.query={query} is out of range: use an attribute index 0..{len(names) - 1} "
                       f"(31 = Smiling, 39 = Young) or a name such as smile, young, male")
    key = _norm(query)
    lowered = [_norm(n) for n in names]
    key = _norm(ALIASES.get(key, key))
    if key in lowered:
        return lowered.index(key)
    raise CfxError(f"dataset.query={query!r} is not a CelebA attribute: use a name ({', '.join(names)}), "
                   f"an alias ({', '.join(sorted(ALIASES))}) or an index 0..{len(names) - 1}")


def draw_subset(n: int, size: int = 1000, seed: int = 5) -> list[int]:
    """DiME/ACE mini-val positions: ``random.seed(seed); sorted(random.choices(range(n), k=size))``.

    Python's standard-library generator, with replacement, sorted; a private ``random.Random``
    so the global state is untouched.
    """
    return sorted(random.Random(seed).choices(list(range(n)), k=size))


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """DiME's ``Resize(size)`` (bilinear) + ``CenterCrop(size)``, torchvision on the PIL image."""
    return images.resize_center_crop(img, size, size)


def _find(root: Path, stem: str, dirs) -> Path | None:
    for d in dirs:
        for ext in (".txt", ".csv"):
            p = root / d / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _read_attributes(path: Path, root) -> pd.DataFrame:
    """DataFrame with column image_id then the 40 attributes (int8, -1/1 as in the file)."""
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path)
            df = df.rename(columns={df.columns[0]: "image_id"})
            names = [str(c) for c in df.columns[1:]]
        else:
            with open(path) as f:
                first, second = f.readline().split(), f.readline().split()
            if len(first) == 1 and first[0].isdigit():  # the official count line
                names, skip = second, 2
            else:
                names, skip = first, 1
            if len(names) == len(ATTRIBUTE_NAMES) + 1:  # a header that names the file column too
                names = names[1:]
            df = pd.read_csv(path, sep=r"\s+", skiprows=skip, header=None, names=["image_id", *names],
                             dtype={"image_id": str, **{n: np.int8 for n in names}}, engine="c")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise CfxError(f"dataset.root={root}: cannot read {path.name} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); it must be CelebA's attribute file") from None
    if [_norm(n) for n in names] != [_norm(n) for n in ATTRIBUTE_NAMES]:
        raise CfxError(f"dataset.root={root}: {path.name} names {len(names)} attributes that are not CelebA's 40 "
                       f"in CelebA's order (5_o_Clock_Shadow ... Young), which the classifiers' outputs follow")
    df.columns = ["image_id", *ATTRIBUTE_NAMES]
    df["image_id"] = df["image_id"].astype(str)
    return df


def _read_partition(path: Path, root) -> pd.Series:
    """Series image_id -> partition (0/1/2)."""
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path).iloc[:, :2]
        else:
            df = pd.read_csv(path, sep=r"\s+", header=None, dtype={0: str}, engine="c").iloc[:, :2]
        df.columns = ["image_id", "partition"]
        return pd.Series(df["partition"].astype(int).to_numpy(), index=df["image_id"].astype(str))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        raise CfxError(f"dataset.root={root}: cannot read {path.name} ({type(e).__name__}); it must hold "
                       f"'filename partition' rows (0 train, 1 val, 2 test)") from None



def attribute_options(ds, root, split, query, image_size, num_images, name: str, layout: str, example: str,
                      size_hint: str):
    """The options CelebA and CelebA-HQ share, checked before the slow part: root, split, the queried
    attribute (and the two classes it makes), image size; sets them on ``ds`` and returns num_images."""
    ds.root = dataset_root(root, layout, example)
    ds.name = name
    key = str(split).strip().lower()
    key = {"0": "train", "1": "val", "2": "test"}.get(key, SPLIT_ALIASES.get(key, key))
    if key not in SPLITS:
        raise CfxError(f"dataset.split={split!r} is unknown; use train, val (or valid, validation), test or all")
    ds.split = key
    ds.query_index = resolve_query(query)
    ds.query_name = ATTRIBUTE_NAMES[ds.query_index]
    ds.attribute_names = list(ATTRIBUTE_NAMES)
    ds.classes = [f"not {ds.query_name}", ds.query_name]
    ds.image_size = positive_int("image_size", image_size, size_hint)
    return None if num_images is None else positive_int("num_images", num_images, "or null for all images")


class AttributeItems:
    """Items of a CelebA-family dataset: ``files``, 0/1 ``_attributes`` (N×40), ``query_index`` and ``_load``.
    ``batch`` gives the interface keys (index, id = filename, x in [-1, 1], label = the queried attribute,
    value = NaN, factors = None) plus ``attributes``: N×40 0/1."""

    def __len__(self):
        return len(self.files)

    def ids(self, indices) -> list[str]:
        """The items' ids without loading them (a resumed job checks that its done rows still match)."""
        return [self.files[int(i)] for i in indices]

    def batch(self, indices) -> dict:
        indices = [int(i) for i in indices]
        files = [self.files[i] for i in indices]
        attributes = torch.from_numpy(self._attributes[indices].astype(np.int64))
        return {"index": indices, "id": files, "x": torch.stack([self._load(f) for f in files]),
                "label": attributes[:, self.query_index].clone(),
                "value": torch.full((len(files),), float("nan")), "factors": None,
                "attributes": attributes}

class CelebADataset(AttributeItems):
    """One split (or the mini-val draw) of CelebA, labelled by one of the 40 attributes.

    ``batch`` returns the interface keys (index, id = filename, x in [-1, 1], label = 1 if the
    queried attribute is +1 else 0, value = NaN, factors = None) plus ``attributes``: N x 40 0/1.
    """

    has_factors = False

    def __init__(self, root: str, split: str = "val", query="smile", image_size: int = 128,
                 num_images: int | None = None, subset: str | None = None, subset_size: int = 1000,
                 subset_seed: int = 5, name: str = "celeba", **unknown):
        if unknown:
            raise CfxError(f"dataset.{sorted(unknown)[0]} is not a celeba option; use root, split, query, "
                           f"image_size, num_images, subset, subset_size, subset_seed")
        num_images = attribute_options(self, root, split, query, image_size, num_images, name, _LAYOUT,
                                       "/data/celeba", "128 for the papers' models")
        subset_key = None if subset is None else str(subset).strip().lower()
        if subset_key in ("", "none", "null"):
            subset_key = None
        elif subset_key is not None:
            if subset_key not in SUBSETS:
                raise CfxError(f"dataset.subset={subset!r} is unknown; use mini_val (the papers' 1000 draws "
                               f"with replacement, seed 5) or null for the whole split")
            subset_key = SUBSETS[subset_key]
        self.subset = subset_key
        self.subset_size = positive_int("subset_size", subset_size, "1000 for mini-val")
        try:
            self.subset_seed = int(subset_seed)
        except (TypeError, ValueError, OverflowError):
            raise CfxError(f"dataset.subset_seed={subset_seed!r} must be an integer (5 for mini-val)") from None

        # ---- files
        attr_path = _find(self.root, "list_attr_celeba", _ANNOTATION_DIRS)
        if attr_path is None:
            raise CfxError(f"dataset.root={root} has no list_attr_celeba.txt or list_attr_celeba.csv "
                           f"(CelebA's attribute file): {_LAYOUT}")
        part_path = _find(self.root, "list_eval_partition", _ANNOTATION_DIRS)
        if part_path is None and self.split != "all":
            raise CfxError(f"dataset.root={root} has no list_eval_partition.txt or list_eval_partition.csv "
                           f"(CelebA's train/val/test split, needed for dataset.split={self.split}): {_LAYOUT}")
        self.attr_path, self.partition_path = attr_path, part_path

        df = _read_attributes(attr_path, root)
        if SPLITS[self.split] is not None:
            part = _read_partition(part_path, root)
            ids = df["image_id"]
            if len(part) == len(df) and (part.index == ids.to_numpy()).all():
                partition = part.to_numpy()
            else:  # not aligned row by row: match by filename (unknown names belong to no split)
                partition = part.reindex(ids.to_numpy()).fillna(-1).astype(int).to_numpy()
            rows = np.flatnonzero(partition == SPLITS[self.split])
        else:
            rows = np.arange(len(df))
        if len(rows) == 0:
            raise CfxError(f"dataset.split={self.split} selects no image in {attr_path.name} / "
                           f"{part_path.name if part_path else '-'}: check dataset.root={root}")

        # positions within the split (DiME's minival.csv first column), then the first num_images
        positions = np.arange(len(rows))
        if self.subset == "mini_val":
            positions = np.asarray(draw_subset(len(rows), self.subset_size, self.subset_seed), dtype=np.int64)
        if num_images is not None:
            positions = positions[:num_images]
        self.split_positions = positions
        chosen = rows[positions]
        self.files = df["image_id"].to_numpy()[chosen].tolist()
        self._attributes = (df.iloc[chosen, 1:].to_numpy() > 0).astype(np.int8)  # 0/1

        self.image_dir = next((self.root / d for d in _IMAGE_DIRS if (self.root / d / self.files[0]).is_file()), None)
        if self.image_dir is None:
            raise CfxError(f"dataset.root={root} has no {self.files[0]} under img_align_celeba/ "
                           f"(nor img_align_celeba/img_align_celeba/): {_LAYOUT}")

    def _load(self, filename: str) -> torch.Tensor:
        path = self.image_dir / filename
        img = open_rgb(path, str(path), f"dataset.root={self.root}: cannot read image {path}; is img_align_celeba/ "
                                        f"complete?")
        return to_tensor(resize_center_crop(img, self.image_size))
