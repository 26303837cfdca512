"""Your own images: which images a folder dataset explains (first, random, balanced, a file list)."""
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
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


def test_train_on_a_folder_then_explain_with_the_models(tmp_path):
    """`cfx train classifier|ddpm dataset=folder ...` then `cfx run` with both, through the CLI."""
    import json

    import pandas as pd

    from cfx_cli.data.synthetic import SyntheticWorld
    from cfx_cli.outputs import to_uint8
    from conftest import cfx

    world = SyntheticWorld()
    f = world.factors_for_indices("train", range(40), 0)
    data = tmp_path / "shapes"
    for i, x in enumerate(world.render(f)):
        d = data / ("round" if f["shape"][i] == 0 else "boxy")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(x)).save(d / f"{i:03d}.png")
    (data / "boxy" / "broken.png").write_text("not an image")
    folder = ["dataset=folder", f"dataset.root={data}", f"work_dir={tmp_path / 'work'}"]
    clf = cfx("train", "classifier", *folder, "trainable.steps=60", f"out={tmp_path / 'clf'}")
    assert "held-out accuracy" in clf.stdout and "skipping boxy/broken.png" in clf.stderr
    info = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert info["classes"] == ["boxy", "round"] and info["quality"]["held_out_images"] == 8
    assert info["quality"]["held_out_accuracy"] >= 0.75  # 60 steps on 31 images: circles vs squares
    assert info["command"].startswith("cfx train classifier dataset=folder")
    cfx("train", "ddpm", *folder, "trainable.steps=2", "trainable.batch_size=4", f"out={tmp_path / 'ddpm'}",
        f"work_dir={tmp_path / 'work_ddpm'}")
    trained = json.loads((tmp_path / "ddpm" / "train_info.json").read_text())
    assert trained["classes"] == ["boxy", "round"] and trained["sample_check"]["file"] == "samples.png"
    assert Image.open(tmp_path / "ddpm" / "samples.png").size == (8 * 32 * 3, 2 * 32 * 3)  # 16 samples, 8 a row
    run = cfx("run", "debug=fast", "dataset=folder", f"dataset.root={data}", f"classifier.path={tmp_path / 'clf'}",
              "diffusion=diffusers_ddpm", f"diffusion.path={tmp_path / 'ddpm'}", f"hydra.run.dir={tmp_path / 'job'}")
    assert "accuracy on 4 of the images to explain" in run.stderr
    assert "the perceptual term is off (method.lambda_perc=0)" in run.stderr  # a user's DDPM: no VGG needed
    assert json.loads((tmp_path / "job" / "classes.json").read_text()) == {"0": "boxy", "1": "round"}
    assert len(pd.read_csv(tmp_path / "job" / "samples.csv")) == 4
    refused = cfx("train", "classifier", check=False)
    assert refused.returncode == 2 and "add dataset=folder dataset.root=<folder>" in refused.stderr
    # a DDPM work_dir holding another folder's run is refused, not continued
    other = tmp_path / "other"
    shutil.copytree(data, other)
    refused = cfx("train", "ddpm", "dataset=folder", f"dataset.root={other}", "trainable.steps=4",
                  "trainable.batch_size=4", f"out={tmp_path / 'ddpm2'}", f"work_dir={tmp_path / 'work_ddpm'}", check=False)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and err[-1].startswith(f"cfx: error: work_dir={tmp_path / 'work_ddpm'} holds the "
                                                          f"checkpoint of another run (dataset_root=")
    # a torchvision-layout architecture, trained and loaded as the job's classifier
    cfx("train", "classifier", *folder, "trainable.arch=resnet18", "trainable.steps=2", f"out={tmp_path / 'rn'}")
    from cfx_cli.models.explained import zoo_model

    net = zoo_model(str(tmp_path / "rn"), "classification")
    assert net.info["arch"] == "resnet18" and net(world.render(f)[:2]).shape == (2, 2)


def test_left_right_flips_can_be_turned_off():
    from cfx_cli.train.ddpm import folder_images

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - draws indices then flips
    plain = folder_images(x, 64, hflip=False)(rng())
    idx = np.random.default_rng(0).integers(0, 2, 64)
    assert torch.equal(plain, x[torch.as_tensor(idx)])
    flipped = folder_images(x, 64)(rng())
    assert not torch.equal(flipped, plain) and any(torch.equal(a, b.flip(-1)) for a, b in zip(flipped, plain))


def test_images_are_the_centred_square_then_bicubic(tmp_path):
    # 31x20 (w x h): the square starts at floor(11 / 2) = 5 (CenterCrop's round(5.5) would start at 6)
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (20, 31, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(arr.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # 20x31: top 5
    ds = FolderDataset(str(tmp_path), image_size=12)
    x = ds.batch([0, 1])["x"]  # sorted: tall, wide
    square = Image.fromarray(arr[:, 5:25]).resize((12, 12), Image.Resampling.BICUBIC)
    expect = torch.from_numpy(np.asarray(square).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(x[1], expect, rtol=0, atol=0)
    square_t = Image.fromarray(arr.transpose(1, 0, 2)[5:25].copy()).resize((12, 12), Image.Resampling.BICUBIC)
    torch.testing.assert_close(x[0], torch.from_numpy(np.asarray(square_t).astype(np.float32)).permute(2, 0, 1)
                               / 127.5 - 1, rtol=0, atol=0)
