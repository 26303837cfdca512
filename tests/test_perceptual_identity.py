"""LPIPS / σ_L (cfx_cli.metrics.perceptual: the lpips package) and FVA / FS / S3 (cfx_cli.metrics.identity:
torchvision's ResNet-50) against values computed independently: numpy chains, functional re-implementations,
hand-made weight files in the released layouts. No download; the real-size weight files are written to tmp and
deleted.

Fixture: tests/fixtures/metrics/keys_vggface2_resnet50_ft_pkl.json, the key/shape list of the VGGFace2
``resnet50_ft_weight.pkl`` (tests/fixtures/metrics/: a copy of the project's shared key list, made from the authors' code)."""
from __future__ import annotations

import copy
import json
import os
import pickle
import struct
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import models as tvm

import cfx_cli
from cfx_cli.errors import CfxError
from cfx_cli.metrics import identity as I
from cfx_cli.metrics import perceptual as P
from cfx_cli.metrics.realism import MissingWeights

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures"
VGGFACE2_KEYS = json.loads((FIXTURES / "metrics" / "keys_vggface2_resnet50_ft_pkl.json").read_text())
ORACLE = Path(cfx_cli.__file__).parent / "zoo" / "synthetic_oracle"


def _images(n=2, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def _one_line_missing(fn, *needles):
    with pytest.raises(MissingWeights) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# ================================================================================================= LPIPS
def _tiny_lpips(learned=True, seed=0):
    """The lpips package's LPIPS on two 1×1-conv + ReLU stages (taps after each ReLU), hand-set lin weights."""
    g = torch.Generator().manual_seed(seed)
    feats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU())
    with torch.no_grad():
        for m in feats:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    model = P.lpips_on(P.TapFeatures(feats, (1, 3)), (4, 5), learned=learned, scaling=True)
    if learned:
        with torch.no_grad():
            model.lin[0].model[1].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1))
            model.lin[1].model[1].weight.copy_(torch.tensor([0.5, 0.0, 1.0, 0.25, 0.75]).view(1, 5, 1, 1))
    return model


def _numpy_lpips(model, x, y):
    """The lpips chain in float64 numpy, from the tiny model's raw weights."""
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    convs = [m for m in model.model.net.features if isinstance(m, nn.Conv2d)]

    def taps(img):
        h = (np.repeat(img, 3, axis=1) if img.shape[1] == 1 else img)
        h = (h - shift) / scale
        out = []
        for conv in convs:
            w = conv.weight.detach().double().numpy()[:, :, 0, 0]
            b = conv.bias.detach().double().numpy()
            h = np.maximum(np.einsum("oc,nchw->nohw", w, h) + b.reshape(1, -1, 1, 1), 0)
            out.append(h)
        return out

    total = 0.0
    for k, (a, b) in enumerate(zip(taps(x.double().numpy()), taps(y.double().numpy()))):
        a = a / (np.sqrt((a ** 2).sum(1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b ** 2).sum(1, keepdims=True)) + 1e-10)
        d = (a - b) ** 2
        if model.lin is not None:
            w = model.lin[k].model[1].weight.detach().double().numpy().reshape(1, -1, 1, 1)
            d = (d * w).sum(1)
        else:
            d = d.sum(1)
        total = total + d.mean(axis=(1, 2))
    return total


@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("channels", [3, 1])
def test_lpips_formula_matches_a_numpy_computation(learned, channels):
    model = _tiny_lpips(learned)
    assert type(model.model) is lpips.LPIPS  # the package's forward computes it
    x, y = _images(3, channels, 8, seed=1), _images(3, channels, 8, seed=2)
    got = model(x, y).double().numpy()
    want = _numpy_lpips(model, x, y)
    assert got.shape == (3,)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_lpips_is_zero_on_identical_images_and_symmetric():
    x, y = _images(2, 3, 16, seed=3), _images(2, 3, 16, seed=4)
    for model in (_tiny_lpips(), P.build_lpips("oracle", oracle=str(ORACLE))):
        assert torch.equal(model(x, x), torch.zeros(2))
        dxy, dyx = model(x, y), model(y, x)
        assert torch.all(dxy > 0)
        torch.testing.assert_close(dxy, dyx)
    np.testing.assert_array_equal(P.lpips_distance(_tiny_lpips(), x, y, batch_size=1),
                                  P.lpips_distance(_tiny_lpips(), x, y, batch_size=64))


