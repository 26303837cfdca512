"""A timm classifier from a local weight file, through the config a user would write and the job's build."""

import pytest
import torch

try:  # an optional dependency (pip install '.[timm]'); it needs a torchvision built for this torch
    import timm
except Exception as e:  # noqa: BLE001 - ImportError, or a torchvision that does not load with this torch
    pytest.skip(f"timm is not usable here ({type(e).__name__})", allow_module_level=True)


def test_timm_classifier_from_safetensors(tmp_path, compose):
    from safetensors.torch import save_file

    from cfx_cli.job.build import build

    torch.manual_seed(0)
    net = timm.create_model("test_convnext", pretrained=False, num_classes=2).eval()
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    cfg = compose(["classifier=timm", "classifier.arch=test_convnext", f"classifier.path={tmp_path / 'w.safetensors'}",
                   "classifier.num_classes=2", "debug=fast", "dataset.num_images=2", "batch_size=2", "device=cpu"])
    model = build(cfg, torch.device("cpu"))["model"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():  # the model's own normalisation of the [0, 1] image
        assert torch.allclose(model(x), net(((x + 1) / 2 - mean) / std), atol=1e-5)
    assert model.task == "classification" and model.num_classes == 2


def test_unknown_timm_architecture_is_one_line(tmp_path):
    from cfx_cli.errors import CfxError
    from cfx_cli.models.classifiers import timm_classifier

    with pytest.raises(CfxError, match="classifier.arch='no_such_net' is not a timm model"):
        timm_classifier("no_such_net", str(tmp_path / "w.pt"))
