"""What every method shares: its result type, per-sample randomness, the difference mask."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cfx_cli.errors import CfxError


@dataclass
class CFResult:
    """A batch of counterfactuals. ``extras`` holds N×1×H×W maps such as masks (in [0, 1]) or other
    N×C×H×W images (e.g. ACE's pre-explanation), saved beside the counterfactual; ``info`` holds
    per-sample numbers (the scale that was used, a method's own success judgement, ...).

    The runner judges success on ``x_cf`` and reads the cost from the counting wrappers. ``judged``
    replaces ``x_cf`` as the image success is judged on, for a paper reproduction whose public code
    judged another image (ACE's pre-explanation); the runner then records ``success_final`` too."""

    x_cf: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Tensor] = field(default_factory=dict)
    judged: Tensor | None = None


class SampleRNG:
    """Per-sample state of one ``explain`` call: one torch.Generator per sample, seeded by
    (job seed, dataset index), and the rows that cost counters charge.

    Draws happen on the CPU and move to the device, so a sample gets the same noise whatever
    its batch, shard, device or resume point. ``subset(rows)`` narrows both to some samples
    (e.g. the ones not yet flipped), so that a method's calls are charged to them alone.
    """

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu", meter=None):
        self.generators = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed((int(seed) * 1_000_003 + int(i) * 7_919 + 12_345) % (2**63 - 1))
            self.generators.append(g)
        self.device = torch.device(device)
        self.meter = meter
        self.rows = torch.arange(len(self.generators))  # positions in the meter's batch

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, rows: Tensor | None = None) -> Tensor:
        """N×shape standard normals, one row per sample (or only for ``rows``, a bool mask or indices)."""
        idx = range(len(self)) if rows is None else _as_indices(rows)
        return torch.stack([torch.randn(tuple(shape), generator=self.generators[i]) for i in idx]).to(self.device)

    @contextmanager
    def subset(self, rows: Tensor):
        """A view on some samples (a bool mask or indices into this view); calls made inside the
        block are charged to them."""
        idx = _as_indices(rows)
        sub = SampleRNG.__new__(SampleRNG)
        sub.generators = [self.generators[i] for i in idx]
        sub.device, sub.meter, sub.rows = self.device, self.meter, self.rows[idx]
        if self.meter is None:
            yield sub
            return
        with self.meter.rows(sub.rows):
            yield sub


def _as_indices(rows: Tensor) -> list[int]:
    rows = torch.as_tensor(rows)
    if rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    return rows.tolist()


def check_dilation(dilation: int) -> None:
    if int(dilation) % 2 == 0:
        raise CfxError(f"method.mask_dilation={dilation} must be odd (a centred k×k window), e.g. 5")


def difference_mask(x_a: Tensor, x_b: Tensor, dilation: int, threshold: float) -> Tensor:
    """m = dilate_k(normalise(Σ_c |x_a − x_b|)) > threshold, per sample (FastDiME, ACE).

    Normalising divides by the per-image maximum, as the public FastDiME / ACE code does.
    """
    check_dilation(dilation)
    d = (x_a - x_b).abs().sum(1, keepdim=True)
    d = d / d.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    if dilation > 1:
        d = F.max_pool2d(d, dilation, stride=1, padding=dilation // 2)
    return (d > threshold).to(x_a.dtype)
