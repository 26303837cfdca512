"""Diff-AE counterfactuals: optimise a Diffusion Autoencoder's semantic code (Ha & Bender 2025, Diff-AE-RE).

    z_sem ← Enc(x);  x_T ← DDIM⁻¹(x | z_sem)             (deterministic inversion on the ``inversion_steps`` grid,
                                                           DiffAE's: N steps, the last to ᾱ = 0)
    x_rec ← DDIM(x_T | z_sem)                            (the reconstruction the heat-map compares with)
    z ← z_sem;  Adam(z, lr)
    repeat ≤ iterations, per sample until success:
        x′ ← DDIM(x_T | z)                                (``sampler.steps`` steps, gradients through all)
        stop the samples where f(x′) succeeds             (|ŷ − y*| ≤ tolerance; a flip for classifiers)
        z ← Adam step on L(f(x′), y*) + λ ‖z − z_sem‖₁
    x_cf ← x′ at each sample's stop (or after the last iteration)
    heat-map ← mean_c(x_cf − x_rec)                      (against the reconstruction, not the input)

x_T stays fixed, so only what z_sem carries (the semantics) can change. L is the objective's loss:
(f(x) − y*)² for regressors, cross-entropy (or the signed logit) for classifiers — the same optimiser
gives Diff-AE counterfactuals for classifiers (``method=diffae``).

As the public code (DiffAE's ``encode_stochastic`` / ``render``, the regression paper's
``DiffeoCF.adv_attack_dae_batch``): grids are DiffAE's ``ddimN`` (``range(0, 1000, 1000 // N)``:
inversion ``ddim20`` = its ``T_eval``, which ``DAE.encode`` falls back to although the scripts pass
``forward_t=250``; rendering ``ddim10`` = ``backward_t``); the inversion takes N steps, the last from
the top of the grid to ᾱ = 0, so x_T = ε̂ there, decoded from the top level; the public code's
``num_steps`` renders are ``iterations + 1`` here (its update after the last render is never seen).
Deliberate differences: per-sample losses are summed, so a sample's path does not depend on its
batch (``batch_mean_loss=true``: the public code's MSE averaged over the whole batch, finished
samples included, with λ‖z − z_sem‖₁ summed over it — λ's weight then grows with the batch size;
Adam is invariant to the loss scale up to its ε, so with λ = 0 only ε-level differences remain);
finished samples are neither rendered nor evaluated again (the public code re-renders the whole
batch each step: the same images, at more cost).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cfx_cli.diffusion.sampler import DDIMSampler, respaced
from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult, check_sampler
from cfx_cli.methods.guidance import check_finite


class DiffAECounterfactual:
    name = "diffae"
    sampler_kind, sampler_why = "ddim", "renders with deterministic DDIM"
    sampler_deterministic = True

    def __init__(self, sampler, model, objective, lr=0.002, iterations=199, lambda_z=0.0, inversion_steps="ddim20",
                 classifier_loss="ce", batch_mean_loss: bool = False):
        gen, name = sampler.model, self.name
        if not hasattr(gen, "semantic"):
            raise CfxError(f"method={name} optimises a Diffusion Autoencoder's semantic code: use "
                           f"diffusion=synthetic_diffae or diffusion=diffae_ffhq256")
        check_sampler(self, sampler)
        check_finite(lr=lr, lambda_z=lambda_z)
        if float(lr) <= 0 or int(iterations) < 1:
            raise CfxError(f"method.lr={lr} and method.iterations={iterations} must be positive")
        self.sampler, self.model, self.objective = sampler, model, objective
        respaced(gen.schedule, inversion_steps, key="method.inversion_steps")  # any grid spelling; errors name the key
        self.inverter = DDIMSampler(gen, steps=inversion_steps)
        self.lr, self.iterations, self.lambda_z = float(lr), int(iterations), float(lambda_z)
        self.classifier_loss, self.batch_mean_loss = classifier_loss, bool(batch_mean_loss)

    def render(self, x_T: Tensor, z: Tensor, grad: bool = False) -> Tensor:
        return self.sampler.denoise(x_T, self.sampler.num_steps - 1, -1, cond=z, grad=grad).clamp(-1, 1)

    def unet_calls(self) -> float:
        """UNet calls of one counterfactual (for the progress bar): the inversion, the reconstruction and at
        most iterations + 1 renders, each forward and backward; an upper bound (a sample stops at success)."""
        steps = self.sampler.num_steps
        return float(self.inverter.num_steps + steps + (self.iterations + 1) * 2 * steps)

    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng) -> CFResult:
        gen = self.sampler.model
        z_sem = gen.semantic(x)
        x_T = self.inverter.invert(x, self.inverter.num_steps, cond=z_sem)  # DiffAE's: past the top, to ᾱ = 0
        x_rec = self.render(x_T, z_sem)
        z = z_sem.clone()
        x_cf = x_rec.clone()
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        iters = torch.zeros(len(x), device=x.device)
        # one Adam per sample: a sample's steps never depend on which others are still running
        params = [z[i:i + 1].clone().requires_grad_(True) for i in range(len(x))]
        opts = [torch.optim.Adam([p], lr=self.lr) for p in params]
        for _ in range(self.iterations + 1):
            active = (~done).nonzero().flatten()
            if len(active) == 0:
                break
            with rng.subset(active), torch.enable_grad():
                za = torch.cat([params[i] for i in active.tolist()])
                xa = self.render(x_T[active], za, grad=True)
                out = self.model(xa)
                with torch.no_grad():
                    ok = self.objective.success(out, target[active]).bool()
                x_cf[active] = xa.detach()
                stop = ok | (iters[active] >= self.iterations)
                done[active[stop]] = True
                go = ~stop
                if not go.any():
                    break
                loss = self.objective.loss(out, target[active], self.classifier_loss)
                if self.batch_mean_loss:  # the public code: the mean over the whole batch, finished samples included
                    loss = loss / len(x)
                loss = loss + self.lambda_z * (za - z_sem[active]).abs().flatten(1).sum(1)
                for o in (opts[i] for i in active[go].tolist()):
                    o.zero_grad(set_to_none=True)
                (loss * go.float()).sum().backward()
                for i in active[go].tolist():
                    opts[i].step()
                iters[active[go]] += 1
        z_final = torch.cat([p.detach() for p in params])
        # the paper's heat-map: the signed channel mean of x_cf − x_rec in [0, 1] units, drawn on [−1, 1]
        # (bwr there; here grey, 0.5 = unchanged, brighter = the counterfactual is lighter)
        heatmap = ((x_cf - x_rec).mean(1, keepdim=True) / 2 + 1) / 2
        return CFResult(x_cf=x_cf, extras={"reconstruction": x_rec, "heatmap": heatmap},
                        info={"iterations": iters, "z_l1": (z_final - z_sem).abs().flatten(1).sum(1),
                              "reconstruction_l1": (x_rec - x).abs().flatten(1).mean(1) / 2})


class DiffAERE(DiffAECounterfactual):
    """Diff-AE-RE: the same optimiser, named as the regression paper's method (``method=diffae_re``)."""

    name = "diffae_re"
