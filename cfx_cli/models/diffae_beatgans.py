"""The Diffusion Autoencoder (DiffAE, Preechakul et al., CVPR 2022) network, written for cfx.

The released DiffAE checkpoints (the FFHQ-256 autoencoder of phizaz/diffae; the square-64
model of the diffusion-counterfactual regression paper) are PyTorch-Lightning files whose
``state_dict`` holds the network twice, ``model.*`` (online weights) and ``ema_model.*``
(the EMA copy the authors sample with), beside an ``x_T`` buffer. The network is DiffAE's
``BeatGANsAutoencModel``:

* a semantic encoder (``encoder.*``): half a UNet without time conditioning, whose
  residual blocks are only norm -> SiLU -> conv plus the skip path, pooled over space to
  ``z_sem`` (``enc_out_channels``, 512);
* a guided-diffusion style UNet that predicts the noise from (x_t, t, z_sem). Each of its
  residual blocks is conditioned twice after the out norm ("resnet_two_cond"): a scale
  and a shift from the time embedding, then a per-channel scale from ``z_sem``.

:class:`DiffAEModel` is built from DiffAE's config flags (``BeatGANsAutoencConfig``, the
``model_conf`` of a training run) with the same parameter names and shapes, so those
files load strictly, and computes the same function up to float32 rounding. The
parameter-free resampling, the attention (``scaled_dot_product_attention``) and the folded
norm-and-modulate step are cfx's ADM ones (:mod:`cfx_cli.models.adm`), which that
module's tests check against guided-diffusion.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.models import adm
from cfx_cli.models.adm import Downsample, Upsample, timestep_embedding
from cfx_cli.models.lightning import read_state_dict, sub_state_dict

# templates.ffhq256_autoenc() of phizaz/diffae: the released FFHQ-256 autoencoder.
FFHQ256_AUTOENC = {
    "image_size": 256, "in_channels": 3, "model_channels": 128, "out_channels": 3, "num_res_blocks": 2,
    "num_input_res_blocks": None, "embed_channels": 512, "attention_resolutions": (16,),
    "time_embed_channels": None, "dropout": 0.1, "channel_mult": (1, 1, 2, 2, 4, 4), "input_channel_mult": None,
    "conv_resample": True, "dims": 2, "num_classes": None, "use_checkpoint": False, "num_heads": 1,
    "num_head_channels": -1, "num_heads_upsample": -1, "resblock_updown": True, "use_new_attention_order": False,
    "resnet_two_cond": True, "resnet_cond_channels": None, "resnet_use_zero_module": True,
    "attn_checkpoint": False, "enc_out_channels": 512, "enc_attn_resolutions": None, "enc_pool": "adaptivenonzero",
    "enc_num_res_block": 2, "enc_channel_mult": (1, 1, 2, 2, 4, 4, 4), "enc_grad_checkpoint": False,
    "latent_net_conf": None,
}

# square64_autoenc() of the regression paper's DiffAE fork: the same model at 64x64, narrower.
SQUARE64_AUTOENC = {
    **FFHQ256_AUTOENC,
    "image_size": 64, "model_channels": 64, "channel_mult": (1, 2, 4, 8), "enc_channel_mult": (1, 2, 4, 8, 8),
}

PRESETS = {"FFHQ256_AUTOENC": FFHQ256_AUTOENC, "SQUARE64_AUTOENC": SQUARE64_AUTOENC}


def _ints(value, name: str) -> tuple:
    """[16, 8] / (16,) / "16,8" / 16 -> a tuple of numbers (ints where whole)."""
    try:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)):
            value = [value]
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise CfxError(f"{name}={value!r} is not a list of numbers: write it as DiffAE's config does, "
                       f"e.g. {name}=[1,2,4,8]") from None
    return tuple(int(v) if v.is_integer() else v for v in numbers)


class GroupNorm(adm.GroupNorm32):
    """ADM's float32 group norm with DiffAE's group count, min(32, C) (DiffAE's
    ``normalization``), so that layers narrower than 32 channels still build."""

    def __init__(self, channels: int):
        nn.GroupNorm.__init__(self, min(32, channels), channels)


class ResBlock(nn.Module):
    """DiffAE's residual block, optionally resampling (``up``/``down``).

    In the UNet (``emb_channels`` given) it is conditioned on the time embedding and on
    ``z_sem``; in the semantic encoder (``emb_channels=None``) DiffAE builds no
    conditioning *and no out layers*: the block is ``skip(x) + conv(silu(norm(x)))``.
    The submodules are Sequentials only because the released keys index into them
    (``in_layers.0`` norm, ``in_layers.2`` conv, ``emb_layers.1``, ``cond_emb_layers.1``,
    ``out_layers.0`` norm, ``out_layers.3`` conv).
    """

    def __init__(self, channels: int, out_channels: int | None = None, emb_channels: int | None = None,
                 cond_channels: int | None = None, dropout: float = 0.0, up: bool = False, down: bool = False,
                 zero_out: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        # A resampling block resamples between its norm and its conv (and on the skip path):
        # parameter-free (nearest / 2x2 average), so no keys.
        self.updown = up or down
        resample = Upsample if up else Downsample if down else None
        self.h_upd = self.x_upd = resample(channels, False) if resample else nn.Identity()
        self.conditioned = emb_channels is not None
        if self.conditioned:
            # time: a scale and a shift per channel (hence 2x); z_sem: a scale per channel.
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, out_channels))
            self.out_layers = nn.Sequential(GroupNorm(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                            nn.Conv2d(out_channels, out_channels, 3, padding=1))
            if zero_out:  # resnet_use_zero_module: a fresh block starts as the identity, as the original
                nn.init.zeros_(self.out_layers[3].weight)
                nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        in_norm, _, in_conv = self.in_layers
        h = F.silu(in_norm(x), inplace=True)  # in_norm returns a fresh tensor: in place is safe
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        if self.conditioned:
            scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
            cond_gain = 1 + self.cond_emb_layers(cond)[:, :, None, None]
            # DiffAE: (norm(h) * (1 + scale) + shift) * (1 + cond). Both are per (sample, channel),
            # so they fold into one affine step that the group norm applies in the same pass.
            out_norm, out_conv = self.out_layers[0], self.out_layers[3]
            h = out_norm.modulated(h, (1 + scale) * cond_gain - 1, shift * cond_gain)
            h = self.out_layers[2](F.silu(h, inplace=True))  # dropout: a no-op in eval mode
            h = out_conv(h)
        return h.add_(self.skip_connection(x))  # h is a conv's fresh output


class AttentionBlock(adm.AttentionBlock):
    """guided-diffusion's attention block: the same keys (``norm``, ``qkv``, ``proj_out``)
    and the same forward as ADM's (scaled_dot_product_attention), with DiffAE's norm."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__(channels, num_heads, num_head_channels, use_new_attention_order, norm=GroupNorm)


