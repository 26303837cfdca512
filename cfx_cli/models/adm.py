"""The OpenAI guided-diffusion ("ADM") UNet, written for cfx.

The released ADM checkpoints (the CelebA-128 model of DiME / ACE / FastDiME, the
ImageNet-256 unconditional model of DVCE / ACE, ...) are plain state dicts of
guided-diffusion's ``UNetModel``. This module builds the same network from the same
construction flags (``image_size``, ``num_channels``, ``channel_mult``,
``attention_resolutions``, ...) with exactly the same parameter names and shapes,
so those files load unchanged, and computes the same function (float32 rounding).

What differs from the original is only how the forward pass is computed: attention
goes through ``scaled_dot_product_attention``; the scale-shift conditioning is
folded into the group norm's affine step; on the CPU, 2x resampling avoids two slow
kernels; low precision is opt-in (:meth:`ADMUNet.set_compute_dtype`) instead of
following ``use_fp16``.

:func:`load_adm_unet` loads a released file strictly; when the flags do not fit it,
:func:`infer_adm_flags` reads the flags the file was built with off its shapes, so
the error names them.

Two flags leave no trace in the weights: ``num_heads`` / ``num_head_channels``
(how the attention channels are split into heads). A checkpoint loads under any
value of them, so they must be taken from the model's release notes.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfx_cli.errors import CfxError

NUM_CLASSES = 1000  # guided-diffusion's class_cond models are ImageNet models

# guided-diffusion's channel_mult="" default, by image size (script_util.create_model).
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# guided-diffusion flags that configure the diffusion process or training, not the
# network: accepted (so a released model's flag set can be passed as is) and ignored.
# use_checkpoint is gradient checkpointing, which changes memory, not the function.
IGNORED_FLAGS = frozenset({
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "use_checkpoint",
})

_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise CfxError(f"dtype={dtype!r} is not a compute dtype: use bf16, fp16 or fp32")
    return _DTYPES[name]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin], as the original."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 (statistics of fp16 activations
    are not accurate enough) and returns the input's dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)

    def modulated(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``norm(x) * (1 + scale) + shift`` with per-sample ``scale``/``shift`` (N×C×1×1).

        The group norm's own affine step and the per-sample one are folded into one
        per-(sample, channel) affine, applied by group_norm itself on the batch seen
        as one sample of N·C channels in N·G groups (the same groups): the full-size
        tensor is read and written once instead of three times.
        """
        n, c = x.shape[:2]
        one_plus_scale = (1 + scale.float()).reshape(n, c)
        gain = one_plus_scale * self.weight
        bias = torch.addcmul(shift.float().reshape(n, c), one_plus_scale, self.bias)
        out = F.group_norm(x.float().reshape(1, n * c, *x.shape[2:]), n * self.num_groups,
                           gain.reshape(-1), bias.reshape(-1), self.eps)
        return out.view(x.shape).to(x.dtype)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second input."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the children that take it.

    A Sequential (not a plain list) because the released keys index into it:
    ``input_blocks.3.0.in_layers...``, ``input_blocks.3.1.qkv...``.
    """

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _avg_pool_2x2(x: Tensor) -> Tensor:
    """avg_pool2d(x, 2); on the CPU as the sum of the four strided phases, in the same
    order (bitwise equal), because the CPU avg_pool2d kernel is ~3x slower on NCHW."""
    if x.device.type != "cpu":
        return F.avg_pool2d(x, 2)
    return (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) * 0.25


def _upsample_nearest_2x(x: Tensor) -> Tensor:
    """Nearest-neighbour 2x upsampling; on the CPU by two broadcast copies (columns,
    then rows), because the CPU interpolate kernel is several times slower on NCHW."""
    if x.device.type != "cpu":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    n, c, h, w = x.shape
    x = x.unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
    return x.unsqueeze(3).expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3×3 conv (``op``, the released keys), or 2×2
    average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            assert out_channels == channels, "average pooling cannot change the channel count"
            self.op = None

    def forward(self, x: Tensor) -> Tensor:
        return _avg_pool_2x2(x) if self.op is None else self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), optionally followed by a 3×3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = _upsample_nearest_2x(x)
        return x if self.conv is None else self.conv(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    The submodules are Sequentials only because the released keys index into them
    (``in_layers.0`` norm, ``in_layers.2`` conv, ``emb_layers.1``, ``out_layers.0``
    norm, ``out_layers.3`` conv); forward calls the pieces directly.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.dropout = dropout
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        # With resblock_updown the block itself resamples, between its norm and its conv
        # (and on the skip path): parameter-free, so no keys.
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        # Scale-shift norm (FiLM) needs a scale and a shift per channel, hence 2×.
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # a fresh block starts as the identity, as the original
        nn.init.zeros_(self.out_layers[3].bias)
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        in_norm, _, in_conv = self.in_layers
        h = F.silu(in_norm(x), inplace=True)  # in_norm returns a fresh tensor: in place is safe
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)

        emb_out = self.emb_layers(emb)[:, :, None, None]  # float32, N×C×1×1
        out_norm, out_conv = self.out_layers[0], self.out_layers[3]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm.modulated(h, scale, shift)
        else:
            h = out_norm(h + emb_out.to(h.dtype))
        h = F.silu(h, inplace=True)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        h = out_conv(h)
        return h.add_(self.skip_connection(x))  # h is the conv's fresh output


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    ``qkv`` and ``proj_out`` are 1×1 Conv1d in the released files (kept for the
    keys/shapes); forward applies them as linear maps on a tokens-last layout, which
    is the layout ``scaled_dot_product_attention`` wants, so no head needs a copy.

    The qkv channels are ordered per head [q|k|v] ("legacy", the released models)
    or [q heads|k heads|v heads] (``use_new_attention_order``).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False, norm=None):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise CfxError(f"num_head_channels={num_head_channels} does not divide the {channels} attention "
                               f"channels: use a divisor of num_channels (e.g. 64), or -1 to use num_heads")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise CfxError(f"num_heads={self.num_heads} does not divide the {channels} attention channels: "
                           f"use a divisor of num_channels")
        self.new_order = use_new_attention_order
        self.norm = (norm or GroupNorm32)(channels)  # norm: another GroupNorm class (DiffAE's min(32, C) groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # a fresh block starts as the identity, as the original
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        n, heads = height * width, self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # N×T×C (a view)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # N×T×3C, contiguous
        if self.new_order:
            qkv = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        else:
            qkv = qkv.view(b, n, heads, 3, c // heads).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each N×heads×T×ch, channels contiguous
        # Default scale 1/sqrt(ch): the original's q·(ch^-1/4) · k·(ch^-1/4).
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, n, c)  # heads back together, head-major as the original
        out = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)  # N×T×C
        return (x.flatten(2) + out.transpose(1, 2)).unflatten(2, (height, width))


def _numbers(value, name: str) -> tuple[float, ...]:
    """"1,1,2" / [1, 1, 2] / 16 -> a tuple of numbers; any other form is a flag error."""
    try:
        if isinstance(value, str):
            return tuple(float(v) for v in value.split(",") if v.strip())
        if isinstance(value, (int, float)):
            return (float(value),)
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        example = "1,1,2,2,4,4" if name == "channel_mult" else "32,16,8"
        raise CfxError(f"{name}={value!r} is not a comma-separated list of numbers: "
                       f"write it as guided-diffusion does, e.g. {name}=\"{example}\"") from None


def _channel_mult(channel_mult, image_size: int) -> tuple:
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise CfxError(f"channel_mult is empty and image_size={image_size} has no guided-diffusion default "
                           f"({sorted(DEFAULT_CHANNEL_MULT)}): set channel_mult, e.g. channel_mult=\"1,2,2,4\"")
        return DEFAULT_CHANNEL_MULT[image_size]
    return tuple(int(m) if m.is_integer() else m for m in _numbers(channel_mult, "channel_mult"))


class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel``, built from guided-diffusion's flags
    (``script_util.create_model``): e.g. for the CelebA-128 model of DiME::

        ADMUNet(image_size=128, num_channels=128, num_res_blocks=2, attention_resolutions="32,16,8",
                learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, use_fp16=True)

    ``forward(x, timesteps, y=None)`` returns N×3×H×W (ε), or N×6×H×W with
    ``learn_sigma`` (ε, then the variance interpolation value). ``timesteps`` are
    the original (not respaced) timesteps; ``y`` the class labels of a
    ``class_cond`` model.

    ``use_fp16`` is accepted (the released flag sets carry it) but does not switch
    precision by itself: ``dtype`` / :meth:`set_compute_dtype` does, so CPU runs stay
    float32 unless asked.
    """

    def __init__(self, image_size: int, num_channels: int, num_res_blocks: int, channel_mult="",
                 attention_resolutions="16", num_heads: int = 4, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, learn_sigma: bool = False, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = False, dropout: float = 0.0, class_cond: bool = False,
                 use_new_attention_order: bool = False, use_fp16: bool = False, in_channels: int = 3,
                 dtype=None, **ignored):
        super().__init__()
        unknown = sorted(set(ignored) - IGNORED_FLAGS)
        if unknown:
            raise CfxError(f"unknown ADM flag(s) {', '.join(unknown)}: ADMUNet takes guided-diffusion's "
                           f"model flags (image_size, num_channels, num_res_blocks, channel_mult, "
                           f"attention_resolutions, num_heads, num_head_channels, learn_sigma, ...); "
                           f"remove or rename them")
        image_size, model_channels = int(image_size), int(num_channels)
        self.image_size = image_size
        self.model_channels = model_channels
        self.in_channels = int(in_channels)
        self.out_channels = 6 if learn_sigma else 3
        self.channel_mult = mult = _channel_mult(channel_mult, image_size)
        # Resolutions (32,16,8) -> the downsample rates at which attention is used.
        resolutions = _numbers(attention_resolutions, "attention_resolutions")
        self.attention_ds = attn_ds = {image_size // int(r) for r in resolutions}
        self.num_classes = NUM_CLASSES if class_cond else None
        self.num_res_blocks = int(num_res_blocks)
        self.use_scale_shift_norm = bool(use_scale_shift_norm)
        self.resblock_updown = bool(resblock_updown)
        self.use_fp16 = bool(use_fp16)  # recorded for callers; see set_compute_dtype
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample

        emb_dim = 4 * model_channels

        def res(ch_in, ch_out=None, **updown):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **updown)

        def attn(ch, heads):
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)

        # Encoder: per level num_res_blocks ResBlocks (+ attention at the listed rates),
        # then a downsampling block except after the last level. Every block's output
        # is a skip for the decoder, so record its channel count.
        ch = input_ch = int(mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(self.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(m * model_channels))]
                ch = int(m * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        # Decoder: per level num_res_blocks + 1 ResBlocks, each eating one encoder skip,
        # then an upsampling block except at the top level.
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(m * model_channels))]
                ch = int(m * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)  # a fresh model predicts zeros, as the original
        nn.init.zeros_(self.out[2].bias)

        self.set_compute_dtype(dtype)

    # -- precision ---------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the trunk (input/middle/output blocks) computes in."""
        return self.input_blocks[0][0].weight.dtype

    def set_compute_dtype(self, dtype=None) -> "ADMUNet":
        """Run the trunk's convolutions and attention in ``dtype`` (``torch.bfloat16``,
        ``torch.float16``, or ``None``/float32 to undo), as guided-diffusion's
        ``convert_to_fp16``: only the trunk's conv weights are cast; group norms
        (computed in float32), the timestep/label embeddings and the ``out`` head stay
        float32, and ``forward`` takes and returns float32. Meant for GPUs. On a CPU
        bfloat16 works (faster only with AVX512-BF16/AMX) and float16 is very slow.

        The cast is in place and lossy: going back to float32 keeps the rounding (reload
        the checkpoint for exact float32 weights).
        """
        dtype = _parse_dtype(dtype) or torch.float32
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in blocks.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                    module.to(dtype)
        return self

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional (class_cond)")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        h = x.to(self.compute_dtype)
        if h.dtype == torch.float16 and h.device.type == "cpu":
            warnings.warn("ADMUNet computes in float16 on the CPU, which has no fast float16 convolutions "
                          "(tens of times slower): use bfloat16 or float32 there", stacklevel=2)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


