"""The one builder of a job's parts from its config: `cfx run`, `cfx doctor`, the Python API, `cfx evaluate`
and `cfx calibrate` all get their dataset, explained model, objective, generative model, sampler, method
and factor oracle here.

:class:`JobParts` builds each part on first use, once, under the name of its config group (``dataset``,
``classifier`` or ``regressor``, ``target``, ``diffusion``, ``sampler``, ``robust_model``, ``method``,
``metrics.oracle``); a part whose build failed is not tried again, and a part that needs it raises
:class:`NeedsFailedPart` naming it (so `cfx doctor` shows it as not checked). :func:`build` builds them all.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cfx_cli.errors import CfxError, Interrupted
from cfx_cli.metrics.sample import OracleMetrics
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.objectives import build_objective


def resolve_device(name) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CfxError(f"device={name} but no CUDA device is visible (torch.cuda.is_available() is False); "
                       f"use device=auto or device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CfxError(f"device={name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CfxError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                       f"use device=cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise CfxError(f"device={name} but MPS (Apple GPU) is not available here; use device=auto or device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CfxError(f"device={name!r} cannot run a job (it holds no data); use auto, cpu, cuda or cuda:N")
    return device


def int_key(cfg: DictConfig, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer config value, or one line naming the key, the value and what it must be."""
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        rng = (f" in {minimum}..{maximum}" if maximum is not None else f" of at least {minimum}") \
            if minimum is not None else ""
        raise CfxError(f"{key}={value!r} must be an integer{rng}")
    return value


def check_settings(cfg: DictConfig) -> int:
    """The job's own settings (batch size, seed, shard), before anything is built; returns the batch size."""
    if int_key(cfg, "batch_size") < 1:  # the historical message for the common mistake
        raise CfxError(f"batch_size={cfg.batch_size} must be at least 1")
    int_key(cfg, "seed", 0, 2**32 - 1)  # numpy and torch seeds
    int_key(cfg, "data.num_shards", 1)
    int_key(cfg, "data.shard", 0)
    return int(cfg.batch_size)


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if not 0 <= shard < num_shards:
        raise CfxError(f"data.shard={shard} must lie in 0..{num_shards - 1} (data.num_shards={num_shards})")
    return list(range(shard, n, num_shards))


def explained_model(cfg: DictConfig):
    """The regressor when one is chosen (``regressor=...`` switches the job to regression), else the classifier."""
    node, key = (cfg.regressor, "regressor") if cfg.get("regressor") else (cfg.get("classifier"), "classifier")
    if not node:
        raise CfxError("no explained model: choose classifier=<name> or regressor=<name>")
    check_node(node, key)
    return build_node(node, key), key


# Keys of a group's node that the builder reads, passed on only to a loader that takes them: the resolution the
# dataset follows (ADM's and DiffAE's checkpoint loaders build their network by it, among their **flags; the
# others read the model's own) and whether any method was tuned for the model (``fit_defaults``).
BUILDER_KEYS = {"image_size": True, "tuned": False}   # key: passed to a loader's **flags too


def interrupted_cause(e: BaseException):
    """The ``Interrupted`` inside ``e``, if any: Hydra's ``instantiate`` wraps what a loader raises in an
    ``InstantiationException``, so a SIGTERM (a SLURM re-queue) that lands while a model loads would be
    recorded ``failed`` and end its sweep with an error, though SLURM runs the job again."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def build_node(node: DictConfig, group: str, **kwargs):
    """Hydra's ``instantiate`` of the ``_target_`` node of config group ``group``. A loader that names the config
    key of its file in its errors is told which (``key=<group>.<its file argument>``, e.g. robust_model.path:
    the option files do not restate it), and the builder's own keys stay out of a loader that does not take them."""
    params = target_parameters(node)
    if not params:  # no importable target: Hydra's own error names it
        return instantiate(node, **kwargs)
    cfg = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)  # ??? names its full key
    takes_flags = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, as_flag in BUILDER_KEYS.items():
        if name not in params and not (takes_flags and as_flag):
            cfg.pop(name, None)
    key = params.get("key")
    if key is not None and "key" not in cfg:  # the loader's default names its file argument: path, weights
        leaf = key.default.rsplit(".", 1)[-1] if isinstance(key.default, str) else "path"
        cfg["key"] = f"{group}.{leaf}"
    return instantiate(cfg, **kwargs)


