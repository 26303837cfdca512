"""Pixel-space diffusion models behind the small interface that guidance needs.

A :class:`PixelDiffusion` pairs an ε-predicting UNet with its noise schedule and
exposes only what methods use: the respaced schedule, ``eps``, ``x0`` and the
posterior ``p_mean_variance``. ``respaced(n)`` returns a view on another grid
that shares the network, so two methods in one process can use different
respacings of one model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.errors import CfxError


class PixelDiffusion(nn.Module):
    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, variance: str = "fixed_small",
                 clip_denoised: bool = True, image_size: int | None = None, base: NoiseSchedule | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.base_schedule = base if base is not None else schedule
        self.variance = variance
        self.clip_denoised = clip_denoised
        self.image_size = image_size or getattr(getattr(unet, "config", None), "sample_size", None)

    def respaced(self, steps) -> "PixelDiffusion":
        """The same network on a respaced grid of the original (full) schedule."""
        if steps is None or steps == self.base_schedule.num_timesteps:
            schedule = self.base_schedule
        else:
            schedule = self.base_schedule.respace(steps)
        return PixelDiffusion(self.unet, schedule, self.variance, self.clip_denoised, self.image_size, self.base_schedule)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_timesteps

    def network(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Raw network output at respaced indices ``t`` (the network sees the original timestep)."""
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(x_t.shape[0])
        t_orig = self.schedule.timestep_map.to(x_t.device)[t]
        out = self.unet(x_t, t_orig)
        return out.sample if hasattr(out, "sample") else out

    def eps(self, x_t: Tensor, t) -> Tensor:
        return self.network(x_t, t)[:, : x_t.shape[1]]

    def x0(self, x_t: Tensor, t, eps: Tensor | None = None) -> Tensor:
        eps = self.eps(x_t, t) if eps is None else eps
        x0 = self.schedule.x0_from_eps(x_t, t, eps)
        return x0.clamp(-1, 1) if self.clip_denoised else x0

    def p_mean_variance(self, x_t: Tensor, t, model_output: Tensor | None = None) -> dict[str, Tensor]:
        out = self.network(x_t, t) if model_output is None else model_output
        return self.schedule.p_mean_variance(out, x_t, t, self.variance, self.clip_denoised)


    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Unconditional ancestral samples on this grid, N×C×H×W in [-1, 1] (noise drawn on the CPU)."""
        p = next(self.unet.parameters())
        shape = (n, 3, self.image_size, self.image_size)
        z = torch.randn(shape, generator=generator).to(p.device, p.dtype)
        for t in range(self.num_steps - 1, -1, -1):
            out = self.p_mean_variance(z, t)
            z = out["mean"]
            if t > 0:
                z = z + (0.5 * out["log_variance"]).exp() * torch.randn(shape, generator=generator).to(z)
        return z.clamp(-1, 1)


def load_diffusers_ddpm(path: str | Path, variance: str = "fixed_small", clip_denoised: bool = True,
                        key: str = "diffusion.path", name: str | None = None) -> PixelDiffusion:
    """Load a diffusers-format DDPM folder (``unet/`` + ``scheduler/``, or a bare UNet folder
    next to a ``scheduler_config.json``), offline."""
    from diffusers import UNet2DModel

    path = Path(path)
    if not path.exists():
        raise CfxError(f"{key}={path} does not exist: point it to a diffusers-format DDPM folder "
                       f"(e.g. the shipped cfx_cli/zoo/synthetic_ddpm, or one made by `cfx train synthetic_ddpm`)")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    sched_file = next((p for p in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json")
                       if p.exists()), None)
    if not (unet_dir / "config.json").exists() or sched_file is None:
        raise CfxError(f"{key}={path} is not a diffusers DDPM folder: it needs unet/config.json and "
                       f"scheduler/scheduler_config.json (as written by save_pretrained)")
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True,
                                       low_cpu_mem_usage=False)
    unet.eval().requires_grad_(False)
    sc = json.loads(sched_file.read_text())
    if sc.get("prediction_type", "epsilon") != "epsilon":
        raise CfxError(f"{key}={path}: prediction_type={sc['prediction_type']!r} is not supported yet; "
                       f"cfx's guidance expects an epsilon-predicting model")
    kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sc.get("beta_schedule", "linear"))
    if kind is None:
        raise CfxError(f"{key}={path}: beta_schedule={sc.get('beta_schedule')!r} is not supported; "
                       f"use 'linear' or 'squaredcos_cap_v2'")
    schedule = NoiseSchedule.from_config(kind, int(sc.get("num_train_timesteps", 1000)),
                                         beta_start=sc.get("beta_start"), beta_end=sc.get("beta_end"))
    return PixelDiffusion(unet, schedule, variance=variance, clip_denoised=clip_denoised)
