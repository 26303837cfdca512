"""ACE and DVCE paper experiments end to end on tiny files in the real formats that the tests write:
CelebA (official layout) / an ImageNet validation folder, a small ADM in guided-diffusion's state-dict
format (the reference fixture, random weights), DiME's classifier.pth, and random ResNet-50s saved as
DVCE's Madry+FT file and as a Madry-lab robustness checkpoint. The experiment configs compose as
users run them; only the paths, the tiny ADM's flags and the length of the chains are overridden."""
import json

import pandas as pd
import pytest
import torch

from cfx_cli.outputs import read_samples
from test_celeba_experiments import FIXTURES, files, tiny_adm_overrides  # noqa: F401  (files: a fixture)
from test_imagenet import random_resnet50, write_val

ADM = FIXTURES / "tiny_adm_celeba_format.pt"  # guided-diffusion's layout, whatever the dataset


def status_of(job_dir):
    return json.loads((job_dir / "status.json").read_text())


def test_ace_celeba_smile_end_to_end(tmp_path, compose, files):  # noqa: F811
    from cfx_cli.job.loop import job

    root, _ = files
    cfg = compose(["experiment=ace_celeba_smile", f"dataset.root={root / 'celeba'}", f"diffusion.path={ADM}",
                   f"classifier.path={root / 'classifier.pth'}", *tiny_adm_overrides(), "dataset.image_size=32",
                   "dataset.num_images=4", "batch_size=4", "sampler.steps=10", "method.tau=2",
                   "method.iterations=3", "device=cpu"])
    # the paper's settings are what the experiment composes
    assert (cfg.method.lambda_l1, cfg.method.step, cfg.method.mask_dilation, cfg.method.success_on) == \
        (0.001, 1.0, 15, "pre_explanation")
    assert cfg.method.classifier_loss == "ce" and cfg.dataset.subset == "mini_val"
    job(cfg, tmp_path / "job")
    assert status_of(tmp_path / "job")["state"] == "done"
    s = read_samples(tmp_path / "job").sort_values("index")
    # faithful: success judged on the pre-explanation; both judgements recorded
    assert (s["success"] == s["success_pre_explanation"].astype(bool)).all()
    assert {"success_final", "pgd_iterations"} <= set(s.columns)
    # Cost: τ UNet forwards and backwards per PGD iteration, τ forwards for the refinement;
    # the classifier once per iteration, once to judge the pre-explanation
    assert (s["pgd_iterations"] == 3).all()
    assert (s["nfe_unet"] == 3 * 2 + 2).all() and (s["nfe_unet_backward"] == 3 * 2).all()
    assert (s["nfe_model"] == 3 + 1).all() and (s["nfe_model_backward"] == 3).all()
    for kind in ("original", "counterfactual", "pre_explanation", "mask"):
        assert len(list((tmp_path / "job" / "images" / kind).glob("*.png"))) == 4
    m = pd.read_csv(tmp_path / "job" / "metrics.csv").set_index("metric")["value"]
    assert m["flip_rate"] == m["flip_rate_pre_explanation"] == s["success"].mean()
    assert m["flip_rate_final"] == s["success_final"].mean()


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet_job")
    write_val(tmp / "val")
    torch.save(random_resnet50(0).state_dict(), tmp / "madryft.pt")  # DVCE's Madry+FT: a plain state dict
    torch.save(random_resnet50(1).state_dict(), tmp / "resnet50.pth")  # a non-robust torchvision classifier
    madry = {f"module.model.{k}": v for k, v in random_resnet50(2).state_dict().items()}
    torch.save({"model": madry, "epoch": 90}, tmp / "imagenet_l2_3_0.pt")  # Madry-lab robustness layout
    return tmp


def dvce_overrides(tmp):
    return [f"dataset.root={tmp / 'val'}", f"diffusion.path={ADM}", *tiny_adm_overrides(),
            "dataset.image_size=32", "dataset.num_images=2", "batch_size=2", "sampler.steps=20", "method.start=2",
            "device=cpu"]


def test_dvce_imagenet_end_to_end(tmp_path, compose, imagenet_files):
    from cfx_cli.job.loop import job

    tmp = imagenet_files
    cfg = compose(["experiment=dvce_imagenet", f"classifier.path={tmp / 'madryft.pt'}", *dvce_overrides(tmp)])
    assert (cfg.method.lambda_c, cfg.method.lambda_d, cfg.method.cone_angle) == (0.1, 0.15, None)
    assert cfg.classifier.temperature == pytest.approx(0.7155761122703552) and cfg.target.mode == "table"
    assert cfg.diffusion.clip_denoised is False and cfg.get("robust_model") is None
    job(cfg, tmp_path / "plain")
    s = read_samples(tmp_path / "plain").sort_values("index")
    # the target: the shipped WordNet table's entry for each predicted class
    table = pd.read_csv(__import__("cfx_cli.data", fromlist=["x"]).__path__[0] + "/imagenet_targets.csv")
    lookup = dict(zip(table["source"], table["target"]))
    assert [lookup[p] for p in s["pred"]] == list(s["target"])
    # Cost: guided steps t = 2, 1, each one UNet forward and a backward for each of the two gradients
    # (classifier, distance); the output x̂_0(z_1) one more forward; the classifier once per guided step
    assert (s["nfe_unet"] == 2 + 1).all() and (s["nfe_unet_backward"] == 2 * 2).all()
    assert (s["nfe_model"] == 2).all() and (s["nfe_model_backward"] == 2).all()

    # the cone: a non-robust torchvision ResNet-50 explained with the Madry-lab robust model's help
    cone = compose(["experiment=dvce_imagenet", "classifier=torchvision", f"classifier.path={tmp / 'resnet50.pth'}",
                    "robust_model=madry_resnet50", f"robust_model.path={tmp / 'imagenet_l2_3_0.pt'}",
                    "method.cone_angle=30", "method.augmentations=2", *dvce_overrides(tmp)])
    job(cone, tmp_path / "cone")
    c = read_samples(tmp_path / "cone").sort_values("index")
    # two augmented copies per classifier call (each image counts, forward and backward); three backward
    # passes through the UNet per step
    assert (c["nfe_robust_model"] == 2 * 2).all() and (c["nfe_robust_model_backward"] == 2 * 2).all()
    assert (c["nfe_model"] == 2 * 2).all() and (c["nfe_model_backward"] == 2 * 2).all()
    assert (c["nfe_unet_backward"] == 3 * 2).all()
    assert c["cone_angle_mean"].between(0, 180).all()
    assert status_of(tmp_path / "cone")["state"] == "done"
