"""The CelebA paper experiments end to end, on tiny files in the real formats that the test writes:
a CelebA folder (official layout), a small ADM in guided-diffusion's state-dict format (the
reference fixture, random weights), a DenseNet-121 in DiME's classifier.pth layout and VGG19
weights for the perceptual term. The experiment configs compose as users run them; only the
paths, the tiny ADM's flags and the length of the chain are overridden."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from cfx_cli.models.perceptual import vgg19_features
from torchvision.models import densenet121
from cfx_cli.outputs import read_samples
from test_celeba import write_celeba

FIXTURES = Path(__file__).parent / "fixtures" / "adm"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba_files")
    write_celeba(root / "celeba")
    torch.manual_seed(0)
    net = densenet121(num_classes=40)
    # DiME's classifier.pth: {'feat_extract': DenseNet121 wrapper state dict, 'classifier': Linear(1024, 40)}
    torch.save({"feat_extract": {f"feat_extract.{k}": v for k, v in net.state_dict().items()
                                 if k.startswith("features.")},
                "classifier": {"weight": net.classifier.weight.detach(), "bias": net.classifier.bias.detach()}},
               root / "classifier.pth")
    vgg = vgg19_features(37)
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, root / "vgg19.pth")
    return root, net


def tiny_adm_overrides():
    flags = json.loads((FIXTURES / "tiny_adm_flags.json").read_text())
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
            "learn_sigma", "use_scale_shift_norm", "resblock_updown", "diffusion_steps", "noise_schedule")
    return [f"diffusion.{k}={json.dumps(flags[k]) if isinstance(flags[k], str) else str(flags[k]).lower()}"
            for k in keys]


@pytest.mark.parametrize("experiment,per_scale", [
    ("dime_celeba_smile", 3 + (1 + 2)),      # τ guided calls + the nested unguided chains
    ("fastdime_celeba_smile", 2 * 3),        # variant 2+: two passes of τ calls
])
def test_celeba_experiment_end_to_end(tmp_path, compose, files, experiment, per_scale):
    from cfx_cli.job.loop import job

    root, net = files
    cfg = compose([f"experiment={experiment}", f"dataset.root={root / 'celeba'}",
                   f"diffusion.path={FIXTURES / 'tiny_adm_celeba_format.pt'}", f"classifier.path={root / 'classifier.pth'}",
                   f"method.perceptual_weights={root / 'vgg19.pth'}", *tiny_adm_overrides(),
                   "dataset.image_size=32", "dataset.num_images=4", "batch_size=4", "sampler.steps=10",
                   "method.tau=3", "device=cpu"])
    # the papers' settings are what the experiment composes
    assert (cfg.dataset.query, cfg.dataset.split, cfg.dataset.subset) == ("smile", "val", "mini_val")
    assert cfg.method.lambda_perc == 30.0 and list(cfg.method.scales) == [8.0, 10.0, 15.0]
    assert cfg.method.classifier_loss == "logit"
    job(cfg, tmp_path / "job")
    status = json.loads((tmp_path / "job" / "status.json").read_text())
    assert status["state"] == "done" and status["written"] == 4
    s = read_samples(tmp_path / "job").sort_values("index")
    # The explained decision is the Smiling logit (index 31) of the 40, flipped.
    from cfx_cli.data.celeba import CelebADataset

    ds = CelebADataset(root / "celeba", split="val", query="smile", image_size=32, subset="mini_val", num_images=4)
    x = ds.batch(list(range(4)))["x"]
    with torch.no_grad():
        logit = net(nn.functional.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False,
                                              antialias=False))[:, 31]
    assert list(s["pred"]) == (logit > 0).long().tolist()
    assert list(s["target"]) == (1 - (logit > 0).long()).tolist()
    assert list(s["id"]) == [ds.batch([i])["id"][0] for i in range(4)]
    # Cost: the UNet is never differentiated; each scale tried costs per_scale calls.
    tried = s["scale"].map({8.0: 1, 10.0: 2, 15.0: 3})
    assert (s["nfe_unet"] == per_scale * tried).all() and (s["nfe_unet_backward"] == 0).all()
    assert (s["nfe_model_backward"] > 0).all()
    for kind in ("original", "counterfactual", "diff"):
        assert len(list((tmp_path / "job" / "images" / kind).glob("*.png"))) == 4
    assert pd.read_csv(tmp_path / "job" / "metrics.csv").set_index("metric").loc["num_samples", "value"] == 4
