"""Latent diffusion models (Rombach et al. 2022) behind the generative protocol.

The diffused variable is z = scale · E(x) of an autoencoder (KL or VQ); ``decode`` is
differentiable (LDCE backpropagates through it; a VQ decoder quantises with a straight-through
estimator, as LDM's ``differentiable_decode_first_stage``). The UNet is a diffusers
``UNet2DConditionModel`` whose cross-attention context comes from a *conditioner*:

- ``ClassConditioner``  LDM's ``cin`` models: ``Embedding(K + 1, d)(y)`` as a length-1 context,
  class K = no class (the unconditional branch);
- ``TextConditioner``   Stable-Diffusion-family folders: a CLIP text encoder on a prompt per
  class (``prompt`` template filled with the dataset's class names); the empty prompt is
  the unconditional branch.

Conditions are class indices in both cases, so methods never see the difference; the null
condition is ``null_condition`` (K, or −1 for "the empty prompt").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from cfx_cli.diffusion.schedule import NoiseSchedule
from cfx_cli.errors import CfxError


class ClassConditioner(nn.Module):
    def __init__(self, embedding: nn.Embedding, null_class: int | None = None):
        super().__init__()
        self.embedding = embedding
        self.null_condition = embedding.num_embeddings - 1 if null_class is None else int(null_class)
        self.num_classes = self.null_condition

    def forward(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y, device=self.embedding.weight.device).long().reshape(-1)
        if ((y < 0) | (y >= self.embedding.num_embeddings)).any():
            raise CfxError(f"class condition {y.tolist()} outside 0..{self.num_classes} "
                           f"({self.num_classes} = no class) of this latent diffusion model")
        return self.embedding(y)[:, None, :]


class TextConditioner(nn.Module):
    """CLIP text embeddings of ``prompt.format(class_name)`` per class index; −1 = the empty prompt.
    Embeddings are computed once per class and cached (the text encoder is frozen)."""

    null_condition = -1

    def __init__(self, tokenizer, text_encoder: nn.Module, prompt: str = "a photo of a {}.",
                 class_prompts: list[str] | None = None):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.prompt = prompt
        self.class_prompts = list(class_prompts) if class_prompts else None
        self.class_names: list[str] | None = None
        self._cache: dict[int, Tensor] = {}

    def set_class_names(self, names) -> None:
        self.class_names = [str(n) for n in names]
        self._cache.clear()

    def prompt_of(self, y: int) -> str:
        if y < 0:
            return ""
        if self.class_prompts:
            if y >= len(self.class_prompts):
                raise CfxError(f"diffusion.class_prompts has {len(self.class_prompts)} prompts; class {y} has none")
            return self.class_prompts[y]
        if self.class_names is None:
            raise CfxError("a text-conditional diffusion model needs the dataset's class names (or "
                           "diffusion.class_prompts) to write its prompts")
        if y >= len(self.class_names):
            raise CfxError(f"class {y} is beyond the dataset's {len(self.class_names)} class names")
        return self.prompt.format(self.class_names[y].replace("_", " "))

    @torch.no_grad()
    def embed(self, y: int) -> Tensor:
        if y not in self._cache:
            tok = self.tokenizer([self.prompt_of(y)], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            device = next(self.text_encoder.parameters()).device
            self._cache[y] = self.text_encoder(tok.input_ids.to(device))[0][0]
        return self._cache[y]

    def forward(self, y: Tensor) -> Tensor:
        y = torch.as_tensor(y).long().reshape(-1).tolist()
        return torch.stack([self.embed(int(i)) for i in y])


class Decoder(nn.Module):
    """x = D(z / scale): the autoencoder's decoder as a module of its own, so that a job counts its
    calls (``nfe_decoder``: LDCE decodes, with gradients, at every step)."""

    def __init__(self, vae: nn.Module, scale_factor: float, vq: bool):
        super().__init__()
        self.vae, self.scale_factor, self.vq = vae, float(scale_factor), vq

    def forward(self, z: Tensor) -> Tensor:
        z = z / self.scale_factor
        out = self.vae.decode(z, force_not_quantize=False) if self.vq else self.vae.decode(z)
        return out.sample


class LatentDiffusion(nn.Module):
    """An autoencoder + an ε-predicting conditional UNet on its latents."""

    variance = "fixed_small"
    clip_denoised = False  # latents are not bounded
    class_conditional = True

    def __init__(self, vae: nn.Module, unet: nn.Module, schedule: NoiseSchedule, conditioner: nn.Module,
                 scale_factor: float = 1.0, image_size: int | None = None, sample_posterior: bool = False):
        super().__init__()
        self.vae, self.unet, self.schedule, self.conditioner = vae, unet, schedule, conditioner
        self.scale_factor = float(scale_factor)
        self.vq = type(vae).__name__ == "VQModel"
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(image_size or unet.config.sample_size * down)
        self.channels = 3
        self.decoder = Decoder(vae, self.scale_factor, self.vq)
        self.sample_posterior = bool(sample_posterior)

    @property
    def null_condition(self):
        return self.conditioner.null_condition

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        s = s if isinstance(s, int) else s[0]
        return (self.unet.config.in_channels, s, s)

    def set_class_names(self, names) -> None:
        if hasattr(self.conditioner, "set_class_names"):
            self.conditioner.set_class_names(names)

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """z = scale · E(x): VQ pre-quantisation latents (LDM does not quantise when encoding); KL: the
        posterior mean, or with ``sample_posterior`` a draw mean + std · noise (Stable Diffusion's img2img;
        the caller passes each sample's own noise, N×latent_shape, so a draw never depends on the batch)."""
        if self.vq:
            return self.vae.encode(x).latents * self.scale_factor
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * noise if (self.sample_posterior and noise is not None) else post.mode()
        return z * self.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, z_t: Tensor, t: Tensor, cond=None) -> Tensor:
        if cond is None:
            cond = torch.full((z_t.shape[0],), self.null_condition, dtype=torch.long)
        context = self.conditioner(cond).to(z_t.dtype)
        return self.unet(z_t, t, encoder_hidden_states=context).sample


