"""The classification architectures cfx builds: torchvision's, by name, with no weights (they come from a
local file). Its own module because the zoo's builder (small_cnn), the released-format loaders
(classifiers) and the metric networks (metrics/identity) all need it and sit on different floors."""
from __future__ import annotations

from torch import nn

from cfx_cli.errors import CfxError


def torchvision_model(arch: str, num_classes: int = 1000, key: str = "classifier.arch") -> nn.Module:
    """``torchvision.models.<arch>(weights=None, num_classes=...)``: the architecture, randomly initialised
    (the weights come from a local file; nothing is downloaded). torchvision is imported here, not at the
    top, so that commands which build no torchvision network do not pay its import time."""
    from torchvision import models

    if arch not in models.list_models(module=models):  # the classification architectures only
        raise CfxError(f"{key}={arch!r} is not a torchvision classification architecture (e.g. resnet50, "
                       f"densenet121, vit_b_16): see torchvision.models.list_models(module=torchvision.models)")
    return models.get_model(arch, weights=None, num_classes=int(num_classes))