class Blocks(nn.Sequential):
    """nn.Sequential that hands the time embedding and ``z_sem`` to its residual blocks.
    A Sequential because the released keys index into it (``input_blocks.4.1.qkv``)."""

    def forward(self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        for layer in self:
            x = layer(x, emb, cond) if isinstance(layer, ResBlock) else layer(x)
        return x


def _down_path(in_channels, stem_channels, model_channels, channel_mult, num_res_blocks, image_size,
               attention_resolutions, resblock_updown, conv_resample, res, attn):
    """The input side that DiffAE's UNet and its encoder share (guided-diffusion's layout):
    a stem conv (to ``stem_channels``), then per level ``num_res_blocks`` residual blocks
    (with attention at the listed resolutions) and, after every level but the last, a 2x
    downsampling block.

    Returns the blocks, each block's level (a downsampling block counts for the level
    below it: its output has that resolution) and output channels.
    """
    ch = stem_channels
    blocks, levels, chans = [Blocks(nn.Conv2d(in_channels, ch, 3, padding=1))], [0], [ch]
    resolution = image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if resolution in attention_resolutions:
                layers.append(attn(ch))
            blocks.append(Blocks(*layers))
            levels.append(level)
            chans.append(ch)
        if level != len(channel_mult) - 1:
            resolution //= 2
            blocks.append(Blocks(res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)))
            levels.append(level + 1)
            chans.append(ch)
    return nn.ModuleList(blocks), levels, chans


