"""One batch explained and judged: the one code path of every method, for `cfx run` and the Python API."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from cfx_cli.methods.base import CFResult, SampleRNG
from cfx_cli.models.counting import CostMeter


@dataclass
class BatchExplanation:
    """One batch explained and judged, as `cfx run` and the Python API (``cfx_cli.api``) both get it."""

    x_cf: Tensor          # the counterfactuals (the input where one failed)
    pred: Tensor          # the model's prediction on the input
    target: Tensor        # y*
    cf_pred: Tensor       # the prediction on the counterfactual
    success: Tensor       # judged on the counterfactual (or on the method's ``judged`` image)
    failed: Tensor        # not a finite image
    cost: dict            # nfe_<role>[_backward] per sample
    result: CFResult      # the method's own output (extras: masks, pre-explanations; info)


def explain_batch(parts: dict, x: Tensor, indices, seed: int, device, labels: Tensor | None = None
                  ) -> BatchExplanation:
    """Target, counterfactuals, judgement and cost of one batch: the one code path of every method.
    ``labels``: the dataset's, for targets chosen from them (target=young_old)."""
    model, objective, method, meter = parts["model"], parts["objective"], parts["method"], parts["meter"]
    with torch.no_grad():
        out = model(x)
        pred, target = objective.prediction(out), objective.target(out, labels)
    meter.start(len(x))
    try:
        result = method.explain(x, target, SampleRNG(seed, indices, device, meter=meter))
        cost = cost_columns(meter)
    finally:
        meter.stop()
    failed = ~torch.isfinite(result.x_cf).flatten(1).all(1)
    x_cf = torch.where(failed.view(-1, 1, 1, 1), x, result.x_cf)  # keep the file valid; the row says failed
    with torch.no_grad():  # success is judged here, on the final image, for every method alike
        cf_out = model(x_cf)
        cf_pred, success = objective.prediction(cf_out), objective.success(cf_out, target)
        if result.judged is not None:  # a paper reproduction that judged another image
            result.info["success_final"] = success.float()
            success = objective.success(model(result.judged), target)
    return BatchExplanation(x_cf, pred, target, cf_pred, success, failed, cost, result)


def cost_columns(meter: CostMeter) -> dict:
    """nfe_<role> (forward evaluations) and nfe_<role>_backward per sample; the UNet and the
    explained model always get both columns, other roles (robust_model) when they were used."""
    roles = ["unet", "model", *sorted(r for r in meter.counts if r not in ("unet", "model"))]
    cols = {}
    for role in roles:
        cols[f"nfe_{role}"] = meter.column(role, "forward")
        cols[f"nfe_{role}_backward"] = meter.column(role, "backward")
    return cols


def expected_unet_calls(method) -> float | None:
    """UNet calls (forward + backward) one counterfactual takes with one strength, as the method declares them
    (``unet_calls()``: exact for a fixed loop, an upper bound where samples stop early); None for a method that
    does not (a user's own), whose estimate comes from the job's first batch."""
    calls = getattr(method, "unet_calls", None)
    return float(calls()) if callable(calls) else None


class BatchProgress:
    """A tqdm bar (unit: counterfactual) that moves inside a batch: each sample counts as the share of a
    counterfactual's UNet calls it has had (forward + backward, read from the cost meter), up to 0.99 until
    its batch ends, so that a batch of 32 shows progress and an ETA. The calls per counterfactual are the
    mean of the batches done so far, or :func:`expected_unet_calls` before the first; with neither the
    bar's postfix counts the batch's calls."""

    def __init__(self, bar, meter, method=None, every: float = 0.5):
        self.bar, self.meter, self.every = bar, meter, every
        self.expected = expected_unet_calls(method) if method is not None else None
        self.done_calls, self.done_rows = 0.0, 0
        self.base, self.n, self.shown, self.calls = 0.0, 0, 0.0, 0
        meter.listener = self.on_call

    def start(self, n: int) -> None:
        self.base, self.n, self.calls = float(self.bar.n), n, 0

    def per_row(self):
        counts = self.meter.counts.get("unet")
        if counts is None:
            return None
        return (counts["forward"] + counts["backward"]).float()

    def on_call(self, role: str, kind: str) -> None:
        if role != "unet" or not self.n:
            return
        self.calls += 1
        now = time.time()
        if now - self.shown < self.every:
            return
        self.shown = now
        expected = self.done_calls / self.done_rows if self.done_rows else self.expected
        calls = self.per_row()
        if expected and calls is not None:
            self.move_to(self.base + float((calls / expected).clamp(max=0.99).sum()))
        else:
            self.bar.set_postfix_str(f"UNet calls in this batch: {self.calls}", refresh=False)
            self.bar.update(0)

    def finish(self, n: int | None = None) -> None:
        """The batch is done: its samples count whole; their calls teach the estimate."""
        calls = self.per_row()
        if calls is not None and len(calls) and float(calls.sum()) > 0:
            self.done_calls += float(calls.sum())
            self.done_rows += len(calls)
        self.move_to(self.base + (self.n if n is None else n))
        self.n = 0

    def move_to(self, n: float) -> None:
        # through update(), not n + refresh(): tqdm then knows it has drawn the bar (its delay passed), so that
        # closing it on an error wipes the line and the error's one line stands alone
        self.bar.update(n - self.bar.n)


# Counterfactuals with one decimal while a batch runs (tqdm would print a float's every digit).
BAR_FORMAT = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
