"""Train the synthetic benchmark's latent diffusion model: a KL autoencoder, then a class-conditional
latent UNet with label dropout (LDM's recipe at toy scale), written as a diffusers-style folder
(``vae/``, ``unet/``, ``class_embedder/``, ``scheduler/``) that ``diffusion=synthetic_ldm`` loads.

The class conditioning is LDM's ``cin`` one: an ``Embedding(K + 1, d)`` whose output is the UNet's
cross-attention context of length 1, class K being "no class" (the unconditional branch of
classifier-free guidance and LDCE's ε_u). The schedule is LDM's scaled-linear 0.0015..0.0195.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.train.ddpm import synthetic_images
from cfx_cli.train.loop import Trainer, step_noise

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_train_timesteps=1000)


def build_autoencoder(image_size: int, channels=(32, 64, 64), latent_channels: int = 4):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=16,
                         sample_size=image_size)


def build_latent_unet(latent_size: int, latent_channels: int = 4, channels=(64, 128), context_dim: int = 64):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                                down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
                                block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=context_dim,
                                attention_head_dim=8, norm_num_groups=16)


def train_autoencoder(world: SyntheticWorld, work_dir: Path, steps: int, batch_size: int, lr: float,
                      channels, latent_channels: int, kl_weight: float, seed: int):
    torch.manual_seed(seed)
    vae = build_autoencoder(world.image_size, channels, latent_channels)
    images = synthetic_images(world, batch_size)
    trainer = Trainer({"vae": vae}, work_dir, steps, lr=lr, decay_from=int(0.75 * steps), ema_decay=None,
                      desc="train autoencoder")

    def loss(step, rng):
        x = images(rng)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + kl_weight * post.kl().mean()

    trainer.run(loss, lambda nets, step: None, seed=seed)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def latent_scale(vae, world: SyntheticWorld, n: int = 512, seed: int = 12345) -> float:
    """LDM's scale factor: 1 / std of the latents, so the diffused variable has unit variance."""
    import numpy as np

    x = world.render(world.sample(np.random.default_rng(seed), n))
    return float(1.0 / vae.encode(x).latent_dist.mode().std())


def train_latent_diffusion(world: SyntheticWorld, out_dir: str | Path, work_dir: str | Path, ae_steps: int = 3000,
                           steps: int = 6000, batch_size: int = 64, lr: float = 4e-4, ae_lr: float = 5e-4,
                           ae_channels=(32, 64, 64), latent_channels: int = 4, kl_weight: float = 1e-6,
                           channels=(64, 128), context_dim: int = 64, label_dropout: float = 0.1,
                           ema_decay: float = 0.999, decay_from: int | None = None, seed: int = 0,
                           threads: int | None = None, command: str = "") -> Path:
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    if threads:
        torch.set_num_threads(threads)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    vae = train_autoencoder(world, work_dir / "autoencoder", ae_steps, batch_size, ae_lr, ae_channels,
                            latent_channels, kl_weight, seed)
    scale = latent_scale(vae, world)
    vae.register_to_config(scaling_factor=scale)
    num_classes = len(world.shapes)
    latent_size = world.image_size // 2 ** (len(ae_channels) - 1)

    torch.manual_seed(seed + 1)
    unet = build_latent_unet(latent_size, latent_channels, channels, context_dim)
    embed = nn.Embedding(num_classes + 1, context_dim)  # class K = no class
    schedule = NoiseSchedule.from_config("scaled_linear", SCHEDULE["num_train_timesteps"],
                                         beta_start=SCHEDULE["beta_start"], beta_end=SCHEDULE["beta_end"])
    trainer = Trainer({"unet": unet, "class_embedder": embed}, work_dir / "unet", steps, lr=lr,
                      decay_from=decay_from, ema_decay=ema_decay, desc="train latent unet")

    def loss(step, rng):
        f = world.sample(rng, batch_size)
        with torch.no_grad():
            z0 = vae.encode(world.render(f)).latent_dist.mode() * scale
        y = torch.as_tensor(f["shape"]).long()
        y = torch.where(torch.as_tensor(rng.random(batch_size) < label_dropout), num_classes, y)
        noise, t = step_noise(rng, z0.shape, SCHEDULE["num_train_timesteps"])
        eps = unet(schedule.q_sample(z0, t, noise), t, encoder_hidden_states=embed(y)[:, None, :]).sample
        return torch.nn.functional.mse_loss(eps, noise)

    def export(ema, step):
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        ema["unet"].save_pretrained(out_dir / "unet", safe_serialization=True)
        (out_dir / "class_embedder").mkdir(parents=True, exist_ok=True)
        save_file({"weight": ema["class_embedder"].weight.detach().contiguous()},
                  out_dir / "class_embedder" / "model.safetensors")
        (out_dir / "class_embedder" / "config.json").write_text(json.dumps(
            {"num_classes": num_classes, "null_class": num_classes, "dim": context_dim}, indent=1))
        DDPMScheduler(prediction_type="epsilon", clip_sample=False, **SCHEDULE).save_pretrained(out_dir / "scheduler")
        (out_dir / "train_info.json").write_text(json.dumps(
            {"command": command, "steps": step, "ae_steps": ae_steps, "batch_size": batch_size, "lr": lr,
             "ema_decay": ema_decay, "label_dropout": label_dropout, "kl_weight": kl_weight, "seed": seed,
             "scale_factor": scale, "shapes": list(world.shapes), "image_size": world.image_size}, indent=1))

    trainer.run(loss, export, seed=seed)
    return out_dir
