"""CelebA as the DiME / ACE / FastDiME papers use it, on a tiny CelebA written in the official layout."""
import hashlib
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cfx_cli.data.celeba import ATTRIBUTE_NAMES, CelebADataset, draw_subset, resize_center_crop, resolve_query
from cfx_cli.errors import CfxError

PARTITION = [0] * 5 + [1] * 5 + [2] * 3  # 000001-000005 train, 000006-000010 val, 000011-000013 test
N = len(PARTITION)
SMILING, YOUNG, MALE = 31, 39, 20


def _names():
    return [f"{i:06d}.jpg" for i in range(1, N + 1)]


def write_celeba(root, layout="txt", nested=False, seed=0):
    """Write a tiny CelebA (178x218 JPGs like the real one); returns the -1/1 attribute matrix."""
    rng = np.random.default_rng(seed)
    attrs = rng.choice([-1, 1], size=(N, 40))
    attrs[:, SMILING] = [1, -1, 1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1]
    root.mkdir(parents=True, exist_ok=True)
    img_dir = root / "img_align_celeba" / ("img_align_celeba" if nested else "")
    img_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:218, 0:178]
    for name in _names():  # smooth gradients (they survive the antialiased resize) with a per-image blue
        img = np.stack([yy * 255 / 217, xx * 255 / 177, np.full_like(yy, rng.integers(0, 256))], -1)
        Image.fromarray(img.astype(np.uint8)).save(img_dir / name)
    if layout == "txt":
        lines = [f"{N}", " ".join(ATTRIBUTE_NAMES) + " "]  # the official header has a trailing space
        for k, (name, row) in enumerate(zip(_names(), attrs)):
            sep = "  " if k % 3 == 0 else " "
            lines.append(name + " " + sep.join(f"{v:2d}" for v in row) + (" " if k % 2 else ""))
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(_names(), PARTITION)))
    else:  # the Kaggle csv files
        lines = ["image_id," + ",".join(ATTRIBUTE_NAMES)]
        lines += [name + "," + ",".join(str(v) for v in row) for name, row in zip(_names(), attrs)]
        (root / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{n},{p}\n" for n, p in zip(_names(), PARTITION)))
    return attrs


@pytest.fixture
def celeba(tmp_path):
    root = tmp_path / "celeba"
    return root, write_celeba(root)


def _one_line_error(match, **kwargs):
    with pytest.raises(CfxError, match=match) as e:
        CelebADataset(**kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_splits_and_aliases(celeba):
    root, _ = celeba
    names = _names()
    for split, part in (("train", 0), ("val", 1), ("test", 2)):
        ds = CelebADataset(root, split=split, image_size=16)
        assert ds.files == [n for n, p in zip(names, PARTITION) if p == part]
    assert CelebADataset(root, split="all", image_size=16).files == names
    for alias in ("valid", "validation", "VAL", " Val "):
        assert CelebADataset(root, split=alias, image_size=16).files == names[5:10]
    assert len(CelebADataset(root, image_size=16)) == 5  # default split: val


def test_query_by_name_alias_index(celeba):
    root, attrs = celeba
    for q in ("smile", "Smiling", "SMILING", "smiling", 31, "31"):
        assert resolve_query(q) == SMILING
    for q in ("young", "age", "Young", 39):
        assert resolve_query(q) == YOUNG
    assert resolve_query("male") == MALE and resolve_query("wearing hat") == 35 and resolve_query(0) == 0
    ds = CelebADataset(root, split="all", query="young", image_size=16)
    assert ds.query_index == YOUNG and ds.classes == ["not Young", "Young"]
    assert ds.attribute_names == list(ATTRIBUTE_NAMES) and len(ds.attribute_names) == 40
    b = ds.batch(range(N))
    assert b["label"].tolist() == (attrs[:, YOUNG] > 0).astype(int).tolist()


def test_batch_labels_attributes_and_images(celeba):
    root, attrs = celeba
    ds = CelebADataset(root, split="val", query="smile", image_size=32)
    b = ds.batch([0, 2, 4])
    assert b["index"] == [0, 2, 4] and b["id"] == ["000006.jpg", "000008.jpg", "000010.jpg"]
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 1, 1]  # rows 6, 8, 10 of Smiling
    assert b["attributes"].dtype == torch.long and b["attributes"].shape == (3, 40)
    assert b["attributes"].tolist() == (attrs[[5, 7, 9]] > 0).astype(int).tolist()
    assert b["x"].shape == (3, 3, 32, 32) and b["x"].dtype == torch.float32
    assert b["x"].min() >= -1 and b["x"].max() <= 1 and b["x"][:, :2].amin() < -0.9 and b["x"][:, :2].amax() > 0.9
    assert torch.isnan(b["value"]).all() and b["factors"] is None


def test_preprocessing_is_torchvision_resize_then_center_crop():
    # torchvision Resize(128) on 178x218 (w x h): shorter side 128, longer int(128 * 218 / 178) = 156;
    # CenterCrop: top = int(round((156 - 128) / 2)) = 14, left = 0.
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (218, 178, 3), dtype=np.uint8))
    expected = np.asarray(img.resize((128, 156), Image.Resampling.BILINEAR))[14:142]
    assert np.array_equal(np.asarray(resize_center_crop(img, 128)), expected)
    # landscape: crop along the width; python's round-half-even as torchvision (39 - 32 = 7 -> 3.5 -> 4)
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 78, 3), dtype=np.uint8))
    expected = np.asarray(wide.resize((39, 32), Image.Resampling.BILINEAR))[:, 4:36]
    assert np.array_equal(np.asarray(resize_center_crop(wide, 32)), expected)
    assert resize_center_crop(img, 64).size == (64, 64)


