"""DiME's perceptual term: MSE between VGG19 ``features[:18]`` activations.

The network is torchvision's ``vgg19(weights=None).features[:18]`` (so a torchvision state dict,
``features.N.weight``, loads unchanged from a safetensors or weights-only torch file; nothing is
downloaded), and the input normalisation torchvision's ``Normalize`` with ImageNet's mean and std.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.models.checkpoints import load_state_dict

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def vgg19_features(upto: int = 18, device: str | torch.device | None = None) -> nn.Sequential:
    """torchvision's ``vgg19(weights=None).features[:upto]`` (its layer indices and names), built on ``device``
    (``"meta"``: shapes only, nothing initialised; the loader fills it from a file)."""
    from torchvision.models import vgg19

    with torch.device(device or "cpu"):
        return vgg19(weights=None).features[:upto]


def clamp_passing_bounds(x: Tensor) -> Tensor:
    """``x.clamp(-1, 1)`` whose gradient passes at x = ±1 and is 0 outside, on every torch version.

    DiME's ``Normalizer`` clamps, and the papers' runs (and the parity fixtures, torch 2.13) had a clamp whose
    backward kept the bounds (``min <= x <= max``); torch 2.14's clamp passes no gradient at x = ±1. DiME's
    clean estimate sits exactly at ±1 wherever ``clip_denoised`` clipped it (over a thousand pixels per
    image in the parity runs), so the newer clamp changes the counterfactuals."""
    inside = (x >= -1) & (x <= 1)
    return torch.where(inside, x, x.detach().clamp(-1, 1))


class VGGPerceptual(nn.Module):
    def __init__(self, weights: str | None, upto: int = 18, key: str = "method.perceptual_weights"):
        super().__init__()
        if not weights:
            raise CfxError(f"{key} is null but the perceptual weight is > 0: set {key}=<vgg19 state dict "
                           f"(.safetensors or .pth, torchvision layout)> or set method.lambda_perc=0")
        # Built on the meta device (VGG19's 139M-parameter classifier is never initialised), then given the
        # file's tensors.
        self.features = vgg19_features(upto, device="meta")
        state = load_state_dict(weights, key=key, source="torchvision's vgg19 ImageNet weights")
        state = {k[len("features."):]: v.float() for k, v in state.items() if k.startswith("features.")}
        want = self.features.state_dict()
        missing = [k for k in want if k not in state]
        if missing:
            raise CfxError(f"{key}={weights} lacks VGG19 feature weights {missing[:3]}...: use torchvision's vgg19 state dict")
        bad = next((k for k in want if tuple(state[k].shape) != tuple(want[k].shape)), None)
        if bad:
            raise CfxError(f"{key}={weights}: features.{bad} has shape {list(state[bad].shape)}, expected "
                           f"{list(want[bad].shape)}: use torchvision's vgg19 state dict")
        self.features.load_state_dict({k: state[k] for k in want}, assign=True)
        self.requires_grad_(False).eval()

    def _features(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        return self.features(TF.normalize((clamp_passing_bounds(x) + 1) / 2, IMAGENET_MEAN, IMAGENET_STD))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample mean squared feature difference; images in [-1, 1], clamped to it first as DiME's
        ``Normalizer`` does (core/sample_utils.py; a pixel outside the range passes no gradient)."""
        return (self._features(x) - self._features(y)).pow(2).flatten(1).mean(1)


def perceptual_loss(weight: float, weights_path: str | None, key: str = "method.perceptual_weights"):
    """DiME's VGG term when its weight is positive (its weights from a path), else None."""
    return VGGPerceptual(weights_path, key=key) if weight > 0 else None