def _schedule_from(sc: dict, key: str, path) -> NoiseSchedule:
    if sc.get("prediction_type", "epsilon") != "epsilon":
        raise CfxError(f"{key}={path}: prediction_type={sc['prediction_type']!r} is not supported yet; "
                       f"cfx's guidance expects an epsilon-predicting model")
    kind = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}.get(
        sc.get("beta_schedule", "linear"))
    if kind is None:
        raise CfxError(f"{key}={path}: beta_schedule={sc.get('beta_schedule')!r} is not supported; use linear, "
                       f"scaled_linear or squaredcos_cap_v2")
    return NoiseSchedule.from_config(kind, int(sc.get("num_train_timesteps", 1000)),
                                     beta_start=sc.get("beta_start"), beta_end=sc.get("beta_end"))


def _read_json(file: Path, key: str, path) -> dict:
    try:
        out = json.loads(file.read_text())
        if not isinstance(out, dict):
            raise ValueError("not a JSON object")
        return out
    except (OSError, ValueError) as e:
        raise CfxError(f"{key}={path}: {file} is not valid JSON ({e})") from None


def _from_pretrained(cls, folder: Path, key: str, path, **kwargs):
    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - damaged configs or weights: one line naming the folder
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CfxError(f"{key}={path}: cannot load {folder.name}/ ({type(e).__name__}: {first})") from None


