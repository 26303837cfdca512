"""LPIPS (Zhang et al. 2018, the ``lpips`` PyPI package, v0.1 weights) between images, and σ_L (diversity).

Written from the package's definition (lpips 0.1.4: ``lpips/lpips.py`` class ``LPIPS``, ``ScalingLayer``,
``NetLinLayer``; ``lpips/__init__.py`` ``normalize_tensor``; ``lpips/pretrained_networks.py`` ``alexnet`` /
``vgg16`` slices), without importing it (it imports torchvision, which cannot be installed next to a CPU torch):

1. inputs in [-1, 1] (1-channel images are repeated to RGB), shifted and scaled per channel by the
   ScalingLayer: ``(x - [-.030, -.088, -.188]) / [.458, .448, .450]``;
2. the backbone's activations at 5 taps: AlexNet ``features`` after indices 1, 4, 7, 9, 11 (relu1..relu5);
   VGG16 ``features`` after indices 3, 8, 15, 22, 29 (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
3. each tap unit-normalised over channels, ``f / (sqrt(Σ_c f²) + 1e-10)``;
4. squared difference; a 1×1 convolution to one channel without bias (the learned "lin" layer) per tap;
5. spatial mean, then sum over the taps: one distance per image pair.

Weights are read from local paths only (never downloaded), weights-only (``torch.load(weights_only=True)``
or safetensors through :func:`cfx_cli.models.checkpoints.load_state_dict`):

- backbone: torchvision's ImageNet state dict, ``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``
  (the ImageNet weights of torchvision's alexnet/vgg16, which lpips builds on); only ``features.*`` is
  used (the classifier keys are ignored);
- lin: the lpips package's ``lpips/weights/v0.1/{alex,vgg}.pth`` (keys ``lin{k}.model.1.weight``, 1×C×1×1;
  saved on a CUDA device, so they are mapped to the CPU). When no path is given they are looked up in an
  installed ``lpips`` package located with ``importlib.util.find_spec`` (never imported).

A missing file raises :class:`~cfx_cli.metrics.realism.MissingWeights` (one line: the config key, its value
and where the file comes from); the caller reports the metric missing rather than computing it with random
weights.

``net="oracle"`` (synthetic benchmark, no download): the same normalise / square / spatial-mean / sum chain
on the activations after each conv stage of the shipped factor oracle's trunk (``cfx_cli/zoo/synthetic_oracle``,
the outputs of its SiLU layers, 4 taps), with UNIFORM channel weights as the lpips package's ``lpips=False``
baseline does (its code sums the squared differences over channels: ``diffs[kk].sum(dim=1)``), and no
ScalingLayer (the oracle takes [-1, 1] images). Its numbers measure closeness in the oracle's feature space
and are NOT comparable with the papers' LPIPS values.

Papers: DiME and ACE report σ_L (``compute_LPIPS.py``, DiME line 133 / ACE line 131:
``lpips.LPIPS(net='vgg')``) as the mean over the K(K-1)/2 pairs of counterfactuals of the same image from K
runs with different seeds (DiME line 110 / ACE line 108: ``sum(dist) / len(dist)``), averaged over the images
found in every run (all of CC/IC × CCF/ICF, but only images that landed in the same outcome folder in every
run: lines 43-45 / 42-44); the images are read back from their saved 8-bit files. :func:`sigma_l` computes the
per-image value; the selection of images is the caller's. σ_L therefore wants ``net="vgg"``; the lpips package's
own default (and :func:`build_lpips`'s) is ``alex``. LPIPS takes the tensors as given (no 8-bit quantisation):
pass images read back from their PNGs for values computed exactly as from saved files.

Checked: with torchvision stubbed to hand the lpips 0.1.4 package these same backbones (random weights) and its
own v0.1 lin files, ``lpips.LPIPS(net=alex|vgg)`` and :class:`LPIPS` give identical values (also with
``lpips=False`` against ``learned=False``); not checked against torchvision's real ImageNet backbone weights
(not available offline).
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.metrics.realism import MissingWeights

__all__ = ["LPIPS", "TapFeatures", "build_lpips", "lpips_distance", "sigma_l", "alexnet_features",
           "vgg16_features", "load_backbone", "load_lin_weights", "find_lin_weights", "LPIPS_NETS"]

LPIPS_NETS = ("alex", "vgg", "oracle")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10

# torchvision alexnet().features: Conv 0, ReLU 1, MaxPool 2, Conv 3, ReLU 4, MaxPool 5, Conv 6, ReLU 7, Conv 8,
# ReLU 9, Conv 10, ReLU 11, MaxPool 12.
ALEX_TAPS = (1, 4, 7, 9, 11)
ALEX_CHANNELS = (64, 192, 384, 256, 256)
# torchvision vgg16().features ("D" configuration): 13 conv+ReLU pairs and 5 max-pools, indices 0..30.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_CHANNELS = (64, 128, 256, 512, 512)

BACKBONE_SOURCE = {
    "alex": "torchvision's AlexNet ImageNet state dict alexnet-owt-7be5be79.pth "
            "(download.pytorch.org/models/alexnet-owt-7be5be79.pth), fetched once on a machine with internet access",
    "vgg": "torchvision's VGG16 ImageNet state dict vgg16-397923af.pth "
           "(download.pytorch.org/models/vgg16-397923af.pth), fetched once on a machine with internet access",
}
LIN_SOURCE = ("the lpips package's lpips/weights/v0.1/{net}.pth (`pip download lpips==0.1.4 --no-deps` and unzip "
              "the wheel, or `pip install --no-deps lpips` so that it is found without importing it)")
ORACLE_SOURCE = ("the synthetic benchmark's factor oracle ships in cfx_cli/zoo/synthetic_oracle "
                 "(`cfx train synthetic_oracle` re-makes it)")


# ------------------------------------------------------------------------------------------- backbones
def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` (same indices, so ``features.N.*`` keys load unchanged)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (no batch norm; same indices as torchvision)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU()]
            cin = int(v)
    return nn.Sequential(*layers)


class TapFeatures(nn.Module):
    """A feature stack (``features``, torchvision's layout) run up to its last tap; returns the activations
    after the layers whose indices are ``taps``. The ReLUs are not in-place, so a tap keeps its value."""

    def __init__(self, features: nn.Sequential, taps: Sequence[int]):
        super().__init__()
        taps = tuple(int(t) for t in taps)
        if not taps or list(taps) != sorted(set(taps)) or taps[-1] >= len(features):
            raise ValueError(f"taps {taps} must be increasing indices of the {len(features)} feature layers")
        self.features = features
        self.taps = taps

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
            if i == self.taps[-1]:
                break
        return outs


def _activation_taps(features: nn.Sequential) -> tuple[int, ...]:
    """The indices of the activation layers of a conv stack: the output of each conv stage."""
    acts = (nn.ReLU, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid)
    return tuple(i for i, m in enumerate(features) if isinstance(m, acts))


# ------------------------------------------------------------------------------------------------ metric
def _rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _unit(f: Tensor) -> Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)


class LPIPS(nn.Module):
    """Per-sample LPIPS distance of two [-1, 1] image batches (N×C×H×W, C = 1 or 3) → (N,).

    ``backbone`` returns the activations at its taps; ``channels`` their channel counts. ``learned``: a 1×1
    "lin" convolution (no bias) per tap weights the channels (lpips' LPIPS); otherwise the squared differences
    are summed over channels (lpips' ``lpips=False`` baseline). ``scaling``: lpips' ScalingLayer first."""

    def __init__(self, backbone: TapFeatures, channels: Sequence[int], learned: bool = True, scaling: bool = True,
                 net: str = ""):
        super().__init__()
        self.net_name = net
        self.net = backbone
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) != len(backbone.taps):
            raise ValueError(f"{len(backbone.taps)} taps but {len(self.channels)} channel counts")
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.channels) if learned else None
        self.scaling = bool(scaling)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS needs two batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = _rgb(x.float()), _rgb(y.float())
        if self.scaling:
            x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for k, (fx, fy) in enumerate(zip(self.net(x), self.net(y))):
            d = (_unit(fx) - _unit(fy)).pow(2)
            d = self.lin[k](d) if self.lin is not None else d.sum(1, keepdim=True)
            total = total + d.mean(dim=(1, 2, 3))
        return total


# ---------------------------------------------------------------------------------------------- weights
def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def _existing(path, key: str, source: str) -> Path:
    if not path or not Path(str(path)).expanduser().is_file():
        raise MissingWeights(f"{key}={path} does not exist: give the path of {source}")
    return Path(str(path)).expanduser()


def _read(path: Path, key: str, source: str) -> dict[str, Tensor]:
    from cfx_cli.models.checkpoints import load_state_dict

    state = load_state_dict(path, key=key, source=source)  # safetensors or torch.load(weights_only=True)
    if not isinstance(state, dict):
        raise CfxError(f"{key}={path} holds a {type(state).__name__}, not a state dict: it must be {source}")
    return state


def load_backbone(backbone: TapFeatures, path, key: str, source: str) -> TapFeatures:
    """Load a torchvision state dict's ``features.*`` into ``backbone`` (names and shapes checked)."""
    path = _existing(path, key, source)
    state = _read(path, key, source)
    want = backbone.features.state_dict()
    got = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing = [f"features.{k}" for k in want if k not in got]
    if missing:
        raise CfxError(f"{key}={path} lacks {len(missing)} backbone weights (first: {missing[0]}): it must be {source}")
    for k, v in want.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise CfxError(f"{key}={path}: features.{k} has shape {list(got[k].shape)}, expected {list(v.shape)}: "
                           f"it must be {source}")
    backbone.features.load_state_dict({k: got[k].float() for k in want})
    return backbone


_LIN_KEY = re.compile(r"^lin(\d+)\.model\.\d+\.weight$")


def load_lin_weights(model: LPIPS, path, key: str, source: str = "") -> LPIPS:
    """Load the lpips package's lin layers (``lin{k}.model.1.weight``, 1×C×1×1) into ``model.lin``."""
    source = source or LIN_SOURCE.format(net=model.net_name or "alex")
    path = _existing(path, key, source)
    if model.lin is None:
        raise CfxError(f"{key}={path}: this LPIPS ({model.net_name}) has no lin layers to load")
    state = _read(path, key, source)
    found: dict[int, Tensor] = {}
    for k, v in state.items():
        m = _LIN_KEY.match(k)
        if m:
            found[int(m.group(1))] = v
    for k, c in enumerate(model.channels):
        if k not in found:
            raise CfxError(f"{key}={path} has no lin{k}.model.1.weight: it must be {source}")
        if tuple(found[k].shape) != (1, c, 1, 1):
            raise CfxError(f"{key}={path}: lin{k}.model.1.weight has shape {list(found[k].shape)}, expected "
                           f"[1, {c}, 1, 1]: it must be {source} for net={model.net_name}")
        model.lin[k].weight.data.copy_(found[k].float())
    return model


def find_lin_weights(net: str) -> Path | None:
    """``weights/v0.1/<net>.pth`` of an installed lpips package, located without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or []:
        f = Path(loc) / "weights" / "v0.1" / f"{net}.pth"
        if f.is_file():
            return f
    return None


# ---------------------------------------------------------------------------------------------- builders
def _oracle_trunk(oracle, key: str) -> nn.Sequential:
    if isinstance(oracle, nn.Module):
        trunk = getattr(oracle, "trunk", oracle)
    else:
        from cfx_cli.metrics.realism import oracle_features

        trunk = oracle_features(oracle, key=key).trunk  # MissingWeights when the folder is not there
    if not isinstance(trunk, nn.Sequential):
        raise CfxError(f"{key}: the oracle's trunk is a {type(trunk).__name__}, not an nn.Sequential of conv stages")
    return trunk


def build_lpips(net: str = "alex", backbone_weights=None, lin_weights=None, oracle=None, key: str = "lpips") -> LPIPS:
    """LPIPS with ``net`` = alex | vgg (the papers' metric: backbone and lin weights from paths) or oracle
    (uniform channel weights on the synthetic factor oracle's conv stages: not comparable with the papers).

    ``backbone_weights``: torchvision's alexnet-owt-7be5be79.pth / vgg16-397923af.pth; ``lin_weights``: the
    lpips package's weights/v0.1/<net>.pth, or None to find it in an installed lpips package; ``oracle``: the
    factor oracle's zoo folder or module (net=oracle). ``key`` prefixes the config keys named in errors."""
    name = {"vgg16": "vgg"}.get(str(net), str(net))
    if name == "oracle":
        trunk = _oracle_trunk(oracle, f"{key}.oracle")
        taps = _activation_taps(trunk)
        if not taps:
            raise CfxError(f"{key}.oracle: its trunk has no activation layers to tap")
        backbone = TapFeatures(trunk, taps)
        conv = next((m for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise CfxError(f"{key}.oracle: its trunk has no convolution")
        with torch.no_grad():  # the channel count at each tap, from one small probe
            probe = torch.zeros(1, conv.in_channels, 32, 32, device=conv.weight.device)
            channels = [f.shape[1] for f in backbone(probe)]
        return LPIPS(backbone, channels, learned=False, scaling=False, net="oracle")
    if name not in ("alex", "vgg"):
        raise CfxError(f"{key}.net={net!r} is unknown; use one of {', '.join(LPIPS_NETS)}")
    features, taps, channels = ((alexnet_features(), ALEX_TAPS, ALEX_CHANNELS) if name == "alex"
                                else (vgg16_features(), VGG16_TAPS, VGG16_CHANNELS))
    backbone = load_backbone(TapFeatures(features, taps), backbone_weights, f"{key}.backbone_weights",
                             BACKBONE_SOURCE[name])
    model = LPIPS(backbone, channels, learned=True, scaling=True, net=name)
    if lin_weights is None:
        found = find_lin_weights(name)
        if found is None:
            raise MissingWeights(f"{key}.lin_weights=None and no installed lpips package has weights/v0.1/{name}.pth: "
                                 f"give the path of {LIN_SOURCE.format(net=name)}")
        lin_weights = found
    return load_lin_weights(model, lin_weights, f"{key}.lin_weights", LIN_SOURCE.format(net=name))


# --------------------------------------------------------------------------------------------- distances
@torch.no_grad()
def lpips_distance(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """``model(x_i, y_i)`` for each pair of two [-1, 1] batches, batch by batch: an (N,) float64 array."""
    if len(x) != len(y):
        raise ValueError(f"lpips_distance needs paired batches: {len(x)} and {len(y)} images")
    model = model.to(device).eval()
    out = [model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)).reshape(-1).double().cpu()
           for i in range(0, len(x), int(batch_size))]
    return torch.cat(out).numpy() if out else np.zeros(0)


def sigma_l(images_by_seed: Sequence[Tensor], model: nn.Module, batch_size: int = 64,
            device: torch.device | str = "cpu") -> np.ndarray:
    """σ_L per image: for K ≥ 2 counterfactuals of each of N images (a list of K batches N×C×H×W, one per
    seed, row i of each the same image), the mean LPIPS over the K(K-1)/2 pairs of seeds. Shape (N,)."""
    k = len(images_by_seed)
    if k < 2:
        raise ValueError(f"sigma_l needs the counterfactuals of at least 2 seeds, got {k}")
    shape = tuple(images_by_seed[0].shape)
    if any(tuple(b.shape) != shape for b in images_by_seed):
        raise ValueError(f"sigma_l needs K batches of the same shape, got {[tuple(b.shape) for b in images_by_seed]}")
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    total = np.zeros(shape[0])
    for i, j in pairs:
        total += lpips_distance(model, images_by_seed[i], images_by_seed[j], batch_size=batch_size, device=device)
    return total / len(pairs)
