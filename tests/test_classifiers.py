"""Released explained-model formats: torchvision's architectures against the published key lists, files
written in each released layout loaded back through the loaders, pickles that need code refused, one-line
errors."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision import models as tvm

from cfx_cli.errors import CfxError
from cfx_cli.models.classifiers import (DimeOracleNet, celeba_densenet, dime_oracle, read_layout,
                                        torchvision_classifier, torchvision_model)

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def released(name):
    return json.loads((FIXTURES / name).read_text())


def shapes(module, prefix=""):
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def randomize(net, seed=0):
    """Random weights and BN statistics (so a wrong key mapping cannot pass unnoticed)."""
    sd = net.state_dict()
    with torch.no_grad():
        for k, v in tensors_for({k: list(v.shape) for k, v in sd.items()}, seed).items():
            sd[k].copy_(v)
    return net.eval()


def tensors_for(keys, seed=0):
    """Random tensors of the shapes a released key list gives (BN scales near 1, He-scaled kernels)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in keys.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(3)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        elif len(s) == 1 and k.endswith(".weight"):
            out[k] = 1 + 0.1 * torch.randn(s, generator=g)
        elif len(s) <= 1:
            out[k] = 0.1 * torch.randn(s, generator=g)
        else:
            fan = 1
            for d in s[1:]:
                fan *= d
            out[k] = torch.randn(s, generator=g) * (2.0 / fan) ** 0.5
    return out


def x_in(n=2, size=128, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- architectures vs key lists
def test_resnet50_matches_dvce_and_madry_key_lists():
    with torch.device("meta"):
        net = torchvision_model("resnet50")
    assert type(net) is tvm.ResNet  # torchvision's own network, not a copy
    assert shapes(net) == released("keys_dvce_madryft_resnet50.json")["keys"]
    madry = released("keys_madry_robustness_resnet50.json")["keys"]
    for p in ("module.model.", "module.attacker.model."):
        assert shapes(net, p) == {k: v for k, v in madry.items() if k.startswith(p)}


def test_densenet121_matches_steex_key_list():
    with torch.device("meta"):
        net = torchvision_model("densenet121", 3)
    assert type(net) is tvm.DenseNet
    steex = released("keys_steex_decision_densenet121_celebamaskhq.json")["keys"]
    assert shapes(net) == {k.replace("feat_extract.feat_extract.", ""): v for k, v in steex.items()}


def test_any_torchvision_classification_arch_and_one_line_refusal(tmp_path):
    ref = randomize(torchvision_model("mobilenet_v3_small", 7), seed=2)  # no cfx code for this one
    save_file(ref.state_dict(), str(tmp_path / "m.safetensors"))
    model = torchvision_classifier("mobilenet_v3_small", str(tmp_path / "m.safetensors"), num_classes=7,
                                   input_size=None)
    assert type(model.net) is tvm.MobileNetV3
    x = x_in(1, 64)
    torch.testing.assert_close(model(x), ref(((x + 1) / 2 - MEAN) / STD), rtol=0, atol=0)
    for arch in ("vgg17", "fcn_resnet50"):  # unknown; a segmentation model, not a classifier
        with pytest.raises(CfxError, match=rf"^classifier\.arch='{arch}' is not a torchvision classification "
                                           r"architecture .*list_models") as e:
            torchvision_classifier(arch, str(tmp_path / "m.safetensors"))
        assert "\n" not in str(e.value)


def test_dime_oracle_matches_key_list():
    meta = released("keys_dime_oracle_resnet50_128.json")
    net = DimeOracleNet()
    assert shapes(net) == meta["keys"]
    assert sum(p.numel() for p in net.parameters()) == meta["param_count"]


# ------------------------------------------------------------------------------ DiME/ACE CelebA classifier
def test_celeba_densenet_released_layout(tmp_path):
    ref = randomize(torchvision_model("densenet121", 40))
    sd = ref.state_dict()
    # DiME's classifier.pth: {'feat_extract': DenseNet121 wrapper (feat_extract = torchvision densenet,
    # classifier Identity), 'classifier': Linear(1024, 40)}
    torch.save({"feat_extract": {f"feat_extract.{k}": v for k, v in sd.items() if k.startswith("features.")},
                "classifier": {"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]}},
               tmp_path / "classifier.pth")
    model = celeba_densenet(str(tmp_path / "classifier.pth"))
    assert model.head == "sigmoid" and model.num_classes == 40 and model.normalize == "none"
    x = x_in(2, 128)
    out = model(x)
    assert out.shape == (2, 40)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)  # [-1, 1] straight in, no normalisation
    # the same weights as a flat, fp16 safetensors torchvision densenet121(num_classes=40)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(tmp_path / "c.safetensors"))
    half = celeba_densenet(str(tmp_path / "c.safetensors"), input_size=64)  # (smaller: a faster test)
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()})
    x = x_in(1, 64)
    torch.testing.assert_close(half(x), ref(x), rtol=0, atol=0)
    assert next(half.parameters()).dtype == torch.float32


