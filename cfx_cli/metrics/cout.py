"""COUT (counterfactual transition, Khorram & Fuxin 2022): how decisively the pixels that a counterfactual
changed move the classifier from the source class to the target class.

The pixels are ranked by Σ_c |x_cf − x| (largest first; ties keep raster order) and inserted from x_cf into
x in ``steps`` equal steps: x_k takes its top-ranked k·HW/steps pixels from x_cf and the rest from x,
rounded half up, so x_0 = x and x_steps = x_cf. Along the path the classifier gives p(target | x_k) and
p(source | x_k);

    COUT = AUC(p_target) − AUC(p_source) ∈ [−1, 1],

each AUC the trapezoid rule over the steps + 1 points on [0, 1]. The source class is the input's label, and
COUT is computed only for correctly classified inputs (prediction on x = label); others get NaN.
Probabilities follow the classifier's head (``ClassificationObjective.probability``): softmax — the
class's softmax probability; sigmoid — σ(±logit of the query attribute), so p_source = 1 − p_target.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

STEPS = 50


def insertion_ranks(x: Tensor, x_cf: Tensor) -> Tensor:
    """Per image, each pixel's rank (0 = inserted first) by Σ_c |x_cf − x|, as an N×H×W long tensor."""
    d = (x_cf.float() - x.float()).abs().sum(1).flatten(1)
    order = torch.argsort(-d, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d.shape[1], device=d.device).expand_as(order).contiguous())
    return ranks.view(x.shape[0], *x.shape[2:])


def inserted_pixels(k, num_pixels: int, steps: int = STEPS):
    """How many pixels x_k takes from x_cf: k·HW/steps rounded half up (integer arithmetic; k may be a tensor)."""
    return (2 * k * num_pixels + steps) // (2 * steps)


def insertion_step(x: Tensor, x_cf: Tensor, ranks: Tensor, k: int, steps: int = STEPS) -> Tensor:
    """x_k: the top-ranked pixels of x_cf inserted into x."""
    n = inserted_pixels(k, ranks[0].numel(), steps)
    return torch.where((ranks < n).unsqueeze(1), x_cf, x)


def auc(curve) -> np.ndarray:
    """Trapezoid-rule area of curves sampled at equal steps on [0, 1] (last axis)."""
    c = np.asarray(curve, dtype=np.float64)
    return (c[..., 1:] + c[..., :-1]).sum(-1) / (2 * (c.shape[-1] - 1))


@torch.no_grad()
def insertion_curves(model: nn.Module, objective, x: Tensor, x_cf: Tensor, source: Tensor, target: Tensor,
                     steps: int = STEPS, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """p(target | x_k) and p(source | x_k) for k = 0..steps, each N×(steps+1). The (step, image) pairs are
    composed and classified ``batch_size`` at a time (few large passes rather than steps + 1 small ones)."""
    n = len(x)
    ranks = insertion_ranks(x, x_cf)
    ks = torch.arange(steps + 1, device=x.device).repeat_interleave(n)  # pair j: step ks[j] of image ims[j]
    ims = torch.arange(n, device=x.device).repeat(steps + 1)
    p_t, p_s = [], []
    for start in range(0, len(ks), batch_size):
        k, i = ks[start:start + batch_size], ims[start:start + batch_size]
        inserted = ranks[i] < inserted_pixels(k, ranks[0].numel(), steps).view(-1, 1, 1)
        out = model(torch.where(inserted.unsqueeze(1), x_cf[i], x[i]))
        p_t.append(objective.probability(out, target[i]).float().cpu())
        p_s.append(objective.probability(out, source[i]).float().cpu())
    return (torch.cat(p_t).view(steps + 1, n).T.numpy(), torch.cat(p_s).view(steps + 1, n).T.numpy())


@torch.no_grad()
def cout(model: nn.Module, objective, x: Tensor, x_cf: Tensor, label: Tensor, target: Tensor,
         steps: int = STEPS, batch_size: int = 64) -> np.ndarray:
    """COUT per sample (N floats): NaN where the input is not correctly classified (or has no label, < 0).

    ``objective``: a ``ClassificationObjective`` (its head and query read the model's outputs);
    ``label``: the inputs' true classes (the source); ``target``: the counterfactuals' target classes."""
    device = next(iter(model.parameters()), torch.zeros(())).device
    label, target = torch.as_tensor(label).long().view(-1), torch.as_tensor(target).long().view(-1)
    res = np.full(len(x), np.nan)
    for i in range(0, len(x), batch_size):
        xb, cb = x[i:i + batch_size].to(device), x_cf[i:i + batch_size].to(device)
        lb, tb = label[i:i + batch_size].to(device), target[i:i + batch_size].to(device)
        correct = (lb >= 0) & (objective.prediction(model(xb)) == lb)
        if not correct.any():
            continue
        sel = correct.nonzero().view(-1)
        p_t, p_s = insertion_curves(model, objective, xb[sel], cb[sel], lb[sel], tb[sel], steps, batch_size)
        res[i + sel.cpu().numpy()] = auc(p_t) - auc(p_s)
    return res
