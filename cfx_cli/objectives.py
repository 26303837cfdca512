"""What a counterfactual must achieve: the only place that knows the task.

``target`` chooses y* from the model's prediction on the original, ``loss`` is the
differentiable per-sample loss that guidance minimises, ``success`` says per
sample whether y* is reached. Every method works for classification and
regression through this object.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cfx_cli.errors import CfxError


class ClassificationObjective:
    """Reach a target class.

    mode ``flip``: the other class of a binary classifier (even when the prediction
    was wrong, as the CelebA papers do); ``class``: the class ``value`` for every image.
    loss ``ce``: cross-entropy to the target; ``logit``: minus the target logit.
    """

    task = "classification"

    def __init__(self, mode: str = "flip", value=None, loss: str = "ce", **_):
        if mode not in ("flip", "class"):
            raise CfxError(f"target.mode={mode!r} is not a classification target; use flip or class")
        if mode == "class" and value is None:
            raise CfxError("target.mode=class needs target.value=<class index>")
        if loss not in ("ce", "logit"):
            raise CfxError(f"target.loss={loss!r} is unknown; use ce or logit")
        self.mode, self.value, self.loss_kind = mode, value, loss

    def prediction(self, output: Tensor) -> Tensor:
        return output.argmax(1)

    def target(self, output: Tensor) -> Tensor:
        if self.mode == "class":
            if not 0 <= int(self.value) < output.shape[1]:
                raise CfxError(f"target.value={self.value} is not a class of this classifier (0..{output.shape[1] - 1})")
            return torch.full((output.shape[0],), int(self.value), dtype=torch.long, device=output.device)
        if output.shape[1] != 2:
            raise CfxError(f"target.mode=flip needs a binary classifier, this one has {output.shape[1]} classes; "
                           f"use target.mode=class target.value=<index>")
        return 1 - output.argmax(1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.loss_kind == "logit":
            return -output.gather(1, target.view(-1, 1)).squeeze(1)
        return F.cross_entropy(output, target, reduction="none")

    def success(self, output: Tensor, target: Tensor) -> Tensor:
        return output.argmax(1) == target

    def probability(self, output: Tensor, target: Tensor) -> Tensor:
        return output.softmax(1).gather(1, target.view(-1, 1)).squeeze(1)


class RegressionObjective:
    """Move the predicted value to y* (labels normalised to [0, 1]).

    mode ``absolute``: y* = value; ``shift``: y* = ŷ + value; ``auto``: the far end
    of ``auto_values`` (low, high), as the regression-counterfactual paper does
    (0.8 for low predictions, the low value otherwise). Success: |ŷ − y*| ≤ tolerance.
    """

    task = "regression"

    def __init__(self, mode: str = "auto", value=None, tolerance: float = 0.05, auto_values=(0.2, 0.8),
                 clamp: bool = True, **_):
        if mode not in ("absolute", "shift", "auto"):
            raise CfxError(f"target.mode={mode!r} is not a regression target; use absolute, shift or auto")
        if mode in ("absolute", "shift") and value is None:
            raise CfxError(f"target.mode={mode} needs target.value=<number>")
        self.mode, self.value, self.tolerance = mode, value, float(tolerance)
        self.low, self.high = (float(v) for v in auto_values)
        self.clamp = clamp

    def prediction(self, output: Tensor) -> Tensor:
        return output

    def target(self, output: Tensor) -> Tensor:
        if self.mode == "absolute":
            y = torch.full_like(output, float(self.value))
        elif self.mode == "shift":
            y = output + float(self.value)
        else:
            y = torch.where(output < (self.low + self.high) / 2, self.high, self.low).to(output.dtype)
        return y.clamp(0, 1) if self.clamp else y

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target) ** 2

    def success(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).abs() <= self.tolerance


def build_objective(task: str, target_cfg: dict) -> ClassificationObjective | RegressionObjective:
    """The objective for the explained model's task; ``target.mode=auto`` picks the task's default."""
    cfg = dict(target_cfg or {})
    mode = cfg.pop("mode", "auto")
    if task == "classification":
        return ClassificationObjective(mode="flip" if mode == "auto" else mode, **cfg)
    if task == "regression":
        return RegressionObjective(mode=mode, **cfg)
    raise CfxError(f"task={task!r} is unknown; the explained model must be a classifier or a regressor")