def load_latent_diffusion(path: str | Path, key: str = "diffusion.path",
                          prompt: str = "a photo of a {}.", class_prompts: list[str] | None = None,
                          sample_posterior: bool = False, num_classes: int = 1000, unet_config: dict | None = None,
                          vq_config: dict | None = None) -> LatentDiffusion:
    """A latent diffusion model, offline:

    - a folder in diffusers layout — ``vae/`` (AutoencoderKL or VQModel), ``unet/``
      (UNet2DConditionModel), ``scheduler/`` and either ``class_embedder/`` (``model.safetensors``
      with ``weight`` + ``config.json``; written by ``cfx train synthetic_ldm``) or ``text_encoder/`` +
      ``tokenizer/`` (a Stable-Diffusion-family folder);
    - or CompVis LDM's class-conditional Lightning checkpoint (``cin256-v2.ckpt``), converted on load
      (``unet_config`` / ``vq_config``: the diffusers configs of another model of that family; default cin256-v2's).
    """
    path = Path(path)
    if not path.exists():
        raise CfxError(f"{key}={path} does not exist: point it to a latent diffusion folder (vae/, unet/, "
                       f"scheduler/ and class_embedder/ or text_encoder/+tokenizer/) or LDM's cin256-v2.ckpt")
    if path.is_file():
        from cfx_cli.models.ldm_checkpoint import load_ldm_checkpoint

        parts = load_ldm_checkpoint(path, key=key, num_classes=num_classes, unet_config=unet_config,
                                    vq_config=vq_config)
        sc = parts["schedule"]
        schedule = NoiseSchedule.from_config(sc["beta_schedule"], sc["num_train_timesteps"],
                                             beta_start=sc["beta_start"], beta_end=sc["beta_end"])
        return LatentDiffusion(parts["vae"], parts["unet"], schedule, ClassConditioner(parts["class_embedder"]),
                               scale_factor=parts["scale_factor"])
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel

    missing = [d for d in ("vae", "unet", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise CfxError(f"{key}={path} is not a latent diffusion folder: {', '.join(d + '/' for d in missing)} "
                       f"missing (diffusers layout: vae/, unet/, scheduler/)")
    vae_cfg = _read_json(path / "vae" / "config.json", key, path)
    vae_cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}.get(vae_cfg.get("_class_name"))
    if vae_cls is None:
        raise CfxError(f"{key}={path}: vae/ is a {vae_cfg.get('_class_name')!r}; cfx reads AutoencoderKL or VQModel")
    # diffusers asks for low_cpu_mem_usage by default and, without accelerate installed, falls back with a
    # warning per model (twice a job): ask for it only where accelerate makes it possible
    from diffusers.utils import is_accelerate_available

    lean = {"low_cpu_mem_usage": is_accelerate_available()}
    vae = _from_pretrained(vae_cls, path / "vae", key, path, **lean)
    unet = _from_pretrained(UNet2DConditionModel, path / "unet", key, path, **lean)
    sched_file = path / "scheduler" / "scheduler_config.json"
    schedule = _schedule_from(_read_json(sched_file, key, path), key, path)
    if (path / "class_embedder").is_dir():
        from safetensors.torch import load_file

        cfg = _read_json(path / "class_embedder" / "config.json", key, path)
        try:
            weight = load_file(path / "class_embedder" / "model.safetensors")["weight"]
        except Exception as e:  # noqa: BLE001
            raise CfxError(f"{key}={path}: cannot read class_embedder/model.safetensors ({type(e).__name__})") from None
        conditioner = ClassConditioner(nn.Embedding.from_pretrained(weight, freeze=True), cfg.get("null_class"))
    elif (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise CfxError(f"{key}={path} is text-conditional: install transformers "
                           f"(pip install 'cfx[text]')") from None
        conditioner = TextConditioner(_from_pretrained(CLIPTokenizer, path / "tokenizer", key, path),
                                      _from_pretrained(CLIPTextModel, path / "text_encoder", key, path),
                                      prompt=prompt, class_prompts=class_prompts)
    else:
        raise CfxError(f"{key}={path} has no conditioner: add class_embedder/ (class-conditional) or "
                       f"text_encoder/ + tokenizer/ (text-conditional)")
    scale = float(vae.config.get("scaling_factor", 1.0) or 1.0)
    model = LatentDiffusion(vae, unet, schedule, conditioner, scale_factor=scale, sample_posterior=sample_posterior)
    return model.eval().requires_grad_(False)