# torchvision's documented architectures (torchvision/models/alexnet.py and vgg.py, configuration "D"):
# the parameter names and shapes of alexnet().features and vgg16().features.
TORCHVISION_ALEXNET_FEATURES = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
}
_VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
                (28, 512, 512)]
TORCHVISION_VGG16_FEATURES = {}
for _i, _cin, _cout in _VGG16_CONVS:
    TORCHVISION_VGG16_FEATURES[f"features.{_i}.weight"] = (_cout, _cin, 3, 3)
    TORCHVISION_VGG16_FEATURES[f"features.{_i}.bias"] = (_cout,)


@pytest.mark.parametrize("name,channels,expected,size,spatial", [
    ("alex", (64, 192, 384, 256, 256), TORCHVISION_ALEXNET_FEATURES, 64, (15, 7, 3, 3, 3)),
    ("vgg", (64, 128, 256, 512, 512), TORCHVISION_VGG16_FEATURES, 32, (32, 16, 8, 4, 2)),
])
def test_package_backbones_read_torchvision_features_and_tap_lpips_layers(name, channels, expected, size, spatial):
    """The lpips package's backbone (built without a download) takes exactly torchvision's features.N keys, and
    its 5 taps have the channels and sizes of LPIPS's relu layers."""
    model = P._package_model(name, learned=True)
    net = model.net
    assert type(net) is {"alex": lpips.pretrained_networks.alexnet, "vgg": lpips.pretrained_networks.vgg16}[name]
    got = {}
    for k, v in net.state_dict().items():
        _, idx, param = k.split(".")  # sliceK.N.weight
        got[f"features.{idx}.{param}"] = tuple(v.shape)
    assert got == expected
    outs = net(torch.zeros(1, 3, size, size, device="meta"))
    assert [tuple(o.shape) for o in outs] == [(1, c, s, s) for c, s in zip(channels, spatial)]
    assert list(model.chns) == list(channels)


