"""LPIPS (Zhang et al. 2018) between images, and σ_L (diversity), computed by the ``lpips`` PyPI package.

The distance is ``lpips.LPIPS.forward`` (v0.1: ScalingLayer, the backbone's 5 taps unit-normalised over
channels, squared difference, the learned 1×1 "lin" layers, spatial mean, sum over taps). cfx only decides
where the weights come from, so that nothing is ever downloaded:

- backbone: the package would have torchvision download AlexNet / VGG16's ImageNet weights; cfx builds it
  with ``pnet_rand=True`` (no download) and loads torchvision's state dict from ``lpips.backbone_weights``
  (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``; ``features.N.*`` go to the package's
  ``net.sliceK.N.*``, the classifier keys are ignored);
- lin: the package's own ``lpips/weights/v0.1/{alex,vgg}.pth`` (shipped inside it), or ``lpips.lin_weights``.

Both are read weights-only (``torch.load(weights_only=True)`` or safetensors, through
:func:`cfx_cli.models.checkpoints.load_state_dict`); a missing file raises
:class:`~cfx_cli.metrics.realism.MissingWeights` (one line: the config key, its value and where the file comes
from), and the caller reports the metric missing rather than computing it with random weights.

``net="oracle"`` (synthetic benchmark): the package's own ``lpips=False`` baseline (uniform channel weights:
``diffs[kk].sum(dim=1)``) run on the shipped factor oracle's trunk (``cfx_cli/zoo/synthetic_oracle``): its
backbone is replaced by the activations after each conv stage (the outputs of its SiLU layers, 4 taps) and its
ScalingLayer by the identity (the oracle takes [-1, 1] images). The package offers no hook for another
backbone, so :func:`lpips_on` sets the three attributes its ``forward`` reads (``net``, ``L``,
``scaling_layer``); the tap extraction (:class:`TapFeatures`) is the one piece cfx keeps. Its numbers measure
closeness in the oracle's feature space and are NOT comparable with the papers' LPIPS values.

Papers: DiME and ACE report σ_L (``compute_LPIPS.py``, DiME line 133 / ACE line 131:
``lpips.LPIPS(net='vgg')``) as the mean over the K(K-1)/2 pairs of counterfactuals of the same image from K
runs with different seeds (DiME line 110 / ACE line 108: ``sum(dist) / len(dist)``), averaged over the images
found in every run (all of CC/IC × CCF/ICF, but only images that landed in the same outcome folder in every
run: lines 43-45 / 42-44); the images are read back from their saved 8-bit files. :func:`sigma_l` computes the
per-image value; the selection of images is the caller's. σ_L therefore wants ``net="vgg"``; the lpips package's
own default (and :func:`build_lpips`'s) is ``alex``. LPIPS takes the tensors as given (no 8-bit quantisation):
pass images read back from their PNGs for values computed exactly as from saved files.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.metrics.realism import MissingWeights

__all__ = ["LPIPS", "TapFeatures", "lpips_on", "build_lpips", "lpips_distance", "sigma_l", "load_backbone",
           "load_lin_weights", "package_lin_weights", "LPIPS_NETS"]

LPIPS_NETS = ("alex", "vgg", "oracle")

BACKBONE_SOURCE = {
    "alex": "torchvision's AlexNet ImageNet state dict alexnet-owt-7be5be79.pth "
            "(download.pytorch.org/models/alexnet-owt-7be5be79.pth), fetched once on a machine with internet access",
    "vgg": "torchvision's VGG16 ImageNet state dict vgg16-397923af.pth "
           "(download.pytorch.org/models/vgg16-397923af.pth), fetched once on a machine with internet access",
}
LIN_SOURCE = "the lpips package's lpips/weights/v0.1/{net}.pth (it ships inside the package: pip install lpips)"
ORACLE_SOURCE = ("the synthetic benchmark's factor oracle ships in cfx_cli/zoo/synthetic_oracle "
                 "(`cfx train synthetic_oracle` re-makes it)")


def _lpips_package():
    """The lpips package, imported on first use (it imports torchvision: seconds that commands without LPIPS
    need not pay)."""
    import lpips

    return lpips


def _package_model(net: str, learned: bool):
    """``lpips.LPIPS`` with a randomly initialised backbone (``pnet_rand=True``: no download) and no lin file
    read, built on the meta device (its AlexNet / VGG16 classifier layers are never initialised); the caller
    assigns every tensor."""
    lpips = _lpips_package()
    with warnings.catch_warnings(), torch.device("meta"):
        # lpips 0.1.4 calls torchvision's deprecated tv.alexnet(pretrained=False): the same as weights=None
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        return lpips.LPIPS(pretrained=False, net=net, lpips=learned, pnet_rand=True, verbose=False)


# ------------------------------------------------------------------------------------------- hosting
class TapFeatures(nn.Module):
    """A feature stack (an ``nn.Sequential``) run up to its last tap; returns the activations after the layers
    whose indices are ``taps`` (what the lpips package's backbones return, for any conv stack)."""

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


class LPIPS(nn.Module):
    """Per-sample LPIPS of two [-1, 1] image batches (N×C×H×W, C = 1 or 3; grey images repeated to RGB) → (N,),
    computed by ``model``, an ``lpips.LPIPS``. ``channels``: the channel count of each tap; ``lin``: the lin
    layers (None for the uniform-weight baseline)."""

    def __init__(self, model: nn.Module, net: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.net_name = net

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.model.chns)

    @property
    def lin(self) -> nn.ModuleList | None:
        return self.model.lins if self.model.lpips else None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS needs two batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        x, y = x.float(), y.float()
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.model(x, y).reshape(-1)


def lpips_on(backbone: nn.Module, channels: Sequence[int], learned: bool = False, scaling: bool = False,
             net: str = "") -> LPIPS:
    """The lpips package's LPIPS on another ``backbone`` (a module returning the activations at its taps, with
    ``channels`` channels each): its ``forward`` reads ``self.net``, ``self.L``, ``self.scaling_layer`` and, when
    ``learned``, ``self.lins``; these are set here. ``learned=False`` is the package's uniform-weight baseline;
    ``learned=True`` adds one lin layer (``lpips.NetLinLayer``, randomly initialised) per tap. ``scaling``:
    keep the package's ScalingLayer (inputs of an ImageNet backbone)."""
    lpips = _lpips_package()
    model = _package_model("alex", learned=False)  # its meta AlexNet is replaced below
    channels = [int(c) for c in channels]
    model.net, model.L, model.chns = backbone, len(channels), channels
    model.scaling_layer = lpips.ScalingLayer() if scaling else nn.Identity()
    if learned:
        model.lpips = True
        model.lins = nn.ModuleList(lpips.NetLinLayer(c, use_dropout=True) for c in channels)
    return LPIPS(model, net)


# ---------------------------------------------------------------------------------------------- weights
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


_SLICE_KEY = re.compile(r"^slice\d+\.(\d+)\.(.+)$")  # the package's net.slice2.3.weight = features.3.weight


def load_backbone(net: nn.Module, path, key: str, source: str) -> dict[str, Tensor]:
    """The tensors of the lpips package's backbone ``net`` (``sliceK.N.*``) from a torchvision state dict's
    ``features.N.*`` (names and shapes checked; other keys ignored), ready to assign."""
    path = _existing(path, key, source)
    state = _read(path, key, source)
    out = {}
    for name, want in net.state_dict().items():
        m = _SLICE_KEY.match(name)
        tv_name = f"features.{m.group(1)}.{m.group(2)}" if m else name
        if tv_name not in state:
            raise CfxError(f"{key}={path} lacks the backbone weight {tv_name}: it must be {source}")
        if tuple(state[tv_name].shape) != tuple(want.shape):
            raise CfxError(f"{key}={path}: {tv_name} has shape {list(state[tv_name].shape)}, expected "
                           f"{list(want.shape)}: it must be {source}")
        out[name] = state[tv_name].float()
    return out


_LIN_KEY = re.compile(r"^lin(\d+)\.model\.\d+\.weight$")


def load_lin_weights(channels: Sequence[int], path, key: str, source: str) -> list[Tensor]:
    """The lpips package's lin layers from a file (``lin{k}.model.1.weight``, 1×C×1×1), one per tap."""
    path = _existing(path, key, source)
    state = _read(path, key, source)
    found = {int(m.group(1)): v for k, v in state.items() if (m := _LIN_KEY.match(k))}
    out = []
    for k, c in enumerate(channels):
        if k not in found:
            raise CfxError(f"{key}={path} has no lin{k}.model.1.weight: it must be {source}")
        if tuple(found[k].shape) != (1, int(c), 1, 1):
            raise CfxError(f"{key}={path}: lin{k}.model.1.weight has shape {list(found[k].shape)}, expected "
                           f"[1, {c}, 1, 1]: it must be {source}")
        out.append(found[k].float())
    return out


def package_lin_weights(net: str) -> Path:
    """``weights/v0.1/<net>.pth`` inside the installed lpips package (where ``lpips.LPIPS`` itself reads it)."""
    return Path(_lpips_package().__file__).parent / "weights" / "v0.1" / f"{net}.pth"


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


def _oracle_lpips(oracle, key: str) -> LPIPS:
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
    return lpips_on(backbone, channels, learned=False, scaling=False, net="oracle")


def build_lpips(net: str = "alex", backbone_weights=None, lin_weights=None, oracle=None, key: str = "lpips") -> LPIPS:
    """LPIPS with ``net`` = alex | vgg (the papers' metric: ``lpips.LPIPS(net=...)`` with its backbone's weights
    from a path) or oracle (the package's uniform-weight baseline on the synthetic factor oracle's conv stages:
    not comparable with the papers).

    ``backbone_weights``: torchvision's alexnet-owt-7be5be79.pth / vgg16-397923af.pth; ``lin_weights``: a
    weights/v0.1/<net>.pth file, or None for the one inside the lpips package; ``oracle``: the factor oracle's
    zoo folder or module (net=oracle). ``key`` prefixes the config keys named in errors."""
    name = {"vgg16": "vgg"}.get(str(net), str(net))
    if name == "oracle":
        return _oracle_lpips(oracle, key)
    if name not in ("alex", "vgg"):
        raise CfxError(f"{key}.net={net!r} is unknown; use one of {', '.join(LPIPS_NETS)}")
    model = _package_model(name, learned=True)
    state = {f"net.{k}": v for k, v in load_backbone(model.net, backbone_weights, f"{key}.backbone_weights",
                                                      BACKBONE_SOURCE[name]).items()}
    lins = load_lin_weights(model.chns, lin_weights or package_lin_weights(name), f"{key}.lin_weights",
                            LIN_SOURCE.format(net=name))
    state.update({f"lins.{k}.model.1.weight": w for k, w in enumerate(lins)})
    state.update({f"scaling_layer.{k}": v for k, v in _lpips_package().ScalingLayer().state_dict().items()})
    # lin0..lin4 are the same modules as lins.0..4: one assignment fills both names
    state.update({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)})
    model.load_state_dict(state, strict=True, assign=True)
    return LPIPS(model, name)


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
