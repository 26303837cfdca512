"""DiME's perceptual term: MSE between VGG19 ``features[:18]`` activations.

The layer list reproduces torchvision's ``vgg19().features`` indices, so its
state dict (``features.N.weight``) loads unchanged from a safetensors or
weights-only torch file; no torchvision import and no download.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError
from cfx_cli.models.checkpoints import load_state_dict

_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19_features(upto: int = 18) -> nn.Sequential:
    layers, cin = [], 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers[:upto])


class VGGPerceptual(nn.Module):
    def __init__(self, weights: str | None, upto: int = 18, key: str = "method.perceptual_weights"):
        super().__init__()
        if not weights:
            raise CfxError(f"{key} is null but the perceptual weight is > 0: set {key}=<vgg19 state dict "
                           f"(.safetensors or .pth, torchvision layout)> or set method.lambda_perc=0")
        self.features = vgg19_features(upto)
        state = load_state_dict(weights, key=key, source="torchvision's vgg19 ImageNet weights")
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing = self.features.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise CfxError(f"{key}={weights} lacks VGG19 feature weights {missing[:3]}...: use torchvision's vgg19 state dict")
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample mean squared feature difference; images in [-1, 1], clamped to it first as DiME's
        ``Normalizer`` does (core/sample_utils.py; a pixel outside the range passes no gradient)."""
        fx = self.features(((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std)
        fy = self.features(((y.clamp(-1, 1) + 1) / 2 - self.mean) / self.std)
        return (fx - fy).pow(2).flatten(1).mean(1)


def perceptual_loss(weight: float, weights_path: str | None, key: str = "method.perceptual_weights"):
    """DiME's VGG term when its weight is positive (its weights from a path), else None."""
    return VGGPerceptual(weights_path, key=key) if weight > 0 else None
