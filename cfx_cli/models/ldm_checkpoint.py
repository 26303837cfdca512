"""The CompVis latent-diffusion class-conditional ImageNet model (``cin256-v2``) on diffusers modules.

The released file is a PyTorch-Lightning ``.ckpt`` whose ``state_dict`` is
``LatentDiffusion.state_dict()``:

- ``model.diffusion_model.*``   the openaimodel ``UNetModel`` (spatial transformers, context 512);
- ``first_stage_model.*``       the VQ-f4 autoencoder (``VQModelInterface``: taming encoder/decoder,
  ``quant_conv``, ``post_quant_conv``, an 8192-code codebook of dimension 3);
- ``cond_stage_model.embedding.weight``  the class embedder, ``Embedding(1001, 512)``; class 1000
  is the unconditional (null) class of classifier-free guidance;
- the noise-schedule buffers (``betas``, ``alphas_cumprod``, ...).

:func:`load_ldm_checkpoint` reads it weights-only (:mod:`cfx_cli.models.lightning`: trainer
objects become inert stand-ins, no pickled code runs) and maps it onto
``diffusers.UNet2DConditionModel`` and ``diffusers.VQModel`` with diffusers' own single-file
conversion helpers (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``); only the
codebook (``quantize.embedding.weight``), which the KL-VAE helper does not know, is mapped here.

How the pieces are used (as ``LatentDiffusion`` does):

- the UNet's context is ``class_embedder(y)[:, None, :]`` (``encoder_hidden_states`` of length 1);
- ``z = vae.encode(x).latents * scale_factor`` (``quant_conv(encoder(x))``, not quantized);
- ``x = vae.decode(z / scale_factor).sample`` (quantized to the codebook, then decoded);
- the schedule is LDM's ``linear`` one, ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``,
  which diffusers calls ``scaled_linear``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.models.lightning import read_state_dict

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
EMBED_KEY = "cond_stage_model.embedding.weight"
CODEBOOK_KEY = "quantize.embedding.weight"

# diffusers.UNet2DConditionModel kwargs of cin256-v2 (configs/latent-diffusion/cin256-v2.yaml:
# model_channels 192, channel_mult 1,2,3,5, attention at 8,4,2, num_heads 1, context_dim 512).
# attention_head_dim is diffusers' legacy name for the number of heads.
CIN256_V2_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [192, 384, 576, 960],
    "layers_per_block": 2,
    "cross_attention_dim": 512,
    "attention_head_dim": 1,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "transformer_layers_per_block": 1,
}

# diffusers.VQModel kwargs of cin256-v2's first stage (VQ-f4: ch 128, ch_mult 1,2,4, z 3, 8192 codes).
CIN256_V2_VQ_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 3,
    "num_vq_embeddings": 8192,
    "vq_embed_dim": 3,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 1.0,
}

# cin256-v2.yaml: linear_start, linear_end, timesteps (used when the file has no ``betas`` buffer).
CIN256_V2_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195,
                      "num_train_timesteps": 1000}

# Keys of LatentDiffusion's state dict that are neither network: the schedule buffers (recomputed
# by the sampler from the schedule), the learned log-variance, and training-only parts.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
})
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")

_UNET_FIX = ("pass the unet_config the checkpoint was built with (UNet2DConditionModel kwargs; "
             "the default is cin256-v2's)")
_VQ_FIX = "pass the vq_config the checkpoint was built with (VQModel kwargs; the default is cin256-v2's)"


def convert_ldm_state_dict(sd: Mapping[str, Tensor], unet_config: Mapping, vq_config: Mapping
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``LatentDiffusion.state_dict()`` → the state dicts of ``UNet2DConditionModel(**unet_config)``,
    ``VQModel(**vq_config)`` and ``nn.Embedding`` (``{"weight": ...}``).

    Pure: no file, no model, tensors passed through (1×1-conv attention weights of the VQ
    become linear ones: views). Keys the helpers do not know are left out (callers compare the
    result with the models' own keys). Works on meta tensors.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_src = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    vq_src = {k: v for k, v in sd.items() if k.startswith(VQ_PREFIX) and not k.startswith(_IGNORED_PREFIXES)}
    unet_sd = convert_ldm_unet_checkpoint(unet_src, dict(unet_config)) if unet_src else {}
    # The helper finds the prefix itself; it must not see an empty source (it would then take every key).
    vq_sd = convert_ldm_vae_checkpoint(vq_src, dict(vq_config)) if vq_src else {}
    if VQ_PREFIX + CODEBOOK_KEY in sd:  # the VQ codebook: same name in taming's VectorQuantizer2 and diffusers'
        vq_sd[CODEBOOK_KEY] = sd[VQ_PREFIX + CODEBOOK_KEY]
    embed_sd = {"weight": sd[EMBED_KEY]} if EMBED_KEY in sd else {}
    return unet_sd, vq_sd, embed_sd


def load_ldm_checkpoint(path: str | Path, key: str = "diffusion.path", unet_config: Mapping | None = None,
                        vq_config: Mapping | None = None, num_classes: int = 1000) -> dict:
    """The UNet, the VQ autoencoder and the class embedder of a CompVis LDM checkpoint, offline.

    Returns ``{"unet": UNet2DConditionModel, "vae": VQModel, "class_embedder": nn.Embedding,
    "scale_factor": float, "schedule": {...}}``: float32, on the CPU, in eval mode, without gradients.
    ``unet_config`` / ``vq_config`` (diffusers kwargs) default to cin256-v2's; ``num_classes`` is the
    number of real classes (the embedder has one more row, the unconditional class ``num_classes``).
    The schedule is read off the file's ``betas`` buffer when it has one (and checked to be
    LDM's ``linear`` = diffusers' ``scaled_linear``). ``key`` is the config key that named the file,
    so every error (a :class:`CfxError`, one line) says what to fix.
    """
    from diffusers import UNet2DConditionModel, VQModel

    path = Path(path)
    unet_config = copy.deepcopy(dict(CIN256_V2_UNET_CONFIG if unet_config is None else unet_config))
    vq_config = copy.deepcopy(dict(CIN256_V2_VQ_CONFIG if vq_config is None else vq_config))
    sd = read_state_dict(path, key)
    where = f"{key}={path}"
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        prefixes = sorted({k.split(".")[0] for k in sd})[:6]
        raise CfxError(f"{where} holds no LatentDiffusion weights (no '{UNET_PREFIX}*' keys; found {prefixes}): "
                       f"point {key} to a CompVis latent-diffusion checkpoint (e.g. cin256-v2/model.ckpt)")

    ema = [k for k in sd if k.startswith("model_ema.")]
    if ema:
        warnings.warn(f"{where}: {len(ema)} EMA keys (model_ema.*) ignored; the non-EMA UNet weights are loaded",
                      stacklevel=2)
    unknown = [k for k in sd if not (k.startswith((UNET_PREFIX, VQ_PREFIX, *_IGNORED_PREFIXES))
                                     or k == EMBED_KEY or k in _SCHEDULE_BUFFERS)]
    if unknown:
        raise CfxError(f"{where}: {len(unknown)} unexpected keys outside the UNet, the VQ first stage and the "
                       f"class embedder (first: {', '.join(unknown[:3])}); this loader takes class-conditional "
                       f"LDMs with a VQ first stage (cin256-v2): is {key} the right checkpoint?")

    with torch.device("meta"):
        unet = _build(UNet2DConditionModel, unet_config, "unet_config", where)
        vae = _build(VQModel, vq_config, "vq_config", where)
    try:
        unet_sd, vq_sd, embed_sd = convert_ldm_state_dict(sd, unet_config, vq_config)
        unet_map, vq_map, _ = _provenance(sd, unet_config, vq_config)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CfxError(f"{where}: the diffusers conversion failed ({type(e).__name__}: {_first_line(e)}); "
                       f"{_UNET_FIX}, and {_VQ_FIX}") from None

    _check(unet, unet_sd, unet_map, sd, UNET_PREFIX, "UNet2DConditionModel", where, _UNET_FIX)
    _check(vae, vq_sd, vq_map, sd, VQ_PREFIX, "VQModel", where, _VQ_FIX)
    context_dim = unet.config.cross_attention_dim
    class_embedder = _class_embedder(embed_sd, num_classes, context_dim if isinstance(context_dim, int) else None,
                                     where)

    unet.load_state_dict(_float32(unet_sd), strict=True, assign=True)
    vae.load_state_dict(_float32(vq_sd), strict=True, assign=True)
    for name, module in (("unet", unet), ("vae", vae)):
        left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        if left:  # a tensor no state dict holds (a non-persistent buffer of a newer diffusers)
            raise CfxError(f"{where}: the {name} has tensors no checkpoint key fills ({', '.join(left[:3])}); "
                           f"this diffusers version builds the model differently: use diffusers 0.42")
    scale = sd.get("scale_factor")
    scale_factor = float(scale) if isinstance(scale, Tensor) and scale.numel() == 1 \
        else float(vq_config.get("scaling_factor", 1.0))
    return {"unet": unet.eval().requires_grad_(False), "vae": vae.eval().requires_grad_(False),
            "class_embedder": class_embedder, "scale_factor": scale_factor,
            "schedule": _schedule(sd.get("betas"), where)}


def _build(cls, config: dict, name: str, where: str) -> nn.Module:
    try:
        return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - a wrong kwarg or value: name the config
        raise CfxError(f"{where}: {name} does not build a diffusers {cls.__name__} ({type(e).__name__}: "
                       f"{_first_line(e)}); fix {name}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _provenance(sd: Mapping[str, Tensor], unet_config: Mapping, vq_config: Mapping):
    """For each converted key, the checkpoint key it came from: the same conversion run on fresh
    meta tensors, traced back by identity (the VQ's 1×1-conv attention weights come back as views)."""
    shadow = {k: torch.empty(tuple(v.shape), device="meta") for k, v in sd.items()}
    names = {id(v): k for k, v in shadow.items()}

    def source(t: Tensor) -> str | None:
        return names.get(id(t)) or (names.get(id(t._base)) if t._base is not None else None)

    return tuple({dk: source(v) for dk, v in part.items()} for part in convert_ldm_state_dict(shadow, unet_config,
                                                                                            vq_config))


def _check(model: nn.Module, converted: dict, origin: dict, sd: Mapping[str, Tensor], prefix: str, what: str,
           where: str, fix: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    used = set(origin.values())
    # Checkpoint keys the conversion did not place, or placed under a name the model does not have.
    unexpected = [k for k in sd if k.startswith(prefix) and not k.startswith(_IGNORED_PREFIXES) and k not in used]
    unexpected += [origin.get(dk) or dk for dk in converted if dk not in want]
    missing = [k for k in want if k not in converted]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} keys missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise CfxError(f"{where} does not fit the {what} config: {'; '.join(parts)}; {fix}")
    misshaped = [dk for dk, shape in want.items() if tuple(converted[dk].shape) != shape]
    if misshaped:
        dk = misshaped[0]
        raise CfxError(f"{where}: {len(misshaped)} keys do not fit the {what} config; first: {origin.get(dk) or dk} "
                       f"has shape {list(converted[dk].shape)} but the config expects {list(want[dk])} (as {dk}); "
                       f"{fix}")


def _class_embedder(embed_sd: dict, num_classes: int, context_dim: int | None, where: str) -> nn.Embedding:
    if "weight" not in embed_sd:
        raise CfxError(f"{where} has no class embedder ({EMBED_KEY} is missing): this loader takes "
                       f"class-conditional LDMs (cin256-v2), not text- or unconditional ones")
    weight = embed_sd["weight"]
    if weight.ndim != 2 or weight.shape[0] != num_classes + 1:
        raise CfxError(f"{where}: {EMBED_KEY} has shape {list(weight.shape)} but num_classes={num_classes} "
                       f"needs {num_classes + 1} rows (the classes and the unconditional one): "
                       f"set num_classes={weight.shape[0] - 1 if weight.ndim == 2 else '?'}")
    if context_dim is not None and weight.shape[1] != context_dim:
        raise CfxError(f"{where}: {EMBED_KEY} has shape {list(weight.shape)} but the UNet's "
                       f"cross_attention_dim is {context_dim}; {_UNET_FIX}")
    embedder = nn.Embedding.from_pretrained(_float32({"w": weight})["w"], freeze=True)
    return embedder.eval()


def _float32(sd: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _schedule(betas: Tensor | None, where: str) -> dict:
    """diffusers' scheduler kwargs; from the file's ``betas`` when it has them (LDM's ``linear``
    schedule is diffusers' ``scaled_linear``), else cin256-v2's."""
    if betas is None:
        return dict(CIN256_V2_SCHEDULE)
    b = betas.detach().double().flatten()
    n = b.numel()
    if n < 2:
        raise CfxError(f"{where}: the betas buffer has {n} entries; re-download the checkpoint")
    start, end = _f32_repr(b[0].item()), _f32_repr(b[-1].item())
    expected = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if not torch.allclose(b, expected, rtol=1e-5, atol=1e-9):
        worst = int((b - expected).abs().argmax())
        raise CfxError(f"{where}: its betas are not LDM's 'linear' (diffusers 'scaled_linear') schedule from "
                       f"{start} to {end} (beta[{worst}] = {b[worst].item():.6g}, expected "
                       f"{expected[worst].item():.6g}); this loader takes cin256-v2-style checkpoints")
    return {"beta_schedule": "scaled_linear", "beta_start": start, "beta_end": end, "num_train_timesteps": n}


def _f32_repr(x: float) -> float:
    """The shortest decimal that a float32 buffer value stands for (0.0015, not 0.00150000001)."""
    import numpy as np

    return float(str(np.float32(x)))
