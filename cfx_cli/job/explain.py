"""One batch explained and judged: the one code path of every method, for `cfx run` and the Python API."""
from __future__ import annotations

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
