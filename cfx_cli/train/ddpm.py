"""Train the synthetic benchmark's pixel DDPM (diffusers UNet2DModel, ε-prediction, EMA).

Images are rendered on the fly; batch k's factors depend only on (seed, k), so a
killed run resumes from its last checkpoint and continues exactly as if it had
not stopped. The EMA weights are exported as a diffusers folder (``unet/`` +
``scheduler/``) that ``diffusion=synthetic_ddpm`` loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.train.loop import Trainer, step_noise


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


def folder_images(x: torch.Tensor, batch_size: int, hflip: bool = True):
    """A batch of images held in memory, drawn with the step's generator, with a random horizontal flip
    (unless ``hflip`` is off)."""

    def batch(rng: np.random.Generator) -> torch.Tensor:
        b = x[torch.as_tensor(rng.integers(0, len(x), batch_size))]
        flip = torch.as_tensor((rng.random(batch_size) < 0.5) & hflip)
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
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = build_unet(image_size, channels).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                              beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=True)
    schedule = NoiseSchedule.from_config("linear", num_train_timesteps)  # the same q_sample as every sampler
    trainer = Trainer({"unet": unet}, work_dir, steps, lr=lr, warmup=warmup, decay_from=decay_from,
                      final_lr_fraction=final_lr_fraction, ema_decay=ema_decay, checkpoint_every=checkpoint_every,
                      desc="train ddpm", identity=info if images is not None and world is None else None)

    def loss(step, rng):
        x0 = images(rng).to(device)
        noise, t = step_noise(rng, x0.shape, num_train_timesteps, device)
        return torch.nn.functional.mse_loss(unet(schedule.q_sample(x0, t, noise), t).sample, noise)

    def export(ema, step):
        ema["unet"].save_pretrained(out_dir / "unet", safe_serialization=True)
        scheduler.save_pretrained(out_dir / "scheduler")
        (out_dir / "train_info.json").write_text(json.dumps({"command": command, "steps": step,
                                                             "batch_size": batch_size, "lr": lr,
                                                             "decay_from": decay_from,
                                                             "ema_decay": ema_decay, "seed": seed, **info},
                                                            indent=1))

    trainer.run(loss, export, seed=seed)
    return out_dir


def sample_check(folder: str | Path, n: int = 16, steps: int = 50, seed: int = 0, cols: int = 8) -> Path:
    """``n`` unconditional samples of the DDPM in ``folder`` (``steps`` respaced ancestral steps) as
    ``folder/samples.png``, 3× enlarged: the trained model's look, recorded beside it."""
    from PIL import Image

    from cfx_cli.diffusion.sampler import DDPMSampler
    from cfx_cli.models.generative import load_diffusers_ddpm
    from cfx_cli.outputs import to_uint8

    ddpm = load_diffusers_ddpm(str(folder))
    with torch.no_grad():
        z = DDPMSampler(ddpm, steps).sample(n, ddpm.latent_shape, torch.Generator().manual_seed(seed)).clamp(-1, 1)
    cols = min(cols, n)
    tiles = [to_uint8(img) for img in z] + [np.zeros_like(to_uint8(z[0]))] * (-n % cols)
    grid = np.concatenate([np.concatenate(tiles[r:r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    path = Path(folder) / "samples.png"
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
    return path