# -- loading ---------------------------------------------------------------------------------------

def _read_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    """The tensors of a released checkpoint, float32; a pickle needing code is refused."""
    if not path.exists():
        raise CfxError(f"{key}={path} does not exist: download the released guided-diffusion (ADM) checkpoint "
                       f"(e.g. 256x256_diffusion_uncond.pt, or DiME's celeba-hq 128 model) and set {key}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # weights_only refuses (never runs) any pickle that would call code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CfxError(f"{key}={path} is not a plain tensor checkpoint ({type(e).__name__}); cfx never "
                       f"unpickles objects that need code: re-save the state_dict, or convert it to "
                       f"safetensors") from None
    for wrapper in ("state_dict", "model"):  # common containers around a state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CfxError(f"{key}={path} is not a state_dict (a dict of tensors): save model.state_dict()")
    # The released files are float16; compute (and keep master weights) in float32.
    return {k.removeprefix("module."): (v.float() if v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def infer_adm_flags(shapes: Mapping[str, Sequence[int]], image_size: int | None = None) -> dict:
    """The architecture flags a guided-diffusion UNet state dict was built with, read off
    its key names and shapes (``{key: shape}``; tensors work too).

    Everything but ``num_heads``/``num_head_channels`` (no trace in the weights) and
    ``image_size`` (the network is convolutional); ``attention_resolutions`` only when
    ``image_size`` is given. Raises KeyError/ValueError on a dict that is not such a UNet.
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    ch = shapes["time_embed.0.weight"][1]
    # The decoder shows the layout: per level num_res_blocks + 1 output blocks, and every
    # level but the top ends with an upsampling layer (an up-ResBlock or an Upsample conv)
    # after its ResBlock (and attention): a layer at index 1 or 2 that is not attention.
    n_out = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("output_blocks."))

    def layer_kinds(j):
        return {(k.split(".")[2], k.split(".")[3]) for k in shapes if k.startswith(f"output_blocks.{j}.")}

    ups = [j for j in range(n_out) if any(i != "0" and kind in ("in_layers", "conv") for i, kind in layer_kinds(j))]
    levels = len(ups) + 1
    if n_out % levels:
        raise ValueError(f"{n_out} output blocks do not split into {levels} levels")
    per_level = n_out // levels
    mult, attn_ds = [], set()
    for level in range(levels):  # decoder order is top level last
        first = (levels - 1 - level) * per_level
        width = shapes[f"output_blocks.{first}.0.out_layers.3.weight"][0]
        mult.append(int(width // ch) if width % ch == 0 else width / ch)
        if f"output_blocks.{first}.1.qkv.weight" in shapes:
            attn_ds.add(2 ** level)
    emb_out = shapes["output_blocks.0.0.emb_layers.1.weight"][0]
    flags = {
        "num_channels": ch,
        "num_res_blocks": per_level - 1,
        "channel_mult": _csv(mult),
        "learn_sigma": shapes["out.2.weight"][0] == 6,
        "class_cond": "label_emb.weight" in shapes,
        "use_scale_shift_norm": emb_out == 2 * shapes["output_blocks.0.0.out_layers.3.weight"][0],
        "in_channels": shapes["input_blocks.0.0.weight"][1],
    }
    if levels > 1:  # a plain Downsample is a conv named "op"; a down-ResBlock has no such key
        flags["resblock_updown"] = not any(k.endswith(".op.weight") for k in shapes)
    if image_size:
        flags["attention_resolutions"] = _csv(sorted((image_size // ds for ds in attn_ds), reverse=True))
    return flags


def _wrong_flags(shapes: dict[str, torch.Size], model: "ADMUNet") -> str:
    """``flag=value (not ...)`` for each flag the checkpoint contradicts."""
    try:
        found = infer_adm_flags(shapes, model.image_size)
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return "is it a guided-diffusion UNetModel state dict? its keys do not have that layout"
    ours = {
        "num_channels": model.model_channels, "num_res_blocks": model.num_res_blocks,
        "channel_mult": _csv(model.channel_mult), "learn_sigma": model.out_channels == 6,
        "class_cond": model.num_classes is not None, "use_scale_shift_norm": model.use_scale_shift_norm,
        "in_channels": model.in_channels, "resblock_updown": model.resblock_updown,
        "attention_resolutions": _csv(sorted((model.image_size // ds for ds in model.attention_ds), reverse=True)),
    }
    wrong = [f"{k}={v!r} (not {ours[k]!r})" if isinstance(v, str) else f"{k}={v} (not {ours[k]})"
             for k, v in found.items() if ours[k] != v]
    wrong = [w + f" at image_size={model.image_size}" if w.startswith("attention_") else w for w in wrong]
    if not wrong:
        return "the flags look right: was the file saved from another UNet variant?"
    return "the checkpoint was built with " + ", ".join(wrong) + ": set those flags"


def _check_keys(state: dict[str, Tensor], model: ADMUNet, path: Path, key: str) -> None:
    got = {k: v.shape for k, v in state.items()}
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    misshaped = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or misshaped):
        return
    examples = ([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
                + [f"{k} is {list(got[k])} in the file, {list(want[k])} in the model" for k in misshaped[:2]])
    raise CfxError(
        f"{key}={path} does not fit the ADM flags: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(misshaped)} mis-shaped keys (e.g. {'; '.join(examples[:2])}); {_wrong_flags(got, model)}")


def load_adm_unet(path: str | Path, key: str = "diffusion.path", **flags) -> ADMUNet:
    """An :class:`ADMUNet` built from guided-diffusion ``flags`` with the weights of a
    released checkpoint (plain state dict ``.pt``, or ``.safetensors``), loaded
    strictly, float32, in eval mode without gradients, on the CPU.

    ``key`` is the config key that named the file, so errors say what to fix. Pass
    ``dtype=`` (a flag of ADMUNet) to compute in low precision after loading.
    """
    path = Path(path)
    state = _read_state_dict(path, key)
    dtype = flags.pop("dtype", None)
    # Build without memory or random init (552 M parameters for ImageNet-256), then adopt
    # the loaded tensors as the parameters.
    with torch.device("meta"):
        model = ADMUNet(**flags)
    _check_keys(state, model, path, key)
    model.load_state_dict(state, strict=True, assign=True)
    return model.set_compute_dtype(dtype).eval().requires_grad_(False)
