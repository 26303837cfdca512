"""Samplers: the time grid, the reverse step, noising, the known-region blend, and denoising.

A sampler wraps a generative model (``cfx_cli.models.generative``) with a respaced grid
of its training schedule (``sampler.steps``) and owns every step of the reverse process,
so methods never re-derive one:

- ``predict(z, t)``  one network call → posterior mean, variance, clean estimate, ε;
- ``step(out, t, noise, mean=None)``  z_t → z_{t−1} (DDPM ancestral, or DDIM with η);
- ``q_sample(x0, t, noise)`` and ``blend(z, x, mask, t, noise)`` (RePaint-style known region);
- ``denoise(z, t_from, t_to, rng)``  the plain chain between two levels, with or without
  gradients (optionally checkpointed per step, to differentiate through long chains);
- ``invert(x0, t_to)``  deterministic DDIM inversion (Diff-AE, LDCE).

Indices ``t`` are positions on the respaced grid (0 = the last step); the network receives
the original timestep ``schedule.timestep_map[t]``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from cfx_cli.diffusion.schedule import NoiseSchedule, _gather
from cfx_cli.errors import CfxError


def respaced(schedule: NoiseSchedule, steps, key: str = "sampler.steps") -> NoiseSchedule:
    """``schedule`` on the grid ``steps`` (an int, guided-diffusion's "10,15,20", "ddimN", "ldmN"; None = all).
    ``key``: the config key that gave ``steps``, named in errors."""
    full = schedule.num_timesteps
    if isinstance(steps, str) and steps.strip().isdigit():  # "20" from a command line = 20
        steps = int(steps)
    if steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps == full):
        return schedule
    hint = (f"{key}={steps!r} is not a grid of the model's {full} steps: use an int in 1..{full}, "
            f"per-section counts such as \"10,15,20\", \"ddimN\" or \"ldmN\"")
    if isinstance(steps, bool) or not isinstance(steps, (int, str)):
        raise CfxError(hint)
    if isinstance(steps, int) and not 0 < steps <= full:
        raise CfxError(f"{key}={steps} must lie in 1..{full} (the model's training steps)")
    try:
        out = schedule.respace(steps)
    except (ValueError, TypeError):
        raise CfxError(hint) from None
    if out.num_timesteps == 0:
        raise CfxError(hint)
    return out


class Sampler:
    kind = "base"

    def __init__(self, model, steps=None, checkpoint: bool = False):
        self.model = model
        self.schedule: NoiseSchedule = respaced(model.schedule, steps)
        self.checkpoint = bool(checkpoint)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    def check_level(self, t: int, key: str) -> None:
        if not 0 <= t < self.num_steps:
            raise CfxError(f"{key}={t} is outside the sampler's grid 0..{self.num_steps - 1} "
                           f"(sampler.steps={self.num_steps}): lower {key} or raise sampler.steps")

    # ----------------------------------------------------------------- network
    def network(self, z: Tensor, t, cond=None) -> Tensor:
        """Raw network output at respaced index ``t`` (the network sees the original timestep)."""
        t = torch.as_tensor(t, device=z.device).long().reshape(-1).expand(z.shape[0])
        return self.model(z, self.schedule.timestep_map.to(z.device)[t], cond)

    def predict(self, z: Tensor, t, cond=None, output: Tensor | None = None, clip: bool | None = None
                ) -> dict[str, Tensor]:
        """Mean, variance, log-variance of p(z_{t−1} | z_t), the clean estimate and ε (one network call).
        ``clip`` (default: the generative model's ``clip_denoised``) clips the clean estimate to [-1, 1]."""
        out = self.network(z, t, cond) if output is None else output
        clip = self.model.clip_denoised if clip is None else clip
        return self.schedule.p_mean_variance(out, z, t, self.model.variance, clip)

    def x0(self, z: Tensor, t, cond=None) -> Tensor:
        """Tweedie's one-step clean estimate x̂_0(z_t)."""
        return self.predict(z, t, cond)["pred_xstart"]

    def alpha_bar(self, t, like: Tensor) -> Tensor:
        """ᾱ_t on this grid, shaped to broadcast against ``like``."""
        return self.schedule.alpha_bar(t, like)

    # ----------------------------------------------------------- forward side
    def q_sample(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        return self.schedule.q_sample(x0, t, noise)

    def blend(self, z: Tensor, known: Tensor, mask: Tensor, t: int, noise: Tensor | None) -> Tensor:
        """Keep ``mask`` from z and the rest from the known image noised to level t (clean when t < 0)."""
        keep = known if t < 0 else self.q_sample(known, t, noise)
        return mask * z + (1 - mask) * keep

    # -------------------------------------------------------------------- step
    def step(self, out: dict, t: int, noise: Tensor | None, mean: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def denoise(self, z: Tensor, t_from: int, t_to: int = -1, rng=None, cond=None, grad: bool = False,
                checkpoint: bool | None = None) -> Tensor:
        """Plain reverse steps t_from, …, t_to + 1: returns z at level t_to (t_to = −1: the clean image).

        ``grad``: keep the graph (ACE's filter, DVCE); ``checkpoint`` (default: the sampler's
        setting) recomputes each step's activations in the backward pass instead of storing them.
        """
        checkpoint = self.checkpoint if checkpoint is None else checkpoint
        with torch.set_grad_enabled(grad):
            for t in range(t_from, t_to, -1):
                noise = rng.randn(z.shape[1:]) if (rng is not None and self.stochastic and t > 0) else None
                if grad and checkpoint:
                    z = grad_checkpoint(self._charged_step, z, t, noise, cond, rng, use_reentrant=False)
                else:
                    z = self._one_step(z, t, noise, cond)
        return z

    def _one_step(self, z, t, noise, cond):
        return self.step(self.predict(z, t, cond), t, noise)

    def _charged_step(self, z, t, noise, cond, rng):
        """A checkpointed step: its forward runs again in the backward pass, when other samples may be
        active; charge that recomputation (a real UNet evaluation) to the samples of this step."""
        if rng is None or getattr(rng, "meter", None) is None:
            return self._one_step(z, t, noise, cond)
        with rng.meter.rows(rng.rows):
            return self._one_step(z, t, noise, cond)

    @property
    def stochastic(self) -> bool:
        return True

    @torch.no_grad()
    def sample(self, n: int, shape, generator: torch.Generator | None = None, device=None, cond=None) -> Tensor:
        """Samples from pure noise on this grid (noise drawn on the CPU, so devices agree)."""
        device = device or next(self.model.parameters()).device

        class _Draw:  # the denoise loop's noise source, from one generator
            @staticmethod
            def randn(s):
                return torch.randn((n, *s), generator=generator).to(device)

        z = _Draw.randn(tuple(shape))
        return self.denoise(z, self.num_steps - 1, -1, _Draw, cond)


class DDPMSampler(Sampler):
    """Ancestral sampling: z_{t−1} = μ + σ_t ε with σ_0 = 0 (no noise at the last step)."""

    kind = "ddpm"

    def step(self, out, t, noise, mean=None):
        mean = out["mean"] if mean is None else mean
        if t == 0 or noise is None:
            return mean
        return mean + (0.5 * out["log_variance"]).exp() * noise


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): z_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ²) ε̂ + σ ε,
    σ = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}); η = 0 is deterministic."""

    kind = "ddim"

    def __init__(self, model, steps=None, eta: float = 0.0, checkpoint: bool = False):
        super().__init__(model, steps, checkpoint)
        if not 0.0 <= float(eta) <= 1.0:
            raise CfxError(f"sampler.eta={eta} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, out, t, noise, mean=None, eps: Tensor | None = None):
        """``eps`` replaces the network's ε (guidance in ε-space, LDCE); x̂_0 is re-derived from it.
        Otherwise ε is re-derived from the (clipped) x̂_0, as guided-diffusion's DDIM does."""
        z = out["z_t"]
        if eps is None:
            x0 = out["pred_xstart"]
            eps = self.schedule.eps_from_x0(z, t, x0)
        else:
            x0 = self.schedule.x0_from_eps(z, t, eps)
        a_t = _gather(self.schedule.alphas_cumprod, t, z)
        a_prev = _gather(self.schedule.alphas_cumprod_prev, t, z)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        z_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        if self.eta > 0 and t > 0 and noise is not None:
            z_prev = z_prev + sigma * noise
        return z_prev

    def invert(self, x0: Tensor, t_to: int | None = None, cond=None, grad: bool = False, t_from: int = 0) -> Tensor:
        """Deterministic DDIM inversion: the clean image is taken as level 0 and each step maps
        level t to t + 1 with the (clipped) x̂_0 and the ε re-derived from it at t; returns z at level
        ``t_to`` (default: the top of the grid), from which ``denoise(z, t_to)`` reconstructs x_0.
        ``t_from``: ``x0`` is z at that level already (resume an inversion part-way).

        ``t_to = num_steps`` takes one step past the top, to ᾱ = 0, as DiffAE's
        ``ddim_reverse_sample_loop`` does (its ``alphas_cumprod_next`` ends with 0): N network calls
        on an N-step grid, and z = ε̂ predicted at the top level, which DiffAE then decodes as if
        it were z at the top level (``denoise(z, num_steps − 1)``)."""
        t_to = self.num_steps - 1 if t_to is None else t_to
        if not 0 <= t_from <= t_to <= self.num_steps:
            raise CfxError(f"DDIM inversion from level {t_from} to {t_to}: the grid has levels 0..{self.num_steps - 1} "
                           f"(or {self.num_steps}: past the top, to ᾱ = 0)")
        a_next_table = torch.cat([self.schedule.alphas_cumprod[1:], self.schedule.alphas_cumprod.new_zeros(1)])
        z = x0
        with torch.set_grad_enabled(grad):
            for t in range(t_from, t_to):
                x0_hat = self.predict(z, t, cond)["pred_xstart"]
                eps = self.schedule.eps_from_x0(z, t, x0_hat)
                a_next = _gather(a_next_table, t, z)
                z = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
        return z


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler}
