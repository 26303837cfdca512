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

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu", meter=None, source=None):
        self.generators = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed((int(seed) * 1_000_003 + int(i) * 7_919 + 12_345) % (2**63 - 1))
            self.generators.append(g)
        self.device = torch.device(device)
        self.meter = meter
        self.source = source  # a NoiseBank replaying recorded draws (parity tests), or None
        self.rows = torch.arange(len(self.generators))  # positions in the meter's batch

    def __len__(self):
        return len(self.generators)

    def randn(self, shape, rows: Tensor | None = None) -> Tensor:
        """N×shape standard normals, one row per sample (or only for ``rows``, a bool mask or indices)."""
        return self._draw(torch.randn, "randn", shape, rows)

    def rand(self, shape, rows: Tensor | None = None) -> Tensor:
        """N×shape uniforms in [0, 1), one row per sample (augmentation parameters and the like)."""
        return self._draw(torch.rand, "rand", shape, rows)

    def _draw(self, fn, kind: str, shape, rows) -> Tensor:
        idx = range(len(self)) if rows is None else _as_indices(rows)
        if self.source is not None:
            return self.source.draw(kind, tuple(shape), self.rows[list(idx)]).to(self.device)
        return torch.stack([fn(tuple(shape), generator=self.generators[i]) for i in idx]).to(self.device)

    @contextmanager
    def subset(self, rows: Tensor):
        """A view on some samples (a bool mask or indices into this view); calls made inside the
        block are charged to them."""
        idx = _as_indices(rows)
        sub = SampleRNG.__new__(SampleRNG)
        sub.generators = [self.generators[i] for i in idx]
        sub.device, sub.meter, sub.source, sub.rows = self.device, self.meter, self.source, self.rows[idx]
        if self.meter is None:
            yield sub
            return
        with self.meter.rows(sub.rows):
            yield sub


class NoiseBank:
    """A recorded sequence of whole-batch draws that a :class:`SampleRNG` replays instead of its
    generators, draw for draw: the hook through which a parity test feeds cfx the noise an official
    implementation drew (``torch.randn_like`` over its batch, step by step).

    Each draw of ``kind`` ("randn" / "rand") and per-sample ``shape`` takes the next recorded
    N×shape tensor and returns the rows of the samples asking (a subset after an early exit).
    A draw that does not match the recording is an error, never a silent fresh draw."""

    def __init__(self, draws, kind: str = "randn"):
        self.draws = [d if isinstance(d, tuple) else (kind, d) for d in draws]
        self.used = 0

    def draw(self, kind: str, shape: tuple, rows: Tensor) -> Tensor:
        if self.used >= len(self.draws):
            raise RuntimeError(f"noise bank exhausted after {self.used} draws (asked {kind}{list(shape)})")
        k, d = self.draws[self.used]
        if k != kind or tuple(d.shape[1:]) != shape:
            raise RuntimeError(f"noise bank draw {self.used} is {k}{list(d.shape)}, asked {kind}[N, {list(shape)}]")
        self.used += 1
        return d[rows.long()].clone()

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.used


def check_sampler(method, sampler) -> None:
    """The one check of the sampler a method runs on. Each method class states what it needs:
    ``sampler_kind`` ("ddpm" | "ddim"), ``sampler_why`` (what it does with the step, for the error) and
    ``sampler_deterministic`` (DDIM with η = 0)."""
    kind, need = getattr(sampler, "kind", None), method.sampler_kind
    deterministic = getattr(method, "sampler_deterministic", False)
    if kind != need or (deterministic and getattr(sampler, "stochastic", False)):
        fix = f"sampler={need}" + (" sampler.eta=0" if deterministic else "")
        got = f"sampler={kind or '?'}" + (f" sampler.eta={sampler.eta}" if deterministic and kind == need else "")
        raise CfxError(f"method={method.name} {method.sampler_why}: use {fix} (got {got})")


def _as_indices(rows: Tensor) -> list[int]:
    rows = torch.as_tensor(rows)
    if rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    return rows.tolist()


def check_dilation(dilation: int) -> None:
    if int(dilation) % 2 == 0:
        raise CfxError(f"method.mask_dilation={dilation} must be odd (a centred k×k window), e.g. 5")


def difference_mask(x_a: Tensor, x_b: Tensor, dilation: int, threshold: float, inclusive: bool = False) -> Tensor:
    """m = dilate_k(normalise(Σ_c |x_a − x_b|)) > threshold, per sample (FastDiME); ``inclusive``: ≥ threshold
    (ACE's public code keeps the pixels at the threshold too; the two differ only at exact ties).

    Normalising divides by the per-image maximum, as the public FastDiME / ACE code does.
    """
    check_dilation(dilation)
    d = (x_a - x_b).abs().sum(1, keepdim=True)
    d = d / d.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    if dilation > 1:
        d = F.max_pool2d(d, dilation, stride=1, padding=dilation // 2)
    return ((d >= threshold) if inclusive else (d > threshold)).to(x_a.dtype)
