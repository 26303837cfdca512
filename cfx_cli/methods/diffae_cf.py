"""Diff-AE counterfactuals: optimise a Diffusion Autoencoder's semantic code (Ha & Bender 2025, Diff-AE-RE).

    z_sem ← Enc(x);  x_T ← DDIM⁻¹(x | z_sem)             (deterministic inversion, ``inversion_steps``)
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
gives Diff-AE counterfactuals for classifiers (``method=diffae``). Per-sample losses are summed, so
a sample's path does not depend on its batch (the public code averages the MSE over the batch;
Adam is invariant to that scale up to its ε). The public code passes 250 inversion steps but its
inversion falls back to the model's default of 20; cfx uses 20 and says so.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cfx_cli.diffusion.sampler import DDIMSampler
from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult
from cfx_cli.methods.guidance import check_finite


class DiffAECounterfactual:
    name = "diffae"

    def __init__(self, sampler, model, objective, lr=0.002, iterations=200, lambda_z=0.0, inversion_steps=20,
                 classifier_loss="ce"):
        gen, name = sampler.model, self.name
        if not hasattr(gen, "semantic"):
            raise CfxError(f"method={name} optimises a Diffusion Autoencoder's semantic code: use "
                           f"diffusion=synthetic_diffae or diffusion=diffae_ffhq256")
        if getattr(sampler, "kind", None) != "ddim" or sampler.stochastic:
            raise CfxError(f"method={name} renders with deterministic DDIM: use sampler=ddim sampler.eta=0")
        check_finite(lr=lr, lambda_z=lambda_z)
        if float(lr) <= 0 or int(iterations) < 1:
            raise CfxError(f"method.lr={lr} and method.iterations={iterations} must be positive")
        self.sampler, self.model, self.objective = sampler, model, objective
        self.inverter = DDIMSampler(gen, steps=int(inversion_steps))
        self.lr, self.iterations, self.lambda_z = float(lr), int(iterations), float(lambda_z)
        self.classifier_loss = classifier_loss

    def render(self, x_T: Tensor, z: Tensor, grad: bool = False) -> Tensor:
        return self.sampler.denoise(x_T, self.sampler.num_steps - 1, -1, cond=z, grad=grad).clamp(-1, 1)

    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng) -> CFResult:
        gen = self.sampler.model
        z_sem = gen.semantic(x)
        x_T = self.inverter.invert(x, cond=z_sem)
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
