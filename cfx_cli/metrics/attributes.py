"""Attribute-oracle metrics: MNAC and CD (DiME / ACE), from any oracle's binarised attribute predictions.

- MNAC: the number of attributes whose binarised prediction differs between x and x_cf, per sample; its
  mean over the (successful) counterfactuals is the set-level MNAC. As the papers' code, every attribute
  counts (``exclude`` leaves some out, e.g. the queried one).
- CD (correlation difference): Σ_a |ρ(Δ_a, Δ_q) − ρ(label_a, label_q)| over the attributes a ≠ q, with
  Δ_a = pred_a(x_cf) − pred_a(x) over the counterfactuals, ρ Pearson's correlation, label the training set's
  labels and q the queried attribute. A constant series (no change of that attribute in any counterfactual,
  an attribute always on in the labels) has correlation 0, never NaN.

The functions work on arrays (N×A); :class:`AttributeMetrics` wraps an oracle network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError


def _np(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def binarise(scores, threshold: float = 0.0) -> np.ndarray:
    """0/1 attributes from an oracle's scores: 1 where score > threshold (0 for logits, 0.5 for probabilities)."""
    return (_np(scores) > threshold).astype(np.int8)


def changed_attributes(attr_x, attr_cf, exclude=()) -> np.ndarray:
    """Per sample, how many binarised attributes differ between x and x_cf (columns ``exclude`` left out)."""
    a, b = _np(attr_x).astype(np.int8), _np(attr_cf).astype(np.int8)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"attributes must be two N×A arrays of one shape, got {a.shape} and {b.shape}")
    keep = np.ones(a.shape[1], dtype=bool)
    keep[list(exclude or ())] = False
    return (a[:, keep] != b[:, keep]).sum(1).astype(float)


def mnac(attr_x, attr_cf, exclude=()) -> float:
    """Mean number of attributes changed (NaN for an empty set)."""
    changed = changed_attributes(attr_x, attr_cf, exclude)
    return float(changed.mean()) if len(changed) else float("nan")


def pearson(u, v) -> float:
    """Pearson's correlation of two series; 0 when either is constant (or shorter than 2)."""
    u, v = _np(u).astype(np.float64).ravel(), _np(v).astype(np.float64).ravel()
    if len(u) != len(v):
        raise ValueError(f"pearson needs series of one length, got {len(u)} and {len(v)}")
    if len(u) < 2:
        return 0.0
    du, dv = u - u.mean(), v - v.mean()
    nu, nv = np.sqrt((du * du).sum()), np.sqrt((dv * dv).sum())
    if nu <= 1e-12 * max(1.0, np.abs(u).max()) or nv <= 1e-12 * max(1.0, np.abs(v).max()):
        return 0.0
    return float(np.clip((du * dv).sum() / (nu * nv), -1.0, 1.0))


def correlations(columns, query: int) -> np.ndarray:
    """ρ(column_a, column_q) for every column a of an N×A array (constant columns: 0)."""
    m = _np(columns)
    return np.array([pearson(m[:, a], m[:, query]) for a in range(m.shape[1])])


def correlation_difference(attr_x, attr_cf, query: int, train_labels=None, label_correlations=None) -> float:
    """CD = Σ_{a≠q} |ρ(Δ_a, Δ_q) − ρ(label_a, label_q)|, Δ = attr_cf − attr_x over the counterfactuals
    given; the label correlations come from ``train_labels`` (N_train×A, 0/1) or are given directly."""
    delta = _np(attr_cf).astype(np.float64) - _np(attr_x).astype(np.float64)
    if label_correlations is None:
        if train_labels is None:
            raise ValueError("correlation_difference needs train_labels or label_correlations")
        label_correlations = correlations(_np(train_labels).astype(np.float64), query)
    label_correlations = _np(label_correlations).astype(np.float64)
    if len(label_correlations) != delta.shape[1]:
        raise CfxError(f"the training labels have {len(label_correlations)} attributes but the oracle predicts "
                       f"{delta.shape[1]}: they must list the same attributes in the same order")
    if len(delta) == 0:
        return float("nan")
    cf = correlations(delta, query)
    others = [a for a in range(delta.shape[1]) if a != query]
    return float(np.abs(cf[others] - label_correlations[others]).sum())


