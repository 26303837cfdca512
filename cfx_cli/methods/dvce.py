"""DVCE (Augustin et al., NeurIPS 2022): Diffusion Visual Counterfactual Explanations.

    z ← q_sample(x, start)                                 (late start: index 99 of 200)
    for t = start … 1:
        μ, Σ, x̂_0, ε ← p(z_{t−1} | z_t)                     (1 UNet call, kept in the graph)
        g_c ← ∇_{z_t} mean_augs L(f(aug(x̂_0)), y*)          (through the UNet; 16 augmentations)
        if a robust model and cone_angle:                   (cone projection)
            g_r ← ∇_{z_t} mean_augs L(f_robust(aug(x̂_0)), y*)
            g_c ← the direction within cone_angle of g_c closest to g_r
        g_d ← ∇_{z_t} mean |x̂_0 − x|
        g  ← ‖ε‖ (λ_c ĝ_c + λ_d ĝ_d)                         (adaptive: each gradient unit, per sample)
        z ← μ − Σ g + σ_t ε′
    x_cf ← x̂_0(z_1) at t = 0                               (the last clean estimate; unguided)

L is the objective's loss (cross-entropy: −log p(y*), with the model's temperature). Cost per guided
step: one UNet forward and one backward pass per gradient (2, or 3 with the cone; ``batched_vjp``: all
of them in one batched vector-Jacobian product, counted as one pass, the same numbers); one forward
and backward of each classifier on ``augmentations`` copies; then one UNet forward for the output.
Augmentations: cfx_cli/methods/augment.py (kornia 0.6.4's, as the public code pins it). The public code runs the UNet twice per step (once
without gradients for μ, once with them for x̂_0) and guides the t = 0 step it then discards; cfx
gets the same numbers from one call per step and skips that last gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cfx_cli.errors import CfxError
from cfx_cli.methods.augment import dvce_augment
from cfx_cli.methods.base import CFResult, check_sampler
from cfx_cli.methods.guidance import check_finite, guided_mean

INSIDE = ("explained", "robust")


def _unit(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, *([1] * (v.dim() - 1)))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.flatten(1) * b.flatten(1)).sum(1).view(-1, *([1] * (a.dim() - 1)))


def cone_projection(g: Tensor, g_robust: Tensor, angle_deg: float, inside: str = "explained") -> Tensor:
    """A unit direction within ``angle_deg`` of ``g`` (the explained model's gradient), per sample.

    When g_robust lies outside the cone: the cone's edge closest to it, unit(g) + tan α · unit(g_robust ⟂ g).
    When it lies inside: ``inside='explained'`` returns unit(g), as the public code does;
    ``'robust'`` returns unit(g_robust), its own projection onto the cone (the corrected rule).
    """
    u = _unit(g)
    cos = _dot(u, _unit(g_robust)).clamp(-1, 1)
    perp = g_robust - _dot(g_robust, u) * u
    edge = _unit(u + math.tan(math.radians(angle_deg)) * _unit(perp))
    within = cos >= math.cos(math.radians(angle_deg))
    return torch.where(within, _unit(g_robust) if inside == "robust" else u, edge)


class DVCE:
    name = "dvce"
    sampler_kind, sampler_why = "ddpm", "guides the DDPM posterior mean (μ + Σ g)"

    def __init__(self, sampler, model, objective, robust_model=None, start=99, lambda_c=0.1, lambda_d=0.15,
                 cone_angle=30.0, cone_inside="explained", augmentations=16, augment_size=None,
                 augment_translate=(0.1, 0.1), clip_denoised=False, classifier_loss="ce", batched_vjp=False):
        check_sampler(self, sampler)
        sampler.check_level(int(start), "method.start")
        check_finite(lambda_c=lambda_c, lambda_d=lambda_d)
        if cone_angle is not None:
            check_finite(cone_angle=cone_angle)
            if not 0 < float(cone_angle) < 90:
                raise CfxError(f"method.cone_angle={cone_angle} must lie in (0, 90) degrees, or be null (no cone)")
            if robust_model is None:
                raise CfxError("method.cone_angle is set but there is no robust model: choose robust_model=<name> "
                               "(e.g. robust_model=synthetic_shape_robust), or method.cone_angle=null")
        if cone_inside not in INSIDE:
            raise CfxError(f"method.cone_inside={cone_inside!r} is unknown; use explained (public code) or robust")
        if int(augmentations) < 1:
            raise CfxError(f"method.augmentations={augmentations} must be at least 1 (1 = the image itself)")
        self.sampler, self.model, self.objective, self.robust = sampler, model, objective, robust_model
        self.start, self.lambda_c, self.lambda_d = int(start), float(lambda_c), float(lambda_d)
        self.cone_angle = None if cone_angle is None else float(cone_angle)
        self.cone_inside, self.augmentations = cone_inside, int(augmentations)
        if augment_size is not None and int(augment_size) < 1:
            raise CfxError(f"method.augment_size={augment_size} must be a positive size in pixels, or null")
        self.augment_size = None if augment_size is None else int(augment_size)
        tr = [augment_translate] * 2 if isinstance(augment_translate, (int, float)) else list(augment_translate)
        if len(tr) != 2 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in tr):
            raise CfxError(f"method.augment_translate={augment_translate} must be [x, y] fractions in [0, 1], "
                           f"e.g. [0.1, 0.1] (the public code's kornia 0.6.4 shifts by [0.0, 0.1])")
        self.augment_translate = (float(tr[0]), float(tr[1]))
        self.clip_denoised, self.classifier_loss = bool(clip_denoised), classifier_loss
        self.batched_vjp = bool(batched_vjp)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual (for the progress bar): a forward per guided step and the last
        clean estimate; per step a backward for each gradient through it (classifier, distance, the robust
        model's with the cone)."""
        cone = self.robust is not None and self.cone_angle is not None
        return float(self.start + 1 + self.start * (3 if cone else 2))

    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng) -> CFResult:
        z = self.sampler.q_sample(x, self.start, rng.randn(x.shape[1:]))
        angles = []
        for t in range(self.start, 0, -1):
            out, g, angle = self.guidance(z, x, target, t, rng)
            z = self.sampler.step(out, t, rng.randn(x.shape[1:]), mean=guided_mean(out, g))
            angles.append(angle)
        # the last clean estimate, x̂_0(z_1) (the public code's output; its guidance would never be used)
        x_cf = self.sampler.predict(z, 0, clip=self.clip_denoised)["pred_xstart"].clamp(-1, 1)
        angle = torch.stack(angles).mean(0) if angles else torch.full((len(x),), float("nan"), device=x.device)
        return CFResult(x_cf=x_cf, info={"cone_angle_mean": angle})

    def guidance(self, z: Tensor, x: Tensor, target: Tensor, t: int, rng):
        """One UNet call with its graph; the step's prediction (detached), g, and the angle between
        the explained and the robust model's gradients (degrees; NaN without a robust model)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            out = self.sampler.predict(z, t, clip=self.clip_denoised)
            x0 = out["pred_xstart"]
            # the gradients' cotangents at x̂_0 (classifier backward passes only), then through the UNet:
            # one backward pass each, or all in one batched vector-Jacobian product
            at = x0.detach().requires_grad_(True) if self.batched_vjp else x0
            wrt = at if self.batched_vjp else z
            grads = [self.classifier_gradient(self.model, at, wrt, target, rng)]
            cone = self.robust is not None and self.cone_angle is not None
            if cone:
                grads.append(self.classifier_gradient(self.robust, at, wrt, target, rng))
            # mean |x̂_0 − x| over all elements, as the public code's l1_loss (its --denoise_dist_input)
            grads += torch.autograd.grad(F.l1_loss(at, x, reduction="mean") * len(x), wrt, retain_graph=True)
            if self.batched_vjp:
                grads = torch.autograd.grad(x0, z, torch.stack(grads), is_grads_batched=True)[0].unbind(0)
            g_c, g_d = grads[0], grads[-1]
            angle = torch.full((len(x),), float("nan"), device=x.device)
            if cone:
                g_r = grads[1]
                angle = torch.rad2deg(torch.acos(_dot(_unit(g_c), _unit(g_r)).flatten().clamp(-1, 1)))
                g_c = cone_projection(g_c, g_r, self.cone_angle, self.cone_inside)
        eps_norm = out["eps"].detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        g = eps_norm * (self.lambda_c * _unit(g_c) + self.lambda_d * _unit(g_d))
        return {k: v.detach() for k, v in out.items()}, g, angle

    def classifier_gradient(self, model, x0: Tensor, z: Tensor, target: Tensor, rng) -> Tensor:
        """∇_z of the loss averaged over the augmented copies of x̂_0 (the first copy unaugmented)."""
        copies = dvce_augment(x0, self.augmentations, rng, translate=self.augment_translate,
                              size=self.augment_size)  # (n·A)×C×H×W, sample-major
        loss = self.objective.loss(model(copies), target.repeat_interleave(self.augmentations), self.classifier_loss)
        (g,) = torch.autograd.grad(loss.sum() / self.augmentations, z, retain_graph=True)
        return g
