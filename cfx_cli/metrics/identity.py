"""Identity and semantic closeness of a counterfactual to its original: FVA / FS (face verification) and S3
(SimSiam similarity), as DiME and ACE compute them.

What the papers' code does (read from github.com/guillaumejs2403/DiME @2ef5f52 and guillaumejs2403/ACE
@6684b93; line numbers of those files):

FVA / FS (DiME ``compute_FVA.py``; ACE ``compute_FVA.py``, the same code; network in ``eval_utils/
resnet50_facevgg2_FVA.py``, identical in both repositories):

- network: cydonia999/VGGFace2-pytorch's ``resnet50_ft`` (ResNet-50 pre-trained on MS1M, fine-tuned on
  VGGFace2; Caffe conversion), built with ``resnet50(num_classes=8631, include_top=False)`` (DiME l.116 /
  ACE l.106): a torchvision-named ResNet-50 whose Bottleneck puts the stride on its first 1×1 convolution
  (resnet50_facevgg2_FVA.py l.53, the 3×3 has stride 1, l.55), max-pool 3/2 with padding 0 and
  ``ceil_mode=True`` (l.96), ``AvgPool2d(7, stride=1)`` (l.102); ``include_top=False`` returns the average
  pool's output (l.141-144): the 2048-d pool5 feature is the embedding (fc, 8631 identities, is unused);
- weights: ``resnet50_ft_weight.pkl`` read with ``pickle.load(f, encoding='latin1')`` (l.166), a dict
  {name: numpy array}; here read with a restricted unpickler that admits only numpy's array
  reconstruction (:class:`NumpyOnlyUnpickler`), or a torch state dict of the same names (weights-only);
- preprocessing (DiME l.20, l.58-66 / ACE l.21, l.46-55): the saved 8-bit image, ``transforms.Resize(224)``
  (PIL bilinear, shorter side to 224), RGB→BGR, float 0..255 minus mean_bgr [91.4953, 103.8827, 131.0912],
  no division by a std;
- FS = cosine similarity of the two embeddings (``nn.CosineSimilarity()``, dim 1: DiME l.79 / ACE l.68);
  FVA = share with cosine > 0.5 (strict: DiME l.93 / ACE l.82);
- samples: originals classified correctly or not (CC and IC), successful counterfactuals only (CCF:
  DiME l.26 / ACE l.27; DiME's ImageSaver puts a counterfactual under CCF when target == pred_cf,
  ``core/sample_utils.py`` l.324): :func:`face_verification` takes ``success`` for that.

S3 (ACE ``compute_SimSiamSimilarity.py``, network in ``eval_utils/simsiam.py``):

- network: facebookresearch/simsiam's ResNet-50 pre-trained with batch size 256 (README l.37; default file
  ``checkpoint_0099.pth.tar``, l.86): ``{'state_dict': {'module.encoder.*', 'module.predictor.*'}, ...}``,
  loaded strictly after stripping ``module.`` (simsiam.py l.72-75);
- output: the encoder's output z = the 3-layer projector after the ResNet-50 pool (``encoder.fc`` =
  Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(affine=False), l.30-37, 2048-d); the predictor is loaded but NOT
  used (its lines are commented out, l.60-63): ``dist = CosineSimilarity(dim=1)(z1, z2)`` (l.64);
- preprocessing (l.46-54): the saved 8-bit image at its own size (no resize), /255, ImageNet mean/std
  [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225];
- samples: correctly classified originals only (CC), successful and failed counterfactuals (CCF and ICF,
  l.26): :func:`s3` takes ``correct`` for that.

Here images come as [-1, 1] RGB tensors (1-channel images are repeated to 3); both networks first quantise
them to 8 bits (rounding, as cfx saves its PNGs; ACE's saver truncates) so that the value matches the one
computed from the saved files. Both networks are torchvision's ResNet-50 (``weights=None``, nothing downloaded;
the Caffe model's differences set on it); the resize is torchvision's ``Resize(224)`` on the 8-bit tensor
(bilinear, antialiased: PIL's within ±1 grey level, PIL works in fixed point) and the SimSiam input
torchvision's ``Normalize``. For non-square images the 2048×h×w pool output is flattened before the cosine
(the papers' images are square, where this is their value).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.metrics.realism import MissingWeights
from cfx_cli.models.architectures import torchvision_model
from cfx_cli.models.classifiers import check_layout

__all__ = ["NumpyOnlyUnpickler", "read_numpy_pickle", "vggface2_resnet50", "FaceVerifier", "build_face_verifier",
           "SimSiamEncoder", "build_simsiam", "embed", "cosine_similarity", "face_similarity", "s3_similarity",
           "fva", "face_verification", "s3", "FVA_THRESHOLD", "VGGFACE2_MEAN_BGR"]

FVA_THRESHOLD = 0.5
VGGFACE2_MEAN_BGR = (91.4953, 103.8827, 131.0912)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGFACE2_SOURCE = ("the VGGFace2 resnet50_ft model, resnet50_ft_weight.pkl (github.com/cydonia999/VGGFace2-pytorch, "
                   "'Pretrained models'), or a torch state dict with the same names, fetched once on a machine with "
                   "internet access")
SIMSIAM_SOURCE = ("facebookresearch/simsiam's ResNet-50 pre-trained with batch size 256, checkpoint_0099.pth.tar "
                  "(github.com/facebookresearch/simsiam, 'Models and Logs'), fetched once on a machine with internet access")


# ------------------------------------------------------------------------------------- safe pickle reading
def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and nothing else: any other global (a
    function, a class: the way a pickle runs code) is refused before it is looked up."""

    def __init__(self, file, **kw):
        kw.setdefault("encoding", "latin1")  # py2-era pickles: str payloads decoded byte for byte
        super().__init__(file, **kw)
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays may be unpickled")
        return obj


