"""Generative models behind the one small interface guidance needs.

Every generative model is an ``nn.Module`` exposing:

- ``schedule``        its training noise schedule (``NoiseSchedule``; samplers respace it);
- ``variance``        how the posterior variance is read: fixed_small | fixed_large | learned_range;
- ``clip_denoised``   whether clean estimates are clipped to [-1, 1] (pixel models);
- ``latent_shape``    the shape (C, H, W) of the diffused variable z;
- ``image_size``      the resolution of the images it makes;
- ``encode(x)`` / ``decode(z)``  image ↔ diffused variable (identity for pixel models);
- ``forward(z_t, t, cond=None)``  the network's raw output at *original* timesteps ``t``
  (ε, plus the variance channels of a learned-range model), with an optional condition
  (a class label, a text embedding, a semantic code; ``null_condition`` for classifier-free
  guidance).

Samplers (``cfx_cli.diffusion.sampler``) add the time grid and the steps; methods use
both and never reach into a model's attributes beyond these.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.errors import CfxError

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


class PixelSpace:
    """Generative models that diffuse the image itself: z = x (encode/decode are identities)."""

    image_size: int | None
    channels: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z


class PixelDiffusion(PixelSpace, nn.Module):
    """An ε-predicting UNet on images: z = x. ``unet(x, t[, y])`` may return a tensor (ADM) or a
    diffusers output (``.sample``)."""

    null_condition = None

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, variance: str = "fixed_small",
                 clip_denoised: bool = True, image_size: int | None = None, channels: int = 3,
                 class_conditional: bool = False, compile: bool = False):
        super().__init__()
        if variance not in VARIANCES:
            raise CfxError(f"diffusion.variance={variance!r} is unknown; use one of {list(VARIANCES)}")
        self.unet = unet
        self.schedule = schedule
        self.variance = variance
        self.clip_denoised = bool(clip_denoised)
        self.image_size = int(image_size or getattr(getattr(unet, "config", None), "sample_size", 0) or 0) or None
        self.channels = int(channels)
        self.class_conditional = class_conditional
        self.compile = bool(compile)
        self._compiled = {}  # the torch.compile'd network, built on first use (kept out of the state dict)

    def forward(self, z_t: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is not None and not self.class_conditional:
            raise CfxError("this diffusion model is unconditional but a condition was given")
        net = self.network()
        out = net(z_t, t, cond) if cond is not None else net(z_t, t)
        return out.sample if hasattr(out, "sample") else out

    def network(self) -> nn.Module:
        """The UNet, compiled on first use when ``compile`` is set."""
        if not self.compile:
            return self.unet
        if "net" not in self._compiled:
            self._compiled["net"] = compiled(self.unet)
        return self._compiled["net"]


def compiled(net: nn.Module) -> nn.Module:
    """``torch.compile`` with inductor's freezing: in no-grad calls (every unguided or guided step that
    does not differentiate through the UNet) the weights are constant-folded and the convolutions
    pre-packed. One-time cost: about a minute on 2 CPU cores; then the tiny ADM's forward runs in
    30 ms instead of 55 (scripts/bench_methods.py). Calls with gradients compile without freezing."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(net)


def load_diffusers_ddpm(path: str | Path, variance: str = "fixed_small", clip_denoised: bool = True,
                        key: str = "diffusion.path", compile: bool = False) -> PixelDiffusion:
    """A diffusers-format DDPM folder (``unet/`` + ``scheduler/``, or a bare UNet folder next to a
    ``scheduler_config.json``), loaded offline."""
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
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True,
                                           low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - a broken config.json or a truncated weight file: name the folder
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CfxError(f"{key}={path}: cannot load the UNet from {unet_dir} ({type(e).__name__}: {first}); "
                       f"its config.json or weights are damaged") from None
    unet.eval().requires_grad_(False)
    try:
        sc = json.loads(sched_file.read_text())
        if not isinstance(sc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CfxError(f"{key}={path}: {sched_file} is not valid JSON ({e})") from None
    if sc.get("prediction_type", "epsilon") != "epsilon":
        raise CfxError(f"{key}={path}: prediction_type={sc['prediction_type']!r} is not supported yet; "
                       f"cfx's guidance expects an epsilon-predicting model")
    kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(sc.get("beta_schedule", "linear"))
    if kind is None:
        raise CfxError(f"{key}={path}: beta_schedule={sc.get('beta_schedule')!r} is not supported; "
                       f"use 'linear' or 'squaredcos_cap_v2'")
    schedule = NoiseSchedule.from_config(kind, int(sc.get("num_train_timesteps", 1000)),
                                         beta_start=sc.get("beta_start"), beta_end=sc.get("beta_end"))
    return PixelDiffusion(unet, schedule, variance=variance, clip_denoised=clip_denoised,
                          channels=unet.config.in_channels, compile=compile)


def load_adm(path: str | Path, key: str = "diffusion.path", clip_denoised: bool = True,
             diffusion_steps: int = 1000, noise_schedule: str = "linear", compute_dtype: str | None = None,
             compile: bool = False, **flags) -> PixelDiffusion:
    """An OpenAI guided-diffusion (ADM) checkpoint: a plain state_dict built by the flags that
    guided-diffusion's scripts take (image_size, num_channels, learn_sigma, ...). ``compute_dtype``
    (bf16 | fp16) runs the UNet's trunk in half precision on a GPU."""
    from cfx_cli.models.adm import load_adm_unet

    if noise_schedule not in ("linear", "cosine"):
        raise CfxError(f"diffusion.noise_schedule={noise_schedule!r} is unknown; use linear or cosine")
    unet = load_adm_unet(path, key=key, dtype=compute_dtype, **flags)
    schedule = NoiseSchedule.from_config(noise_schedule, int(diffusion_steps))
    learn_sigma = bool(flags.get("learn_sigma", False))
    return PixelDiffusion(unet, schedule, variance="learned_range" if learn_sigma else "fixed_large",
                          clip_denoised=clip_denoised, image_size=int(flags["image_size"]),
                          channels=int(flags.get("in_channels", 3)),
                          class_conditional=bool(flags.get("class_cond", False)), compile=compile)