def _reference_lpips(features: nn.Sequential, taps, lins, x, y):
    """LPIPS v0.1 in float64 from a torchvision ``features`` stack (run layer by layer, taps after the ReLUs
    ``taps``) and lin weights: ScalingLayer, unit-normalise, squared difference, lin, spatial mean, sum."""
    feats = [m.double() for m in copy.deepcopy(features)]
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def tapped(img):
        h, out = (img.double() - shift) / scale, []
        for i, layer in enumerate(feats[:max(taps) + 1]):
            h = layer(h).clone()
            if i in taps:
                out.append(h)
        return out

    total = torch.zeros(len(x), dtype=torch.float64)
    with torch.no_grad():
        for a, b, w in zip(tapped(x), tapped(y), lins):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += ((a - b).pow(2) * w.double().view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total.numpy()


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    """A torchvision-layout AlexNet state dict (features + a classifier key that must be ignored) and lin
    weights in the lpips package's layout (lin{k}.model.1.weight, 1×C×1×1)."""
    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    feats = tvm.alexnet(weights=None).features
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(3, 5)
    torch.save(state, d / "alexnet-owt-7be5be79.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, d / "alex.pth")
    return d / "alexnet-owt-7be5be79.pth", d / "alex.pth", state, lins


def test_build_lpips_loads_backbone_and_lin_weights_from_files(alex_files):
    bb, lin, state, lins = alex_files
    model = P.build_lpips("alex", backbone_weights=str(bb), lin_weights=str(lin))
    assert type(model.model) is lpips.LPIPS and model.model.pnet_rand  # the package runs, its net not downloaded
    for k, v in model.model.net.state_dict().items():  # net.slice2.3.weight <- features.3.weight
        _, idx, param = k.split(".")
        assert torch.equal(v, state[f"features.{idx}.{param}"])
    for k in range(5):
        assert torch.equal(model.lin[k].model[1].weight, lins[f"lin{k}.model.1.weight"])
        assert model.model.lins[k] is getattr(model.model, f"lin{k}")
    assert not any(t.is_meta for t in model.state_dict().values())
    x, y = _images(2, 3, 64, seed=5), _images(2, 3, 64, seed=6)
    d = P.lpips_distance(model, x, y)
    assert d.shape == (2,) and np.all(np.isfinite(d)) and np.all(d > 0)
    feats = tvm.alexnet(weights=None).features
    feats.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    want = _reference_lpips(feats, (1, 4, 7, 9, 11), [lins[f"lin{k}.model.1.weight"] for k in range(5)], x, y)
    np.testing.assert_allclose(d, want, rtol=1e-5)
    np.testing.assert_array_equal(P.lpips_distance(model, x, x), np.zeros(2))

    bad = bb.parent / "bad_lin.pth"
    torch.save({**lins, "lin2.model.1.weight": torch.rand(1, 7, 1, 1)}, bad)
    with pytest.raises(CfxError, match=r"lpips\.lin_weights=.*lin2\.model\.1\.weight has shape \[1, 7, 1, 1\]"):
        P.build_lpips("alex", backbone_weights=str(bb), lin_weights=str(bad))
    small = bb.parent / "not_alexnet.pth"
    torch.save({**state, "features.3.weight": torch.zeros(192, 64, 3, 3)}, small)
    with pytest.raises(CfxError, match=r"lpips\.backbone_weights=.*features\.3\.weight has shape \[192, 64, 3, 3\], "
                                       r"expected \[192, 64, 5, 5\]"):
        P.build_lpips("alex", backbone_weights=str(small), lin_weights=str(lin))


def test_vgg_lpips_uses_the_lin_weights_shipped_in_the_lpips_package(tmp_path):
    """σ_L's net: lin_weights=None reads lpips/weights/v0.1/vgg.pth, the file the package itself loads."""
    shipped = P.package_lin_weights("vgg")
    assert shipped == Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth" and shipped.is_file()
    ref = torch.load(shipped, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    feats = tvm.vgg16(weights=None).features  # features only: the classifier keys are not needed
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg16-397923af.pth")
    try:
        model = P.build_lpips("vgg", backbone_weights=str(tmp_path / "vgg16-397923af.pth"))
    finally:
        (tmp_path / "vgg16-397923af.pth").unlink()
    lins = [ref[f"lin{k}.model.1.weight"] for k in range(5)]
    for k in range(5):
        assert torch.equal(model.lin[k].model[1].weight, lins[k])
    x, y = _images(2, 3, 32, seed=12), _images(2, 3, 32, seed=13)
    want = _reference_lpips(feats, (3, 8, 15, 22, 29), lins, x, y)
    np.testing.assert_allclose(P.lpips_distance(model, x, y), want, rtol=1e-5)


def test_missing_weights_name_the_key_in_one_line(alex_files, tmp_path):
    bb, lin, _, _ = alex_files
    _one_line_missing(lambda: P.build_lpips("alex", lin_weights=str(lin)), "lpips.backbone_weights=None",
                      "alexnet-owt-7be5be79.pth")
    _one_line_missing(lambda: P.build_lpips("vgg", backbone_weights=str(tmp_path / "no.pth")),
                      f"lpips.backbone_weights={tmp_path / 'no.pth'}", "vgg16-397923af.pth")
    _one_line_missing(lambda: P.build_lpips("alex", backbone_weights=str(bb), lin_weights=str(tmp_path / "x.pth")),
                      f"lpips.lin_weights={tmp_path / 'x.pth'}")
    _one_line_missing(lambda: P.build_lpips("oracle", oracle=None), "lpips.oracle=None", "synthetic_oracle")
    _one_line_missing(lambda: I.build_face_verifier(str(tmp_path / "resnet50_ft_weight.pkl")),
                      f"identity.weights={tmp_path / 'resnet50_ft_weight.pkl'}", "resnet50_ft")
    _one_line_missing(lambda: I.build_simsiam(None), "s3.weights=None", "checkpoint_0099.pth.tar")
    with pytest.raises(CfxError, match=r"lpips\.net='squeeze' is unknown"):
        P.build_lpips("squeeze")


def test_oracle_lpips_is_the_uniform_weight_chain_on_the_oracle_conv_stages():
    from cfx_cli.models.small_cnn import zoo_oracle

    model = P.build_lpips("oracle", oracle=str(ORACLE))
    assert type(model.model) is lpips.LPIPS and not model.model.lpips  # the package's uniform-weight baseline
    trunk = zoo_oracle(str(ORACLE)).trunk
    x, y = _images(2, 1, 32, seed=7), _images(2, 1, 32, seed=8)  # grey images are repeated to RGB

    def stage_outputs(img):  # the activation after each of the 4 conv stages (conv, BN, SiLU[, pool])
        h, outs = img.expand(-1, 3, -1, -1), []
        with torch.no_grad():
            for layer in trunk:
                h = layer(h)
                if isinstance(layer, nn.SiLU):
                    outs.append(h.double().numpy())
        return outs

    want = 0.0
    for a, b in zip(stage_outputs(x), stage_outputs(y)):
        a = a / (np.sqrt((a ** 2).sum(1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b ** 2).sum(1, keepdims=True)) + 1e-10)
        want = want + ((a - b) ** 2).sum(1).mean(axis=(1, 2))
    assert len(model.channels) == 4 and model.lin is None
    np.testing.assert_allclose(P.lpips_distance(model, x, y), want, rtol=1e-5)


class _MeanAbs(nn.Module):
    def forward(self, x, y):
        return (x - y).abs().mean(dim=(1, 2, 3))


def test_sigma_l_is_the_mean_pairwise_distance_over_seeds():
    base = torch.zeros(2, 3, 4, 4)
    a, b, c = base.clone(), base + 0.5, base - 1.0
    b[1] = 0.25  # image 1: seeds at 0, 0.25, -1
    # image 0: |a-b| = 0.5, |a-c| = 1, |b-c| = 1.5 -> 1.0; image 1: 0.25, 1, 1.25 -> 0.8333...
    got = P.sigma_l([a, b, c], _MeanAbs())
    np.testing.assert_allclose(got, [1.0, 2.5 / 3])
    np.testing.assert_allclose(P.sigma_l([a, b], _MeanAbs(), batch_size=1), [0.5, 0.25])
    with pytest.raises(ValueError, match="at least 2"):
        P.sigma_l([a], _MeanAbs())
    with pytest.raises(ValueError, match="same shape"):
        P.sigma_l([a, b[:1]], _MeanAbs())


# ============================================================================================= FVA / FS
def _py2_pickle(arrays: dict[str, np.ndarray]) -> bytes:
    """What Python 2's cPickle (protocol 2) writes for a dict of numpy arrays, as resnet50_ft_weight.pkl is
    stored: py2 str keys and payloads (SHORT_BINSTRING / BINSTRING, decoded with latin-1 in Python 3) and
    numpy.core.multiarray._reconstruct + BUILD(1, shape, dtype, False, raw bytes)."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(n: int) -> bytes:
        if 0 <= n < 256:
            return b"K" + bytes([n])
        return b"M" + struct.pack("<H", n) if 0 <= n < 65536 else b"J" + struct.pack("<i", n)

    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    for k, a in arrays.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        out += s(k.encode("ascii"))
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
        out += b"(" + i(1) + b"(" + b"".join(i(d) for d in a.shape) + b"t"
        out += b"cnumpy\ndtype\n" + s(b"f4") + i(0) + i(1) + b"\x87R"
        out += b"(" + i(3) + s(b"<") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
        out += b"\x89" + s(a.tobytes()) + b"tb"
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def _pkl_keys():
    return [k for k in VGGFACE2_KEYS["keys"] if k not in set(VGGFACE2_KEYS["not_expected_in_pkl"])]


def test_vggface2_architecture_has_the_released_key_layout():
    with torch.device("meta"):
        net = I.vggface2_resnet50()
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == VGGFACE2_KEYS["keys"]
    assert VGGFACE2_KEYS["num_keys"] == 320 and len(_pkl_keys()) == 320 - 53
    for stage in (net.layer2, net.layer3, net.layer4):  # Caffe: the stride on the first 1×1 convolution
        assert stage[0].conv1.stride == (2, 2) and stage[0].conv2.stride == (1, 1)
        assert stage[0].downsample[0].stride == (2, 2)
    assert net.maxpool.ceil_mode and net.maxpool.padding == 0


def test_restricted_unpickler_reads_a_py2_latin1_pickle_of_numpy_arrays(tmp_path):
    keys = _pkl_keys()
    arrays = {k: np.arange(i, i + 2, dtype=np.float32) / 7 for i, k in enumerate(keys)}
    arrays["conv1.weight"] = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 2, 2)
    blob = _py2_pickle(arrays)
    path = tmp_path / "resnet50_ft_weight.pkl"
    path.write_bytes(blob)
    got = I.read_numpy_pickle(path)
    assert list(got) == keys
    for k in keys:
        assert got[k].dtype == torch.float32
        np.testing.assert_array_equal(got[k].numpy(), arrays[k])
    plain = pickle.loads(blob, encoding="latin1")  # how DiME/ACE read it: the same arrays
    for k in keys:
        np.testing.assert_array_equal(plain[k], arrays[k])
    with pytest.raises(CfxError, match=r"identity\.weights=.*conv1\.weight has shape \[2, 3, 2, 2\], expected "
                                       r"\[64, 3, 7, 7\]"):
        I.build_face_verifier(str(path))  # the released names with other shapes: refused by name
    path.write_bytes(pickle.dumps(arrays, protocol=4))  # the same dict re-saved by Python 3 also reads
    got = I.read_numpy_pickle(path)
    assert all(np.array_equal(got[k].numpy(), arrays[k]) for k in keys)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_restricted_unpickler_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "payload_ran"
    blob = pickle.dumps({"conv1.weight": np.zeros(2, np.float32), "bn1.weight": _Payload(marker)}, protocol=4)
    pickle.loads(blob)  # the payload is live: a plain unpickler runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    path = tmp_path / "resnet50_ft_weight.pkl"
    path.write_bytes(blob)
    with pytest.raises(CfxError) as e:
        I.read_numpy_pickle(path)
    assert "builtins.exec" in str(e.value) and "identity.weights=" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(CfxError, match="refused global"):
        I.build_face_verifier(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"conv1.weight": os.system}, protocol=4))  # a reference to a function
    with pytest.raises(CfxError, match=r"refused global (posix|os|nt)\.system"):
        I.read_numpy_pickle(path)


def _caffe_resnet50(sd, x):
    """The VGGFace2 ResNet-50 written out functionally from a state dict: stride on conv1 of each stage's first
    block, max-pool 3/2 without padding and with ceil_mode, 7×7 average pool."""
    def bn(h, p):
        return F.batch_norm(h, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    h = F.max_pool2d(h, 3, 2, 0, ceil_mode=True)
    for li, (n, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), 1):
        for b in range(n):
            p, st = f"layer{li}.{b}.", (stride if b == 0 else 1)
            o = F.relu(bn(F.conv2d(h, sd[p + "conv1.weight"], stride=st), p + "bn1"))
            o = F.relu(bn(F.conv2d(o, sd[p + "conv2.weight"], padding=1), p + "bn2"))
            o = bn(F.conv2d(o, sd[p + "conv3.weight"]), p + "bn3")
            short = bn(F.conv2d(h, sd[p + "downsample.0.weight"], stride=st), p + "downsample.1") if b == 0 else h
            h = F.relu(o + short)
    return F.avg_pool2d(h, 7, 1).flatten(1)


def _pil_preprocess(x):
    """DiME/ACE's FVA input from a [-1, 1] tensor: 8-bit image, PIL Resize(224) bilinear, BGR - mean (0..255)."""
    out = []
    for img in x:
        a = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        a = np.asarray(Image.fromarray(a).resize((224, 224), Image.BILINEAR), dtype=np.float32)
        a = a[:, :, ::-1] - np.array([91.4953, 103.8827, 131.0912], dtype=np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))))
    return torch.stack(out)


