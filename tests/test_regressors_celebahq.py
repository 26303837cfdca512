"""The CelebA-HQ models of the regression paper and LDCE, in their released layouts (key lists from the
papers' code), written here with random weights and read back through the configs' loaders."""
import json
import sys
import types
from pathlib import Path

import torch

from cfx_cli.models.classifiers import celeba_densenet, dcfir_regressor
from torchvision.models import densenet121, resnet18
from cfx_cli.objectives import build_objective

FIX = Path(__file__).parent / "fixtures" / "checkpoints"


def _keys(name):
    return {k: tuple(v) for k, v in json.loads((FIX / name).read_text())["keys"].items()}


def _lightning_save(state, path, monkeypatch):
    """A Lightning 2.x-like checkpoint: weights under state_dict, a callback of a class that is not importable."""
    mod = types.ModuleType("fake_lightning_cb")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    torch.save({"state_dict": state, "epoch": 3, "callbacks": {ModelCheckpoint: {"best_model_path": "x"}},
                "hyper_parameters": {"full_finetune": False}}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)


def test_age_regressor_densenet(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = densenet121(num_classes=1).eval()
    state = {"model.mu": torch.full((1, 3, 1, 1), 0.5), "model.sigma": torch.full((1, 3, 1, 1), 0.5)}
    state.update({f"model.classifier.0.feat_extract.{k}": v for k, v in net.state_dict().items()
                  if k.startswith("features.")})
    state.update({f"model.classifier.1.{k[len('classifier.'):]}": v for k, v in net.state_dict().items()
                  if k.startswith("classifier.")})
    assert {k: tuple(v.shape) for k, v in state.items()} == _keys("keys_dcfir_imdbclean_regressor_densenet121.json")
    _lightning_save(state, tmp_path / "last.ckpt", monkeypatch)
    model = dcfir_regressor(str(tmp_path / "last.ckpt"), arch="densenet121")
    assert model.task == "regression"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # [-1, 1] → [0, 1] → Normalizer(0.5, 0.5) → the network sees x itself
        assert torch.allclose(model.net(x), net(x), atol=1e-5)


def test_squares_regressor_resnet18(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = resnet18(num_classes=1)
    net.conv1 = torch.nn.Conv2d(3, 64, 4, 1, 2, bias=False)
    net.eval()
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == _keys("keys_dcfir_square_regressor_resnet18.json")
    _lightning_save(state, tmp_path / "last.ckpt", monkeypatch)
    model = dcfir_regressor(str(tmp_path / "last.ckpt"), arch="resnet18_small")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():  # the squares regressor reads [0, 1] images as they are
        assert torch.allclose(model.net(x), net((x + 1) / 2), atol=1e-5)


def test_steex_classifier_query_maps_to_its_output(tmp_path):
    """STEEX's DenseNet has 3 outputs (Male, Smiling, Young): dataset.query=smile (31) is its output 1."""
    net = densenet121(num_classes=3)
    state = {f"feat_extract.feat_extract.{k}": v for k, v in net.state_dict().items() if k.startswith("features.")}
    state.update({k: v for k, v in net.state_dict().items() if k.startswith("classifier.")})
    assert {k: tuple(v.shape) for k, v in state.items()} == _keys("keys_steex_decision_densenet121_celebamaskhq.json")
    torch.save({"epoch": 1, "loss": 0.1, "model_state_dict": state}, tmp_path / "checkpoint.tar")
    model = celeba_densenet(str(tmp_path / "checkpoint.tar"), num_classes=3, input_size=256,
                            output_attributes=[20, 31, 39])
    assert build_objective(model, {"mode": "flip"}, query=31).query == 1
    assert build_objective(model, {"mode": "flip"}, query=39).query == 2
