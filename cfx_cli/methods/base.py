"""What every method shares: its result type, per-sample randomness and cost counters."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cfx_cli.errors import CfxError


@dataclass
class CFResult:
    """A batch of counterfactuals. ``extras`` holds N×1×H×W maps such as masks (in [0, 1])."""

    x_cf: Tensor
    success: Tensor  # bool, judged on the final image
    nfe_unet: Tensor  # per-sample UNet evaluations
    nfe_model: Tensor  # per-sample explained-model evaluations (forward + backward counted once)
    extras: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Tensor] = field(default_factory=dict)  # per-sample numbers, e.g. the scale that flipped


class SampleRNG:
    """One torch.Generator per sample, seeded by (job seed, dataset index).

    Draws happen on the CPU and move to the device, so a sample gets the same
    noise whatever its batch, shard, device or resume point.
    """

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.generators = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed((int(seed) * 1_000_003 + int(i) * 7_919 + 12_345) % (2**63 - 1))
            self.generators.append(g)
        self.device = torch.device(device)

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, rows: Tensor | None = None) -> Tensor:
        """N×shape standard normals, one row per sample (or only for ``rows``, a bool mask or indices)."""
        idx = range(len(self)) if rows is None else _as_indices(rows)
        return torch.stack([torch.randn(tuple(shape), generator=self.generators[i]) for i in idx]).to(self.device)


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