def _random_state(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Random weights for a key/shape list: He-scaled convolutions and linears, plausible batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            v = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            v = (torch.rand(shape, generator=g) - 0.5) * 0.2
        elif len(shape) == 1:  # batch-norm scale
            v = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            v = torch.randn(shape, generator=g) * (2.0 / float(np.prod(shape[1:]))) ** 0.5
        out[k] = v
    return out


def test_face_verifier_from_the_released_pickle_layout_matches_a_functional_reference(tmp_path):
    sd = _random_state(VGGFACE2_KEYS["keys"], seed=0)
    path = tmp_path / "resnet50_ft_weight.pkl"
    path.write_bytes(_py2_pickle({k: v.numpy() for k, v in sd.items()}))
    try:
        net = I.build_face_verifier(str(path))
    finally:
        path.unlink()
    assert isinstance(net.net, tvm.ResNet) and isinstance(net.net.fc, nn.Identity)  # the 8631-way fc is unused
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(net.net.state_dict()[k], v)

    x = _images(2, 3, 64, seed=9)
    y = x.clone()
    y[1] = -y[1]
    pre = net.preprocess(x)
    assert pre.shape == (2, 3, 224, 224)
    assert (pre - _pil_preprocess(x)).abs().max() <= 1.0 + 1e-4  # PIL's fixed-point bilinear: ±1 grey level
    const = torch.tensor([0.2, -0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 128, 128)  # 153, 64, 242 in 8 bits
    want = torch.tensor([242 - 91.4953, 64 - 103.8827, 153 - 131.0912])  # B, G, R
    torch.testing.assert_close(net.preprocess(const)[0, :, 100, 7], want.float())  # BGR, 0..255, mean removed

    ex, ey = I.embed(net, x, batch_size=1), I.embed(net, y, batch_size=2)
    with torch.no_grad():
        want_x, want_y = _caffe_resnet50(sd, pre), _caffe_resnet50(sd, net.preprocess(y))
    assert ex.shape == (2, 2048)
    torch.testing.assert_close(ex.float(), want_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ey.float(), want_y, rtol=1e-4, atol=1e-4)
    cos = I.face_similarity(net, x, y, batch_size=1)
    np.testing.assert_allclose(cos, F.cosine_similarity(want_x, want_y).double().numpy(), atol=1e-5)
    assert cos[0] == pytest.approx(1.0, abs=1e-6) and cos[1] < 1.0


def test_cosine_fva_and_fs_on_constructed_embeddings():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]).view(4, 2, 1, 1)
    y = torch.tensor([[4.0, 3.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.7320508075688772]]).view(4, 2, 1, 1)
    cos = I.face_similarity(nn.Flatten(), x, y, batch_size=3)
    np.testing.assert_allclose(cos, [24 / 25, 0.0, -1.0, 0.5], atol=1e-6)
    np.testing.assert_array_equal(I.fva([0.5, 0.5000001, 0.49, 1.0, -1.0]), [False, True, False, True, False])
    np.testing.assert_array_equal(I.fva(cos[:3]), [True, False, False])
    res = I.face_verification([0.96, 0.0, -1.0, 0.7], success=[True, True, False, True])
    assert res["fva"] == pytest.approx(2 / 3) and res["fs"] == pytest.approx((0.96 + 0.0 + 0.7) / 3)
    assert np.isnan(I.face_verification([0.9], success=[False])["fva"])
    assert I.s3([0.9, 0.5, 0.1], correct=[True, False, True]) == pytest.approx(0.5)
    np.testing.assert_allclose(I.s3_similarity(nn.Flatten(), x, y), cos)