# The typed parts a method may ask for by naming them in its constructor.
PART_ROLES = ("sampler", "generative", "model", "robust_model", "objective")


def instantiate_method(node: DictConfig, parts: dict):
    """The method of ``node`` (``_target_`` + its own keys) with the typed parts its constructor names."""
    from hydra.utils import get_class

    cfg = OmegaConf.to_container(node, resolve=True)
    cls = get_class(cfg.pop("_target_"))
    name = getattr(cls, "name", cls.__name__.lower())  # a method class names itself (method=<that name>)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in cfg if k not in params or k in parts]
    if unknown:
        keys = sorted(k for k in params if k not in ("self", *parts))
        raise CfxError(f"method.{unknown[0]} is not a key of method={name}; its keys are {', '.join(keys)}")
    missing = [role for role, p in params.items() if role in PART_ROLES and p.default is inspect.Parameter.empty
               and parts.get(role) is None]
    if missing:
        raise CfxError(f"method={name} needs a {missing[0]} (choose {missing[0]}=<name>)")
    for key, value in cfg.items():
        check_type(f"method.{key}", value, params[key].default)
    return cls(**cfg, **{role: part for role, part in parts.items() if role in params})


def check_type(key: str, value, default) -> None:
    """A value of the kind the constructor's default has (number, flag, list), or one line: a typo such as
    method.tau=abc must not surface as int()'s traceback deep inside a method."""
    if value is None or default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, kind = isinstance(value, (list, tuple)), "a list, e.g. [8,10,15]"
    else:
        return
    if not ok:
        raise CfxError(f"{key}={value!r} must be {kind} (default {default!r})")


def target_parameters(node: DictConfig | None) -> dict[str, inspect.Parameter]:
    """The parameters of a ``_target_`` node's callable (none when it is no such node, or its target cannot
    be imported: Hydra's own error names an unknown target)."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return {}
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
        return dict(inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters)
    except Exception:  # noqa: BLE001
        return {}


def check_node(node: DictConfig | None, prefix: str) -> None:
    """The keys of a ``_target_`` node against its callable's defaults (``check_type``), before Hydra calls it:
    dataset.num_images=abc must be one line naming the key, not int()'s traceback."""
    params = target_parameters(node)
    if not params:
        return
    for key, value in OmegaConf.to_container(node, resolve=True).items():
        if key in params and not key.startswith("_"):
            check_type(f"{prefix}.{key}", value, params[key].default)


def check_resolution(dataset, generative, follows: bool = False) -> int | None:
    """Images travel at the generative model's resolution: the dataset must deliver it. Returns it. ``follows``:
    the dataset's size is the config's diffusion.image_size (the default), so that is the key to fix."""
    data_size = getattr(dataset, "image_size", None) or getattr(getattr(dataset, "world", None), "image_size", None)
    if data_size and generative.image_size and int(data_size) != int(generative.image_size):
        size = generative.image_size
        fix = (f"set diffusion.image_size={size} (the dataset follows it)" if follows else
               f"set dataset.image_size={size}, or leave it out (it follows diffusion.image_size)")
        raise CfxError(f"dataset.image_size={data_size} but the diffusion model makes {size}×{size} images: {fix} "
                       f"(images travel at the generative model's resolution)")
    return int(data_size) if data_size and generative.image_size else None


