"""Realism of the counterfactuals as a set: FID, sFID and KID between all originals and the successful
counterfactuals, in a configurable feature space.

The distances are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``, fed with
features that are extracted once per image (so that sFID's many splits cost no extra network pass): the
metric's "feature network" is :class:`Precomputed`, which passes the features through.

Feature spaces (``build_extractor``):

- ``oracle``: the penultimate features (the trunk's 4·width global-average-pooled activations) of the
  synthetic benchmark's shipped factor oracle (``cfx_cli/zoo/synthetic_oracle``): needs no downloaded weight;
- ``inception``: Inception-v3 pool3 (2048) with the FID weights converted from TensorFlow's 2015-12-05
  graph (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, the same file as pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``), read with ``torch.load(weights_only=True)`` from a path; the
  network is torch-fidelity's FID Inception (TensorFlow-compatible blocks and bilinear resize to 299).

A weights path that does not exist raises :class:`MissingWeights`: the caller reports the metric missing
(NaN, an empty cell) with a one-line warning, and never computes it with random weights.

sFID (DiME): the *images* are split into halves at random; sFID = mean of FID(originals of half 1,
successful counterfactuals of half 2) and FID(originals of half 2, successful counterfactuals of half 1),
averaged over ``splits`` seeded splits, so that no counterfactual is compared with its own original.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfx_cli.errors import CfxError

REALISM = ("fid", "sfid", "kid")
FEATURES = ("oracle", "inception")
INCEPTION_SOURCE = ("torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth, the same weights), downloaded once on a machine with "
                    "internet access")


class MissingWeights(CfxError):
    """A feature network's weights file is not there: the metrics that need it are reported missing."""


# ---------------------------------------------------------------------------------------------- distances
class Precomputed(nn.Module):
    """The 'feature network' handed to torchmetrics: features in, the same features out (float64)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x.double()


def _as_features(f) -> Tensor:
    f = torch.as_tensor(np.asarray(f) if not isinstance(f, Tensor) else f).detach().cpu().double()
    return f.view(-1, 1) if f.dim() == 1 else f.flatten(1)


def _mask(success) -> Tensor:
    if isinstance(success, Tensor):
        return success.detach().cpu().bool().view(-1)
    return torch.from_numpy(np.array(success, dtype=bool)).view(-1)


def fid(real, fake) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N×d each, N ≥ 2), through
    torchmetrics' FrechetInceptionDistance; NaN when a set has fewer than 2 rows."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_features(real), _as_features(fake)
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1])).set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def sfid(real, fake, success=None, splits: int = 10, seed: int = 0) -> float:
    """Split FID. ``real`` and ``fake`` are the features of the same N images (row i: image i's original and
    its counterfactual); ``success`` (N booleans, default all) selects the counterfactuals that count. Each of
    ``splits`` seeded random splits halves the images into A and B; its value is the mean of FID(real[A],
    fake[B ∩ success]) and FID(real[B], fake[A ∩ success]). Halves too small for a FID (fewer than 2 rows)
    are left out; NaN when none is left."""
    real, fake = _as_features(real), _as_features(fake)
    n = len(real)
    if len(fake) != n:
        raise ValueError(f"sfid needs paired sets: {n} originals but {len(fake)} counterfactuals")
    ok = torch.ones(n, dtype=torch.bool) if success is None else _mask(success)
    gen = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(int(splits)):
        perm = torch.randperm(n, generator=gen)
        a, b = perm[: n // 2], perm[n // 2:]
        for r, c in ((a, b), (b, a)):
            value = fid(real[r], fake[c[ok[c]]])
            if math.isfinite(value):
                values.append(value)
    return float(np.mean(values)) if values else float("nan")


def kid(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD² with the cubic polynomial kernel), mean and std over
    ``subsets`` random subsets of ``min(subset_size, N_real, N_fake)`` rows, through torchmetrics'
    KernelInceptionDistance; seeded (the global torch generator is left as it was). NaN below 2 rows."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _as_features(real), _as_features(fake)
    size = min(int(subset_size), len(real), len(fake))
    if size < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": it is what we give it
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=int(subsets), subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)


# --------------------------------------------------------------------------------------- feature networks
class OracleFeatures(nn.Module):
    """The factor oracle's penultimate features: its shared trunk (conv stages + global average pool)."""

    def __init__(self, oracle: nn.Module):
        super().__init__()
        self.trunk = oracle.trunk.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)


