"""ACE (Jeanneret et al., CVPR 2023): Adversarial Counterfactual Explanations; with a regressor and
its stopping rule, AC-RE (Ha & Bender 2025).

    F_τ(x′) = the τ stochastic reverse steps from q_sample(x′, τ − 1)     (gradients through all τ UNet calls)
    pre-explanation:  x′ ← x
        for k = 1 … iterations, on the samples still running:
            ℓ ← L(f(F_τ(x′)), y*)                     (AC-RE: a sample stops once f(F_τ(x′)) reaches y*)
            g ← ∇_{x′} [ ℓ + λ_1 ‖x′ − x‖_1 + λ_2 ‖x′ − x‖_2 ]       ([0, 1] pixel units, as the public code)
            x′ ← clip_{[0,1] ∩ ε-ball}(x′ − η sign g)
    (ℓ per sample; ``loss_reduction=mean``: ℓ / batch, the public code's batch mean. AC-RE's stop keeps the x′
    that reached y*; ``stop_after_step``: the public code's order, that iteration's step still taken.
    With sign steps λ_1 acts per pixel as a threshold: a pixel leaves x only where |∂ℓ/∂x′| > λ_1.)
    M ← dilate_k(normalise(Σ_c |x − x′|)) > threshold
    refinement (RePaint):  z ← q_sample(x′, τ − 1)
        for t = τ−1 … 0:  z ← M z + (1 − M) q_sample(x, t);  z ← step(z, t)
    x_cf ← M z + (1 − M) x

Cost: τ UNet forwards and τ backwards per PGD iteration, plus τ forwards for the refinement.
``sampler.checkpoint=true`` recomputes each step in the backward pass instead of storing it
(memory of one step instead of τ; each checkpointed step is one more UNet forward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult, check_dilation, check_sampler, difference_mask
from cfx_cli.methods.guidance import check_finite

SUCCESS_ON = ("final", "pre_explanation")
LOSS_REDUCTIONS = ("sum", "mean")


class ACE:
    name = "ace"
    sampler_kind, sampler_why = "ddpm", "filters with stochastic DDPM steps"

    def __init__(self, sampler, model, objective, tau=5, iterations=50, step=1.0, epsilon=255.0, lambda_l1=0.001,
                 lambda_l2=0.0, mask_dilation=15, mask_threshold=0.15, classifier_loss="ce", early_stop=None,
                 success_on="final", loss_reduction="sum", stop_after_step=False):
        check_sampler(self, sampler)
        if not 0 < int(tau) <= sampler.num_steps:
            raise CfxError(f"method.tau={tau} must lie in 1..{sampler.num_steps} (the sampler's respaced steps, "
                           f"sampler.steps); the paper uses 5 of 50")
        if int(iterations) < 1:
            raise CfxError(f"method.iterations={iterations} must be at least 1 (the paper: 50 on CelebA)")
        check_finite(step=step, epsilon=epsilon, lambda_l1=lambda_l1, lambda_l2=lambda_l2,
                     mask_threshold=mask_threshold)
        if not step > 0 or not epsilon > 0:
            raise CfxError(f"method.step={step} and method.epsilon={epsilon} must be positive (units of 1/255)")
        check_dilation(mask_dilation)
        if success_on not in SUCCESS_ON:
            raise CfxError(f"method.success_on={success_on!r} is unknown; use final (the corrected judgement) or "
                           f"pre_explanation (the public code's)")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise CfxError(f"method.loss_reduction={loss_reduction!r} is unknown; use sum (each sample's own loss) or "
                           f"mean (the public code: the loss averaged over the batch)")
        self.sampler, self.model, self.objective = sampler, model, objective
        self.tau, self.iterations = int(tau), int(iterations)
        # the public code's units: [0, 1] images, step and budget in 1/255; cfx's images are in [-1, 1]
        self.step, self.epsilon = float(step) / 255, float(epsilon) / 255
        self.lambda_l1, self.lambda_l2 = float(lambda_l1), float(lambda_l2)
        self.mask_dilation, self.mask_threshold = int(mask_dilation), float(mask_threshold)
        self.classifier_loss = classifier_loss
        # AC-RE stops a sample once its target is reached; ACE runs every iteration on every image
        self.early_stop = (objective.task == "regression") if early_stop is None else bool(early_stop)
        self.success_on = success_on
        self.loss_reduction, self.stop_after_step = loss_reduction, bool(stop_after_step)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual (for the progress bar): tau forward and tau backward through the
        filter per PGD iteration, then the tau-step refinement; an upper bound where samples stop early."""
        return float(self.iterations * 2 * self.tau + self.tau)

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng) -> CFResult:
        pe, iterations, reached = self.pre_explanation(x, target, rng)
        mask = difference_mask(pe, x, self.mask_dilation, self.mask_threshold, inclusive=True)
        x_cf = self.refine(pe, x, mask, rng)
        pe_success = self.objective.success(self.model(pe), target)
        info = {"pgd_iterations": iterations.float(), "success_pre_explanation": pe_success.float()}
        if self.early_stop:  # AC-RE's own success: the stopping rule fired (f(F_τ(x′)) within tolerance)
            info["pgd_reached"] = reached.float()
        return CFResult(x_cf=x_cf, extras={"pre_explanation": pe, "mask": mask}, info=info,
                        judged=pe if self.success_on == "pre_explanation" else None)

    def filtered(self, x_prime: Tensor, rng) -> Tensor:
        """F_τ(x′), differentiable: fresh noise each call, as the public code draws it."""
        start = self.tau - 1
        z = self.sampler.q_sample(x_prime, start, rng.randn(x_prime.shape[1:]))
        return self.sampler.denoise(z, start, -1, rng, grad=True)

    def pre_explanation(self, x: Tensor, target: Tensor, rng) -> tuple[Tensor, Tensor, Tensor]:
        """PGD on x′ through the filter; returns x′, each sample's number of gradient iterations and
        whether its stopping rule fired (early_stop)."""
        x01 = (x + 1) / 2
        pe01 = x01.clone()
        running = torch.ones(len(x), dtype=torch.bool, device=x.device)
        reached_any = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        iterations = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for _ in range(self.iterations):
            rows = running.nonzero().flatten()
            if len(rows) == 0:
                break
            with rng.subset(rows.cpu()) as sub:
                g, reached = self.gradient(pe01[rows], x01[rows], target[rows], sub, len(x))
            iterations[rows] += 1
            if self.early_stop:
                if not self.stop_after_step:  # keep the x′ whose filtered image reached y*
                    g = g * (~reached).view(-1, 1, 1, 1)
                running[rows[reached]] = False
                reached_any[rows[reached]] = True
            pe01[rows] = self.project(pe01[rows] - self.step * g.sign(), x01[rows])
        return pe01 * 2 - 1, iterations, reached_any

    def gradient(self, pe01: Tensor, x01: Tensor, target: Tensor, rng, batch: int) -> tuple[Tensor, Tensor]:
        """∇_{x′}[L(f(F_τ(x′)), y*) + distances] in [0, 1] units, and whether f(F_τ(x′)) reaches y*."""
        with torch.enable_grad():
            pe01 = pe01.detach().requires_grad_(True)
            out = self.model(self.filtered(pe01 * 2 - 1, rng))
            loss = self.objective.loss(out, target, self.classifier_loss).sum()
            if self.loss_reduction == "mean":  # the public code: averaged over the batch (running or not)
                loss = loss / batch
            diff = (pe01 - x01).flatten(1)
            if self.lambda_l1:
                loss = loss + self.lambda_l1 * diff.abs().sum()
            if self.lambda_l2:
                loss = loss + self.lambda_l2 * diff.norm(dim=1).sum()
            (g,) = torch.autograd.grad(loss, pe01)
        return g, self.objective.success(out.detach(), target)

    def project(self, pe01: Tensor, x01: Tensor) -> Tensor:
        """Into the L∞ ball of radius ε around x (unbounded at the public default 255/255) and [0, 1]."""
        if self.epsilon < 1:
            pe01 = torch.max(torch.min(pe01, x01 + self.epsilon), x01 - self.epsilon)
        return pe01.clamp(0, 1)

    def refine(self, pe: Tensor, x: Tensor, mask: Tensor, rng) -> Tensor:
        """RePaint inside the mask: the pre-explanation's region regenerated, the rest kept from x."""
        z = self.sampler.q_sample(pe, self.tau - 1, rng.randn(x.shape[1:]))
        for t in reversed(range(self.tau)):
            z = self.sampler.blend(z, x, mask, t, rng.randn(x.shape[1:]))
            noise = rng.randn(x.shape[1:]) if t > 0 else None
            z = self.sampler.step(self.sampler.predict(z, t), t, noise)
        return (mask * z + (1 - mask) * x).clamp(-1, 1)