# ====================================================================================================== S3
SIMSIAM_HEAD = {
    "encoder.fc.0.weight": [2048, 2048], "encoder.fc.1.weight": [2048], "encoder.fc.1.bias": [2048],
    "encoder.fc.1.running_mean": [2048], "encoder.fc.1.running_var": [2048], "encoder.fc.1.num_batches_tracked": [],
    "encoder.fc.3.weight": [2048, 2048], "encoder.fc.4.weight": [2048], "encoder.fc.4.bias": [2048],
    "encoder.fc.4.running_mean": [2048], "encoder.fc.4.running_var": [2048], "encoder.fc.4.num_batches_tracked": [],
    "encoder.fc.6.weight": [2048, 2048], "encoder.fc.6.bias": [2048],
    "encoder.fc.7.running_mean": [2048], "encoder.fc.7.running_var": [2048], "encoder.fc.7.num_batches_tracked": [],
    "predictor.0.weight": [512, 2048], "predictor.1.weight": [512], "predictor.1.bias": [512],
    "predictor.1.running_mean": [512], "predictor.1.running_var": [512], "predictor.1.num_batches_tracked": [],
    "predictor.3.weight": [2048, 512], "predictor.3.bias": [2048],
}


def test_simsiam_has_the_facebookresearch_checkpoint_layout():
    resnet = json.loads((FIXTURES / "checkpoints" / "keys_dvce_madryft_resnet50.json").read_text())["keys"]
    expected = {f"module.encoder.{k}": v for k, v in resnet.items() if not k.startswith("fc.")}
    expected.update({f"module.{k}": v for k, v in SIMSIAM_HEAD.items()})
    with torch.device("meta"):
        model = I.SimSiamEncoder()
    assert {f"module.{k}": list(v.shape) for k, v in model.state_dict().items()} == expected