def load_labels(path: str, key: str = "attributes.train_labels") -> np.ndarray:
    """Training labels as an N×A 0/1 array: a .npy array, CelebA's list_attr_celeba.txt / .csv (−1/1), or any
    CSV / whitespace table of numbers (non-numeric columns such as file names are dropped); values > 0 are 1."""
    import pandas as pd

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise CfxError(f"{key}={path} does not exist: give the training labels (.npy, .csv or CelebA's "
                       f"list_attr_celeba.txt) to compute cd")
    try:
        if p.suffix == ".npy":
            m = np.load(p, allow_pickle=False)
        elif p.name.startswith("list_attr_celeba"):
            from cfx_cli.data.celeba import _read_attributes

            m = _read_attributes(p, p.parent).iloc[:, 1:].to_numpy()
        else:
            df = pd.read_csv(p, sep=None, engine="python")
            m = df.apply(pd.to_numeric, errors="coerce").dropna(axis=1, how="all").to_numpy()
    except CfxError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CfxError(f"{key}={p} cannot be read as a table of labels ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:150] if str(e) else ''})") from None
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or not len(m):
        raise CfxError(f"{key}={p} holds no N×A table of labels (shape {m.shape})")
    return (m > 0).astype(np.int8)


class AttributeMetrics:
    """MNAC and CD through an attribute oracle: a network mapping [-1, 1] images to N×A scores
    (binarised at ``threshold``). ``query``: the queried attribute's column (CD; MNAC with
    ``exclude_query``); ``train_labels``: N_train×A 0/1 labels (CD)."""

    def __init__(self, oracle: nn.Module, threshold: float = 0.0, query: int | None = None, train_labels=None,
                 exclude_query: bool = False, batch_size: int = 64):
        self.oracle, self.threshold, self.query = oracle.eval(), float(threshold), query
        self.train_labels = None if train_labels is None else _np(train_labels)
        self.exclude_query, self.batch_size = exclude_query, batch_size

    @torch.no_grad()
    def predict(self, x: Tensor) -> np.ndarray:
        device = next(iter(self.oracle.parameters()), torch.zeros(())).device
        out = [_np(self.oracle(x[i:i + self.batch_size].to(device)).float()) for i in range(0, len(x), self.batch_size)]
        return binarise(np.concatenate(out), self.threshold) if out else np.zeros((0, 0), np.int8)

    def __call__(self, x: Tensor, x_cf: Tensor, success=None, names=("mnac", "cd")) -> tuple[dict, dict]:
        """(per-sample columns, set-level values) for the pairs; only successful counterfactuals count
        (per-sample MNAC is NaN for the others, so that its column's mean is the set-level MNAC)."""
        return self.from_predictions(self.predict(x), self.predict(x_cf), success, names)

    def from_predictions(self, a, b, success=None, names=("mnac", "cd")) -> tuple[dict, dict]:
        """As ``__call__``, from the binarised predictions on the originals (``a``) and counterfactuals (``b``)."""
        a, b = _np(a), _np(b)
        ok = np.ones(len(a), bool) if success is None else np.array(success, dtype=bool)
        per, level = {}, {}
        if "mnac" in names:
            exclude = [self.query] if self.exclude_query and self.query is not None else []
            changed = changed_attributes(a, b, exclude)
            per["mnac"] = np.where(ok, changed, np.nan)
            level["mnac"] = float(changed[ok].mean()) if ok.any() else float("nan")
        if "cd" in names:
            if self.query is None or self.train_labels is None:
                raise CfxError("cd needs attributes.query (the queried attribute's column) and "
                               "attributes.train_labels (the training labels)")
            level["cd"] = correlation_difference(a[ok], b[ok], self.query, self.train_labels)
        return per, level