def read_numpy_pickle(path, key: str = "identity.weights", source: str = VGGFACE2_SOURCE) -> dict[str, Tensor]:
    """A {name: numpy array} pickle (py2 era, latin-1) as a dict of tensors, through
    :class:`NumpyOnlyUnpickler`: a pickle that would run code is refused with one CfxError line."""
    path = Path(str(path)).expanduser()
    try:
        with open(path, "rb") as f:
            obj = NumpyOnlyUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CfxError(f"{key}={path} is not a plain pickle of numpy arrays ({str(e).splitlines()[0][:200]}); "
                       f"cfx never unpickles code: it must be {source}") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a pickle at all
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CfxError(f"{key}={path} cannot be read as a pickle of numpy arrays ({first}): it must be {source}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CfxError(f"{key}={path} holds a {type(obj).__name__}, not a dict of numpy arrays: it must be {source}")
    out = {}
    for k, v in obj.items():
        v = np.array(v, copy=True)  # writable, owns its memory
        out[k] = torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
    return out


def _existing(path, key: str, source: str) -> Path:
    if not path or not Path(str(path)).expanduser().is_file():
        raise MissingWeights(f"{key}={path} does not exist: give the path of {source}")
    return Path(str(path)).expanduser()


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _loaded(make, state: dict[str, Tensor], path: Path, key: str, fmt: str, source: str) -> nn.Module:
    """``make()`` with the weights of ``state``: every parameter/buffer present with its shape (BN counters
    optional), no key that the network lacks; else one CfxError line. The network is built on the meta device
    and checked first, then materialised on the CPU and filled (no random initialisation is paid for)."""
    with torch.device("meta"):
        net = make()
    want = net.state_dict()
    check_layout(state, want, [k for k in state if k not in want],
                 f"{key}={path} does not match the expected format, {fmt}", f"; it must be {source}")
    full = {k: (state[k].to(want[k].dtype) if k in state else torch.zeros((), dtype=want[k].dtype)) for k in want}
    net = net.to_empty(device="cpu")
    net.load_state_dict(full, strict=True)
    return net


def _quantised(x: Tensor) -> Tensor:
    """[-1, 1] images (1 or 3 channels) → the 0..255 float values of their 8-bit RGB file."""
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


# ------------------------------------------------------------------------------------------ face verifier
def vggface2_resnet50(num_classes: int = 8631) -> nn.Module:
    """The VGGFace2 ResNet-50 (cydonia999 layout = torchvision's names): torchvision's ResNet-50 with the
    Caffe model's differences: the stride of each stage's first Bottleneck on its 1×1 ``conv1`` (torchvision
    v1.5 has it on the 3×3 ``conv2``), max-pool 3/2 without padding and with ceil_mode, 7×7 average pool of
    stride 1."""
    net = torchvision_model("resnet50", num_classes, key="identity.arch")
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    net.avgpool = nn.AvgPool2d(kernel_size=7, stride=1)
    return net


def _pooled(net: nn.Module) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is the identity: its forward returns the flattened average pool."""
    net.fc = nn.Identity()
    return net


class FaceVerifier(nn.Module):
    """[-1, 1] RGB images → VGGFace2 pool5 embeddings (N×2048 for square images), as DiME/ACE's FVA: 8-bit
    quantisation, bilinear resize of the shorter side to 224, RGB→BGR, minus the VGGFace2 BGR mean (0..255).
    ``net``: the VGGFace2 ResNet-50 (its ``fc`` over the 8631 identities is dropped: unused by the papers)."""

    SIZE = 224

    def __init__(self, net: nn.Module | None = None):
        super().__init__()
        self.net = _pooled(vggface2_resnet50() if net is None else net)

    def preprocess(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        x = _quantised(x)
        if min(x.shape[-2:]) != self.SIZE:  # Resize(224) on the 8-bit image (bilinear, antialiased), 8 bits again
            x = TF.resize(x, [self.SIZE], antialias=True).round().clamp(0, 255)
        return x[:, [2, 1, 0]] - x.new_tensor(VGGFACE2_MEAN_BGR).view(1, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.preprocess(x))


def build_face_verifier(weights, key: str = "identity.weights") -> FaceVerifier:
    """The VGGFace2 resnet50_ft face verifier from ``weights``: a ``.pkl`` / ``.pickle`` file is read as
    ``resnet50_ft_weight.pkl`` (latin-1 pickle of numpy arrays, through :class:`NumpyOnlyUnpickler`); any other
    file as a torch / safetensors state dict of the same names (weights-only, ``module.`` stripped)."""
    path = _existing(weights, key, VGGFACE2_SOURCE)
    if path.suffix in (".pkl", ".pickle"):
        state = read_numpy_pickle(path, key=key)
    else:
        from cfx_cli.models.checkpoints import load_state_dict

        state = load_state_dict(path, key=key, source=VGGFACE2_SOURCE)
        if not isinstance(state, dict):
            raise CfxError(f"{key}={path} holds a {type(state).__name__}, not a state dict: it must be {VGGFACE2_SOURCE}")
        state = _strip(state, "module.")
    net = _loaded(vggface2_resnet50, state, path, key, "VGGFace2 ResNet-50 {conv1, bn1, layer1..4, fc(2048, 8631)}",
                  VGGFACE2_SOURCE)
    return FaceVerifier(net).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ SimSiam
class SimSiamEncoder(nn.Module):
    """facebookresearch/simsiam's model (``encoder``: torchvision ResNet-50 whose ``fc`` is the 3-layer
    projector; ``predictor``: kept so that the checkpoint loads strictly, unused, as in ACE). ``forward``:
    [-1, 1] RGB images → z, the projector's 2048-d output (ImageNet normalisation of the 8-bit image, no resize)."""

    def __init__(self, dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        self.encoder = torchvision_model("resnet50", dim, key="s3.arch")
        prev, last = self.encoder.fc.in_features, self.encoder.fc
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev, prev, bias=False), nn.BatchNorm1d(prev), nn.ReLU(inplace=True),
            nn.Linear(prev, prev, bias=False), nn.BatchNorm1d(prev), nn.ReLU(inplace=True),
            last, nn.BatchNorm1d(dim, affine=False))
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim),
                                       nn.ReLU(inplace=True), nn.Linear(pred_dim, dim))

    def preprocess(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        return TF.normalize(_quantised(x) / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(self.preprocess(x))


def build_simsiam(weights, key: str = "s3.weights") -> SimSiamEncoder:
    """SimSiam's ResNet-50 from a facebookresearch/simsiam checkpoint (``{'state_dict': {'module.encoder.*',
    'module.predictor.*'}, ...}``; a bare state dict with or without ``module.`` also loads), weights-only."""
    from cfx_cli.models.checkpoints import load_state_dict

    path = _existing(weights, key, SIMSIAM_SOURCE)
    state = load_state_dict(path, key=key, source=SIMSIAM_SOURCE)  # opens the 'state_dict' container
    if not isinstance(state, dict):
        raise CfxError(f"{key}={path} holds a {type(state).__name__}, not a state dict: it must be {SIMSIAM_SOURCE}")
    state = _strip(state, "module.")
    model = _loaded(SimSiamEncoder, state, path, key, "SimSiam {encoder: ResNet-50 + projector fc.0-7, predictor.0-3}",
                    SIMSIAM_SOURCE)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- similarities
@torch.no_grad()
def embed(net: nn.Module, x: Tensor, batch_size: int = 32, device: torch.device | str = "cpu") -> Tensor:
    """``net``'s embeddings of [-1, 1] images, batch by batch, flattened: an N×D float64 CPU tensor."""
    net = net.to(device).eval()
    out = [net(x[i:i + batch_size].to(device)).flatten(1).double().cpu() for i in range(0, len(x), int(batch_size))]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def cosine_similarity(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 32,
                      device: torch.device | str = "cpu") -> np.ndarray:
    """Per-sample cosine similarity of ``net``'s embeddings of two paired [-1, 1] batches: (N,) float64."""
    if len(x) != len(y):
        raise ValueError(f"cosine_similarity needs paired batches: {len(x)} and {len(y)} images")
    ex, ey = embed(net, x, batch_size, device), embed(net, y, batch_size, device)
    if len(ex) == 0:
        return np.zeros(0)
    return F.cosine_similarity(ex, ey, dim=1, eps=1e-8).numpy()


def face_similarity(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """FS per sample: cosine similarity of the face verifier's embeddings of originals and counterfactuals."""
    return cosine_similarity(net, x, y, batch_size, device)


def s3_similarity(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 32,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """S3 per sample: cosine similarity of SimSiam's projector outputs z of originals and counterfactuals."""
    return cosine_similarity(net, x, y, batch_size, device)


def fva(cos, threshold: float = FVA_THRESHOLD) -> np.ndarray:
    """Face verified per sample: cosine > threshold (strictly, 0.5 in DiME/ACE)."""
    return np.asarray(cos, dtype=np.float64) > float(threshold)


def _select(values, mask) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if mask is None:
        return values
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    if mask.shape != values.shape:
        raise ValueError(f"{values.size} similarities but {mask.size} mask entries")
    return values[mask]


def face_verification(cos, success=None, threshold: float = FVA_THRESHOLD) -> dict[str, float]:
    """Set-level FVA (share of cosine > threshold) and FS (mean cosine) over the successful counterfactuals
    (``success``: N booleans; DiME/ACE count CCF only), NaN when none is left."""
    c = _select(cos, success)
    if c.size == 0:
        return {"fva": float("nan"), "fs": float("nan")}
    return {"fva": float(fva(c, threshold).mean()), "fs": float(c.mean())}


def s3(cos, correct=None) -> float:
    """Set-level S3: mean SimSiam cosine over the counterfactuals of correctly classified originals
    (``correct``: N booleans; ACE counts CC, successful or not), NaN when none is left."""
    c = _select(cos, correct)
    return float(c.mean()) if c.size else float("nan")