def test_celeba_densenet_reads_steex_released_keys(tmp_path):
    """STEEX's checkpoint.tar: the DiVE layout under 'model_state_dict', next to an optimizer."""
    keys = released("keys_steex_decision_densenet121_celebamaskhq.json")["keys"]
    w = tensors_for(keys)
    torch.save({"epoch": 4, "loss": 0.1, "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(3)}}},
                "model_state_dict": w}, tmp_path / "checkpoint.tar")
    model = celeba_densenet(str(tmp_path / "checkpoint.tar"), num_classes=3, input_size=64)  # 256 in STEEX
    ref = torchvision_model("densenet121", 3)
    ref.load_state_dict({k.replace("feat_extract.feat_extract.", ""): v for k, v in w.items()})
    x = x_in(1, 64)
    torch.testing.assert_close(model(x), ref.eval()(x), rtol=0, atol=0)


def test_celeba_layouts_read_the_same(tmp_path):
    """DiME's nesting, a 'features' state dict under feat_extract, flat torchvision, DataParallel."""
    net = torchvision_model("densenet121", 40)
    sd = net.state_dict()
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    head = {"weight": sd["classifier.weight"], "bias": sd["classifier.bias"]}
    layouts = {
        "dime": {"feat_extract": {f"feat_extract.{k}": v for k, v in feats.items()}, "classifier": head},
        "features": {"feat_extract": feats, "classifier": head},
        "flat": sd,
        "module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        # pre-0.4 torchvision names ('denselayer1.norm.1.weight'), as torchvision's own loader remaps them
        "old": {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()},
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in layouts["old"]
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        got = read_layout(tmp_path / f"{name}.pth", net, "celeba", groups=("features.", "classifier."))
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_gradients_reach_the_input():
    """Counterfactual methods differentiate the explained model w.r.t. its input."""
    for arch in ("densenet121", "resnet18", "resnet50"):
        net, size = torchvision_model(arch, 4), 32
        x = torch.zeros(1, 3, size, size, requires_grad=True)
        net.eval()(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------ DiME oracle
def test_dime_oracle_released_layout(tmp_path):
    keys = released("keys_dime_oracle_resnet50_128.json")["keys"]
    w = tensors_for(keys, seed=3)
    nested = {"feat_extract": {}, "classifier": {}}
    for k, v in w.items():
        top, inner = k.split(".", 1)
        nested[top][inner] = v.half() if v.is_floating_point() else v  # fp16 tensors
    torch.save(nested, tmp_path / "oracle.pth")
    model = dime_oracle(str(tmp_path / "oracle.pth"))
    assert model.head == "sigmoid" and model.num_classes == 40 and model.input_size is None
    ref = DimeOracleNet()
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in w.items()})
    x = x_in(1, 128)
    emb = model.net.embed(x)
    assert emb.shape == (1, 128)
    out = model(x)
    assert out.shape == (1, 40)
    torch.testing.assert_close(out, model.net.classifier(emb), rtol=0, atol=0)
    torch.testing.assert_close(out, ref.eval()(x), rtol=0, atol=0)


def test_dime_oracle_preprocessing_is_the_public_codes():
    net = DimeOracleNet().feat_extract
    x = x_in(2, 128)
    y = ((x + 1) / 2)[:, [2, 1, 0]] - torch.tensor([131.0912, 103.8827, 91.4953]).view(1, 3, 1, 1) / 255
    expect = F.interpolate(y, size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(net.preprocess(x), expect)


# --------------------------------------------------------------------------------- torchvision files
def test_torchvision_module_prefix_temperature_and_normalisation(tmp_path):
    ref = randomize(torchvision_model("resnet18", 10), seed=5)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               tmp_path / "r18.pt")
    # (input 48 -> 40 here; DVCE: 256 -> 224)
    model = torchvision_classifier("resnet18", str(tmp_path / "r18.pt"), num_classes=10, temperature=0.5,
                                   input_size=40)
    assert model.head == "softmax" and model.num_classes == 10
    x = x_in(2, 48)
    z = F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(model(x), ref(((z + 1) / 2 - MEAN) / STD) / 0.5)
    # DVCE resizes bicubic (torchvision 0.10 tensor Resize(224, interpolation=3): no antialiasing)
    bic = torchvision_classifier("resnet18", str(tmp_path / "r18.pt"), num_classes=10, interpolation="bicubic",
                                 input_size=40)
    zb = F.interpolate(((x + 1) / 2 - MEAN) / STD, size=(40, 40), mode="bicubic", align_corners=False)
    torch.testing.assert_close(bic(x), ref(zb), atol=1e-4, rtol=1e-4)