def folder_image_size(path) -> int | None:
    """The resolution of a diffusers model folder (unet/config.json's ``sample_size``), None if unreadable: the
    loader then says what is wrong with the folder."""
    try:
        size = json.loads((Path(str(path)) / "unet" / "config.json").read_text()).get("sample_size")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def fit_defaults(cfg: DictConfig) -> list[str]:
    """Fits the config to a user's own generative model, before the job records its config (so the job folder
    shows the values used): ``diffusion.image_size: null`` becomes the model folder's resolution (the dataset
    follows it), and with ``diffusion.tuned: false`` (no method was tuned for the model) the papers' perceptual
    term, which needs VGG weights the user may not have, is off unless its weights are given; says so."""
    notes = []
    diffusion = cfg.get("diffusion")
    if diffusion is not None and "image_size" in diffusion and diffusion.image_size is None:
        size = folder_image_size(OmegaConf.select(cfg, "diffusion.path", throw_on_missing=False))
        if size is not None:
            diffusion.image_size = size
    if diffusion is not None and diffusion.get("tuned", True) is False and "lambda_perc" in cfg.method \
            and cfg.method.get("perceptual_weights") is None and cfg.method.lambda_perc:
        notes.append(f"no tuning for this diffusion model (diffusion.tuned=false): method.lambda_perc="
                     f"{cfg.method.lambda_perc} needs method.perceptual_weights, none given, so the perceptual term "
                     f"is off (method.lambda_perc=0); the other method defaults are the paper's")
        cfg.method.lambda_perc = 0.0
    return notes


