"""Your own images: which images a folder dataset explains (first, random, balanced, a file list)."""
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cfx_cli.data.folder import FolderDataset
from cfx_cli.errors import CfxError


@pytest.fixture
def root(tmp_path):
    """Three classes of unequal size: a 6, b 2, c 4 (8×8 PNGs)."""
    for cls, n in (("a", 6), ("b", 2), ("c", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    return tmp_path


def classes_of(ds):
    return Counter(p.parent.name for p in ds.files)


def test_first_random_and_balanced_draws(root):
    first = FolderDataset(str(root), image_size=8, num_images=6)
    assert classes_of(first) == {"a": 6}  # the first sorted paths: one class only
    balanced = FolderDataset(str(root), image_size=8, num_images=6, subset="balanced")
    assert classes_of(balanced) == {"a": 2, "b": 2, "c": 2}
    assert classes_of(FolderDataset(str(root), image_size=8, num_images=7, subset="balanced")) == {"a": 3, "b": 2,
                                                                                                     "c": 2}
    r0 = FolderDataset(str(root), image_size=8, num_images=5, subset="random", seed=0)
    assert len(set(r0.files)) == 5 and r0.files == sorted(r0.files)
    assert r0.files == FolderDataset(str(root), image_size=8, num_images=5, subset="random", seed=0).files
    assert r0.files != FolderDataset(str(root), image_size=8, num_images=5, subset="random", seed=1).files
    # the class mapping comes from every file, whatever the draw
    assert first.classes == balanced.classes == ["a", "b", "c"]
    assert first.batch([0])["label"].tolist() == [0]


def test_file_list(root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# my picks\nc/3.png\nb/0.png\n")
    ds = FolderDataset(str(root), image_size=8, files=str(listing))
    assert [str(p.relative_to(root)) for p in ds.files] == ["c/3.png", "b/0.png"]
    assert ds.ids([0, 1]) == ["c/3.png", "b/0.png"] and ds.batch([1])["label"].tolist() == [1]
    listing.write_text("c/3.png\nz/9.png\n")
    with pytest.raises(CfxError, match=r"1 listed file\(s\) are not under dataset.root=.*\(first: z/9.png\)"):
        FolderDataset(str(root), image_size=8, files=str(listing))
    with pytest.raises(CfxError, match="dataset.subset='stratified' is unknown"):
        FolderDataset(str(root), subset="stratified")
