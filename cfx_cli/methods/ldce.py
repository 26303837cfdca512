"""LDCE (Farid et al., 2023): Latent Diffusion Counterfactual Explanations, with consensus guidance.

    z ← q_sample(E(x), t_enc)                     t_enc = ⌊strength · N⌋ on the DDIM grid (η = 0)
    for t = t_enc − 1 … 0:
        ε_u, ε_c ← ε_θ([z, z], t, [∅, y*])         (one batched UNet call, kept in the graph)
        x̂_0 ← D(ẑ_0(z, ε_u))                       (differentiable decode)
        c ← ∇_z L(f(x̂_0), y*)                      (through decoder and UNet; L = −log p(y*))
        d ← ∇_z Σ |clip(x̂_0) − x|
        c ← 0 where ∠(c, ε_c − ε_u) > α            (consensus: per latent position, channel vectors)
        ε̃ ← ε_u + s (λ_c ĉ + λ_d d̂)                 (ĉ, d̂ rescaled per sample to ‖ε_c − ε_u‖)
        z ← DDIM(z, ε̃)
    x_cf ← clip(D(z))

In the paper's notation the scores are −√(1−ᾱ)∇log p and −√(1−ᾱ)∇(−dist); the rescaling removes
√(1−ᾱ), so c and d are plain loss gradients here. The class-conditional direction ε_c − ε_u is
never added to ε̃: the conditioning acts only through the consensus mask and the scale ‖ε_c − ε_u‖
(as the public code). ``consensus=false`` keeps the whole classifier score (the paper's ablation).
The public code noises to grid index t_enc and starts denoising at t_enc − 1 (LDM's img2img
indexing); cfx does the same. Its DDIM (LDM's) ends at ᾱ of training timestep 0 = 1 − β_0, not at 1:
``set_alpha_to_one=false`` does the same (the paper reproductions' setting; cfx's default ends at the
clean latent). With it, cfx equals the public code (lmb-freiburg/ldce) to float32 rounding on a tiny
class-conditional LDM, consensus on and off: latents, guided ε, counterfactual, success and call counts
(tests/test_parity_ldce.py). ``free_guidance=true`` is what the public CelebA-HQ config runs
(``guidance: free``): ε̃ = ε_u + s (ε_c − ε_u), plain classifier-free guidance toward the target's
condition, without the classifier, the distance or consensus (the public code still decodes x̂_0 at
each step and discards it; cfx does not). Cost per step: 2 UNet evaluations per sample (ε_u, ε_c), two backward
passes through them (classifier and distance gradients), one decoder pass.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult, check_sampler
from cfx_cli.methods.guidance import check_finite


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def consensus_mask(score: Tensor, implicit: Tensor, angle_deg: float) -> Tensor:
    """1 where the classifier score and the implicit classifier ε_c − ε_u agree within ``angle_deg``
    at a latent position (channel vectors, N×1×H×W); positions where either is zero are kept
    (their angle is undefined, NaN in the public code, which keeps them)."""
    dot = (score * implicit).sum(1, keepdim=True)
    norms = score.norm(dim=1, keepdim=True) * implicit.norm(dim=1, keepdim=True)
    cos = dot / norms
    agree = cos >= math.cos(math.radians(angle_deg))
    return (agree | (norms == 0)).to(score.dtype)


def rescale(v: Tensor, to: Tensor) -> Tensor:
    """``v`` rescaled per sample to the norm of ``to`` (a zero ``v`` stays zero)."""
    return v / _norm(v).clamp_min(1e-20) * _norm(to)


class LDCE:
    name = "ldce"
    sampler_kind, sampler_why = "ddim", "runs deterministic DDIM with guidance in epsilon-space"

    def __init__(self, sampler, model, objective, strength=0.382, lambda_c=2.3, lambda_d=0.3, consensus=True,
                 angle=45.0, scale=3.0, classifier_loss="ce", set_alpha_to_one=True, free_guidance=False):
        check_sampler(self, sampler)
        generative = sampler.model
        if getattr(generative, "null_condition", None) is None:
            raise CfxError("method=ldce needs a conditional latent diffusion model with a null condition "
                           "(diffusion=synthetic_ldm, ldm_cin256, or a text-conditional folder)")
        check_finite(strength=strength, lambda_c=lambda_c, lambda_d=lambda_d, angle=angle, scale=scale)
        if not 0 < float(strength) < 1:
            raise CfxError(f"method.strength={strength} must lie in (0, 1): the share of the DDIM grid noised "
                           f"and denoised (LDCE: 0.382 ImageNet, 0.502 CelebA-HQ)")
        if not 0 < float(angle) <= 180:
            raise CfxError(f"method.angle={angle} must lie in (0, 180] degrees (the consensus cone)")
        self.t_enc = int(float(strength) * sampler.num_steps)
        if self.t_enc < 1:
            raise CfxError(f"method.strength={strength} gives no denoising step on a grid of {sampler.num_steps}: "
                           f"raise method.strength or sampler.steps")
        self.sampler, self.model, self.objective = sampler, model, objective
        self.lambda_c, self.lambda_d, self.scale = float(lambda_c), float(lambda_d), float(scale)
        self.consensus, self.angle, self.classifier_loss = bool(consensus), float(angle), classifier_loss
        self.set_alpha_to_one, self.free_guidance = bool(set_alpha_to_one), bool(free_guidance)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual (for the progress bar): per guided step ε_u and ε_c, and with
        classifier guidance a backward through both for each of the two gradients."""
        return float(self.t_enc * (2 if self.free_guidance else 6))

    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng) -> CFResult:
        gen = self.sampler.model
        # a KL model that samples its posterior (Stable Diffusion's encode) draws from each sample's generator
        z0 = gen.encode(x, rng.randn(gen.latent_shape)) if getattr(gen, "sample_posterior", False) else gen.encode(x)
        z = self.sampler.q_sample(z0, self.t_enc, rng.randn(z0.shape[1:]))
        kept = []
        for t in range(self.t_enc - 1, -1, -1):
            eps, share = self.guided_eps(z, x, target, t)
            z = self.ddim_step(z, t, eps)
            kept.append(share)
        x_cf = gen.decode(z).clamp(-1, 1)
        return CFResult(x_cf=x_cf, info={"consensus_kept": torch.stack(kept).mean(0)})

    def ddim_step(self, z: Tensor, t: int, eps: Tensor) -> Tensor:
        """One deterministic DDIM step with ε̃. The last step (t = 0) goes to ᾱ = 1 (the clean latent), or with
        ``set_alpha_to_one=false`` to ᾱ of training timestep 0 (1 − β_0), as LDM's DDIMSampler and the public code."""
        if t > 0 or self.set_alpha_to_one:
            return self.sampler.step({"z_t": z}, t, None, eps=eps)
        a_prev = float(self.sampler.model.schedule.alphas_cumprod[0])
        x0 = self.sampler.schedule.x0_from_eps(z, t, eps)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def guided_eps(self, z: Tensor, x: Tensor, target: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """ε̃ at grid index t, and the share of latent positions whose classifier score was kept."""
        gen, n = self.sampler.model, len(z)
        null = torch.full_like(target.long(), int(gen.null_condition))
        if self.free_guidance:  # the public CelebA-HQ config's guidance=free: no classifier, no distance
            both = self.sampler.network(torch.cat([z, z]), t, torch.cat([null, target.long()]))
            eps_u, eps_c = both[:n], both[n:]
            return eps_u + self.scale * (eps_c - eps_u), torch.full((n,), float("nan"), device=z.device)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            both = self.sampler.network(torch.cat([z, z]), t, torch.cat([null, target.long()]))
            eps_u, eps_c = both[:n], both[n:]
            x0 = gen.decode(self.sampler.schedule.x0_from_eps(z, t, eps_u))
            loss = self.objective.loss(self.model(x0), target, self.classifier_loss).sum()
            (c,) = torch.autograd.grad(loss, z, retain_graph=True)
            (d,) = torch.autograd.grad((x0.clamp(-1, 1) - x).abs().sum(), z)
        implicit = (eps_c - eps_u).detach()
        mask = consensus_mask(c, implicit, self.angle) if self.consensus else torch.ones_like(c[:, :1])
        score = self.lambda_c * rescale(c * mask, implicit) + self.lambda_d * rescale(d, implicit)
        return eps_u.detach() + self.scale * score, mask.flatten(1).mean(1)
