"""`cfx doctor` (alias `cfx check`): for the composed config of `cfx run`, every file the job needs,
whether it is there, and whether each part builds — before a cluster job fails an hour in.

``doctor(cfg)`` returns a list of :class:`Check`; ``report(checks)`` prints them. Parts are built one at a
time by the job's own builder (:class:`cfx_cli.job.build.JobParts`), so that one failing part does not hide
the others; a part that needs one that failed is shown as not checked. Nothing is generated: the explained model, the
objective and the factor oracle see one image. Parts are built on the CPU unless ``device`` names one
(``device=auto`` only reports what the job would use). Every loader reads safetensors or ``weights_only``
files: nothing here unpickles code.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from cfx_cli.config import choice as config_choice
from cfx_cli.config import hydra_app
from cfx_cli.errors import CfxError, user_error
from cfx_cli.job.build import (JobParts, NeedsFailedPart, check_settings, resolve_device, shard_indices,
                               target_parameters)

# Keys whose string values name a file or folder the job reads.
PATH_KEYS = ("path", "root", "weights")
PATH_SUFFIXES = ("_weights", "_path")
MISSING = "???"


@dataclass
class Check:
    """One line of the report. ``ok``: True (fine), False (a problem), None (not checked: a part it
    needs failed, or unused by this config). ``group``: device | config | file | part; file rows carry
    the path in ``value``."""

    name: str
    ok: bool | None
    detail: str = ""
    group: str = "part"
    value: str = ""


def is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(PATH_SUFFIXES)


def walk(node, prefix: str = ""):
    """(full key, value) of every leaf of ``node``, resolved; MISSING for ``???``; an exception for a
    value that does not resolve. Interpolations to a missing value are left out (the missing key is
    reported itself)."""
    from omegaconf.errors import InterpolationToMissingValueError

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        full = f"{prefix}.{key}" if prefix and isinstance(node, DictConfig) else (
            f"{prefix}[{key}]" if prefix else str(key))
        if OmegaConf.is_missing(node, key):
            yield full, MISSING
            continue
        try:
            value = node[key]
        except InterpolationToMissingValueError:
            continue
        except Exception as e:  # noqa: BLE001 — a bad interpolation is reported, not raised
            yield full, e
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from walk(value, full)
        else:
            yield full, value


def missing_message(key: str) -> str:
    return f"{key} has no value (???): set it on the command line, e.g. {key}=..."


def why(exc: BaseException) -> str:
    """The one-line reason: the user-facing line of a CfxError / missing value, else type and first line."""
    msg = user_error(exc)
    if msg is None:
        first = (str(exc).strip().splitlines() or [""])[0]
        msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    msg = " ".join(msg.split())
    return msg if len(msg) <= 400 else msg[:397] + "..."


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def word_settings(node, prefix: str = "") -> set[str]:
    """The keys of ``_target_`` nodes whose callable takes a word there by default (a DiffAE's
    ``weights: ema``): settings, not files, whatever their name."""
    found = set()
    if isinstance(node, DictConfig):
        params = target_parameters(node)
        for key in node.keys():
            full = f"{prefix}.{key}" if prefix else str(key)
            if key in params and isinstance(params[key].default, str):
                found.add(full)
            elif not OmegaConf.is_missing(node, key) and OmegaConf.is_config(node._get_node(key)):
                found |= word_settings(node._get_node(key), full)
    return found


def config_checks(cfg: DictConfig) -> list[Check]:
    """File rows (path-like keys) and ``???`` / unresolvable values anywhere in the config."""
    checks = []
    words = word_settings(cfg)
    for key, value in walk(cfg):
        leaf = key.rsplit(".", 1)[-1]
        if key in words:
            continue
        if isinstance(value, Exception):
            checks.append(Check(key, False, why(value), group="config"))
        elif value == MISSING:
            if is_path_key(leaf):
                checks.append(Check(key, False, "no value (???): set " + f"{key}=...", group="file", value=MISSING))
            else:
                checks.append(Check(key, False, missing_message(key), group="config"))
        elif is_path_key(leaf) and isinstance(value, str):
            p = Path(value)
            if p.is_dir():
                checks.append(Check(key, True, "exists (folder)", group="file", value=value))
            elif p.exists():
                checks.append(Check(key, True, f"exists (file, {_size(p)})", group="file", value=value))
            else:
                checks.append(Check(key, False, "missing", group="file", value=value))
    return checks


def _params(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M params" if n >= 1e5 else f"{n / 1e3:.1f}k params"


def _choice(cfg: DictConfig, group: str, choices: dict | None):
    try:
        return (choices or {}).get(group) or config_choice(cfg, group)
    except Exception:  # noqa: BLE001
        return None


def summary(cfg: DictConfig, choices: dict | None = None) -> str:
    """``method=fastdime dataset=synthetic ...``: the choices of the config groups (``choices``: Hydra's, while
    `cfx doctor` runs; else as far as the config says them)."""
    parts = [f"{g}={n}" for g in ("method", "dataset", "classifier", "regressor", "robust_model", "diffusion", "sampler",
                                  "metrics")
             if (n := _choice(cfg, g, choices)) and cfg.get(g)]
    try:
        parts.append(f"target={cfg.target.mode}")
    except Exception:  # noqa: BLE001
        pass
    return " ".join(parts)


def doctor(cfg: DictConfig, device: str | torch.device | None = None) -> list[Check]:
    """Every check of the job ``cfg`` would run: device, files, then each part as the job builder
    (:class:`cfx_cli.job.build.JobParts`) builds it, one at a time, and what each did on one image.

    ``device``: where to build the parts; None: the CPU for ``device=auto``, else the device asked for.
    """
    checks: list[Check] = []

    def check(name: str, fn) -> None:
        """Run ``fn() -> detail`` (it builds a part through ``parts``); record ok, its error, or not checked
        (a part it needs failed to build)."""
        try:
            detail = fn()
        except NeedsFailedPart as e:
            checks.append(Check(name, None, f"not checked: needs the {e} (see above)"))
            return
        except Exception as e:  # noqa: BLE001 — report it and go on with the other parts
            checks.append(Check(name, False, why(e)))
            return
        checks.append(Check(name, True, detail))

    # -- device: what the job would use; parts are built on the CPU unless a device is asked for
    asked = str(cfg.get("device", "auto"))
    try:
        job_device = resolve_device(asked)
        build_device = torch.device(device) if device is not None else (
            job_device if asked != "auto" else torch.device("cpu"))
        checks.append(Check("device", True, f"{job_device} (device={asked}); parts built on {build_device}",
                            group="device"))
    except Exception as e:  # noqa: BLE001
        build_device = torch.device(device) if device is not None else torch.device("cpu")
        checks.append(Check("device", False, why(e) + f" (parts built on {build_device})", group="device"))

    checks.extend(config_checks(cfg))
    parts = JobParts(cfg, build_device)
    first: dict = {}  # the first image, and the explained model's output on it

    def _dataset():
        dataset = parts.dataset
        n = len(dataset)
        if n == 0:
            raise CfxError(f"the dataset has no images (dataset.num_images={cfg.dataset.get('num_images')}): "
                           f"ask for at least one")
        first["batch"] = dataset.batch([0])
        shape = tuple(first["batch"]["x"].shape[1:])
        return f"{n} images, {shape[0]}×{shape[1]}×{shape[2]} (first image loads)"

    check("dataset", _dataset)

    def _job():  # the job's own settings (cheap; they fail a job at its start)
        bs = check_settings(cfg)
        shard = f"shard {cfg.data.shard} of {cfg.data.num_shards}"
        if "batch" not in first:
            shard_indices(0, int(cfg.data.shard), int(cfg.data.num_shards))
            return f"batch_size={bs}, {shard}"
        idx = shard_indices(len(parts.dataset), int(cfg.data.shard), int(cfg.data.num_shards))
        nb = -(-len(idx) // bs)
        return f"{len(idx)} images in {shard}, {nb} batch{'es' if nb != 1 else ''} of {bs}"

    check("job", _job)

    def _model():
        model = parts.model.eval()
        if "batch" in first:
            img, where = first["batch"]["x"].to(build_device), "the first image"
        else:
            size = cfg.dataset.get("image_size") if isinstance(cfg.get("dataset"), DictConfig) else None
            size = int(size) if isinstance(size, int) else 32
            img = torch.zeros(1, 3, size, size, device=build_device)
            where = f"a blank {size}×{size} image (the dataset did not load)"
        with torch.no_grad():
            first["out"] = out = model(img)
        shape = "×".join(map(str, out.shape[1:]))
        head = f" ({model.head})" if model.task == "classification" else ""
        outputs = f"{shape} outputs{head}" if shape else f"value {out.flatten()[0].item():.3g}"
        return f"{model.task}, {outputs} on {where}; {_params(model)}"

    check(parts.model_key, _model)

    def _objective():  # the target, on the model's output for that image
        objective, out = parts.objective, first["out"]
        labels = first["batch"].get("label") if "batch" in first else None
        pred, target = objective.prediction(out), objective.target(out, labels)
        p, t = pred.flatten()[0].item(), target.flatten()[0].item()
        fmt = (lambda v: f"{v:.3g}") if parts.model.task == "regression" else (lambda v: f"{int(v)}")
        return f"mode={cfg.target.mode}: prediction {fmt(p)} -> target {fmt(t)} on that image"

    check("target", _objective)

    def _diffusion():
        gen = parts.generative.module
        size = getattr(gen, "image_size", None)
        steps = getattr(getattr(gen, "schedule", None), "num_timesteps", None)
        facts = [f"{size}×{size} images" if size else "resolution unknown"]
        if steps:
            facts.append(f"T={steps}")
        facts.append(_params(gen))
        return ", ".join(facts)

    check("diffusion", _diffusion)
    if "dataset" in parts.built and "diffusion" in parts.built:  # the dataset's resolution against the model's
        try:
            size = parts.match_dataset()
            if size:
                checks.append(Check("image size", True, f"dataset and diffusion model both {size}×{size}"))
        except CfxError as e:
            checks.append(Check("image size", False, str(e)))

    def _sampler():
        sampler = parts.sampler
        return f"{type(sampler).__name__}, {sampler.num_steps} of {parts.generative.schedule.num_timesteps} steps"

    check("sampler", _sampler)
    if cfg.get("robust_model"):  # only when the config names one
        check("robust_model", lambda: _params(parts.robust_model))

    def _method():
        method = parts.method
        facts = [type(method).__name__]
        tau = cfg.method.get("tau")
        if tau is not None and "sampler" in parts.built:
            facts.append(f"{tau} guided steps of {parts.sampler.num_steps}")
        if getattr(method, "perceptual", None) is not None:
            facts.append("VGG perceptual term loaded")
        return ", ".join(facts)

    check("method", _method)

    # -- metrics: the factor oracle, read on one image
    oracle_cfg = cfg.metrics.get("oracle") if isinstance(cfg.get("metrics"), DictConfig) else None
    if oracle_cfg:
        if "dataset" in parts.built and not getattr(parts.dataset, "has_factors", False):
            checks.append(Check("metrics.oracle", None,
                                f"not used: dataset={_choice(cfg, 'dataset')} has no known factors"))
        else:
            def _oracle():
                oracle = parts.oracle
                return f"reads {len(oracle.read(first['batch']['x'].to(build_device)))} factors of the first image; " \
                       f"{_params(oracle.oracle)}"

            check("metrics.oracle", _oracle)
    return checks


def problems(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.ok is False]


def verdict(checks: list[Check]) -> str:
    bad = problems(checks)
    skipped = sum(c.ok is None and c.detail.startswith("not checked") for c in checks)
    if not bad:
        return f"ready: {sum(c.ok is True for c in checks)} checks passed"
    names = ", ".join(c.name for c in bad)
    tail = f" ({skipped} not checked)" if skipped else ""
    return f"{len(bad)} problem{'s' if len(bad) > 1 else ''}: {names}{tail}"


def report(checks: list[Check], cfg: DictConfig | None = None, choices: dict | None = None) -> str:
    """The printed report: config line, device, files table, parts, then the one-line verdict."""
    lines = []
    if cfg is not None:
        lines.append(f"config: {summary(cfg, choices)}")
    for c in checks:
        if c.group == "device":
            lines.append(f"device: {c.detail}")
    files = [c for c in checks if c.group == "file"]
    lines.append("")
    lines.append("files:")
    if files:
        wk = max(len(c.name) for c in files)
        wv = max(len(c.value) for c in files)
        for c in files:
            lines.append(f"  {c.name:<{wk}}  {c.value:<{wv}}  {c.detail}")
    else:
        lines.append("  (none named by this config)")
    config = [c for c in checks if c.group == "config"]
    if config:
        lines.append("")
        lines.append("config values:")
        for c in config:
            lines.append(f"  {'problem':<11} {c.name}: {c.detail}")
    parts = [c for c in checks if c.group == "part"]
    lines.append("")
    lines.append("parts:")
    wn = max((len(c.name) for c in parts), default=0)
    for c in parts:
        status = "ok" if c.ok else ("problem" if c.ok is False else "-")
        lines.append(f"  {status:<8}  {c.name:<{wn}}  {c.detail}")
    lines.append("")
    lines.append(verdict(checks))
    return "\n".join(lines)


def main(args: list[str]) -> None:
    """``cfx doctor [overrides...]``: the Hydra app of ``cfx run`` (same config, same overrides, ``--cfg job``,
    ``-m``), but no job folder is made; exit 0 when every check passes, 1 otherwise."""
    results: list[bool] = []

    def task(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            print(f"\n== job {hc.job.num}: {hc.job.override_dirname or '(no overrides)'}")
        checks = doctor(cfg)
        print(report(checks, cfg, dict(hc.runtime.choices)), flush=True)
        results.append(not problems(checks))

    with tempfile.TemporaryDirectory(prefix="cfx-doctor-") as tmp:  # Hydra's run folder: thrown away
        ours = [f"hydra.run.dir={tmp}", f"hydra.sweep.dir={tmp}", "hydra.output_subdir=null",
                "hydra.help.app_name=cfx doctor"]
        # before the user's first override (Hydra's flags, -m, --cfg job, must come before all overrides),
        # so that the user's own hydra.run.dir=... wins
        first = next((i for i, a in enumerate(args) if not a.startswith("-") and ("=" in a or a.startswith("~"))),
                     0)
        hydra_app("cfx doctor", "config", [*args[:first], *ours, *args[first:]], task)
    sys.exit(0 if all(results) else 1)
