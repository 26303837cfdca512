"""DiME (Jeanneret et al., ACCV 2022): Diffusion Models for counterfactual Explanations.

Algorithm (per scale s in ``scales``, only on images not yet flipped, all from
the same noisy image z_τ = q_sample(x, τ)):

    x̂ ← x
    for t = τ−1 … 0:
        μ, Σ ← p(z_{t−1} | z_t)                                   (one UNet call)
        g ← s ∇_x̂ L(f(x̂), y*) / √ᾱ_t  [+ λ_p ∇_x̂ perc(x̂, x) / √ᾱ_t]  + λ_1 ∇_z ‖z_t − x‖_1
        z_{t−1} ← μ − Σ g + σ_t ε                                  (no noise at t = 0)
        x̂ ← unguided chain z_{t−1} → 0                           (t UNet calls, no gradient)
    x_cf ← z_0

Cost per scale: τ + Σ_{k=1..τ−1} k UNet calls; no backprop through the UNet.
"""
from __future__ import annotations

from cfx_cli.methods.guided import GuidedDiffusion


class DiME:
    name = "dime"

    def __init__(self, diffusion, model, objective, respacing=200, tau=60, scales=(8.0, 10.0, 15.0),
                 lambda_l1=0.05, lambda_perc=0.0, perceptual=None, public_code_offset=True):
        self.guided = GuidedDiffusion(diffusion, model, objective, respacing=respacing, tau=tau, scales=scales,
                                      lambda_l1=lambda_l1, lambda_perc=lambda_perc, perceptual=perceptual,
                                      rescale_sqrt_alpha=True, clean_estimate="chain",
                                      public_code_offset=public_code_offset)

    def explain(self, x, target, rng):
        def one_pass(x, target, z, rows, rng, scale, nfe_unet, nfe_model):
            return self.guided.guided_pass(x, target, z, rows, rng, scale, nfe_unet, nfe_model)

        return self.guided.explain(x, target, rng, one_pass)
