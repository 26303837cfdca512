"""ImageNet (ILSVRC2012) validation images, as DVCE and ACE explain them.

Two layouts under ``root`` (also looked for in ``root/val`` and Kaggle's ``root/ILSVRC/Data/CLS-LOC/val``):

(a) one folder per synset, as torchvision's ``ImageFolder`` / ``ImageNet`` reads it::

        root/n01440764/ILSVRC2012_val_00000293.JPEG ...

(b) the flat folder of 50,000 ``ILSVRC2012_val_*.JPEG`` plus a labels file (``dataset.labels``, or found
    in ``root`` or its parent):

    - Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString``, the synset is the first token;
    - a text list of ``filename synset`` or ``filename class_index`` lines (Caffe's ``val.txt``);
    - the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012_ID per line, line k
      for ``ILSVRC2012_val_{k:08d}``): those IDs are not the class order, the mapping to synsets is the
      devkit's ``data/meta.mat`` (``dataset.meta``, or found next to the labels file), read with
      ``scipy.io.loadmat`` when scipy is installed (it is not a cfx dependency).

Class index = position in the sorted list of the 1000 synset IDs (torchvision, Keras, Caffe and every
released ImageNet classifier: 0 = n01440764 tench); the list and the WordNet names ship in
``imagenet_classes.tsv`` (built by ``scripts/build_imagenet_classes.py``). Items are in ``ImageFolder``
order in both layouts (by class, then file name), so an index means the same image as in DVCE's and
ACE's code (DVCE's ``some_vces = {5358: ...}``) whichever layout holds the files; ``id`` is the file name.

Preprocessing, by torchvision on the PIL image as in both papers' loaders (``Resize(s)``: the shorter side
to ``s``, the longer to ``int(s * long / short)``, antialiased on PIL; ``CenterCrop`` starts at
``int(round((size - crop) / 2))``), then ``ToTensor`` + ``Normalize(0.5, 0.5)`` to [-1, 1]:

- default, ACE (``guided_diffusion/image_datasets.py``, ``get_dataset``, ImageNet): ``Resize(256)`` +
  ``CenterCrop(256)`` + ``ToTensor``, bilinear (torchvision's default);
- DVCE (``imagenet_VCEs.py``: ``get_ImageNet(train=False, augm_type='crop_0.875', size=256)``):
  ``Resize(floor(256 / 0.875) = 292, BICUBIC)`` + ``CenterCrop(256)``: ``dataset.crop_fraction=0.875
  dataset.interpolation=bicubic``.

The classifiers' own 256 -> 224 resize and normalisation live in the explained model, not here.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from cfx_cli.data.images import dataset_root, open_rgb, positive_int, to_tensor
from cfx_cli.data.images import resize_center_crop as _resize_center_crop
from cfx_cli.errors import CfxError

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")
EXTENSIONS = {".jpeg", ".jpg", ".png"}
# the papers' two filters, by their torchvision InterpolationMode names
INTERPOLATIONS = ("bilinear", "bicubic")
_SYNSET = re.compile(r"n\d{8}")
_IMAGE_DIRS = (".", "val", "ILSVRC/Data/CLS-LOC/val", "Data/CLS-LOC/val")
_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt",
                "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", "val.txt")
_LAYOUT = ("point dataset.root to the ILSVRC2012 validation images: one folder per synset (root/n01440764/*.JPEG) "
           "or the flat folder with a labels file (dataset.labels=LOC_val_solution.csv or a 'filename synset' list)")


@lru_cache(maxsize=1)
def load_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(synset IDs, WordNet names) of the 1000 classes, in class-index order."""
    rows = [line.split("\t") for line in CLASSES_FILE.read_text().splitlines()[1:] if line.strip()]
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def resize_center_crop(img: Image.Image, size: int, crop_fraction: float = 1.0,
                       interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize(floor(size / crop_fraction), interpolation)`` + ``CenterCrop(size)`` on PIL."""
    return _resize_center_crop(img, int(math.floor(size / crop_fraction)), size, interpolation)


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_meta_mat(path: Path, key: str = "dataset.meta") -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 leaf classes, from the devkit's ``data/meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CfxError(f"{key}={path}: reading the devkit's meta.mat needs scipy (pip install scipy); or label the "
                       f"images with Kaggle's LOC_val_solution.csv or a 'filename synset' list") from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        ids, wnids = synsets["ILSVRC2012_ID"], synsets["WNID"]
        children = synsets["num_children"]
        return {int(i): str(w) for i, w, c in zip(ids, wnids, children) if int(c) == 0}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CfxError(f"{key}={path} is not the ILSVRC2012 devkit's meta.mat ({type(e).__name__}): use "
                       f"ILSVRC2012_devkit_t12/data/meta.mat") from None


class ImageNetDataset:
    """ILSVRC2012 validation images with their class (0..999, sorted-synset order).

    ``batch`` returns the interface keys: index, id (file name), x (N×3×S×S in [-1, 1]), label, value
    (NaN), factors (None). ``synsets``/``class_names``/``classes``: the 1000 synset IDs, WordNet names
    and short names (first lemma) by class index; ``synset``: each item's synset.
    """

    has_factors = False

    def __init__(self, root: str, labels: str | None = None, meta: str | None = None, image_size: int = 256,
                 num_images: int | None = None, crop_fraction: float = 1.0, interpolation: str = "bilinear",
                 name: str = "imagenet", **unknown):
        if unknown:
            raise CfxError(f"dataset.{sorted(unknown)[0]} is not an imagenet option; use root, labels, meta, "
                           f"image_size, num_images, crop_fraction, interpolation")
        self.root = dataset_root(root, _LAYOUT, "/data/imagenet/val")
        self.name = name
        self.image_size = positive_int("image_size", image_size, "256 for the ImageNet diffusion models")
        if num_images is not None:
            num_images = positive_int("num_images", num_images, "or null for all images")
        try:
            self.crop_fraction = float(crop_fraction)
        except (TypeError, ValueError):
            self.crop_fraction = float("nan")
        if not 0 < self.crop_fraction <= 1:
            raise CfxError(f"dataset.crop_fraction={crop_fraction!r} must be in (0, 1]: 1.0 resizes the shorter "
                           f"side to image_size (ACE), 0.875 to image_size / 0.875 before the centre crop (DVCE)")
        if interpolation not in INTERPOLATIONS:
            raise CfxError(f"dataset.interpolation={interpolation!r} is unknown; use bilinear (ACE, torchvision's "
                           f"default) or bicubic (DVCE)")
        self.interpolation = interpolation
        self.synsets, self.class_names = load_classes()
        self.classes = [n.split(", ")[0] for n in self.class_names]
        self._index = {s: i for i, s in enumerate(self.synsets)}

        self.image_dir = next((d for d in (self.root / p for p in _IMAGE_DIRS) if d.is_dir() and any(
            (c.is_dir() and _SYNSET.fullmatch(c.name)) or c.suffix.lower() in EXTENSIONS for c in d.iterdir())),
            self.root)
        class_dirs = sorted(c for c in self.image_dir.iterdir() if c.is_dir() and _SYNSET.fullmatch(c.name))
        if labels is None and class_dirs:
            self.layout, self.labels_path = "folders", None
            items = self._from_folders(class_dirs)
        else:
            self.layout = "flat"
            items = self._from_labels(labels, meta)
        items.sort(key=lambda it: (it[1], it[0].name))
        if num_images is not None:
            items = items[:num_images]
        self.files = [p for p, _ in items]
        self.labels = [c for _, c in items]
        self.synset = [self.synsets[c] for c in self.labels]

    # ------------------------------------------------------------------ layouts
    def _from_folders(self, class_dirs: list[Path]) -> list[tuple[Path, int]]:
        items = []
        for d in class_dirs:
            if d.name not in self._index:
                raise CfxError(f"dataset.root={self.root}: folder {d.name} is not one of the 1000 ILSVRC2012 "
                               f"synsets (n01440764 ... n15075141): remove it or point dataset.root elsewhere")
            items += [(p, self._index[d.name]) for p in _images(d, recursive=True)]
        if not items:
            raise CfxError(f"dataset.root={self.root}: the synset folders hold no images "
                           f"({', '.join(sorted(EXTENSIONS))}): {_LAYOUT}")
        return items

    def _from_labels(self, labels, meta) -> list[tuple[Path, int]]:
        files = _images(self.image_dir)
        if not files:
            raise CfxError(f"dataset.root={self.root} holds no images ({', '.join(sorted(EXTENSIONS))}) "
                           f"and no synset folders: {_LAYOUT}")
        if labels is None or str(labels).strip() in ("", "???"):
            found = [d / f for d in (self.root, self.root.parent) for f in _LABEL_FILES if (d / f).is_file()]
            if not found:
                raise CfxError(f"dataset.root={self.root} is a flat folder of images with no labels file: set "
                               f"dataset.labels to LOC_val_solution.csv, the devkit's "
                               f"ILSVRC2012_validation_ground_truth.txt or a 'filename synset' list")
            path = found[0]
        else:
            path = Path(str(labels)).expanduser()
            if not path.is_absolute() and not path.is_file():
                path = self.root / path
            if not path.is_file():
                raise CfxError(f"dataset.labels={labels} does not exist: point it to LOC_val_solution.csv, "
                               f"ILSVRC2012_validation_ground_truth.txt or a 'filename synset' list")
        self.labels_path = path
        table = self._read_labels(path, meta)
        missing = [p.name for p in files if p.stem not in table]
        if missing:
            raise CfxError(f"dataset.labels={path} has no label for {missing[0]} ({len(missing)} of the "
                           f"{len(files)} images in {self.image_dir} unlabelled): is it the labels file of these "
                           f"images?")
        return [(p, table[p.stem]) for p in files]

    # ------------------------------------------------------------------ labels files
    def _class_of(self, token: str, path: Path, line: int) -> int:
        if token.isdigit():
            c = int(token)
            if c < len(self.synsets):
                return c
            raise CfxError(f"dataset.labels={path}: line {line} has class index {c}, out of range 0..999 "
                           f"(sorted-synset order)")
        if token in self._index:
            return self._index[token]
        raise CfxError(f"dataset.labels={path}: line {line} names {token!r}, not one of the 1000 ILSVRC2012 "
                       f"synsets (n01440764 ... n15075141)")

    def _read_labels(self, path: Path, meta) -> dict[str, int]:
        """file stem -> class index."""
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CfxError(f"dataset.labels={path} cannot be read ({type(e).__name__})") from None
        rows = [(k, ln.strip()) for k, ln in enumerate(lines, 1) if ln.strip()]
        if not rows:
            raise CfxError(f"dataset.labels={path} is empty")
        head = [c.strip() for c in rows[0][1].split(",")]
        if head[:2] == ["ImageId", "PredictionString"]:  # Kaggle
            out = {}
            for k, ln in rows[1:]:
                image, _, pred = ln.partition(",")
                tokens = pred.split()
                if not tokens:
                    raise CfxError(f"dataset.labels={path}: line {k} has no PredictionString (expected "
                                   f"'ImageId,n01440764 x y x y ...')")
                out[Path(image.strip()).stem] = self._class_of(tokens[0], path, k)
            return out
        if all(ln.isdigit() for _, ln in rows):  # the devkit's ground truth: ILSVRC2012_IDs in file order
            meta_path = Path(str(meta)).expanduser() if meta else path.parent / "meta.mat"
            if not meta_path.is_file():
                raise CfxError(f"dataset.meta={meta_path} does not exist: {path.name} holds ILSVRC2012_IDs, whose "
                               f"synsets are in the devkit's data/meta.mat (set dataset.meta=.../meta.mat)")
            ids = read_meta_mat(meta_path)
            out = {}
            for k, (_, ln) in enumerate(rows, 1):
                if int(ln) not in ids:
                    raise CfxError(f"dataset.labels={path}: line {k} has ILSVRC2012_ID {ln}, not one of the 1000 "
                                   f"classes of dataset.meta={meta_path}")
                out[f"ILSVRC2012_val_{k:08d}"] = self._index[ids[int(ln)]]
            return out
        out = {}
        for n, (k, ln) in enumerate(rows):
            parts = ln.replace(",", " ").split()
            if len(parts) < 2 or not (parts[1].isdigit() or _SYNSET.fullmatch(parts[1])):
                if n == 0:  # a header line
                    continue
                raise CfxError(f"dataset.labels={path}: line {k} is not 'filename synset' or 'filename "
                               f"class_index' ({ln[:60]!r})")
            out[Path(parts[0]).stem] = self._class_of(parts[1], path, k)
        return out

    # ------------------------------------------------------------------ items
    def __len__(self):
        return len(self.files)

    def _load(self, path: Path) -> torch.Tensor:
        img = open_rgb(path, str(path), f"dataset.root={self.root}: cannot read image {path}")
        return to_tensor(resize_center_crop(img, self.image_size, self.crop_fraction, self.interpolation))

    def ids(self, indices) -> list[str]:
        """The items' ids without loading them (a resumed job checks that its done rows still match)."""
        return [self.files[int(i)].name for i in indices]

    def batch(self, indices) -> dict:
        indices = [int(i) for i in indices]
        files = [self.files[i] for i in indices]
        return {"index": indices, "id": [p.name for p in files], "x": torch.stack([self._load(p) for p in files]),
                "label": torch.as_tensor([self.labels[i] for i in indices], dtype=torch.long),
                "value": torch.full((len(files),), float("nan")), "factors": None}
