"""FastDiME (Weng et al., ECCV 2024): DiME with a one-step clean estimate and self-optimised masks.

    z_τ ← q_sample(x, τ)
    for s in scales, on the images not flipped yet:  passes (below) from z_τ
    one pass:
        x̂_prev ← x
        for step i, t = τ−1 … 0:
            μ, Σ, x̂ ← p(z_{t−1} | z_t), x0(z_t)                 (1 UNet call; x̂ by Tweedie)
            if self-masking and i ≥ mask_start:  m ← dilate(normalise(Σ_c |x̂ − x|)) > threshold
            x̂ ← m x̂ + (1 − m) x
            x̃ ← x̂_prev if public_x_hat_lag else x̂
            g ← s ∇_x̃ L(f(x̃), y*) [+ λ_p ∇perc] + λ_1 sign(z − x)   (no 1/√ᾱ_t by default)
            z ← μ − Σ g + σ_t ε
            z ← m z + (1 − m) q_sample(x, t)                     (keep the original outside the mask)
            x̂_prev ← x̂

Variants (``variant``): ``mask`` one self-masked pass; ``nomask`` one plain pass; ``2`` a plain
pass, then its difference mask fixed for a second pass; ``2+`` as ``2`` with a self-masked first
pass. τ UNet calls a pass (≈30× fewer than DiME at τ = 60).

``public_x_hat_lag``: the public code (ppegiosk/FastDiME_CelebA, core/sample_utils.py
get_FastDiME_iterative_sampling) takes step i's gradient at the clean estimate of the step before
(x itself at the first step): it sets x̂ from the step's prediction only after the guided update. cfx's
default takes it at the current step's x̂(z_t), at the same cost.
"""
from __future__ import annotations

import torch

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import check_dilation, difference_mask
from cfx_cli.methods.dime import DiME
from cfx_cli.methods.guidance import check_finite, guided_mean

VARIANTS = ("mask", "nomask", "2", "2+")


class FastDiME(DiME):
    """DiME's outer loop (``explain``: noise once, the scales in turn) and its gradient; another
    ``counterfactual``: masked passes with the one-step clean estimate."""
    name = "fastdime"

    def __init__(self, sampler, model, objective, variant="mask", tau=60, scales=(8.0, 10.0, 15.0), lambda_l1=0.05,
                 lambda_perc=30.0, perceptual_weights=None, rescale_sqrt_alpha=False, mask_start=None,
                 mask_dilation=5, mask_threshold=0.15, classifier_loss="logit", public_code_offset=True,
                 public_mask_noise=True, public_x_hat_lag=False):
        variant = str(variant)
        if variant not in VARIANTS:
            raise CfxError(f"method.variant={variant!r} is unknown; use one of {list(VARIANTS)}")
        super().__init__(sampler, model, objective, tau=tau, scales=scales, lambda_l1=lambda_l1,
                         lambda_perc=lambda_perc, perceptual_weights=perceptual_weights,
                         classifier_loss=classifier_loss, public_code_offset=public_code_offset)
        check_finite(mask_threshold=mask_threshold)
        mask_start = int(tau) // 2 if mask_start is None else int(mask_start)  # the paper's step 30 of 60
        if variant in ("mask", "2+") and not 0 <= mask_start < int(tau):
            # otherwise the self-optimised mask would silently never switch on (the variant would be nomask)
            raise CfxError(f"method.mask_start={mask_start} must lie in 0..{int(tau) - 1} (method.tau={tau} guided "
                           f"steps); the paper masks from step 30 of 60, e.g. method.mask_start={int(tau) // 2}")
        if variant != "nomask":
            check_dilation(mask_dilation)
        self.variant, self.rescale_sqrt_alpha = variant, bool(rescale_sqrt_alpha)
        self.mask_start, self.mask_dilation, self.mask_threshold = mask_start, int(mask_dilation), float(mask_threshold)
        # The public code keeps the unmasked region at noise level t (one above z_{t−1}'s); t − 1 matches z_{t−1}.
        self.public_mask_noise = bool(public_mask_noise)
        # The public code takes the gradient at the previous step's x̂ (x at the first step); false: this step's.
        self.public_x_hat_lag = bool(public_x_hat_lag)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual with one scale: tau per pass (two for FastDiME-2 and 2+)."""
        return float(self.tau * (2 if self.variant in ("2", "2+") else 1))

    def counterfactual(self, x, y, z, scale, rng):
        cf, mask = self.guided_pass(x, y, z, scale, rng, self_mask=self.variant in ("mask", "2+"))
        if self.variant in ("2", "2+"):
            mask = difference_mask(cf, x, self.mask_dilation, self.mask_threshold)
            cf, mask = self.guided_pass(x, y, z, scale, rng, fixed_mask=mask)
        return cf, ({} if self.variant == "nomask" else {"mask": mask})

    def guided_pass(self, x, y, z, scale, rng, self_mask=False, fixed_mask=None):
        mask, x_prev = fixed_mask, x
        for i, t in enumerate(reversed(range(self.tau))):
            out = self.sampler.predict(z, t)
            x_hat = out["pred_xstart"]
            if self_mask and i >= self.mask_start:
                mask = difference_mask(x_hat, x, self.mask_dilation, self.mask_threshold)
            if mask is not None:
                x_hat = mask * x_hat + (1 - mask) * x
            g = self.gradient(x_prev if self.public_x_hat_lag else x_hat, x, z, y, t, scale)
            z = self.sampler.step(out, t, rng.randn(x.shape[1:]) if t > 0 else None, mean=guided_mean(out, g))
            if mask is not None:
                level = t if self.public_mask_noise else t - 1
                z = self.sampler.blend(z, x, mask, level if t > 0 else -1, rng.randn(x.shape[1:]) if t > 0 else None)
            x_prev = x_hat
        return z, mask
