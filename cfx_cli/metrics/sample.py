"""Per-sample metrics: one number per (original, counterfactual) pair, written to samples.csv.

Distances are measured on [0, 1] images: ``l1`` is the mean absolute pixel
difference, ``l2`` the root-mean-square difference (both per channel value).

On the synthetic benchmark a factor oracle reads every factor of both images:

- ``mnac``: non-target factors whose oracle reading changed (discrete factors:
  the arg-max differs; size: |Δ| > ``size_tol`` of its range; position: either
  coordinate moved by more than ``pos_tol`` of the image side);
- ``bg_changed``: the oracle sees another background colour (a shortcut revealed);
- ``oracle_flip``: the oracle sees the target factor reached (shape = target
  class; size within the objective's tolerance of the target);
- ``oracle_was_target``: the oracle saw it reached on the original already (the model had misread it);
- ``ideal_cf_l1``: l1 to the ideal counterfactual, rendered from the same
  factors with only the target factor changed;
- ``oracle_error`` (regression): |oracle's size reading of x_cf − target| (its mean: ``oracle_mae``).

Each sample's ``outcome`` (:func:`outcomes`): where an oracle reads the counterfactual, **real** (the
model flipped, or reached its regression target, and the oracle confirms: the edit made the image the target
class / size within the tolerance), **corrected** (the oracle saw the target on the original already: the
model had misread it, and the edit changed its decision without making the image anything it was not — on
the biased classifier, a background edit of a misread image: its shortcut), **adversarial** (the model is
fooled, the oracle is not) or **failed**; with no oracle, **success** or **failed**.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cfx_cli.data.synthetic import ALL_SHAPES

DISCRETE = ("shape", "obj_colour", "bg_colour")


OUTCOMES = ("real", "corrected", "adversarial", "failed")


def outcomes(success, oracle_flip=None, oracle_was_target=None) -> np.ndarray:
    """Per sample: real | corrected | adversarial | failed where the oracle's confirmation ``oracle_flip`` is
    known (NaN: not known), success | failed without it. ``oracle_was_target`` (the oracle read the target on
    the original) turns a confirmed success into corrected; without it (job folders written before it was
    recorded) a confirmed success is real."""
    success = np.asarray(success, dtype=bool)
    out = np.where(success, "success", "failed").astype(object)
    if oracle_flip is not None:
        confirmed = np.asarray(oracle_flip, dtype=float)
        was = np.zeros(len(success)) if oracle_was_target is None else np.asarray(oracle_was_target, dtype=float)
        known = np.isfinite(confirmed)
        real = np.where(np.nan_to_num(was) > 0.5, "corrected", "real")
        out[known & success] = np.where(confirmed[known & success] > 0.5, real[known & success], "adversarial")
    return out


def distances(x: Tensor, x_cf: Tensor) -> dict[str, np.ndarray]:
    d = (x_cf - x).float() / 2  # [-1, 1] → [0, 1] units
    return {"l1": d.abs().flatten(1).mean(1).cpu().numpy(),
            "l2": d.pow(2).flatten(1).mean(1).sqrt().cpu().numpy()}


class OracleMetrics:
    """Factor-level metrics of the synthetic benchmark (needs the oracle and the renderer)."""

    def __init__(self, oracle, world, size_tol: float = 0.1, pos_tol: float = 0.06):
        self.oracle, self.world = oracle, world
        self.size_tol, self.pos_tol = size_tol, pos_tol

    @torch.no_grad()
    def read(self, x: Tensor) -> dict[str, np.ndarray]:
        out = self.oracle(x)
        r = {k: out[k].argmax(1).cpu().numpy() for k in DISCRETE}
        cont = out["continuous"].float().cpu().numpy()
        r.update(size=cont[:, 0], pos_x=cont[:, 1], pos_y=cont[:, 2])
        return r

    @torch.no_grad()
    def __call__(self, x: Tensor, x_cf: Tensor, factors: dict, target: Tensor, task: str,
                 tolerance: float = 0.05) -> dict[str, np.ndarray]:
        a, b = self.read(x), self.read(x_cf)
        changed = {k: a[k] != b[k] for k in DISCRETE}
        changed["size"] = np.abs(a["size"] - b["size"]) > self.size_tol
        changed["position"] = np.maximum(np.abs(a["pos_x"] - b["pos_x"]), np.abs(a["pos_y"] - b["pos_y"])) > self.pos_tol
        target_factor = "shape" if task == "classification" else "size"
        mnac = sum(v.astype(int) for k, v in changed.items() if k != target_factor)
        t = target.detach().cpu().numpy()
        if task == "classification":
            target_shape = np.array([self.world.shape_ids[int(v)] for v in t])
            oracle_flip, was_target = b["shape"] == target_shape, a["shape"] == target_shape
            ideal = self.world.ideal_counterfactual(factors, shape=t.astype(np.int64))
        else:
            oracle_flip, was_target = np.abs(b["size"] - t) <= tolerance, np.abs(a["size"] - t) <= tolerance
            ideal = self.world.ideal_counterfactual(factors, size=t.astype(np.float64))
        # regression: how far the oracle's reading of the counterfactual is from the target (oracle MAE)
        oracle_error = np.abs(b["size"] - t) if task != "classification" else None
        ideal_l1 = ((x_cf.float().cpu() - ideal).abs() / 2).flatten(1).mean(1).numpy()
        out = {"mnac": mnac.astype(float), "bg_changed": changed["bg_colour"].astype(float),
               "oracle_flip": oracle_flip.astype(float), "oracle_was_target": was_target.astype(float),
               "ideal_cf_l1": ideal_l1,
               "oracle_shape_cf": np.array([ALL_SHAPES[int(v)] for v in b["shape"]])}
        if oracle_error is not None:
            out["oracle_error"] = oracle_error.astype(float)
        return out