def test_s3_is_the_cosine_of_simsiam_projector_outputs(tmp_path):
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in I.SimSiamEncoder().state_dict().items()}
    sd = _random_state(shapes, seed=1)
    ckpt = {"epoch": 100, "arch": "resnet50", "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1]}]}}
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save(ckpt, path)
    try:
        net = I.build_simsiam(str(path))
        del ckpt["state_dict"]["module.predictor.3.bias"]
        torch.save(ckpt, path)
        with pytest.raises(CfxError, match=r"s3\.weights=.*1 keys missing \(first: predictor\.3\.bias\)"):
            I.build_simsiam(str(path))
    finally:
        path.unlink()

    x = _images(2, 3, 32, seed=10)
    y = _images(2, 3, 32, seed=11)
    y[0] = x[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def z(img):  # 8-bit image /255, ImageNet normalisation, ResNet-50 pool, then the projector by hand
        pre = (((img + 1) * 127.5).round() / 255 - mean) / std
        h = torch.flatten(net.encoder.avgpool(nn.Sequential(*list(net.encoder.children())[:-2])(pre)), 1)
        for lin, norm in (("0", "1"), ("3", "4")):
            h = F.linear(h, sd[f"encoder.fc.{lin}.weight"])
            h = F.relu(F.batch_norm(h, sd[f"encoder.fc.{norm}.running_mean"], sd[f"encoder.fc.{norm}.running_var"],
                                    sd[f"encoder.fc.{norm}.weight"], sd[f"encoder.fc.{norm}.bias"], False, 0.0, 1e-5))
        h = F.linear(h, sd["encoder.fc.6.weight"], sd["encoder.fc.6.bias"])
        return F.batch_norm(h, sd["encoder.fc.7.running_mean"], sd["encoder.fc.7.running_var"], None, None,
                            False, 0.0, 1e-5)

    with torch.no_grad():
        want = F.cosine_similarity(z(x), z(y)).double().numpy()
        assert net(x).shape == (2, 2048)
    got = I.s3_similarity(net, x, y, batch_size=2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-6) and abs(got[1]) < 1.0
