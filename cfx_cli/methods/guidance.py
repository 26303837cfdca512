"""Primitives of gradient guidance that DiME, FastDiME and later methods compose.

- :func:`loss_gradient`  s·∇_x̂ L(f(x̂), y*) (+ any extra differentiable term) at a clean estimate;
- :func:`guided_mean`    the guided posterior mean μ − Σ_t g (Dhariwal & Nichol's classifier guidance,
  with g the gradient of a loss to minimise);
- :func:`retry_scales`   DiME's schedule of guidance scales: each scale re-runs only the images
  not flipped yet, all from the same noisy start;
- :func:`check_common`   the checks of τ and the scales that DiME and FastDiME make of their config.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult, SampleRNG


def loss_gradient(model, objective, x_hat: Tensor, target: Tensor, scale: float, kind: str = "ce",
                  extra=None) -> Tensor:
    """∇_x̂ [ s · Σ_i L(f(x̂_i), y*_i) + extra(x̂) ]: one forward and one backward of the explained model."""
    with torch.enable_grad():
        x_hat = x_hat.detach().requires_grad_(True)
        loss = scale * objective.loss(model(x_hat), target, kind).sum()
        if extra is not None:
            loss = loss + extra(x_hat)
        (g,) = torch.autograd.grad(loss, x_hat)
    return g


def guided_mean(out: dict, g: Tensor) -> Tensor:
    """μ − Σ_t g: the posterior mean moved against the loss gradient, scaled by the step's variance."""
    return out["mean"] - out["variance"] * g


@torch.no_grad()
def retry_scales(scales, x: Tensor, target: Tensor, rng: SampleRNG, counterfactual, judge) -> CFResult:
    """Try each guidance scale in turn on the images not yet flipped.

    ``counterfactual(rows, scale, rng) -> (x_cf, extras)`` makes the counterfactuals of ``rows``
    (``rng`` narrowed to them); ``judge(x_cf, target) -> bool`` is the method's own success test
    that decides which images go on to the next scale (the runner judges the final image again).
    """
    n = x.shape[0]
    x_cf, done = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    scale_used = torch.full((n,), float("nan"), device=x.device)
    extras: dict[str, Tensor] = {}
    for scale in scales:
        rows = (~done).nonzero().flatten()
        if len(rows) == 0:
            break
        with rng.subset(rows.cpu()) as sub:
            cf, more = counterfactual(rows, scale, sub)
            ok = judge(cf, target[rows])
        x_cf[rows] = cf
        for k, v in more.items():
            if v is not None:
                extras.setdefault(k, torch.zeros(n, *v.shape[1:], device=v.device, dtype=v.dtype))[rows] = v
        scale_used[rows] = scale
        done[rows] = ok
    return CFResult(x_cf=x_cf, extras=extras, info={"scale": scale_used})


def check_common(sampler, tau: int, scales) -> None:
    if not 0 < int(tau) <= sampler.num_steps:
        raise CfxError(f"method.tau={tau} must lie in 1..{sampler.num_steps} (the sampler's respaced steps, "
                       f"sampler.steps); lower method.tau or raise sampler.steps")
    if not scales:
        raise CfxError("method.scales is empty: give the guidance scales to try in turn, e.g. method.scales=[8,10,15]")
    for s in scales:
        if not isinstance(s, (int, float)) or not math.isfinite(float(s)):
            raise CfxError(f"method.scales={list(scales)} must be finite numbers, e.g. method.scales=[8,10,15]")


def check_finite(**values) -> None:
    """Refuse NaN/inf weights (they would silently act as 0 or break every sample)."""
    for key, v in values.items():
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise CfxError(f"method.{key}={v} must be a finite number")


def start_level(tau: int, public_code_offset: bool, num_steps: int) -> int:
    """The respaced index the input is noised to. The public DiME code noises to index τ and starts
    denoising at τ − 1 (an off-by-one); the corrected version noises to τ − 1. Both run τ steps."""
    return min(int(tau) if public_code_offset else int(tau) - 1, num_steps - 1)