class NeedsFailedPart(Exception):
    """A part was not built because parts it needs failed to build (``names``, their config groups)."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


class JobParts:
    """Every part of a job ``cfg`` on ``device``, each built on first use and once; the UNet, the decoder
    of a latent model and the explained models are wrapped in counters of ``meter``. ``model``: an
    explained model given directly (the Python API) instead of the config's."""

    def __init__(self, cfg: DictConfig, device: torch.device, model=None):
        self.cfg, self.device, self.meter = cfg, torch.device(device), CostMeter()
        self._given_model = model
        self.built: dict = {}
        self.failed: dict[str, BaseException] = {}

    def part(self, name: str, make):
        """The part ``name`` (a config group), made by ``make()`` the first time it is asked for."""
        if name in self.built:
            return self.built[name]
        if name in self.failed:
            raise NeedsFailedPart([name])
        try:
            value = make()
        except Exception as e:
            stop = interrupted_cause(e)
            if stop is not None:  # SIGTERM while loading: the job is interrupted (re-queued), not failed
                raise stop from None
            self.failed[name] = e
            raise
        self.built[name] = value
        return value

    # ------------------------------------------------------------------------------------------ the parts
    @property
    def model_key(self) -> str:
        if self._given_model is not None:
            return "regressor" if self._given_model.task == "regression" else "classifier"
        return "regressor" if self.cfg.get("regressor") else "classifier"

    @property
    def dataset(self):
        def make():
            node = self.cfg.get("dataset")
            check_node(node, "dataset")
            if self.size_from_model:
                return instantiate(node, image_size=self.generative_size())
            return instantiate(node)
        return self.part("dataset", make)

    @property
    def size_from_model(self) -> bool:
        """The dataset's image_size is null (a user's diffusers folder whose size was not read): the generative
        model's own."""
        node = self.cfg.get("dataset")
        return isinstance(node, DictConfig) and "image_size" in node and node.image_size is None

    def generative_size(self) -> int:
        """The generative model's resolution, for a dataset that follows it (a part it needs: its failure is
        the diffusion's, not the dataset's)."""
        try:
            return self.generative.image_size
        except NeedsFailedPart:
            raise
        except Exception:  # noqa: BLE001 - recorded under "diffusion", reported there
            raise NeedsFailedPart(["diffusion"]) from None

    @property
    def model(self):
        def make():
            model = self._given_model if self._given_model is not None else explained_model(self.cfg)[0]
            return Counted(model.to(self.device), self.meter, "model")
        return self.part(self.model_key, make)

    @property
    def objective(self):
        """The target: a sigmoid head with no ``target.query`` explains the dataset's query attribute."""
        def make():
            model, target = self.model, OmegaConf.to_container(self.cfg.target, resolve=True)
            reads_query = model.task == "classification" and getattr(model, "head", "softmax") == "sigmoid" \
                and (target or {}).get("query") is None
            query = getattr(self.dataset, "query_index", None) if reads_query else None
            return build_objective(model, target, query=query)
        return self.part("target", make)

    @property
    def generative(self):
        def make():
            check_node(self.cfg.get("diffusion"), "diffusion")
            generative = build_node(self.cfg.diffusion, "diffusion").to(self.device)
            if isinstance(getattr(generative, "decoder", None), nn.Module):  # a latent model's decoder: nfe_decoder
                generative.decoder = Counted(generative.decoder, self.meter, "decoder")
            return Counted(generative, self.meter, "unet")
        return self.part("diffusion", make)

    def match_dataset(self) -> int | None:
        """The dataset's resolution against the generative model's (returned), and a text-conditional model's
        prompts named after the dataset's classes."""
        def make():
            dataset, generative = self.dataset, self.generative
            follows = OmegaConf.select(self.cfg, "dataset.image_size", default=None) == \
                OmegaConf.select(self.cfg, "diffusion.image_size", default=None)
            size = check_resolution(dataset, generative, follows)
            if hasattr(generative, "set_class_names") and getattr(dataset, "classes", None):
                generative.set_class_names(dataset.classes)
            return size
        return self.part("image size", make)

    @property
    def sampler(self):
        """The ``sampler`` group's sampler over the (counted) generative model."""
        def make():
            generative = self.generative
            check_node(self.cfg.get("sampler"), "sampler")
            return instantiate(self.cfg.sampler, model=generative)
        return self.part("sampler", make)

    @property
    def robust_model(self):
        def make():
            if not self.cfg.get("robust_model"):
                return None
            check_node(self.cfg.robust_model, "robust_model")
            return Counted(build_node(self.cfg.robust_model, "robust_model").to(self.device), self.meter,
                           "robust_model")
        return self.part("robust_model", make)

    @property
    def method(self):
        """The method, with the typed parts its constructor names (each built here, if not yet)."""
        def make():
            from hydra.utils import get_class

            try:
                params = inspect.signature(get_class(self.cfg.method._target_).__init__).parameters
            except Exception:  # noqa: BLE001 - instantiate_method reports a bad _target_ itself
                params = PART_ROLES
            parts, lost = {}, []
            for role in PART_ROLES:
                if role in params:
                    try:
                        parts[role] = getattr(self, role)
                    except NeedsFailedPart as e:
                        lost += [n for n in e.names if n not in lost]
            if lost:
                raise NeedsFailedPart(lost)
            return instantiate_method(self.cfg.method, parts)
        return self.part("method", make)

    @property
    def oracle(self) -> OracleMetrics | None:
        """The factor oracle's per-sample metrics, on a dataset with known factors (else None)."""
        def make():
            metrics = self.cfg.metrics
            for key in ("size_tol", "pos_tol"):
                if key in metrics:
                    check_type(f"metrics.{key}", metrics[key], 0.1)
            if not metrics.get("oracle") or not getattr(self.dataset, "has_factors", False):
                return None
            return OracleMetrics(build_node(metrics.oracle, "metrics.oracle").to(self.device), self.dataset.world,
                                 size_tol=metrics.size_tol, pos_tol=metrics.pos_tol)
        return self.part("metrics.oracle", make)

    def all(self) -> dict:
        """Every part, in the order a job needs them (the first problem raises)."""
        if self.size_from_model:  # the dataset needs the model's resolution: the model's problem is the first
            self.generative
        dataset, model, generative = self.dataset, self.model, self.generative
        self.match_dataset()
        parts = {"dataset": dataset, "model": model, "model_key": self.model_key, "objective": self.objective,
                 "diffusion": generative, "sampler": self.sampler, "method": self.method, "oracle": self.oracle,
                 "meter": self.meter}
        return parts


def build(cfg: DictConfig, device: torch.device, model=None) -> dict:
    """Every part of a job, built once (:class:`JobParts`), by the names the job loop and the Python API use:
    dataset, model, model_key, objective, diffusion, sampler, method, oracle, meter."""
    return JobParts(cfg, device, model=model).all()
