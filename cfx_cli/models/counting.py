"""Honest cost accounting: counting wrappers around the UNet and every explained model.

A :class:`CostMeter` holds, per sample of the batch being explained and per role
(``unet``, ``model``, ``robust_model``, ...), the number of forward evaluations and of
backward passes. :class:`Counted` wraps a module: each forward adds one evaluation to
every *active* sample (the rows the method is working on — see
``SampleRNG.subset``), and when the output takes part in a backward pass a hook adds one
backward pass to those same rows. Methods that backpropagate through the UNet (ACE,
DVCE) are thus charged for it without counting anything themselves.

A forward on k× the active rows (a batched conditional + unconditional call) counts k
evaluations per sample.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

KINDS = ("forward", "backward")


class CostMeter:
    def __init__(self):
        self.counts: dict[str, dict[str, Tensor]] = {}
        self.active: Tensor | None = None  # rows being worked on; None = not counting
        self.n = 0
        self.listener = None  # called as listener(role, kind) after each count (the job's progress bar)

    def start(self, n: int) -> None:
        """Begin counting for a batch of ``n`` samples (all active)."""
        self.n = n
        self.counts = {}
        self.active = torch.arange(n)

    def stop(self) -> dict[str, dict[str, Tensor]]:
        self.active = None
        return self.counts

    @contextmanager
    def paused(self):
        active, self.active = self.active, None
        try:
            yield
        finally:
            self.active = active

    @contextmanager
    def rows(self, rows: Tensor):
        """Charge calls made inside the block to these (absolute) rows."""
        active, self.active = self.active, rows
        try:
            yield
        finally:
            self.active = active

    def add(self, role: str, kind: str, batch: int, rows: Tensor | None = None) -> None:
        rows = self.active if rows is None else rows
        if rows is None or len(rows) == 0:
            return
        per = self.counts.setdefault(role, {k: torch.zeros(self.n, dtype=torch.long) for k in KINDS})
        per[kind][rows] += max(1, batch // len(rows))
        if self.listener is not None:
            self.listener(role, kind)

    def column(self, role: str, kind: str) -> Tensor:
        return self.counts.get(role, {}).get(kind, torch.zeros(self.n, dtype=torch.long))


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict):
        return next((v for v in out.values() if isinstance(v, Tensor)), None)
    return None


class Counted(nn.Module):
    """``module`` with its calls counted in ``meter`` under ``role``; attributes pass through."""

    def __init__(self, module: nn.Module, meter: CostMeter, role: str):
        super().__init__()
        self.module = module
        self.meter = meter
        self.role = role

    def forward(self, x: Tensor, *args, **kwargs):
        out = self.module(x, *args, **kwargs)
        meter, rows = self.meter, self.meter.active
        if rows is None:
            return out
        meter.add(self.role, "forward", x.shape[0], rows)
        t = _first_tensor(out)
        if t is not None and t.requires_grad:
            batch = x.shape[0]
            t.register_hook(lambda g: meter.add(self.role, "backward", batch, rows))
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)
