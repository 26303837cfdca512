"""CelebA-HQ read from files in CelebAMask-HQ's layout, written here: the test split comes from CelebA's
partition through the mapping file, labels from the attribute file, age targets from Young."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfx_cli.data.celeba import ATTRIBUTE_NAMES
from cfx_cli.data.celebahq import CelebAHQDataset
from cfx_cli.errors import CfxError
from cfx_cli.objectives import RegressionObjective

# HQ index → (CelebA original, partition, Smiling, Young)
ROWS = [(0, "119614.jpg", 0, 1, 1), (1, "182700.jpg", 2, 0, 1), (2, "182650.jpg", 2, 1, 0),
        (3, "170000.jpg", 1, 0, 0), (4, "190000.jpg", 2, 1, 1)]


def write_celebahq(root, size=40, ldce_partition=False):
    (root / "CelebA-HQ-img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [str(len(ROWS)), " ".join(ATTRIBUTE_NAMES)]
    for idx, _, _, smile, young in ROWS:
        vals = [-1] * 40
        vals[31], vals[39] = (1 if smile else -1), (1 if young else -1)
        lines.append(f"{idx}.jpg  " + " ".join(str(v) for v in vals))
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "CelebA-HQ-img" / f"{idx}.jpg")
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(lines) + "\n")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx        orig_file\n"
        + "".join(f"{idx:<12d}{int(f[:-4]) - 1:<16d}{f}\n" for idx, f, *_ in ROWS))
    if ldce_partition:  # LDCE's own CSV, by HQ index
        (root / "list_eval_partition.csv").write_text("idx,split\n" + "".join(f"{i},{p}\n" for i, _, p, *_ in ROWS))
    else:  # CelebA's file, by CelebA filename (plus rows for images not in CelebA-HQ)
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{f} {p}\n" for _, f, p, *_ in ROWS) + "000001.jpg 0\n")


@pytest.mark.parametrize("ldce", [False, True])
def test_test_split_through_the_mapping(tmp_path, ldce):
    write_celebahq(tmp_path, ldce_partition=ldce)
    ds = CelebAHQDataset(tmp_path, split="test", query="smile", image_size=16)
    assert ds.files == ["1.jpg", "2.jpg", "4.jpg"]           # partition 2, in HQ index order
    b = ds.batch([0, 1, 2])
    assert b["x"].shape == (3, 3, 16, 16) and b["x"].min() >= -1 and b["x"].max() <= 1
    assert b["label"].tolist() == [0, 1, 1]                   # Smiling
    assert CelebAHQDataset(tmp_path, split="test", query="young", image_size=16).batch([0, 1, 2])["label"].tolist() \
        == [1, 0, 1]
    assert CelebAHQDataset(tmp_path, split="val", image_size=16).files == ["3.jpg"]
    assert len(CelebAHQDataset(tmp_path, split="all", image_size=16)) == 5


def test_age_targets_from_young():
    """The regression paper's age task: y* = 0.8 for young faces, 0.1 for the others."""
    obj = RegressionObjective(mode="label", label_values=[0.1, 0.8])
    y = obj.target(torch.tensor([0.3, 0.5, 0.2]), labels=torch.tensor([1, 0, 1]))
    assert torch.allclose(y, torch.tensor([0.8, 0.1, 0.8]))
    with pytest.raises(CfxError, match="label_values"):
        RegressionObjective(mode="label")


def test_missing_files_are_one_line(tmp_path):
    with pytest.raises(CfxError, match="dataset.root=.*CelebAMask-HQ-attribute-anno.txt"):
        CelebAHQDataset(tmp_path)
    write_celebahq(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(CfxError, match="list_eval_partition"):
        CelebAHQDataset(tmp_path)
