"""Diffusion Autoencoders (Preechakul et al. 2022) behind the generative protocol.

A Diff-AE encodes an image into a *semantic code* z_sem (a vector) and decodes with a DDIM whose
UNet is conditioned on z_sem; the rest of the image (the *stochastic code*) is x_T, found by
deterministic DDIM inversion given z_sem. Editing z_sem with x_T fixed changes what the image shows
and keeps how it is drawn — the latent space Diff-AE-RE optimises in.

Two networks fit: the official BeatGANs autoencoder (``cfx_cli.models.diffae_beatgans``; z_sem
scales every ResBlock) and the synthetic benchmark's small one — the shipped pixel DDPM's diffusers
UNet with an "identity" class embedding, so a projection of z_sem is added to the time embedding,
plus a small convolutional semantic encoder (trained by ``cfx train synthetic_diffae``).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.errors import CfxError
from cfx_cli.models.generative import PixelSpace


class SemanticEncoder(nn.Module):
    """x ∈ [-1, 1] → z_sem (``z_dim``); ``to_emb`` maps z_sem to the UNet's time-embedding width
    (initialised small, so training starts close to the unconditional DDPM it fine-tunes)."""

    def __init__(self, z_dim: int = 64, width: int = 32, emb_dim: int = 128, groups: int = 8):
        super().__init__()
        w = width

        def down(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(groups, cout), nn.SiLU())

        self.features = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.SiLU(), down(w, 2 * w), down(2 * w, 2 * w),
                                      down(2 * w, 4 * w), nn.Conv2d(4 * w, 4 * w, 3, 1, 1), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, z_dim)
        self.to_emb = nn.Linear(z_dim, emb_dim)
        # small, not zero: a zero projection passes no gradient to the encoder, and the fine-tuned DDPM
        # then learns to ignore z (measured: z alone set shape/colours at chance after 900 steps)
        nn.init.normal_(self.to_emb.weight, std=0.02)
        nn.init.zeros_(self.to_emb.bias)
        self.config = {"z_dim": z_dim, "width": width, "emb_dim": emb_dim, "groups": groups}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DiffAE(PixelSpace, nn.Module):
    """A Diff-AE as a pixel generative model whose condition is z_sem.

    ``semantic(x)`` is the encoder; ``forward(x_t, t, cond=z_sem)`` the conditioned ε. The diffused
    variable is the image (encode/decode are identities); x_T comes from the DDIM sampler's inversion.
    """

    variance = "fixed_small"
    null_condition = None
    class_conditional = True

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, encoder: nn.Module | None = None,
                 image_size: int = 32, channels: int = 3, clip_denoised: bool = True, kind: str = "diffusers"):
        super().__init__()
        self.unet, self.encoder, self.schedule, self.kind = unet, encoder, schedule, kind
        self.image_size, self.channels, self.clip_denoised = int(image_size), int(channels), bool(clip_denoised)

    def semantic(self, x: Tensor) -> Tensor:
        """z_sem of images in [-1, 1]."""
        return self.unet.encode(x) if self.kind == "beatgans" else self.encoder(x)

    def forward(self, z_t: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is None:
            raise CfxError("a Diff-AE decodes only given a semantic code z_sem (cond)")
        if self.kind == "beatgans":
            return self.unet(z_t, t, cond)
        return self.unet(z_t, t, class_labels=self.encoder.to_emb(cond)).sample


def load_diffae(path: str | Path, key: str = "diffusion.path", weights: str = "ema",
                clip_denoised: bool = True, architecture: str | None = None, **flags) -> DiffAE:
    """A Diff-AE: a folder written by ``cfx train synthetic_diffae`` (``unet/``, ``encoder/``,
    ``scheduler/``) or the official Lightning checkpoint (``last.ckpt``; flags of its architecture
    in ``diffusion.*``, default the FFHQ-256 autoencoder's; the linear 1000-step schedule)."""
    path = Path(path)
    if not path.exists():
        raise CfxError(f"{key}={path} does not exist: point it to a Diff-AE folder (cfx train synthetic_diffae) "
                       f"or the official DiffAE checkpoint (e.g. checkpoints/ffhq256_autoenc/last.ckpt)")
    if path.is_file():
        from cfx_cli.models import diffae_beatgans as beatgans

        conf = dict(getattr(beatgans, str(architecture or "FFHQ256_AUTOENC").upper()))
        conf.update(flags)
        net = beatgans.load_diffae_checkpoint(path, key=key, weights=weights, **conf)
        return DiffAE(net, NoiseSchedule.from_config("linear", 1000), image_size=conf["image_size"],
                      clip_denoised=clip_denoised, kind="beatgans")
    return load_diffae_folder(path, key, clip_denoised)


def load_diffae_folder(path: Path, key: str, clip_denoised: bool = True) -> DiffAE:
    from safetensors.torch import load_file

    from cfx_cli.models.generative import load_diffusers_ddpm

    enc_dir = path / "encoder"
    if not (enc_dir / "config.json").exists():
        raise CfxError(f"{key}={path} is not a Diff-AE folder: it needs encoder/config.json next to unet/ and "
                       f"scheduler/ (as written by cfx train synthetic_diffae)")
    ddpm = load_diffusers_ddpm(path, key=key)
    try:
        cfg = json.loads((enc_dir / "config.json").read_text())
        encoder = SemanticEncoder(**cfg)
        encoder.load_state_dict(load_file(enc_dir / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - damaged files: one line naming them
        raise CfxError(f"{key}={path}: cannot load the semantic encoder from {enc_dir} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    encoder.eval().requires_grad_(False)
    return DiffAE(ddpm.unet, ddpm.schedule, encoder, image_size=ddpm.image_size, channels=ddpm.channels,
                  clip_denoised=clip_denoised)