def test_center_crop_removes_the_borders(celeba):
    root, _ = celeba
    # 48 x 80 (w x h): red bands of 16 rows top and bottom (8-aligned, so JPEG keeps them clean), green middle.
    arr = np.zeros((80, 48, 3), dtype=np.uint8)
    arr[:, :] = (0, 255, 0)
    arr[:16], arr[64:] = (255, 0, 0), (255, 0, 0)
    Image.fromarray(arr).save(root / "img_align_celeba" / "000006.jpg", quality=100, subsampling=0)
    x = CelebADataset(root, split="val", image_size=48).batch([0])["x"][0]  # no resize: crop rows 16..63
    assert x.shape == (3, 48, 48)
    assert (x[0] + 1).abs().max() < 0.05 and (x[1] - 1).abs().max() < 0.05 and (x[2] + 1).abs().max() < 0.05
    # downscaled: 24 x 40 -> crop rows 8..31; all but the (bilinear-blended) edge rows are pure green
    x = CelebADataset(root, split="val", image_size=24).batch([0])["x"][0]
    assert x.shape == (3, 24, 24)
    assert (x[0, 1:-1] + 1).abs().max() < 0.05 and (x[1, 1:-1] - 1).abs().max() < 0.05
    assert x[0].mean() < -0.8  # the red bands are gone


def test_csv_variant_and_nested_kaggle_folder(tmp_path, celeba):
    root, attrs = celeba
    kaggle = tmp_path / "kaggle"
    write_celeba(kaggle, layout="csv", nested=True)
    assert not (kaggle / "img_align_celeba" / "000001.jpg").exists()
    a = CelebADataset(root, split="val", query="smile", image_size=16)
    b = CelebADataset(kaggle, split="validation", query=31, image_size=16)
    assert a.files == b.files and a.image_dir != b.image_dir
    ba, bb = a.batch(range(len(a))), b.batch(range(len(b)))
    assert torch.equal(ba["label"], bb["label"]) and torch.equal(ba["attributes"], bb["attributes"])
    assert torch.equal(ba["x"], bb["x"])  # same seed, same pixels


def test_nested_folder_with_txt_files(tmp_path):
    root = tmp_path / "c"
    write_celeba(root, nested=True)
    ds = CelebADataset(root, split="test", image_size=16)
    assert ds.image_dir == root / "img_align_celeba" / "img_align_celeba"
    assert ds.batch([0, 1, 2])["x"].shape == (3, 3, 16, 16)


def test_mini_val_draw(celeba):
    root, attrs = celeba
    state = random.getstate()
    ds = CelebADataset(root, split="val", subset="mini_val", subset_size=12, image_size=16)
    assert random.getstate() == state  # the draw leaves the global generator alone
    # independent computation, DiME/ACE utils/create-mini-val.py verbatim (on the global generator)
    random.seed(5)
    indexes = random.choices(list(range(5)), k=12)
    indexes.sort()
    random.setstate(state)
    assert ds.split_positions.tolist() == indexes
    assert len(ds) == 12 and len(set(ds.files)) < 12  # with replacement: duplicates kept
    assert ds.files == [f"{6 + i:06d}.jpg" for i in indexes]
    b = ds.batch(range(12))
    assert b["index"] == list(range(12)) and b["id"] == ds.files
    assert b["label"].tolist() == [int(attrs[5 + i, SMILING] > 0) for i in indexes]
    again = CelebADataset(root, split="valid", subset="minival", subset_size=12, image_size=16)
    assert again.files == ds.files
    other = CelebADataset(root, split="val", subset="mini-val", subset_size=12, subset_seed=6, image_size=16)
    assert other.split_positions.tolist() != ds.split_positions.tolist()
    assert CelebADataset(root, subset="mini_val", subset_size=12, num_images=3, image_size=16).files == ds.files[:3]


