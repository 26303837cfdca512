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
    """Reach a target class, for any classifier head.

    ``head``: ``softmax`` — K exclusive classes (argmax); ``sigmoid`` — K independent binary
    attributes, of which ``query`` is explained (CelebA's 40 attributes; a single-logit head
    is K = 1, query 0). A sigmoid head's class is 1 when the query logit is positive.

    mode ``flip``: the other class of a binary decision (even when the prediction was wrong,
    as the CelebA papers do); ``class``: the class ``value`` for every image.

    ``loss(output, target, kind)``: the method chooses ``kind`` —
    ``ce``: cross-entropy to the target (binary cross-entropy for a sigmoid head);
    ``logit``: minus the target's logit (sigmoid head: minus the signed query logit,
    −(2y* − 1)·z, DiME's ``use_logits``).
    """

    task = "classification"
    LOSSES = ("ce", "logit")

    def __init__(self, mode: str = "flip", value=None, head: str = "softmax", query: int | None = None,
                 num_outputs: int | None = None):
        if mode not in ("flip", "class"):
            raise CfxError(f"target.mode={mode!r} is not a classification target; use flip or class")
        if mode == "class" and value is None:
            raise CfxError("target.mode=class needs target.value=<class index>")
        if head == "sigmoid":
            if query is None:
                if num_outputs not in (None, 1):
                    raise CfxError(f"the classifier has {num_outputs} independent (sigmoid) outputs: say which one "
                                   f"to explain with target.query=<index> (or a dataset with a query, e.g. "
                                   f"dataset.query=smile)")
                query = 0
            if num_outputs is not None and not 0 <= int(query) < num_outputs:
                raise CfxError(f"target.query={query} is not an output of this classifier (0..{num_outputs - 1})")
        self.mode, self.value, self.head = mode, value, head
        self.query = None if query is None else int(query)

    def logit(self, output: Tensor) -> Tensor:
        """The query attribute's logit (sigmoid heads)."""
        return output[:, self.query]

    def prediction(self, output: Tensor) -> Tensor:
        if self.head == "sigmoid":
            return (self.logit(output) > 0).long()
        return output.argmax(1)

    def target(self, output: Tensor) -> Tensor:
        classes = 2 if self.head == "sigmoid" else output.shape[1]
        if self.mode == "class":
            if not 0 <= int(self.value) < classes:
                raise CfxError(f"target.value={self.value} is not a class of this classifier (0..{classes - 1})")
            return torch.full((output.shape[0],), int(self.value), dtype=torch.long, device=output.device)
        if classes != 2:
            raise CfxError(f"target.mode=flip needs a binary classifier, this one has {classes} classes; "
                           f"use target=class target.value=<index>")
        return 1 - self.prediction(output)

    def loss(self, output: Tensor, target: Tensor, kind: str = "ce") -> Tensor:
        if kind not in self.LOSSES:
            raise CfxError(f"method.classifier_loss={kind!r} is unknown; use one of {list(self.LOSSES)}")
        if self.head == "sigmoid":
            z, sign = self.logit(output), 2.0 * target.to(output.dtype) - 1.0
            if kind == "logit":
                return -sign * z
            return F.binary_cross_entropy_with_logits(z, target.to(output.dtype), reduction="none")
        if kind == "logit":
            return -output.gather(1, target.view(-1, 1)).squeeze(1)
        return F.cross_entropy(output, target, reduction="none")

    def success(self, output: Tensor, target: Tensor) -> Tensor:
        return self.prediction(output) == target

    def probability(self, output: Tensor, target: Tensor) -> Tensor:
        """p(target | x)."""
        if self.head == "sigmoid":
            return torch.sigmoid((2.0 * target.to(output.dtype) - 1.0) * self.logit(output))
        return output.softmax(1).gather(1, target.view(-1, 1)).squeeze(1)


class RegressionObjective:
    """Move the predicted value to y* (labels normalised to [0, 1]).

    mode ``absolute``: y* = value; ``shift``: y* = ŷ + value; ``auto``: the far end
    of ``auto_values`` (low, high), as the regression-counterfactual paper does
    (0.8 for low predictions, the low value otherwise). Success: |ŷ − y*| ≤ tolerance.
    """

    task = "regression"

    def __init__(self, mode: str = "auto", value=None, tolerance: float = 0.05, auto_values=(0.2, 0.8),
                 clamp: bool = True):
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

    def loss(self, output: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
        """(ŷ − y*)²; ``kind`` is a classifier's choice and has no meaning here."""
        return (output - target) ** 2

    def success(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).abs() <= self.tolerance


REGRESSION_ONLY = ("tolerance", "auto_values", "clamp")  # target keys that only regression reads


def build_objective(model, target_cfg: dict, query: int | None = None):
    """The objective for the explained model's task and head; ``target.mode=auto`` picks the task's
    default. ``query`` (from the dataset, e.g. CelebA's smile = 31) is used unless target.query is set."""
    cfg = dict(target_cfg or {})
    mode = cfg.pop("mode", "auto")
    cfg_query = cfg.pop("query", None)
    if model.task == "classification":
        for k in REGRESSION_ONLY:
            cfg.pop(k, None)
        return ClassificationObjective(mode="flip" if mode == "auto" else mode, head=getattr(model, "head", "softmax"),
                                       query=query if cfg_query is None else cfg_query,
                                       num_outputs=getattr(model, "num_classes", None), **cfg)
    if model.task == "regression":
        return RegressionObjective(mode=mode, **cfg)
    raise CfxError(f"task={model.task!r} is unknown; the explained model must be a classifier or a regressor")
