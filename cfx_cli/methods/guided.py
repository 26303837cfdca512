"""The guided reverse process shared by DiME and FastDiME.

One *pass* noises the input once and denoises it with the classifier (or
regressor) gradient taken on a clean estimate x̂ and applied to the posterior
mean: ``μ ← μ − Σ_t g``. DiME and FastDiME differ only in how x̂ is made
(the nested unguided chain vs Tweedie's one-step estimate), in a 1/√ᾱ_t
rescaling, and in FastDiME's masks; each is a flag here, and
``dime.py`` / ``fastdime.py`` put them together as their papers do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cfx_cli.errors import CfxError
from cfx_cli.methods.base import CFResult, SampleRNG, check_dilation, difference_mask


class GuidedDiffusion:
    """Scale-retry loop and one guided pass over a DDPM's respaced schedule."""

    def __init__(self, diffusion, model, objective, *, respacing=200, tau=60, scales=(8.0, 10.0, 15.0),
                 lambda_l1=0.05, lambda_perc=0.0, perceptual=None, rescale_sqrt_alpha=True,
                 clean_estimate="chain", public_code_offset=True, mask_start=None, mask_dilation=5,
                 mask_threshold=0.15, public_mask_noise=True):
        full = diffusion.base_schedule.num_timesteps
        if isinstance(respacing, int) and not 0 < respacing <= full:
            raise CfxError(f"method.respacing={respacing} must lie in 1..{full} (the DDPM's training steps)")
        if not scales:
            raise CfxError("method.scales is empty: give the guidance scales to try in turn, e.g. method.scales=[8,10,15]")
        self.diffusion = diffusion.respaced(respacing)
        self.model, self.objective = model, objective
        if not 0 < tau <= self.diffusion.num_steps:
            raise CfxError(f"method.tau={tau} must lie in 1..{self.diffusion.num_steps} (the respaced steps); "
                           f"lower method.tau or raise method.respacing")
        self.tau, self.scales = int(tau), [float(s) for s in scales]
        self.lambda_l1, self.lambda_perc, self.perceptual = float(lambda_l1), float(lambda_perc), perceptual
        self.rescale_sqrt_alpha, self.clean_estimate = rescale_sqrt_alpha, clean_estimate
        # The public DiME code noises to index τ but starts denoising at τ−1; the
        # corrected version noises to τ−1. Both run τ guided steps.
        self.noise_index = self.tau if public_code_offset else self.tau - 1
        self.noise_index = min(self.noise_index, self.diffusion.num_steps - 1)
        if mask_start is not None:  # say so now, not when the mask first switches on
            check_dilation(mask_dilation)
        self.mask_start, self.mask_dilation, self.mask_threshold = mask_start, mask_dilation, mask_threshold
        self.public_mask_noise = public_mask_noise

    # ------------------------------------------------------------------ pieces
    def _count(self, counter: Tensor, rows: Tensor, k: int = 1):
        counter[rows] += k

    def loss_gradient(self, x_hat: Tensor, x: Tensor, z: Tensor, target: Tensor, t: int, scale: float) -> Tensor:
        """g = s·∇_x̂ L(f(x̂)) [+ λ_p ∇_x̂ perc(x̂, x)] [/ √ᾱ_t] + λ_1 ∇_z ‖z − x‖_1."""
        with torch.enable_grad():
            x_hat = x_hat.detach().requires_grad_(True)
            loss = scale * self.objective.loss(self.model(x_hat), target).sum()
            if self.lambda_perc > 0:
                loss = loss + self.lambda_perc * self.perceptual(x_hat, x).sum()
            (g,) = torch.autograd.grad(loss, x_hat)
        if self.rescale_sqrt_alpha:
            g = g / self.diffusion.schedule.alpha_bar(t, g).sqrt()
        if self.lambda_l1 > 0:
            g = g + self.lambda_l1 * torch.sign(z - x)
        return g

    @torch.no_grad()
    def unguided_chain(self, z: Tensor, t_from: int, rows: Tensor, rng: SampleRNG, nfe: Tensor) -> Tensor:
        """Run the plain stochastic sampler from index ``t_from`` down to a clean image."""
        for t in range(t_from, -1, -1):
            out = self.diffusion.p_mean_variance(z, t)
            z = self._step(out, t, rows, rng)
        self._count(nfe, rows, t_from + 1)
        return z

    def _step(self, out: dict, t: int, rows: Tensor, rng: SampleRNG, mean: Tensor | None = None) -> Tensor:
        mean = out["mean"] if mean is None else mean
        if t == 0:
            return mean
        return mean + (0.5 * out["log_variance"]).exp() * rng.randn(mean.shape[1:], rows)

    # -------------------------------------------------------------------- pass
    @torch.no_grad()
    def guided_pass(self, x: Tensor, target: Tensor, z: Tensor, rows: Tensor, rng: SampleRNG, scale: float,
                    nfe_unet: Tensor, nfe_model: Tensor, self_mask: bool = False,
                    fixed_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """τ guided steps from the noisy image ``z``; returns the clean result and the last mask."""
        sched = self.diffusion.schedule
        x_hat, mask = x.clone(), fixed_mask
        for i, t in enumerate(range(self.tau - 1, -1, -1)):
            out = self.diffusion.p_mean_variance(z, t)
            self._count(nfe_unet, rows)
            if self.clean_estimate == "tweedie":
                x_hat = out["pred_xstart"]
            if self_mask and self.mask_start is not None and i >= self.mask_start:
                mask = difference_mask(x_hat, x, self.mask_dilation, self.mask_threshold)
            if mask is not None:
                x_hat = mask * x_hat + (1 - mask) * x
            g = self.loss_gradient(x_hat, x, z, target, t, scale)
            self._count(nfe_model, rows)
            z = self._step(out, t, rows, rng, mean=out["mean"] - out["log_variance"].exp() * g)
            if mask is not None:  # keep the unmasked region on the original's noisy trajectory
                # The public FastDiME code noises it to level t (one above z_{t-1}'s); t-1 matches z_{t-1}.
                level = t if self.public_mask_noise else t - 1
                keep = sched.q_sample(x, level, rng.randn(x.shape[1:], rows)) if t > 0 else x
                z = mask * z + (1 - mask) * keep
            if self.clean_estimate == "chain" and t > 0:
                x_hat = self.unguided_chain(z, t - 1, rows, rng, nfe_unet)
        return z, mask

    # ------------------------------------------------------------ scale retry
    @torch.no_grad()
    def explain(self, x: Tensor, target: Tensor, rng: SampleRNG, passes) -> CFResult:
        """Try each scale in turn on the images not yet flipped, all from the same noisy image.

        ``passes(x, target, z, rows, rng, scale, nfe_unet, nfe_model) -> (x_cf, mask)`` is the
        method's own procedure for one scale (one pass, or two for FastDiME-2).
        """
        n, dev = x.shape[0], x.device
        all_rows = torch.arange(n, device=dev)
        z_start = self.diffusion.schedule.q_sample(x, self.noise_index, rng.randn(x.shape[1:]))
        x_cf, done = x.clone(), torch.zeros(n, dtype=torch.bool, device=dev)
        nfe_unet = torch.zeros(n, dtype=torch.long, device=dev)
        nfe_model = torch.zeros(n, dtype=torch.long, device=dev)
        scale_used = torch.full((n,), float("nan"), device=dev)
        masks = torch.zeros_like(x[:, :1])
        for scale in self.scales:
            rows = all_rows[~done]
            if len(rows) == 0:
                break
            cf, mask = passes(x[rows], target[rows], z_start[rows], rows, rng, scale, nfe_unet, nfe_model)
            x_cf[rows] = cf
            if mask is not None:
                masks[rows] = mask
            ok = self.objective.success(self.model(cf), target[rows])
            self._count(nfe_model, rows)
            scale_used[rows] = scale
            done[rows] = ok
        return CFResult(x_cf=x_cf, success=done, nfe_unet=nfe_unet, nfe_model=nfe_model,
                        extras={"mask": masks} if self.mask_start is not None else {},
                        info={"scale": scale_used})