def oracle_features(path: str, key: str = "realism.oracle") -> OracleFeatures:
    from cfx_cli.models.small_cnn import zoo_oracle

    if not path or not Path(str(path)).exists():
        raise MissingWeights(f"{key}={path} does not exist: the synthetic benchmark's factor oracle ships in "
                             f"cfx_cli/zoo/synthetic_oracle (`cfx train synthetic_oracle` re-makes it)")
    return OracleFeatures(zoo_oracle(str(path), key=key))


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (N×2048) of [-1, 1] images, as FID computes them: the images are
    quantised to 0..255, resized to 299×299 with TensorFlow 1.x's bilinear resize, scaled to [-1, 1] and
    run through the FID Inception (torch-fidelity's FeatureExtractorInceptionV3 / pytorch-fid's
    FIDInceptionA/C/E blocks, whose state-dict names this module keeps)."""

    SIZE = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool="avg")
        self.Mixed_7c = _InceptionE(2048, pool="max")
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)  # in the weights file; pool3 does not use it

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # the uint8 image FID is defined on
        x = resize_like_tensorflow(x, self.SIZE)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)


def inception_features(weights: str | None, key: str = "realism.inception_weights") -> InceptionFeatures:
    """The FID Inception with the weights of ``weights`` (weights-only load; never downloaded)."""
    if not weights or not Path(str(weights)).expanduser().is_file():
        raise MissingWeights(f"{key}={weights} does not exist: give the path of {INCEPTION_SOURCE}")
    path = Path(str(weights)).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        net = InceptionFeatures()
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a pickle with code, a truncated file, another network's weights
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CfxError(f"{key}={path} cannot be loaded as the FID Inception-v3 ({first}); it must be "
                       f"{INCEPTION_SOURCE}") from None
    return net.eval().requires_grad_(False)


def build_extractor(kind: str, oracle: str | None = None, inception_weights: str | None = None) -> nn.Module:
    """The feature network of ``kind`` (oracle | inception); MissingWeights when its file is not there."""
    if kind == "oracle":
        return oracle_features(oracle)
    if kind == "inception":
        return inception_features(inception_weights)
    raise CfxError(f"realism.features={kind!r} is unknown; use one of {', '.join(FEATURES)} (or auto)")


@torch.no_grad()
def extract(net: nn.Module, images: Tensor, batch_size: int = 64, device: torch.device | str = "cpu") -> Tensor:
    """Features of [-1, 1] images, batch by batch, as an N×d float64 CPU tensor."""
    net = net.to(device)
    out = [net(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def realism(real: Tensor, fake: Tensor, success, names=REALISM, splits: int = 10, seed: int = 0,
            kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, float]:
    """The set-level realism metrics ``names`` from paired features (row i: image i's original and
    counterfactual): FID and KID compare all originals with the successful counterfactuals."""
    ok = _mask(success)
    res: dict[str, float] = {}
    if "fid" in names:
        res["fid"] = fid(real, fake[ok])
    if "sfid" in names:
        res["sfid"] = sfid(real, fake, ok, splits=splits, seed=seed)
    if "kid" in names:
        res["kid"], res["kid_std"] = kid(real, fake[ok], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return res


# ----------------------------------------------------------------------------- TensorFlow-compatible parts
def resize_like_tensorflow(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TensorFlow 1.x's ``resize_bilinear(align_corners=False)`` (no half-pixel offset:
    source coordinate = output coordinate × in/out), the resize the FID Inception graph was used with."""
    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = pos.long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (pos - lo.float()).to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy.view(1, 1, -1, 1)


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:  # TensorFlow's average pool leaves the padding out of the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    """Mixed_7b pools by average, Mixed_7c by maximum (as TensorFlow's graph does)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)