def test_mini_val_reproduces_the_published_file():
    # ACE's utils/minival.csv (github guillaumejs2403/ACE, the draw of DiME's utils/create-mini-val.py on the
    # 19,867 val images): its first column, the position in the val split, for all 1000 rows.
    pos = draw_subset(19867, 1000, 5)
    assert pos[:10] == [8, 13, 18, 35, 58, 67, 101, 124, 161, 180]
    assert len(set(pos)) == 966 and sum(pos) == 9755023
    assert hashlib.sha256(",".join(map(str, pos)).encode()).hexdigest() == \
        "66a32037b08ec71a11db7e4d7cbe6ebbbc35469c4ea7aae6408278bd3767df97"


def test_num_images(celeba):
    root, _ = celeba
    assert CelebADataset(root, split="train", num_images=2, image_size=16).files == ["000001.jpg", "000002.jpg"]
    assert len(CelebADataset(root, split="train", num_images=100, image_size=16)) == 5
    for bad in (0, -3, "x"):
        _one_line_error("dataset.num_images", root=root, num_images=bad)


def test_one_line_errors(tmp_path, celeba):
    root, _ = celeba
    _one_line_error("dataset.root", root=tmp_path / "nowhere")
    _one_line_error("dataset.query", root=root, query="smiley")
    _one_line_error("dataset.query", root=root, query=40)
    _one_line_error("dataset.split", root=root, split="dev")
    _one_line_error("dataset.subset", root=root, subset="tiny_val")
    _one_line_error("dataset.image_size", root=root, image_size=0)
    _one_line_error("dataset.colour", root=root, colour="red")

    (root / "list_eval_partition.txt").rename(root / "moved.txt")
    msg = _one_line_error("dataset.root", root=root)
    assert "list_eval_partition" in msg
    assert len(CelebADataset(root, split="all", image_size=16)) == N  # split=all needs no partition file
    (root / "moved.txt").rename(root / "list_eval_partition.txt")

    (root / "list_attr_celeba.txt").rename(root / "moved.txt")
    assert "list_attr_celeba" in _one_line_error("dataset.root", root=root)
    (root / "moved.txt").rename(root / "list_attr_celeba.txt")

    shutil.rmtree(root / "img_align_celeba")
    assert "img_align_celeba" in _one_line_error("dataset.root", root=root)

    (root / "list_attr_celeba.txt").write_text("1\nA B C\n000001.jpg 1 -1 1\n")
    assert "40" in _one_line_error("dataset.root", root=root, split="all")


def test_hydra_config(celeba, compose):
    from hydra.utils import instantiate

    root, _ = celeba
    cfg = compose(["dataset=celeba", f"dataset.root={root}", "dataset.image_size=16"])
    assert cfg.dataset.split == "val" and cfg.dataset.query == "smile" and cfg.dataset.subset is None
    ds = instantiate(cfg.dataset)
    assert isinstance(ds, CelebADataset) and ds.query_index == SMILING and len(ds) == 5
    cfg = compose(["dataset=celeba", f"dataset.root={root}", "dataset.subset=mini_val"])
    assert len(instantiate(cfg.dataset)) == 1000


def test_to_tensor_divides_by_255_as_the_papers_totensor():
    # ToTensor divides by 255 (v2's ToDtype multiplies by 1/255, one ulp off on about half the values)
    from cfx_cli.data.images import to_tensor

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_tensor(Image.fromarray(np.stack([values, values[::-1], values.T], -1)))
    v = torch.arange(256, dtype=torch.float32).reshape(16, 16)
    expect = (torch.stack([v, v.flip(0), v.T]) / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


def test_reading_no_image_imports_no_torchvision():
    # torchvision costs seconds at import: the datasets and the explained model import it on first use only
    import subprocess
    import sys

    code = ("import sys, cfx_cli.data.celeba, cfx_cli.data.imagenet, cfx_cli.data.folder, cfx_cli.models.explained; "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
