"""DiME (Jeanneret et al., ACCV 2022): Diffusion Models for counterfactual Explanations.

    z_τ ← q_sample(x, τ)                                   (once, shared by every scale)
    for s in scales, on the images not flipped yet:
        x̂ ← x ; z ← z_τ
        for t = τ−1 … 0:
            μ, Σ ← p(z_{t−1} | z_t)                          (1 UNet call)
            g ← [s ∇_x̂ L(f(x̂), y*) + λ_p ∇_x̂ perc(x̂, x)] / √ᾱ_t + λ_1 sign(z − x)
            z ← μ − Σ g + σ_t ε                              (no noise at t = 0)
            x̂ ← unguided chain z → 0                        (t UNet calls, no gradient)
        x_cf ← z

Cost per scale: τ + Σ_{k=1..τ−1} k UNet calls; no backprop through the UNet.
"""
from __future__ import annotations

import torch

from cfx_cli.methods.base import check_sampler
from cfx_cli.methods.guidance import check_common, check_finite, guided_mean, loss_gradient, retry_scales, start_level
from cfx_cli.models.perceptual import perceptual_loss


class DiME:
    name = "dime"
    sampler_kind, sampler_why = "ddpm", "guides the DDPM posterior mean (μ − Σ g)"
    rescale_sqrt_alpha = True  # the guidance gradient is divided by √ᾱ_t

    def __init__(self, sampler, model, objective, tau=60, scales=(8.0, 10.0, 15.0), lambda_l1=0.05,
                 lambda_perc=30.0, perceptual_weights=None, classifier_loss="logit", public_code_offset=True):
        check_sampler(self, sampler)
        check_common(sampler, tau, scales)
        check_finite(lambda_l1=lambda_l1, lambda_perc=lambda_perc)
        self.sampler, self.model, self.objective = sampler, model, objective
        self.tau, self.scales = int(tau), [float(s) for s in scales]
        self.lambda_l1, self.lambda_perc = float(lambda_l1), float(lambda_perc)
        self.perceptual = perceptual_loss(self.lambda_perc, perceptual_weights)
        self.classifier_loss = classifier_loss
        self.start = start_level(self.tau, public_code_offset, sampler.num_steps)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual with one scale (for the progress bar): each of the tau guided steps
        and, after each but the last, the unguided chain to x̂_0: tau·(tau+1)/2."""
        return self.tau * (self.tau + 1) / 2

    @torch.no_grad()
    def explain(self, x, target, rng):
        """Noise x once, then each scale in turn on the images not flipped yet, all from that noisy image
        (FastDiME shares this loop; its ``counterfactual`` is one or two masked passes)."""
        z_tau = self.sampler.q_sample(x, self.start, rng.randn(x.shape[1:]))
        return retry_scales(self.scales, x, target, rng,
                            lambda rows, s, sub: self.counterfactual(x[rows], target[rows], z_tau[rows], s, sub),
                            lambda cf, y: self.objective.success(self.model(cf), y))

    def counterfactual(self, x, y, z, scale, rng):
        x_hat = x
        for t in reversed(range(self.tau)):
            out = self.sampler.predict(z, t)
            g = self.gradient(x_hat, x, z, y, t, scale)
            z = self.sampler.step(out, t, rng.randn(x.shape[1:]) if t > 0 else None, mean=guided_mean(out, g))
            if t > 0:
                x_hat = self.sampler.denoise(z, t - 1, -1, rng)
        return z, {}

    def gradient(self, x_hat, x, z, y, t, scale):
        """[s ∇L_c + λ_p ∇perc] at x̂ [/ √ᾱ_t], plus λ_1 ∇_z ‖z − x‖_1."""
        perc = None if self.perceptual is None else (lambda xh: self.lambda_perc * self.perceptual.to(x)(xh, x).sum())
        g = loss_gradient(self.model, self.objective, x_hat, y, scale, self.classifier_loss, extra=perc)
        if self.rescale_sqrt_alpha:
            g = g / self.sampler.alpha_bar(t, g).sqrt()
        return g + self.lambda_l1 * torch.sign(z - x)
