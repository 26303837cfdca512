"""FastDiME (Weng et al., ECCV 2024): DiME with a one-step clean estimate and self-optimised masks.

x̂ = x0(z_t) (Tweedie) replaces DiME's nested chain: τ UNet calls per pass instead
of O(τ²). No 1/√ᾱ_t rescaling by default. From step ``mask_start`` on, the mask

    m = dilate(normalise(Σ_c |x̂ − x|)) > threshold
    x̂ ← m x̂ + (1 − m) x,      z_t ← m z_t + (1 − m) q_sample(x, t)

keeps the edit local (``mask_start`` null: halfway through the τ steps, the paper's 30 of 60). Variants (``variant``):

- ``mask``   (FastDiME):    one pass with the self-optimised mask;
- ``nomask``:               one pass, no mask;
- ``2``      (FastDiME-2):  an unmasked pass, then its difference mask fixed for a second pass;
- ``2+``     (FastDiME-2+): as ``2`` but the first pass is masked.
"""
from __future__ import annotations

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import difference_mask
from cfx_cli.methods.guided import GuidedDiffusion

VARIANTS = ("mask", "nomask", "2", "2+")


class FastDiME:
    name = "fastdime"

    def __init__(self, diffusion, model, objective, variant="mask", respacing=200, tau=60,
                 scales=(8.0, 10.0, 15.0), lambda_l1=0.05, lambda_perc=0.0, perceptual=None,
                 rescale_sqrt_alpha=False, mask_start=None, mask_dilation=5, mask_threshold=0.15,
                 public_code_offset=True, public_mask_noise=True):
        variant = str(variant)
        if variant not in VARIANTS:
            raise CfxError(f"method.variant={variant!r} is unknown; use one of {list(VARIANTS)}")
        self.variant = variant
        if mask_start is None:  # halfway, as the paper's step 30 of 60, whatever tau is
            mask_start = int(tau) // 2
        self.guided = GuidedDiffusion(diffusion, model, objective, respacing=respacing, tau=tau, scales=scales,
                                      lambda_l1=lambda_l1, lambda_perc=lambda_perc, perceptual=perceptual,
                                      rescale_sqrt_alpha=rescale_sqrt_alpha, clean_estimate="tweedie",
                                      public_code_offset=public_code_offset,
                                      mask_start=None if variant == "nomask" else int(mask_start),
                                      mask_dilation=int(mask_dilation), mask_threshold=float(mask_threshold),
                                      public_mask_noise=public_mask_noise)
        if variant in ("mask", "2+") and not 0 <= int(mask_start) < int(tau):
            # otherwise the self-optimised mask would silently never switch on (the variant would be nomask)
            raise CfxError(f"method.mask_start={mask_start} must lie in 0..{int(tau) - 1} (method.tau={tau} guided "
                           f"steps); the paper masks from step 30 of 60, e.g. method.mask_start={int(tau) // 2}")

    def explain(self, x, target, rng):
        g = self.guided

        def passes(x, target, z, rows, rng, scale, nfe_unet, nfe_model):
            first_masked = self.variant in ("mask", "2+")
            cf, mask = g.guided_pass(x, target, z, rows, rng, scale, nfe_unet, nfe_model, self_mask=first_masked)
            if self.variant in ("2", "2+"):
                mask = difference_mask(cf, x, g.mask_dilation, g.mask_threshold)
                cf, mask = g.guided_pass(x, target, z, rows, rng, scale, nfe_unet, nfe_model, fixed_mask=mask)
            return cf, mask

        return g.explain(x, target, rng, passes)
