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

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cfx_cli.errors import CfxError
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
    return instantiate(node), key


# The typed parts a method may ask for by naming them in its constructor.
PART_ROLES = ("sampler", "generative", "model", "robust_model", "objective")


def instantiate_method(node: DictConfig, parts: dict):
    """The method of ``node`` (``_target_`` + its own keys) with the typed parts its constructor names."""
    from hydra.utils import get_class

    cfg = OmegaConf.to_container(node, resolve=True)
    cls = get_class(cfg.pop("_target_"))
    name = cfg.pop("name", cls.__name__.lower())
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


def check_resolution(dataset, generative) -> int | None:
    """Images travel at the generative model's resolution: the dataset must deliver it. Returns it."""
    data_size = getattr(dataset, "image_size", None) or getattr(getattr(dataset, "world", None), "image_size", None)
    if data_size and generative.image_size and int(data_size) != int(generative.image_size):
        raise CfxError(f"dataset.image_size={data_size} but the diffusion model makes {generative.image_size}×"
                       f"{generative.image_size} images: set dataset.image_size={generative.image_size} "
                       f"(images travel at the generative model's resolution)")
    return int(data_size) if data_size and generative.image_size else None


# Generative models that come with no tuning of their own: a user's diffusers folder.
UNTUNED = ("diffusers_ddpm",)


def fit_defaults(cfg: DictConfig) -> list[str]:
    """With a user's own generative model and no tuning for it, the papers' perceptual term (it needs
    VGG weights that the user may not have) is off unless its weights are given; says so. Changes
    ``cfg`` before its config is recorded, so the job folder shows the value used."""
    notes = []
    if cfg.diffusion.get("name") in UNTUNED and "lambda_perc" in cfg.method \
            and cfg.method.get("perceptual_weights") is None and cfg.method.lambda_perc:
        notes.append(f"no tuning for diffusion={cfg.diffusion.name}: method.lambda_perc={cfg.method.lambda_perc} "
                     f"needs method.perceptual_weights, none given, so the perceptual term is off "
                     f"(method.lambda_perc=0); the other method defaults are the paper's")
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
            check_node(self.cfg.get("dataset"), "dataset")
            return instantiate(self.cfg.dataset)
        return self.part("dataset", make)

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
            generative = instantiate(self.cfg.diffusion).to(self.device)
            if isinstance(getattr(generative, "decoder", None), nn.Module):  # a latent model's decoder: nfe_decoder
                generative.decoder = Counted(generative.decoder, self.meter, "decoder")
            return Counted(generative, self.meter, "unet")
        return self.part("diffusion", make)

    def match_dataset(self) -> int | None:
        """The dataset's resolution against the generative model's (returned), and a text-conditional model's
        prompts named after the dataset's classes."""
        def make():
            dataset, generative = self.dataset, self.generative
            size = check_resolution(dataset, generative)
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
            sampler_cfg = OmegaConf.to_container(self.cfg.sampler, resolve=True)
            sampler_cfg.pop("name", None)
            return instantiate(sampler_cfg, model=generative)
        return self.part("sampler", make)

    @property
    def robust_model(self):
        def make():
            if not self.cfg.get("robust_model"):
                return None
            check_node(self.cfg.robust_model, "robust_model")
            return Counted(instantiate(self.cfg.robust_model).to(self.device), self.meter, "robust_model")
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
            return OracleMetrics(instantiate(metrics.oracle).to(self.device), self.dataset.world,
                                 size_tol=metrics.size_tol, pos_tol=metrics.pos_tol)
        return self.part("metrics.oracle", make)

    def all(self) -> dict:
        """Every part, in the order a job needs them (the first problem raises)."""
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
