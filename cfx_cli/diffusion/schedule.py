"""The noise-schedule math, in one place.

A :class:`NoiseSchedule` holds β_t on some grid of timesteps and everything derived
from it (ᾱ_t, the forward process q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0),
x_0 ↔ ε maps). Respacing keeps a subset of the original timesteps and recomputes
β on that grid from ᾱ (Nichol & Dhariwal 2021), so the same formulas serve the
full and the respaced process; ``timestep_map`` says which original t each
respaced index stands for (the value the network receives).

All tables are kept in float64 and cast on use, as the reference implementations
do, so results match them to float32 rounding.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def linear_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """Linear β of DDPM; by default scaled to ``num_timesteps`` as ADM does (1000 steps: 1e-4..0.02)."""
    scale = 1000 / num_timesteps
    beta_start = scale * 1e-4 if beta_start is None else beta_start
    beta_end = scale * 0.02 if beta_end is None else beta_end
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """β linear in √β (latent diffusion; diffusers' "scaled_linear"). LDM's ImageNet model: 0.0015..0.0195."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021)."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Timesteps kept when respacing, in the convention of OpenAI's guided-diffusion.

    ``section_counts`` is an int, a comma-separated string of counts per equal
    section (``"10,15,20"``), ``"ddimN"`` for DDIM's evenly strided grid, or ``"ldmN"`` for
    CompVis LDM's (the same grid shifted by one: 1, 1 + T/N, ..., as LDCE samples).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ldm"):  # CompVis LDM's "uniform" DDIM grid: range(0, T, T // N) + 1
            desired = int(section_counts[len("ldm"):])
            if not 0 < desired <= num_timesteps:
                raise ValueError(f"cannot create {desired} steps of {num_timesteps}")
            return [t + 1 for t in range(0, num_timesteps, num_timesteps // desired)][:desired]
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """table[t] shaped to broadcast against ``like`` (N×...), in its dtype and device."""
    t = torch.as_tensor(t, device=table.device).long().reshape(-1)
    out = table[t].to(device=like.device, dtype=like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """β_t on a grid of timesteps and the Gaussian-diffusion formulas built on it."""

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None):
        self.betas = torch.as_tensor(betas, dtype=torch.float64)
        n = len(self.betas)
        self.num_timesteps = n
        self.timestep_map = torch.arange(n) if timestep_map is None else torch.as_tensor(timestep_map).long()
        a = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(a, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # Log of the posterior variance, clipped because it is 0 at t = 0.
        pv = self.posterior_variance.clone()
        if n > 1:
            pv[0] = pv[1]
        self.posterior_log_variance_clipped = pv.log()
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * a.sqrt() / (1 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, kind: str = "linear", num_timesteps: int = 1000, **kwargs) -> "NoiseSchedule":
        if kind == "linear":
            return cls(linear_betas(num_timesteps, kwargs.get("beta_start"), kwargs.get("beta_end")))
        if kind in ("cosine", "squaredcos_cap_v2"):
            return cls(cosine_betas(num_timesteps))
        if kind == "scaled_linear":
            given = {k: kwargs[k] for k in ("beta_start", "beta_end") if kwargs.get(k) is not None}
            return cls(scaled_linear_betas(num_timesteps, **given))
        raise ValueError(f"diffusion.schedule.kind={kind!r} is unknown; use 'linear', 'scaled_linear' or 'cosine'")

    def respace(self, section_counts) -> "NoiseSchedule":
        """The process restricted to the kept timesteps (β recomputed from ᾱ on that grid)."""
        keep = space_timesteps(self.num_timesteps, section_counts)
        last, betas = 1.0, []
        for t in keep:
            ac = self.alphas_cumprod[t].item()
            betas.append(1 - ac / last)
            last = ac
        return NoiseSchedule(torch.tensor(betas, dtype=torch.float64), self.timestep_map[keep])

    # ------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def x0_from_eps(self, x_t: Tensor, t, eps: Tensor) -> Tensor:
        """Tweedie's one-step estimate x̂_0 = (x_t − √(1-ᾱ_t) ε) / √ᾱ_t."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t: Tensor, t, x0: Tensor) -> Tensor:
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def alpha_bar(self, t, like: Tensor) -> Tensor:
        return _gather(self.alphas_cumprod, t, like)

    # ---------------------------------------------------------------- posterior
    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t), _gather(self.posterior_log_variance_clipped, t, x_t)

    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t, variance: str = "fixed_small",
                        clip: bool = True) -> dict[str, Tensor]:
        """Mean, variance and log-variance of p(x_{t-1} | x_t) from an ε-predicting network's output.

        ``variance`` is Σ_t, the factor of guidance's mean shift μ − Σ_t g: for ``fixed_small``
        it is the true posterior variance, 0 at t = 0 (guided-diffusion's convention), while
        ``log_variance`` (the noise scale) is clipped there; no noise is added at t = 0 anyway.

        ``variance``: ``fixed_small`` (posterior variance), ``fixed_large`` (β_t) or
        ``learned_range`` (ADM's learned interpolation: the network outputs 2C
        channels, ε and v ∈ [-1, 1] interpolating the two log-variances).
        """
        c = x_t.shape[1]
        if variance == "learned_range":
            eps, v = model_output[:, :c], model_output[:, c:]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(self.betas.log(), t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            var = log_variance.exp()
        else:
            eps = model_output[:, :c]
            if variance == "fixed_small":
                # guided-diffusion pairs the true posterior variance (0 at t = 0) with a clipped log
                log_variance = _gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
                var = _gather(self.posterior_variance, t, x_t).expand_as(x_t)
            elif variance == "fixed_large":
                large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
                log_variance = _gather(large.log(), t, x_t).expand_as(x_t)
                var = _gather(large, t, x_t).expand_as(x_t)
            else:
                raise ValueError(f"diffusion.variance={variance!r} is unknown; use fixed_small, fixed_large or learned_range")
        pred_x0 = self.x0_from_eps(x_t, t, eps)
        if clip:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": var, "log_variance": log_variance, "pred_xstart": pred_x0, "eps": eps,
                "z_t": x_t}
