"""Train the synthetic benchmark's Diffusion Autoencoder, starting from the shipped pixel DDPM.

The DDPM's UNet gets an "identity" class embedding (a vector added to its time embedding) fed by
``SemanticEncoder.to_emb(z_sem)``, initialised small: step 0 is nearly the unconditional DDPM, and
the usual ε-loss with z_sem = encoder(x_0) teaches the encoder to carry what the noise destroys
(Diff-AE's training, Preechakul et al. 2022). The UNet is fine-tuned at a lower rate than the encoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cfx_cli.data.synthetic import SyntheticWorld
from cfx_cli.models.diffae import SemanticEncoder
from cfx_cli.train.ddpm import synthetic_images
from cfx_cli.train.loop import Trainer, step_noise


def conditioned_unet(ddpm_dir: str | Path):
    """The DDPM folder's UNet with an identity class embedding (no new weights), its weights loaded."""
    from diffusers import UNet2DModel

    src = UNet2DModel.from_pretrained(Path(ddpm_dir) / "unet", local_files_only=True, use_safetensors=True)
    unet = UNet2DModel.from_config({**src.config, "class_embed_type": "identity"})
    unet.load_state_dict(src.state_dict())
    return unet


def train_diffae(world: SyntheticWorld, ddpm_dir: str | Path, out_dir: str | Path, work_dir: str | Path,
                 steps: int = 1500, batch_size: int = 32, lr: float = 4e-4, unet_lr_scale: float = 1.0,
                 z_dim: int = 64, width: int = 32, ema_decay: float = 0.999, decay_from: int | None = None,
                 min_snr_gamma: float | None = 5.0, seed: int = 0, threads: int | None = None,
                 command: str = "") -> Path:
    from diffusers import DDPMScheduler

    from cfx_cli.models.generative import load_diffusers_ddpm

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    ddpm = load_diffusers_ddpm(ddpm_dir, key="trainable.ddpm")
    torch.manual_seed(seed)
    unet = conditioned_unet(ddpm_dir).train()
    encoder = SemanticEncoder(z_dim=z_dim, width=width, emb_dim=unet.config.block_out_channels[0] * 4)
    schedule = ddpm.schedule
    images = synthetic_images(world, batch_size)
    trainer = Trainer({"unet": unet, "encoder": encoder}, work_dir, steps, lr=lr, decay_from=decay_from,
                      ema_decay=ema_decay, lr_scale={"unet": unet_lr_scale}, desc="train diffae")

    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    # Min-SNR-γ weighting (Hang et al. 2023): the low-noise steps, which the DDPM already solves without z,
    # weigh less, so the loss rewards what z carries (with plain ε-MSE z stayed unused in 900 steps)
    weight = (snr.clamp(max=min_snr_gamma) / snr).float() if min_snr_gamma else torch.ones_like(snr).float()

    def loss(step, rng):
        x0 = images(rng)
        noise, t = step_noise(rng, x0.shape, schedule.num_timesteps)
        cond = encoder.to_emb(encoder(x0))
        err = (unet(schedule.q_sample(x0, t, noise), t, class_labels=cond).sample - noise).pow(2).mean((1, 2, 3))
        return (weight[t] * err).mean()

    def export(ema, step):
        ema["unet"].save_pretrained(out_dir / "unet", safe_serialization=True)
        DDPMScheduler.from_pretrained(Path(ddpm_dir) / "scheduler").save_pretrained(out_dir / "scheduler")
        (out_dir / "encoder").mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in ema["encoder"].state_dict().items()},
                  out_dir / "encoder" / "model.safetensors")
        (out_dir / "encoder" / "config.json").write_text(json.dumps(ema["encoder"].config, indent=1))
        (out_dir / "train_info.json").write_text(json.dumps(
            {"command": command, "steps": step, "batch_size": batch_size, "lr": lr, "unet_lr_scale": unet_lr_scale,
             "ema_decay": ema_decay, "min_snr_gamma": min_snr_gamma, "seed": seed,
             "initialised_from": str(ddpm_dir), "z_dim": z_dim,
             "shapes": list(world.shapes), "image_size": world.image_size}, indent=1))

    trainer.run(loss, export, seed=seed)
    return out_dir
