"""The project's own small networks for the synthetic benchmark, and their zoo format.

A zoo model is a folder with ``model.safetensors`` and ``config.json`` (the
architecture's name and arguments, plus how it was trained and measured), so
loading never unpickles anything.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cfx_cli.errors import CfxError


class SmallCNN(nn.Module):
    """Four conv stages and global average pooling; [-1, 1] images in, ``num_outputs`` values out."""

    def __init__(self, num_outputs: int, width: int = 32, in_channels: int = 3):
        super().__init__()
        w = width

        def stage(cin, cout, pool=True):
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.SiLU()]
            return layers + ([nn.MaxPool2d(2, ceil_mode=True)] if pool else [])

        self.features = nn.Sequential(*stage(in_channels, w), *stage(w, 2 * w), *stage(2 * w, 4 * w),
                                      *stage(4 * w, 4 * w, pool=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FactorOracle(nn.Module):
    """Predicts every factor of a synthetic image: one head per discrete factor, one for the continuous ones.

    ``forward`` returns a dict: logits for each discrete factor and ``continuous``
    (N×3: size, pos_x, pos_y, each normalised to [0, 1]).
    """

    def __init__(self, discrete: dict[str, int], width: int = 32):
        super().__init__()
        self.discrete = dict(discrete)
        self.trunk = SmallCNN(1, width).features
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, n) for k, n in self.discrete.items()})
        self.continuous = nn.Linear(4 * width, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        out = {k: head(h) for k, head in self.heads.items()}
        out["continuous"] = self.continuous(h)
        return out


def _torchvision(arch: str):
    """torchvision's ``arch`` with ``num_outputs`` outputs (config.json's kwargs), for cfx-trained zoo folders."""
    def build(num_outputs: int) -> nn.Module:
        from cfx_cli.models.architectures import torchvision_model

        return torchvision_model(arch, num_outputs, key="trainable.arch")
    return build


# Classifier architectures a zoo folder may name (cfx train classifier trainable.arch=...), and the oracle.
CLASSIFIERS = ("small_cnn", "resnet18", "resnet34", "resnet50", "densenet121")
ARCHITECTURES = {"small_cnn": SmallCNN, "factor_oracle": FactorOracle,
                 **{a: _torchvision(a) for a in CLASSIFIERS[1:]}}


def save_zoo_model(model: nn.Module, folder: str | Path, arch: str, kwargs: dict, **info) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"arch": arch, "kwargs": kwargs, **info}, indent=1))
    return folder


def load_zoo_model(folder: str | Path, key: str = "model.path") -> tuple[nn.Module, dict]:
    """Build the architecture named in ``config.json`` and load its safetensors weights."""
    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise CfxError(f"{key}={folder} is not a cfx zoo model (needs config.json and model.safetensors); "
                       f"shipped ones live in cfx_cli/zoo/, `cfx train <model>` makes new ones")
    try:
        info = json.loads(cfg_file.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CfxError(f"{key}={folder}: {cfg_file.name} is not valid JSON ({e}); restore it, or re-make the "
                       f"model with `cfx train`") from None
    if info.get("arch") not in ARCHITECTURES:
        raise CfxError(f"{key}={folder}: arch={info.get('arch')!r} is unknown; known: {sorted(ARCHITECTURES)}")
    try:
        model = ARCHITECTURES[info["arch"]](**info.get("kwargs", {}))
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # noqa: BLE001 - a truncated file, other shapes, bad kwargs: name the file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CfxError(f"{key}={folder}: cannot load {weights.name} into its {info['arch']} ({first}); the file is "
                       f"damaged or belongs to another config.json") from None
    return model.eval().requires_grad_(False), info


def zoo_oracle(path: str, key: str = "metrics.oracle.path") -> FactorOracle:
    model, info = load_zoo_model(path, key=key)
    if not isinstance(model, FactorOracle):
        raise CfxError(f"{key}={path} is a {info.get('arch')}, not a factor oracle")
    return model
