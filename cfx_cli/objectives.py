"""What a counterfactual must achieve: the only place that knows the task.

``target`` chooses y* from the model's prediction on the original, ``loss`` is the
differentiable per-sample loss that guidance minimises, ``success`` says per
sample whether y* is reached. Every method works for classification and
regression through this object.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cfx_cli.errors import CfxError

# Target tables shipped with cfx (target.table=<name> reads <name>_targets.csv there).
SHIPPED_TABLES = Path(__file__).resolve().parent / "data"


class ClassificationObjective:
    """Reach a target class, for any classifier head.

    ``head``: ``softmax`` — K exclusive classes (argmax); ``sigmoid`` — K independent binary
    attributes, of which ``query`` is explained (CelebA's 40 attributes; a single-logit head
    is K = 1, query 0). A sigmoid head's class is 1 when the query logit is positive.

    mode ``flip``: the other class of a binary decision (even when the prediction was wrong,
    as the CelebA papers do); ``class``: the class ``value`` for every image; ``table``: the class a
    CSV (``source,target``) gives for the predicted class (``table``: a path, or the name of a shipped
    table, ``imagenet`` = each class's closest other class in WordNet, as DVCE / LDCE pick targets).

    ``loss(output, target, kind)``: the method chooses ``kind`` —
    ``ce``: cross-entropy to the target (binary cross-entropy for a sigmoid head);
    ``logit``: minus the target's logit (sigmoid head: minus the signed query logit,
    −(2y* − 1)·z, DiME's ``use_logits``).
    """

    task = "classification"
    LOSSES = ("ce", "logit")

    def __init__(self, mode: str = "flip", value=None, head: str = "softmax", query: int | None = None,
                 num_outputs: int | None = None, table: str | None = None):
        if mode not in ("flip", "class", "table"):
            raise CfxError(f"target.mode={mode!r} is not a classification target; use flip, class or table")
        if mode == "class" and (value is None or isinstance(value, bool) or not isinstance(value, int)):
            raise CfxError(f"target.mode=class needs target.value=<class index> (an integer; got {value!r})")
        self.table = load_target_table(table) if mode == "table" else None
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
        if self.table is not None and head == "softmax" and num_outputs is not None:
            self._lookup(num_outputs)  # a bad table fails before the first batch

    def logit(self, output: Tensor) -> Tensor:
        """The query attribute's logit (sigmoid heads)."""
        return output[:, self.query]

    def prediction(self, output: Tensor) -> Tensor:
        if self.head == "sigmoid":
            return (self.logit(output) > 0).long()
        return output.argmax(1)

    def target(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        classes = 2 if self.head == "sigmoid" else output.shape[1]
        if self.mode == "class":
            if not 0 <= int(self.value) < classes:
                raise CfxError(f"target.value={self.value} is not a class of this classifier (0..{classes - 1})")
            return torch.full((output.shape[0],), int(self.value), dtype=torch.long, device=output.device)
        if self.mode == "table":
            pred = self.prediction(output)
            target = self._lookup(classes).to(output.device)[pred]
            if (target < 0).any():
                c = int(pred[target < 0][0])
                raise CfxError(f"target.table={self.table.path} has no row for class {c}, the model's prediction: "
                               f"add a '{c},<target class>' row")
            return target
        if classes != 2:
            raise CfxError(f"target.mode=flip needs a binary classifier, this one has {classes} classes; "
                           f"use target=class target.value=<index>")
        return 1 - self.prediction(output)

    def _lookup(self, classes: int) -> Tensor:
        """source -> target as a tensor over the model's classes (-1: no row), every index in range."""
        table = self.table
        if getattr(table, "lookup", None) is not None and len(table.lookup) == classes:
            return table.lookup
        bad = next(((s, t) for s, t in table.rows.items() if not (0 <= s < classes and 0 <= t < classes)), None)
        if bad is not None:
            raise CfxError(f"target.table={table.path} maps class {bad[0]} to {bad[1]}, out of range for this "
                           f"classifier's classes 0..{classes - 1}: is it the table of this model's classes?")
        lookup = torch.full((classes,), -1, dtype=torch.long)
        for s, t in table.rows.items():
            lookup[s] = t
        table.lookup = lookup
        return lookup

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


class TargetTable:
    """A ``source,target`` CSV of class indices (header required; other columns are ignored)."""

    def __init__(self, path: Path, rows: dict[int, int]):
        self.path, self.rows = path, rows
        self.lookup: Tensor | None = None  # rows as a tensor over a model's classes, built once


def load_target_table(table) -> TargetTable:
    """``table``: a CSV path, or the name of a table shipped in cfx_cli/data (``imagenet``)."""
    if table is None or str(table).strip() in ("", "???"):
        raise CfxError("target.mode=table needs target.table=<CSV with source,target columns> "
                       "(or imagenet, the shipped WordNet-closest ImageNet table)")
    shipped = SHIPPED_TABLES / f"{table}_targets.csv"
    is_name = re.fullmatch(r"[A-Za-z0-9_]+", str(table)) and shipped.is_file()
    path = shipped if is_name else Path(str(table)).expanduser()
    if not path.is_file():
        names = sorted(p.name[:-len("_targets.csv")] for p in SHIPPED_TABLES.glob("*_targets.csv"))
        raise CfxError(f"target.table={table} does not exist: give a CSV with source,target columns or a shipped "
                       f"table ({', '.join(names)})")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"source", "target"} <= set(reader.fieldnames or ()):
                raise CfxError(f"target.table={path} has no source,target header (columns: "
                               f"{','.join(reader.fieldnames or ())}): write 'source,target' then one row per class")
            rows: dict[int, int] = {}
            for k, row in enumerate(reader, 2):
                try:
                    s, t = int(row["source"]), int(row["target"])
                except (TypeError, ValueError):
                    raise CfxError(f"target.table={path}: line {k} has source={row['source']!r}, "
                                   f"target={row['target']!r}; both must be class indices") from None
                if s in rows:
                    raise CfxError(f"target.table={path}: class {s} has two rows (line {k}); keep one")
                if s == t:
                    raise CfxError(f"target.table={path}: line {k} maps class {s} to itself; a counterfactual "
                                   f"needs another class")
                rows[s] = t
    except (OSError, UnicodeDecodeError) as e:
        raise CfxError(f"target.table={path} cannot be read ({type(e).__name__})") from None
    if not rows:
        raise CfxError(f"target.table={path} has no rows: write one 'source,target' row per class")
    return TargetTable(path, rows)


class RegressionObjective:
    """Move the predicted value to y* (labels normalised to [0, 1]).

    mode ``absolute``: y* = value; ``shift``: y* = ŷ + value; ``auto``: the far end
    of ``auto_values`` (low, high), as the regression-counterfactual paper does
    (0.8 for low predictions, the low value otherwise); ``label``: y* = label_values[label] from the
    dataset's label (the paper's CelebA-HQ age task: 0.1 for label 0, 0.8 for label 1 = Young).
    Success: |ŷ − y*| ≤ tolerance.
    """

    task = "regression"

    def __init__(self, mode: str = "auto", value=None, tolerance: float = 0.05, auto_values=(0.2, 0.8),
                 clamp: bool = True, label_values=None):
        if mode not in ("absolute", "shift", "auto", "label"):
            raise CfxError(f"target.mode={mode!r} is not a regression target; use absolute, shift, auto or label")
        if mode == "label":
            if not label_values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                       for v in label_values):
                raise CfxError(f"target.mode=label needs target.label_values=[y* for label 0, y* for label 1, ...] "
                               f"(finite numbers; got {label_values!r})")
        self.label_values = None if label_values is None else [float(v) for v in label_values]
        if mode in ("absolute", "shift") and value is None:
            raise CfxError(f"target.mode={mode} needs target.value=<number>")
        for key, v in (("value", value), ("tolerance", tolerance), *zip(("auto_values",) * 2, auto_values)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise CfxError(f"target.{key}={v} must be a finite number")
        if not float(tolerance) > 0:
            raise CfxError(f"target.tolerance={tolerance} must be positive (success: |y - y*| <= tolerance)")
        self.mode, self.value, self.tolerance = mode, value, float(tolerance)
        self.low, self.high = (float(v) for v in auto_values)
        self.clamp = clamp

    def prediction(self, output: Tensor) -> Tensor:
        return output

    def target(self, output: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.mode == "label":
            if labels is None:
                raise CfxError("target.mode=label needs the dataset's labels (this input has none)")
            labels = torch.as_tensor(labels).long().to(output.device).view(output.shape)
            if ((labels < 0) | (labels >= len(self.label_values))).any():
                raise CfxError(f"target.label_values has {len(self.label_values)} values but the labels are "
                               f"{sorted(set(labels.flatten().tolist()))}")
            y = torch.tensor(self.label_values, dtype=output.dtype, device=output.device)[labels]
        elif self.mode == "absolute":
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


REGRESSION_ONLY = ("tolerance", "auto_values", "clamp", "label_values")  # target keys that only regression reads
CLASSIFICATION_ONLY = ("table",)  # target keys that only classification reads


def build_objective(model, target_cfg: dict, query: int | None = None):
    """The objective for the explained model's task and head; ``target.mode=auto`` picks the task's
    default. ``query`` (from the dataset, e.g. CelebA's smile = 31) is used unless target.query is set."""
    cfg = dict(target_cfg or {})
    mode = cfg.pop("mode", "auto")
    cfg_query = cfg.pop("query", None)
    if model.task == "classification":
        for k in REGRESSION_ONLY:
            cfg.pop(k, None)
        outputs = (getattr(model, "info", None) or {}).get("output_attributes")
        if outputs and cfg_query is None and query is not None:  # the dataset's attribute → this model's output
            if int(query) not in outputs:
                raise CfxError(f"the dataset's query attribute {query} is not an output of this classifier "
                               f"(its outputs are CelebA attributes {outputs}): choose dataset.query among them")
            query = outputs.index(int(query))
        return ClassificationObjective(mode="flip" if mode == "auto" else mode, head=getattr(model, "head", "softmax"),
                                       query=query if cfg_query is None else cfg_query,
                                       num_outputs=getattr(model, "num_classes", None), **cfg)
    if model.task == "regression":
        for k in CLASSIFICATION_ONLY:
            cfg.pop(k, None)
        return RegressionObjective(mode=mode, **cfg)
    raise CfxError(f"task={model.task!r} is unknown; the explained model must be a classifier or a regressor")
