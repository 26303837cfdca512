"""The explained models (classifiers) that the counterfactual papers released, loaded offline.

Every loader reads its file with ``load_state_dict`` (safetensors, or ``torch.load(weights_only=True)``:
a pickle that needs code is refused, never executed), finds the released layout's keys in it (nested
``{'feat_extract': ..., 'classifier': ...}`` dicts, ``state_dict``/``model``/``model_state_dict``
containers, ``module.`` or ``module.model.`` prefixes), checks names and shapes strictly, and returns an
:class:`~cfx_cli.models.explained.ExplainedModel` that takes images in [-1, 1] and applies the model's
own preprocessing, as the authors' code does:

``celeba_densenet``  DiVE / DiME / ACE / FastDiME CelebA classifier: torchvision DenseNet-121 features
                     + ReLU + global average pool + Linear(1024, 40); fed the [-1, 1] 128×128 image as is
                     (DiME main.py calls it on the dataset tensor, Normalize(0.5, 0.5)); 40 attribute logits.
``dime_oracle``      DiVE / DiME / ACE CelebA oracle for MNAC and CD: VGGFace2 ResNet-50-128 (Caffe layout)
                     + Linear(128, 40); its preprocessing lives in its forward ((x+1)/2, RGB→BGR, minus
                     [131.0912, 103.8827, 91.4953]/255 in that channel order, bicubic resize to 224).
``torchvision_classifier``  any torchvision-layout state dict (DVCE's Madry+FT ResNet-50 with logits / T,
                     the Madry-lab robustness ResNet-50 under ``model`` with ``module.model.``, plain files).

The architectures are torchvision's own (``torchvision.models.<arch>(weights=None)``: nothing is ever
downloaded); cfx keeps only the readers of the released file layouts and the networks torchvision does not
have (the Caffe-layout VGGFace2 ResNet-50-128 of the oracle).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfx_cli.data.celeba import ATTRIBUTE_NAMES
from cfx_cli.errors import CfxError
from cfx_cli.models.architectures import torchvision_model
from cfx_cli.models.checkpoints import load_state_dict
from cfx_cli.models.explained import ExplainedModel

__all__ = ["celeba_densenet", "dime_oracle", "torchvision_classifier", "timm_classifier", "dcfir_regressor",
           "torchvision_model", "DimeOracleNet",
           "Resnet50_128", "read_layout", "CELEBA_ATTRIBUTES"]

# The 40 CelebA attributes in list_attr_celeba.txt order (the classifier's and the oracle's outputs).
CELEBA_ATTRIBUTES = ATTRIBUTE_NAMES

# Containers that wrap a state dict in training checkpoints (load_state_dict already opens 'state_dict'
# and 'model'); STEEX's checkpoint.tar keeps its weights under 'model_state_dict'.
_CONTAINERS = ("model_state_dict", "state_dict", "model")
# Pre-0.4 torchvision DenseNet names ('denselayer1.norm.1.weight' for 'denselayer1.norm1.weight').
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                           r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


# ------------------------------------------------------------------------------- torchvision networks
# ------------------------------------------------------------------------------------ reading layouts
def _flatten(obj, prefix: str = "", out: dict | None = None) -> dict[str, Tensor]:
    """Nested dicts of tensors as one dict with dotted keys; non-tensor leaves (epoch, loss, ...) dropped."""
    out = {} if out is None else out
    if isinstance(obj, Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out)
    return out


def _open(path, key: str, source: str) -> dict[str, Tensor]:
    state = load_state_dict(path, key=key, source=source)
    for name in _CONTAINERS:
        if isinstance(state, Mapping) and isinstance(state.get(name), Mapping):
            state = state[name]
    flat = _flatten(state)
    if not flat:
        raise CfxError(f"{key}={path} holds no tensors (a {type(state).__name__}): it is not a weight file")
    return {(_OLD_DENSENET.sub(r"\1\2", k)): v for k, v in flat.items()}


def _find_prefix(flat: Mapping[str, Tensor], expected: set[str]) -> str:
    """The prefix p under which most expected keys sit (p + key in the file); the shortest on a tie."""
    counts: dict[str, int] = {}
    for k in flat:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in expected:
                p = ".".join(parts[:i]) + "." if i else ""
                counts[p] = counts.get(p, 0) + 1
    if not counts:
        return ""
    return min(counts, key=lambda p: (-counts[p], len(p), p))


def check_layout(state: Mapping[str, Tensor], want: Mapping[str, Tensor], unexpected, what: str, fix: str = "") -> None:
    """One CfxError line (``what``: the key, the file and its expected format; ``fix`` after it) unless
    ``state`` has every key of ``want`` (BN counters optional) with its shape and no ``unexpected`` key."""
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        first = "; ".join(s for s in (
            f"{len(missing)} keys missing (first: {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "") if s)
        raise CfxError(f"{what}: {first}{fix}")
    for k, v in state.items():
        if k in want and tuple(v.shape) != tuple(want[k].shape):
            raise CfxError(f"{what}: {k} has shape {list(v.shape)}, expected {list(want[k].shape)}{fix}")


def read_layout(path, net: nn.Module, fmt: str, key: str = "classifier.path", source: str = "",
                groups: tuple[str, ...] = ("",)) -> dict[str, Tensor]:
    """The state dict for ``net`` found in the file at ``path``, as float32, or one clear CfxError.

    ``groups`` splits ``net``'s keys by leading name (e.g. ``("features.", "classifier.")``); each group's
    keys may sit under their own prefix in the file (DiVE's ``feat_extract.feat_extract.features.*`` next
    to ``classifier.*``). Keys under a chosen prefix that ``net`` lacks are unexpected; keys elsewhere
    (an optimizer, the Madry attacker's alias copy) are ignored. ``num_batches_tracked`` may be absent.
    """
    flat = _open(path, key, source)
    want = net.state_dict()
    state, prefixes, consumed = {}, [], set()
    for g in groups:
        expected = {k for k in want if k.startswith(g)}
        p = _find_prefix(flat, expected)
        prefixes.append(p)
        for k, v in flat.items():
            if k.startswith(p) and k[len(p):] in expected:
                state[k[len(p):]] = v
                consumed.add(k)
    unexpected = sorted(k for k in flat if any(k.startswith(p) for p in prefixes) and k not in consumed)
    check_layout(state, want, unexpected, f"{key}={path} does not match the expected format, {fmt}")
    for k, v in want.items():  # absent BN counters keep the module's own
        state.setdefault(k, v)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def _load(net: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    net.load_state_dict(state, strict=True)
    return net.eval()


class _Scaled(nn.Module):
    """Logits divided by a temperature (DVCE's calibrated Madry+FT: T = 0.7155761122703552)."""

    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) / self.temperature


class _Resized(nn.Module):
    """torchvision's tensor transforms in front of a classifier: ``bicubic`` = ``Resize(size,
    interpolation=BICUBIC)`` without antialiasing, as torchvision 0.10 resized tensors (DVCE, 256 -> 224);
    ``center_crop`` = ``CenterCrop(size)`` (LDCE's ImageNet classifier input, 256 -> 224). Both differentiable."""

    def __init__(self, net: nn.Module, size: int, mode: str):
        super().__init__()
        self.net, self.size, self.mode = net, int(size), mode

    def forward(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        if x.shape[-2:] != (self.size, self.size):
            if self.mode == "center_crop":
                x = TF.center_crop(x, [self.size])
            else:
                x = TF.resize(x, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
        return self.net(x)


# ------------------------------------------------------------------------ DiVE/DiME CelebA classifier
def celeba_densenet(path: str, key: str = "classifier.path", name: str | None = None, num_classes: int = 40,
                    input_size: int = 128, output_attributes: list[int] | None = None) -> ExplainedModel:
    """DiVE's CelebA DenseNet-121 as DiME, ACE and FastDiME use it (``classifier.pth``).

    File: ``torch.save({'feat_extract': DenseNet121().state_dict(), 'classifier': Linear(1024, 40)
    .state_dict()})``, where DenseNet121 wraps a torchvision densenet121 whose classifier is Identity —
    so the weights read ``feat_extract.feat_extract.features.*`` and ``classifier.{weight,bias}``. A flat
    torchvision densenet121(num_classes=40) state dict or a safetensors conversion loads too, and so does
    STEEX's DecisionDensenetModel (``checkpoint.tar``, under ``model_state_dict``) with num_classes=3,
    input_size=256. The image goes in as [-1, 1] (no ImageNet normalisation); outputs are the
    ``num_classes`` attribute logits (sigmoid head; the objective picks the query attribute).
    ``output_attributes``: the CelebA attribute index of each output when there are fewer than 40
    (STEEX: [20, 31, 39] = Male, Smiling, Young), so dataset.query=smile picks output 1.
    """
    if output_attributes is not None and len(output_attributes) != num_classes:
        raise CfxError(f"classifier.output_attributes has {len(output_attributes)} entries for {num_classes} "
                       f"outputs: give one CelebA attribute index per output")
    net = torchvision_model("densenet121", num_classes)
    fmt = (f"DiVE/DiME CelebA DenseNet-121 {{'feat_extract': densenet121 features, 'classifier': "
           f"Linear(1024, {num_classes})}}")
    _load(net, read_layout(path, net, fmt, key=key, groups=("features.", "classifier."),
                           source="DiME's classifier.pth, huggingface.co/guillaumejs2403/DiME"))
    info = {"name": name, "format": "dive_densenet121", "arch": "densenet121", "input_size": input_size,
            "attributes": list(CELEBA_ATTRIBUTES) if num_classes == 40 else None,
            "output_attributes": None if output_attributes is None else [int(a) for a in output_attributes]}
    return ExplainedModel(net, "classification", input_size=input_size, normalize="none",
                          num_classes=num_classes, info=info, head="sigmoid")


class _MeanStd(nn.Module):
    """[-1, 1] → a [0, 1] image, then torchvision's ``Normalize(mean, std)``: the regression paper's
    ``Normalizer`` (μ, σ from its checkpoint), timm's pretrained_cfg mean/std."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.mean = [float(m) for m in torch.as_tensor(mean).reshape(-1)]
        self.std = [float(s) for s in torch.as_tensor(std).reshape(-1)]

    def forward(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        return self.net(TF.normalize((x + 1) / 2, self.mean, self.std))


def dcfir_regressor(path: str, arch: str = "densenet121", key: str = "regressor.path", name: str | None = None,
                    input_size: int | None = None) -> ExplainedModel:
    """The regression paper's regressors (Ha & Bender 2025), Lightning checkpoints (``last.ckpt``):

    - ``densenet121``: the CelebA-HQ age regressor (and its oracle) — STEEX's DenseNet-121 features with a
      Linear(1024, 1) head, trained on imdb-clean ages / 100: ``model.classifier.0.feat_extract.features.*``,
      ``model.classifier.1.*`` and its Normalizer's ``model.mu`` / ``model.sigma`` (0.5: [0, 1] → [-1, 1]);
      256×256 input;
    - ``resnet18_small``: the 64×64 squares regressor — torchvision ResNet-18 with conv1 = Conv2d(3, 64, 4, 1, 2),
      fc = Linear(512, 1), ``model.*``, on [0, 1] images (no normalisation).
    """
    flat = _open(path, key, "the regression paper's release (regressors/.../last.ckpt)")
    if arch == "densenet121":
        net = torchvision_model("densenet121", 1, key="regressor.arch")
        rename = {"model.classifier.0.feat_extract.features.": "features.", "model.classifier.1.": "classifier."}
        input_size = input_size or 256
    elif arch == "resnet18_small":
        net = torchvision_model("resnet18", 1, key="regressor.arch")
        net.conv1 = nn.Conv2d(3, 64, kernel_size=4, stride=1, padding=2, bias=False)
        rename = {"model.": ""}
        input_size = input_size or 64
    else:
        raise CfxError(f"regressor.arch={arch!r} is unknown; use densenet121 (CelebA-HQ age) or resnet18_small (squares)")
    state = {}
    for k, v in flat.items():
        for old, new in rename.items():
            if k.startswith(old) and k not in ("model.mu", "model.sigma"):
                state[new + k[len(old):]] = v
                break
    want = net.state_dict()
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise CfxError(f"{key}={path} is not the regression paper's {arch} regressor: "
                       + "; ".join(s for s in (f"{len(missing)} keys missing (first: {missing[0]})" if missing else "",
                                               f"{len(unexpected)} unexpected (first: {unexpected[0]})"
                                               if unexpected else "") if s))
    bad = next((k for k in state if tuple(state[k].shape) != tuple(want[k].shape)), None)
    if bad:
        raise CfxError(f"{key}={path}: {bad} has shape {list(state[bad].shape)}, expected {list(want[bad].shape)} "
                       f"(regressor.arch={arch})")
    for k, v in want.items():
        state.setdefault(k, v)
    _load(net, {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    mu = flat.get("model.mu", torch.zeros(3)) if arch == "densenet121" else torch.zeros(3)
    sigma = flat.get("model.sigma", torch.ones(3)) if arch == "densenet121" else torch.ones(3)
    info = {"name": name, "format": f"dcfir_{arch}", "arch": arch, "input_size": input_size}
    return ExplainedModel(_MeanStd(net, mu, sigma).eval(), "regression", input_size=input_size,
                          normalize="none", info=info)


# ---------------------------------------------------------------------------------- DiME CelebA oracle
# (stage, number of bottleneck units, reduce width, output width, stride of the stage's first unit)
_CAFFE_STAGES = ((2, 3, 64, 256, 1), (3, 4, 128, 512, 2), (4, 6, 256, 1024, 2), (5, 3, 512, 2048, 2))
# Subtracted after RGB->BGR in the public code: VGGFace2's RGB mean listed in BGR channel order (a quirk
# of BTE/DiVE's oracle that the fine-tuned weights were trained with; kept for faithful MNAC/CD).
_ORACLE_MEAN = (131.0912, 103.8827, 91.4953)


class Resnet50_128(nn.Module):
    """VGGFace2 ResNet-50-128 (Caffe conversion): ``conv{s}_{u}_1x1_reduce`` carries the stride, max-pool
    3/2 with ceil_mode, 7×7 average pool and a 1×1 conv to a 128-d embedding (``feat_extract``).

    Takes [-1, 1] RGB at any size and does its own preprocessing, as DiVE/DiME's forward does.
    """

    def __init__(self):
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(64)
        self.pool1_3x3_s2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        self.units: list[tuple[str, bool]] = []
        cin = 64
        for s, n, mid, cout, stride in _CAFFE_STAGES:
            for u in range(1, n + 1):
                name, first = f"conv{s}_{u}", u == 1
                st = stride if first else 1
                self._conv_bn(f"{name}_1x1_reduce", cin, mid, 1, st)
                self._conv_bn(f"{name}_3x3", mid, mid, 3, 1)
                self._conv_bn(f"{name}_1x1_increase", mid, cout, 1, 1)
                if first:
                    self._conv_bn(f"{name}_1x1_proj", cin, cout, 1, st)
                self.units.append((name, first))
                cin = cout
        self.pool5_7x7_s1 = nn.AvgPool2d(kernel_size=7, stride=1, padding=0)
        self.feat_extract = nn.Conv2d(2048, 128, kernel_size=1, stride=1, bias=False)
        self.output_size = 128
        self.register_buffer("mean", torch.tensor(_ORACLE_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)

    def _conv_bn(self, name: str, cin: int, cout: int, k: int, stride: int) -> None:
        self.add_module(name, nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout))

    def _cb(self, name: str, x: Tensor) -> Tensor:
        return getattr(self, f"{name}_bn")(getattr(self, name)(x))

    def preprocess(self, x: Tensor) -> Tensor:
        x = (x + 1) / 2
        x = x[:, [2, 1, 0]] - self.mean
        return F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        x = self.pool1_3x3_s2(F.relu(self._cb("conv1_7x7_s2", x)))
        for name, first in self.units:
            h = F.relu(self._cb(f"{name}_1x1_reduce", x))
            h = F.relu(self._cb(f"{name}_3x3", h))
            h = self._cb(f"{name}_1x1_increase", h)
            x = F.relu(h + (self._cb(f"{name}_1x1_proj", x) if first else x))
        return torch.flatten(self.feat_extract(self.pool5_7x7_s1(x)), 1)


class DimeOracleNet(nn.Module):
    """``feat_extract`` (ResNet-50-128) + ``classifier`` Linear(128, 40): 40 attribute logits."""

    def __init__(self, num_classes: int = 40):
        super().__init__()
        self.feat_extract = Resnet50_128()
        self.classifier = nn.Linear(128, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """The 128-d face embedding (DiME's oracle-based FVA uses its cosine similarity)."""
        return self.feat_extract(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.feat_extract(x))


def dime_oracle(path: str, key: str = "metrics.oracle.path", name: str | None = None) -> ExplainedModel:
    """DiME/ACE's CelebA oracle (``oracle.pth``): ``{'feat_extract': Resnet50_128, 'classifier':
    Linear(128, 40)}``, VGGFace2-pretrained and fine-tuned on CelebA (DiVE). Takes [-1, 1] images at any
    size (the network resizes to 224 itself); 40 attribute logits, sigmoid head. ``net.embed(x)`` gives
    the 128-d embedding."""
    net = DimeOracleNet()
    fmt = "DiME CelebA oracle {'feat_extract': VGGFace2 Resnet50_128, 'classifier': Linear(128, 40)}"
    _load(net, read_layout(path, net, fmt, key=key, groups=("feat_extract.", "classifier."),
                           source="DiME's oracle.pth, huggingface.co/guillaumejs2403/DiME"))
    info = {"name": name, "format": "dime_oracle", "arch": "vggface2_resnet50_128", "input_size": 224,
            "attributes": list(CELEBA_ATTRIBUTES)}
    return ExplainedModel(net, "classification", input_size=None, normalize="none", num_classes=40, info=info,
                          head="sigmoid")


# ------------------------------------------------------------------------ torchvision state dicts
def torchvision_classifier(arch: str, path: str, num_classes: int = 1000, normalize: str = "imagenet",
                           input_size: int | None = 224, temperature: float | None = None,
                           head: str = "softmax", key: str = "classifier.path", name: str | None = None,
                           task: str = "classification", interpolation: str = "bilinear") -> ExplainedModel:
    """A torchvision ``arch`` with weights from a local file: a plain state dict, or one under
    ``state_dict`` / ``model`` / ``model_state_dict``, with any ``module.`` (DataParallel) or
    ``module.model.`` (Madry-lab robustness AttackerModel) prefix.

    ``normalize``: ``imagenet`` maps [-1, 1] to torchvision's mean/std input; ``zero_one`` to [0, 1];
    ``none`` passes [-1, 1]. ``input_size``: resize first — ``bilinear`` (ExplainedModel's: antialiased
    when shrinking), ``bicubic`` (no antialiasing: DVCE's 256→224 torchvision-0.10 tensor Resize) or
    ``center_crop`` (no resize: the central input_size square, LDCE's ImageNet classifier input).
    ``temperature``: logits / T.
    """
    if interpolation not in ("bilinear", "bicubic", "center_crop"):
        raise CfxError(f"classifier.interpolation={interpolation!r} is unknown; use bilinear, bicubic or center_crop")
    if temperature is not None and not float(temperature) > 0:
        raise CfxError(f"classifier.temperature={temperature} must be a positive number (or null)")
    net = torchvision_model(arch, num_classes, key=key.rsplit(".", 1)[0] + ".arch")
    fmt = f"a torchvision {arch} state dict with {num_classes} outputs"
    _load(net, read_layout(path, net, fmt, key=key))
    out: nn.Module = net if temperature is None else _Scaled(net, temperature)
    size = input_size
    if input_size and interpolation != "bilinear":
        out, size = _Resized(out, input_size, interpolation), None
    info = {"name": name, "format": "torchvision", "arch": arch, "input_size": input_size,
            "temperature": temperature, "interpolation": interpolation}
    return ExplainedModel(out, task, input_size=size, normalize=normalize,
                          num_classes=num_classes if task == "classification" else None, info=info, head=head)


def timm_classifier(arch: str, path: str, num_classes: int = 1000, normalize: str = "timm",
                    input_size: int | None = None, head: str = "softmax", key: str = "classifier.path",
                    name: str | None = None, task: str = "classification") -> ExplainedModel:
    """Any timm architecture (``timm.create_model(arch, num_classes=...)``, no download) with weights from a
    local file (safetensors, or a torch state dict read weights-only; ``module.`` prefixes are fine).
    ``normalize``: ``timm`` uses the architecture's own mean/std (its pretrained_cfg), or imagenet |
    zero_one | none as for torchvision models. ``input_size``: resize first (null: the images as they are)."""
    try:
        import timm
    except ImportError:
        raise CfxError(f"classifier=timm needs timm: pip install timm (classifier.arch={arch})") from None
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=int(num_classes))
    except Exception as e:  # noqa: BLE001 - an unknown architecture: name it
        raise CfxError(f"classifier.arch={arch!r} is not a timm model ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else ''}); see timm.list_models()") from None
    _load(net, read_layout(path, net, f"a timm {arch} state dict with {num_classes} outputs", key=key))
    net.eval()
    if normalize == "timm":
        cfg = getattr(net, "pretrained_cfg", None) or {}
        net, normalize = _MeanStd(net, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))), \
            "none"
    info = {"name": name, "format": "timm", "arch": arch, "input_size": input_size}
    return ExplainedModel(net, task, input_size=input_size, normalize=normalize,
                          num_classes=int(num_classes) if task == "classification" else None, info=info, head=head)
