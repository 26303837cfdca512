"""Train the synthetic benchmark's pixel DDPM (diffusers UNet2DModel, ε-prediction, EMA).

Images are rendered on the fly; batch k's factors depend only on (seed, k), so a
killed run resumes from its last checkpoint and continues exactly as if it had
not stopped. The EMA weights are exported as a diffusers folder (``unet/`` +
``scheduler/``) that ``diffusion=synthetic_ddpm`` loads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.diffusion.schedule import NoiseSchedule


def build_unet(image_size: int, channels=(32, 64, 64), layers_per_block: int = 1, norm_num_groups: int = 16,
               attention_head_dim: int = 32):
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]  # attention at the lowest resolution only
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                       layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim)


def synthetic_images(world: SyntheticWorld, batch_size: int):
    """A batch of the synthetic world, rendered from factors drawn with the step's generator."""

    def batch(rng: np.random.Generator) -> torch.Tensor:
        return world.render(world.sample(rng, batch_size))

    return batch


def folder_images(x: torch.Tensor, batch_size: int):
    """A batch of images held in memory, drawn with the step's generator, with a random horizontal flip."""

    def batch(rng: np.random.Generator) -> torch.Tensor:
        b = x[torch.as_tensor(rng.integers(0, len(x), batch_size))]
        flip = torch.as_tensor(rng.random(batch_size) < 0.5)
        return torch.where(flip.view(-1, 1, 1, 1), b.flip(-1), b)

    return batch


def train_ddpm(world: SyntheticWorld | None, out_dir: str | Path, work_dir: str | Path, steps: int = 6000,
               batch_size: int = 64, lr: float = 4e-4, warmup: int = 200, decay_from: int | None = None,
               final_lr_fraction: float = 0.05, ema_decay: float = 0.999,
               num_train_timesteps: int = 1000, channels=(32, 64, 64), seed: int = 0,
               checkpoint_every: int = 200, threads: int | None = None, device: str = "cpu",
               command: str = "", images=None, image_size: int | None = None, info: dict | None = None) -> Path:
    """``images(rng) -> batch`` draws a batch with the step's generator (default: the synthetic ``world``'s
    renders), so that step k's batch and noise depend only on (seed, k); ``info`` goes into
    train_info.json (a folder dataset's root and classes)."""
    from diffusers import DDPMScheduler

    images = images or synthetic_images(world, batch_size)
    image_size = image_size or world.image_size
    info = info if info is not None else {"shapes": list(world.shapes), "image_size": world.image_size}

    if threads:
        torch.set_num_threads(threads)
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = build_unet(image_size, channels).to(device)
    ema = build_unet(image_size, channels).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                              beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=True)
    schedule = NoiseSchedule.from_config("linear", num_train_timesteps)  # the same q_sample as every sampler

    state_file = work_dir / "state.pt"
    start = 0
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])

    def save(step: int):
        tmp = state_file.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
        tmp.replace(state_file)
        ema.save_pretrained(out_dir / "unet", safe_serialization=True)
        scheduler.save_pretrained(out_dir / "scheduler")
        (out_dir / "train_info.json").write_text(json.dumps({"command": command, "steps": step,
                                                             "batch_size": batch_size, "lr": lr,
                                                             "decay_from": decay_from,
                                                             "ema_decay": ema_decay, "seed": seed, **info},
                                                            indent=1))

    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    log = open(work_dir / "loss.log", "a")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train ddpm", mininterval=10)
    t0 = time.time()
    for step in bar:
        rng = np.random.default_rng([seed, step])
        x0 = images(rng).to(device)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, num_train_timesteps, (batch_size,), generator=g).to(device)
        x_t = schedule.q_sample(x0, t, noise)
        loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, warmup, decay_from, steps, final_lr_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():  # one fused update of all EMA weights (one kernel per group, not per tensor)
            torch._foreach_lerp_(ema_params, unet_params, 1 - decay)
        if step % 20 == 0:
            log.write(f"{step} {loss.item():.5f} {time.time() - t0:.1f}\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
    if start >= steps and not (out_dir / "unet").exists():
        save(steps)
    return out_dir


def _lr_factor(step: int, warmup: int, decay_from: int | None, steps: int, final: float) -> float:
    """Linear warm-up, constant, then (from ``decay_from``) linear decay to ``final`` at ``steps``.

    The rate at a step depends only on these numbers, so a run stopped and resumed with the
    same settings follows the same schedule.
    """
    factor = min(1.0, (step + 1) / warmup)
    if decay_from is not None and step >= decay_from:
        frac = (step - decay_from) / max(1, steps - decay_from)
        factor *= 1 - (1 - final) * min(1.0, frac)
    return factor