class SemanticEncoder(nn.Module):
    """DiffAE's ``BeatGANsEncoderModel`` with ``pool='adaptivenonzero'``: image -> ``z_sem``."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_heads, num_head_channels, resblock_updown, conv_resample,
                 use_new_attention_order):
        super().__init__()

        def attn(ch):
            return AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order)

        self.input_blocks, _, chans = _down_path(
            in_channels, int(channel_mult[0] * model_channels), model_channels, channel_mult, num_res_blocks,
            image_size, attention_resolutions, resblock_updown, conv_resample,
            res=lambda c, o=None, **updown: ResBlock(c, o, **updown), attn=attn)
        ch = chans[-1]
        self.middle_block = Blocks(ResBlock(ch), attn(ch), ResBlock(ch))
        # norm -> SiLU -> global average pool -> 1x1 conv: the pooled features, projected.
        self.out = nn.Sequential(GroupNorm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                 nn.Conv2d(ch, out_channels, 1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        return self.out(self.middle_block(h))


class DiffAEModel(nn.Module):
    """DiffAE's ``BeatGANsAutoencModel``, built from the flags of its config (the
    ``model_conf`` of a training run): e.g. ``DiffAEModel(**FFHQ256_AUTOENC)``.

    * ``encode(x)``: images in [-1, 1], N x 3 x H x W -> ``z_sem``, N x ``enc_out_channels``;
    * ``forward(x_t, t, cond)``: the predicted noise eps for noisy images ``x_t``, original
      timesteps ``t`` (0..T-1, not respaced; a scalar or one per sample) and ``cond = z_sem``.

    Flags that change only memory use (``use_checkpoint``, ``attn_checkpoint``,
    ``enc_grad_checkpoint``) or initialisation (``resnet_use_zero_module``) are accepted,
    as is ``time_embed_channels``, which DiffAE's autoencoder ignores too. Variants the
    original does not implement (``num_classes``, ``resnet_two_cond=False``, other
    ``enc_pool``, ``dims`` other than 2) and the latent DPM (``latent_net_conf``) are errors.
    Defaults are DiffAE's config defaults, except ``resnet_two_cond`` and ``enc_pool``:
    the only values its autoencoder runs with.
    """

    def __init__(self, image_size: int = 64, in_channels: int = 3, model_channels: int = 64, out_channels: int = 3,
                 num_res_blocks: int = 2, num_input_res_blocks: int | None = None, embed_channels: int = 512,
                 attention_resolutions=(16,), time_embed_channels: int | None = None, dropout: float = 0.1,
                 channel_mult=(1, 2, 4, 8), input_channel_mult=None, conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, resblock_updown: bool = True,
                 use_new_attention_order: bool = False, resnet_two_cond: bool = True,
                 resnet_cond_channels: int | None = None, resnet_use_zero_module: bool = True,
                 attn_checkpoint: bool = False, enc_out_channels: int = 512, enc_attn_resolutions=None,
                 enc_pool: str = "adaptivenonzero", enc_num_res_block: int = 2, enc_channel_mult=None,
                 enc_grad_checkpoint: bool = False, latent_net_conf=None, **unknown):
        super().__init__()
        if unknown:
            raise CfxError(f"unknown DiffAE flag(s) {', '.join(sorted(unknown))}: DiffAEModel takes the model_conf "
                           f"of DiffAE's BeatGANsAutoencConfig (image_size, model_channels, channel_mult, "
                           f"enc_channel_mult, ...); remove or rename them")
        cond_channels = resnet_cond_channels or embed_channels
        for name, value, bad, why in (
            ("dims", dims, dims != 2, "only 2-D images"),
            ("num_classes", num_classes, num_classes is not None, "DiffAE does not implement class conditioning"),
            ("resnet_two_cond", resnet_two_cond, not resnet_two_cond, "DiffAE's autoencoder needs true"),
            ("enc_pool", enc_pool, enc_pool != "adaptivenonzero", "DiffAE implements only 'adaptivenonzero'"),
            ("latent_net_conf", latent_net_conf, latent_net_conf is not None,
             "the latent DPM is not supported: use the autoencoder's config (null)"),
            ("resnet_cond_channels", resnet_cond_channels, cond_channels != enc_out_channels,
             f"z_sem has enc_out_channels={enc_out_channels} channels: set resnet_cond_channels "
             f"(or embed_channels) to that"),
        ):
            if bad:
                raise CfxError(f"{name}={value!r} is not supported: {why}")
        channel_mult = _ints(channel_mult, "channel_mult")
        input_mult = _ints(input_channel_mult, "input_channel_mult") if input_channel_mult else channel_mult
        if len(input_mult) != len(channel_mult):
            raise CfxError(f"input_channel_mult={list(input_mult)} must have as many levels as "
                           f"channel_mult={list(channel_mult)}")
        attention_resolutions = _ints(attention_resolutions, "attention_resolutions")
        self.image_size, self.model_channels = int(image_size), int(model_channels)
        self.in_channels, self.enc_out_channels = int(in_channels), int(enc_out_channels)
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        def res(ch_in, ch_out=None, **updown):
            return ResBlock(ch_in, ch_out, embed_channels, cond_channels, dropout, zero_out=resnet_use_zero_module,
                            **updown)

        def attn(ch, heads=num_heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        # DiffAE wraps the time MLP in a module of its own (TimeStyleSeperateEmbed), hence the
        # doubled name in the keys: time_embed.time_embed.0.weight. Its input is always the
        # model_channels-wide sinusoid (time_embed_channels is not used by the autoencoder).
        self.time_embed = nn.ModuleDict({"time_embed": nn.Sequential(
            nn.Linear(self.model_channels, embed_channels), nn.SiLU(), nn.Linear(embed_channels, embed_channels))})

        # The stem is channel_mult[0] wide even with another input_channel_mult, as the original.
        stem = int(channel_mult[0] * self.model_channels)
        self.input_blocks, self._input_levels, chans = _down_path(
            self.in_channels, stem, self.model_channels, input_mult, num_input_res_blocks or num_res_blocks,
            self.image_size, attention_resolutions, resblock_updown, conv_resample, res, attn)
        ch = chans[-1]
        self.middle_block = Blocks(res(ch), attn(ch), res(ch))

        # Decoder: per level num_res_blocks + 1 blocks, top level last. Each takes, while
        # there are any, the encoder's outputs of the same level, last first (concatenated
        # to its input); with num_input_res_blocks < num_res_blocks the rest take none.
        skips = [[c for c, lv in zip(chans, self._input_levels) if lv == level] for level in range(len(channel_mult))]
        self.output_blocks, self._output_levels = nn.ModuleList(), []
        resolution = self.image_size // 2 ** (len(channel_mult) - 1)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skips[level].pop() if skips[level] else 0
                layers = [res(ch + skip, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if resolution in attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    resolution *= 2
                self.output_blocks.append(Blocks(*layers))
                self._output_levels.append(level)

        self.out = nn.Sequential(GroupNorm(ch), nn.SiLU(),
                                 nn.Conv2d(stem, out_channels, 3, padding=1))
        if resnet_use_zero_module:  # a fresh model predicts zeros, as the original
            nn.init.zeros_(self.out[2].weight)
            nn.init.zeros_(self.out[2].bias)

        self.encoder = SemanticEncoder(
            self.image_size, self.in_channels, self.model_channels, self.enc_out_channels, enc_num_res_block,
            _ints(enc_attn_resolutions, "enc_attn_resolutions") if enc_attn_resolutions else attention_resolutions,
            _ints(enc_channel_mult, "enc_channel_mult") if enc_channel_mult else channel_mult,
            num_heads, num_head_channels, resblock_updown, conv_resample, use_new_attention_order)

    def encode(self, x: Tensor) -> Tensor:
        """The semantic code ``z_sem`` (N x enc_out_channels) of images in [-1, 1]."""
        return self.encoder(x.float())

    def forward(self, x_t: Tensor, t, cond: Tensor) -> Tensor:
        """The predicted noise for ``x_t`` at original timesteps ``t`` given ``cond = z_sem``."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_embed["time_embed"](timestep_embedding(t, self.model_channels))
        cond = cond.float()
        skips = [[] for _ in range(max(self._input_levels) + 1)]
        h = x_t.float()
        for block, level in zip(self.input_blocks, self._input_levels):
            h = block(h, emb, cond)
            skips[level].append(h)
        h = self.middle_block(h, emb, cond)
        for block, level in zip(self.output_blocks, self._output_levels):
            if skips[level]:
                h = torch.cat([h, skips[level].pop()], dim=1)
            h = block(h, emb, cond)
        return self.out(h)