def test_torchvision_madry_robustness_layout(tmp_path):
    """{'model': DataParallel(AttackerModel).state_dict(), 'optimizer', 'schedule', 'epoch'}: keep
    module.model.*, ignore the normalizer and the attacker's alias copy."""
    keys = released("keys_madry_robustness_resnet50.json")["keys"]
    inner = tensors_for({k[len("module.model."):]: v for k, v in keys.items() if k.startswith("module.model.")})
    inner = {k: v.half() if v.is_floating_point() else v for k, v in inner.items()}
    sd = {"module.normalizer.new_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
          "module.normalizer.new_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1),
          "module.attacker.normalize.new_mean": torch.zeros(3, 1, 1),
          "module.attacker.normalize.new_std": torch.ones(3, 1, 1)}
    sd.update({f"module.model.{k}": v for k, v in inner.items()})
    sd.update({f"module.attacker.model.{k}": v for k, v in inner.items()})  # same storages, as saved
    assert set(sd) == set(keys)
    torch.save({"model": sd, "optimizer": {"state": {}}, "schedule": None, "epoch": 90}, tmp_path / "madry.pt")
    model = torchvision_classifier("resnet50", str(tmp_path / "madry.pt"), input_size=None)
    ref = torchvision_model("resnet50")
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in inner.items()})
    x = x_in(1, 64)
    torch.testing.assert_close(model(x), ref.eval()(((x + 1) / 2 - MEAN) / STD), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ refusals
class MakeDir:
    """Unpickling this would create a directory: proof of execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("loader", ["celeba", "oracle", "torchvision"])
def test_pickle_needing_code_is_refused_not_run(tmp_path, loader):
    marker = tmp_path / "ran"
    torch.save({"feat_extract": MakeDir(marker), "classifier": {"weight": torch.zeros(40, 1024)}},
               tmp_path / "evil.pth")
    call = {"celeba": lambda p: celeba_densenet(p), "oracle": lambda p: dime_oracle(p),
            "torchvision": lambda p: torchvision_classifier("resnet18", p)}[loader]
    with pytest.raises(CfxError, match="never unpickles") as e:
        call(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    assert "\n" not in str(e.value)


def test_wrong_format_is_one_line(tmp_path):
    torch.save({"feat_extract": {"conv1_7x7_s2.weight": torch.zeros(64, 3, 7, 7)},
                "classifier": {"weight": torch.zeros(40, 128), "bias": torch.zeros(40)}}, tmp_path / "oracle.pth")
    with pytest.raises(CfxError) as e:
        celeba_densenet(str(tmp_path / "oracle.pth"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("classifier.path=") and "DenseNet-121" in msg
    assert "keys missing (first: features.conv0.weight)" in msg and "unexpected (first: feat_extract." in msg
    sd = torchvision_model("densenet121", 40).state_dict()
    sd["classifier.weight"] = torch.zeros(40, 128)  # the features right, the oracle's head
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CfxError, match=r"classifier.weight has shape \[40, 128\], expected \[40, 1024\]"):
        celeba_densenet(str(tmp_path / "bad.safetensors"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CfxError, match=r"metrics.oracle.path=.* 268 keys missing .* 1 unexpected \(first: x\)"):
        dime_oracle(str(tmp_path / "x.safetensors"))
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(CfxError, match="holds no tensors"):
        dime_oracle(str(tmp_path / "empty.pt"))
    with pytest.raises(CfxError, match=r"a torchvision resnet34 state dict .* missing"):
        torchvision_classifier("resnet34", str(tmp_path / "bad.safetensors"))


def test_missing_file_names_key_and_path(tmp_path):
    for call, key in ((lambda p: celeba_densenet(p), "classifier.path"),
                      (lambda p: dime_oracle(p), "metrics.oracle.path"),
                      (lambda p: torchvision_classifier("resnet50", p, key="robust.path"), "robust.path")):
        with pytest.raises(CfxError, match=rf"^{key}=.*nope.pt does not exist") as e:
            call(str(tmp_path / "nope.pt"))
        assert "\n" not in str(e.value)


def test_read_layout_num_batches_tracked_optional(tmp_path):
    net = torchvision_model("resnet18", 4)
    save_file({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")},
              str(tmp_path / "caffe_like.safetensors"))
    state = read_layout(tmp_path / "caffe_like.safetensors", net, "resnet18")
    assert set(state) == set(net.state_dict())


# --------------------------------------------------------------------------------------------- configs
def test_classifier_configs_instantiate(tmp_path, compose):
    from hydra.utils import instantiate

    ref = randomize(torchvision_model("densenet121", 40))
    save_file(ref.state_dict(), str(tmp_path / "c.safetensors"))
    cfg = compose(["classifier=celeba_densenet", f"classifier.path={tmp_path / 'c.safetensors'}"])
    model = instantiate(cfg.classifier)
    assert model.head == "sigmoid" and model.input_size == 128 and model(x_in(1, 32)).shape == (1, 40)
    save_file(randomize(torchvision_model("resnet18", 5)).state_dict(), str(tmp_path / "r.safetensors"))
    cfg = compose(["classifier=torchvision", "classifier.arch=resnet18", "classifier.num_classes=5",
                   f"classifier.path={tmp_path / 'r.safetensors'}"])
    assert instantiate(cfg.classifier)(x_in(1, 64)).shape == (1, 5)
    cfg = compose(["classifier=torchvision"])
    with pytest.raises(Exception, match="path"):
        instantiate(cfg.classifier)  # path: ??? must be set
