"""Explained models: a network plus its own preprocessing and its task.

Every explained model takes images in [-1, 1] at the generative model's
resolution and returns logits (N×K, classification) or values (N, regression);
resizing and normalisation live here, so methods never normalise anything.
Both are torchvision's tensor functions (differentiable: the methods' gradients flow through them);
torchvision is imported on the first forward, not with this module, which every command imports.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cfx_cli.errors import CfxError

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
TASKS = ("classification", "regression")
# How a classifier's outputs are read: ``softmax`` — K mutually exclusive classes (argmax);
# ``sigmoid`` — K independent binary attributes (CelebA's 40), one chosen by the objective's query.
HEADS = ("softmax", "sigmoid")


class ExplainedModel(nn.Module):
    def __init__(self, net: nn.Module, task: str, input_size: int | None = None, normalize: str = "none",
                 num_classes: int | None = None, info: dict | None = None, head: str = "softmax"):
        super().__init__()
        if task not in TASKS:
            raise CfxError(f"task={task!r} is unknown; use one of {list(TASKS)}")
        if head not in HEADS:
            raise CfxError(f"head={head!r} is unknown; use softmax (exclusive classes) or sigmoid (binary attributes)")
        if normalize not in ("none", "zero_one", "imagenet"):
            raise CfxError(f"normalize={normalize!r} is unknown; use none, zero_one or imagenet")
        self.net = net.eval().requires_grad_(False)
        self.task = task
        self.head = head
        self.input_size = input_size
        self.normalize = normalize
        self.num_classes = num_classes
        self.info = info or {}

    def forward(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        if self.input_size and x.shape[-1] != self.input_size:
            # bilinear, antialiased when shrinking only (e.g. 256 -> 224): the antialiased kernel upsamples one
            # float32 ulp off the plain bilinear that cfx's zoo models were trained and checked with
            x = tvf.resize(x, [self.input_size] * 2, interpolation=InterpolationMode.BILINEAR,
                           antialias=x.shape[-1] > self.input_size)
        if self.normalize == "zero_one":
            x = (x + 1) / 2
        elif self.normalize == "imagenet":
            x = tvf.normalize((x + 1) / 2, list(_IMAGENET_MEAN), list(_IMAGENET_STD))
        out = self.net(x)
        return out.squeeze(-1) if self.task == "regression" else out


def zoo_model(path: str, task: str, key: str = "classifier.path") -> ExplainedModel:
    """A cfx zoo model (safetensors + config.json) as an explained model."""
    from cfx_cli.models.small_cnn import CLASSIFIERS, load_zoo_model

    net, info = load_zoo_model(path, key=key)
    if info.get("arch") not in CLASSIFIERS:  # e.g. the factor oracle: its outputs are a dict of factors
        raise CfxError(f"{key}={path} is a {info.get('arch')} (made by `{info.get('command', 'cfx train')}`), not a "
                       f"{task} model: point {key} to a classifier or regressor")
    if info.get("task") not in (None, task):
        raise CfxError(f"{key}={path} is a {info['task']} model, not a {task} one: use it as "
                       f"{'regressor' if info['task'] == 'regression' else 'classifier'}=... instead")
    num = info["kwargs"].get("num_outputs")
    return ExplainedModel(net, task, input_size=info.get("input_size"), num_classes=num if task == "classification"
                          else None, info=info)


def wrap_module(module: nn.Module, task: str, weights: str | None = None, input_size: int | None = None,
                normalize: str = "none", key: str = "classifier.weights") -> ExplainedModel:
    """Any ``nn.Module`` built by ``_target_``, with optional weights from a safetensors or state-dict file."""
    if weights:
        from cfx_cli.models.checkpoints import load_state_dict

        module.load_state_dict(load_state_dict(weights, key=key))
    return ExplainedModel(module, task, input_size=input_size, normalize=normalize)