# -- loading ---------------------------------------------------------------------------------------

_WEIGHTS = {"ema": "ema_model.", "online": "model."}


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _matching_preset(shapes: dict[str, tuple]) -> str | None:
    """The name of the preset whose keys and shapes are exactly ``shapes``, if any."""
    for name, flags in PRESETS.items():
        with torch.device("meta"):
            if _shapes(DiffAEModel(**flags)) == shapes:
                return name
    return None


def _check_keys(state: dict[str, Tensor], model: DiffAEModel, path: Path, key: str) -> None:
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = _shapes(model)
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    misshaped = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or misshaped):
        return
    examples = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
        [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []) + (
        [f"{k} is {list(got[k])} in the file, {list(want[k])} in the model" for k in misshaped[:2]])
    preset = _matching_preset(got)
    fix = (f"the file has the layout of {preset}: pass those flags" if preset else
           "pass the flags the file was trained with (its model_conf: model_channels, channel_mult, "
           "enc_channel_mult, attention_resolutions, ...)")
    raise CfxError(f"{key}={path} does not fit the DiffAE flags: {len(missing)} missing, {len(unexpected)} "
                   f"unexpected, {len(misshaped)} mis-shaped keys ({'; '.join(examples)}); {fix}")


def load_diffae_checkpoint(path: str | Path, key: str = "diffusion.path", weights: str = "ema",
                           **flags) -> DiffAEModel:
    """A :class:`DiffAEModel` with the weights of a DiffAE Lightning checkpoint (``last.ckpt``),
    loaded strictly, float32, on the CPU, in eval mode without gradients.

    ``weights='ema'`` takes ``ema_model.*`` (what DiffAE samples with), ``'online'``
    ``model.*``. ``flags`` are the architecture flags (default: :data:`FFHQ256_AUTOENC`).
    The file is read weights-only; its trainer objects become inert stand-ins, never code.
    ``key`` is the config key that named the file, so errors say what to fix.
    """
    if weights not in _WEIGHTS:
        raise CfxError(f"weights={weights!r} is not a DiffAE weight set: use 'ema' (the EMA copy DiffAE samples "
                       f"with) or 'online'")
    path = Path(path)
    state_dict = read_state_dict(path, key)
    prefix = _WEIGHTS[weights]
    state = {k: (v.float() if v.is_floating_point() else v).contiguous()
             for k, v in sub_state_dict(state_dict, prefix).items()}
    if not state:
        heads = sorted({k.split(".")[0] for k in state_dict})
        raise CfxError(f"{key}={path} has no '{prefix}*' weights (its state_dict holds {heads[:6]}): is it a "
                       f"DiffAE training checkpoint (last.ckpt)? Point {key} to one")
    # Build without memory or random init, then adopt the loaded tensors as the parameters.
    with torch.device("meta"):
        model = DiffAEModel(**(flags or FFHQ256_AUTOENC))
    _check_keys(state, model, path, key)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
