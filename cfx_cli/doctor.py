"""`cfx doctor` (alias `cfx check`): for the composed config of `cfx run`, every file the job needs,
whether it is there, and whether each part builds — before a cluster job fails an hour in.

``doctor(cfg)`` returns a list of :class:`Check`; ``report(checks)`` prints them. Parts are built one at a
time, as :func:`cfx_cli.run.build` builds them, so that one failing part does not hide the others; a part
that needs one that failed is shown as not checked. Nothing is generated: the explained model, the
objective and the factor oracle see one image. Parts are built on the CPU unless ``device`` names one
(``device=auto`` only reports what the job would use). Every loader reads safetensors or ``weights_only``
files: nothing here unpickles code.
"""
from __future__ import annotations

import inspect
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

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
    from cfx_cli.cli import _user_error

    msg = _user_error(exc)
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


def config_checks(cfg: DictConfig) -> list[Check]:
    """File rows (path-like keys) and ``???`` / unresolvable values anywhere in the config."""
    checks = []
    for key, value in walk(cfg):
        leaf = key.rsplit(".", 1)[-1]
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


def _choice(cfg: DictConfig, group: str):
    try:
        node = cfg.get(group)
        return node.get("name") if isinstance(node, DictConfig) else None
    except Exception:  # noqa: BLE001
        return None


def summary(cfg: DictConfig) -> str:
    """``method=fastdime dataset=synthetic ...``: the choices of the config groups."""
    parts = [f"{g}={n}" for g in ("method", "dataset", "classifier", "regressor", "robust_model", "diffusion", "sampler",
                                  "metrics")
             if (n := _choice(cfg, g))]
    try:
        parts.append(f"target={cfg.target.mode}")
    except Exception:  # noqa: BLE001
        pass
    return " ".join(parts)


def doctor(cfg: DictConfig, device: str | torch.device | None = None) -> list[Check]:
    """Every check of the job ``cfg`` would run: device, files, then each part built on its own.

    ``device``: where to build the parts; None: the CPU for ``device=auto``, else the device asked for.
    """
    from hydra.utils import get_class, instantiate

    from cfx_cli.errors import CfxError
    from cfx_cli.metrics.sample import OracleMetrics
    from cfx_cli.models.counting import CostMeter, Counted
    from cfx_cli.objectives import build_objective
    from cfx_cli.run import (PART_ROLES, build_sampler, check_resolution, explained_model, instantiate_method,
                             resolve_device, shard_indices)

    checks: list[Check] = []
    failed: set[str] = set()  # parts that did not build

    def part(name: str, fn, needs: tuple[str, ...] = ()):
        """Run ``fn() -> (value, detail)``; record ok / its error; None when it failed or was skipped."""
        lost = [n for n in needs if n in failed]
        if lost:
            checks.append(Check(name, None, f"not checked: needs the {', '.join(lost)} (see above)"))
            failed.add(name)
            return None
        try:
            value, detail = fn()
        except Exception as e:  # noqa: BLE001 — report it and go on with the other parts
            checks.append(Check(name, False, why(e)))
            failed.add(name)
            return None
        checks.append(Check(name, True, detail))
        return value

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

    meter = CostMeter()
    x = None  # one image for the explained model, the objective and the oracle

    # -- dataset
    def _dataset():
        dataset = instantiate(cfg.dataset)
        n = len(dataset)
        if n == 0:
            raise CfxError(f"the dataset has no images (dataset.num_images={cfg.dataset.get('num_images')}): "
                           f"ask for at least one")
        batch = dataset.batch([0])
        shape = tuple(batch["x"].shape[1:])
        return (dataset, batch), f"{n} images, {shape[0]}×{shape[1]}×{shape[2]} (first image loads)"

    got = part("dataset", _dataset)
    dataset, batch = got if got is not None else (None, None)
    if batch is not None:
        x = batch["x"].to(build_device)

    # -- job settings: batch size and shard (cheap; they fail a job at its start)
    def _job():
        bs = int(cfg.batch_size)
        if bs < 1:
            raise CfxError(f"batch_size={cfg.batch_size} must be at least 1")
        n = len(dataset) if dataset is not None else 0
        idx = shard_indices(n, int(cfg.data.shard), int(cfg.data.num_shards))
        shard = f"shard {cfg.data.shard} of {cfg.data.num_shards}"
        if dataset is None:
            return None, f"batch_size={bs}, {shard}"
        nb = -(-len(idx) // bs)
        return None, f"{len(idx)} images in {shard}, {nb} batch{'es' if nb != 1 else ''} of {bs}"

    part("job", _job)

    # -- explained model, on one image
    model_key = "regressor" if cfg.get("regressor") else "classifier"
    model_out = {}

    def _model():
        model, _ = explained_model(cfg)
        model = model.to(build_device).eval()
        img = x
        where = "the first image"
        if img is None:
            size = cfg.dataset.get("image_size") if isinstance(cfg.get("dataset"), DictConfig) else None
            size = int(size) if isinstance(size, int) else 32
            img = torch.zeros(1, 3, size, size, device=build_device)
            where = f"a blank {size}×{size} image (the dataset did not load)"
        with torch.no_grad():
            out = model(img)
        model_out["out"] = out
        shape = "×".join(map(str, out.shape[1:]))
        head = f" ({model.head})" if model.task == "classification" else ""
        outputs = f"{shape} outputs{head}" if shape else f"value {out.flatten()[0].item():.3g}"
        return Counted(model, meter, "model"), f"{model.task}, {outputs} on {where}; {_params(model)}"

    model = part(model_key, _model)

    # -- objective (target), on the model's output for that image
    def _objective():
        objective = build_objective(model, OmegaConf.to_container(cfg.target, resolve=True),
                                    query=getattr(dataset, "query_index", None))
        out = model_out["out"]
        labels = batch.get("label") if batch is not None else None
        pred, target = objective.prediction(out), objective.target(out, labels)
        p, t = pred.flatten()[0].item(), target.flatten()[0].item()
        fmt = (lambda v: f"{v:.3g}") if model.task == "regression" else (lambda v: f"{int(v)}")
        return objective, f"mode={cfg.target.mode}: prediction {fmt(p)} -> target {fmt(t)} on that image"

    objective = part("target", _objective, needs=(model_key,))

    # -- diffusion model
    def _diffusion():
        gen = instantiate(cfg.diffusion).to(build_device)
        size = getattr(gen, "image_size", None)
        steps = getattr(getattr(gen, "schedule", None), "num_timesteps", None)
        facts = [f"{size}×{size} images" if size else "resolution unknown"]
        if steps:
            facts.append(f"T={steps}")
        facts.append(_params(gen))
        return gen, ", ".join(facts)

    generative = part("diffusion", _diffusion)

    # -- the dataset's resolution against the diffusion model's (build's own check)
    if dataset is not None and generative is not None:
        try:
            size = check_resolution(dataset, generative)
            if size:
                checks.append(Check("image size", True, f"dataset and diffusion model both {size}×{size}"))
        except CfxError as e:
            checks.append(Check("image size", False, str(e)))
            failed.add("image size")
    if generative is not None:
        generative = Counted(generative, meter, "unet")

    # -- sampler
    def _sampler():
        sampler = build_sampler(cfg, generative)
        full = generative.schedule.num_timesteps
        return sampler, f"{type(sampler).__name__}, {sampler.num_steps} of {full} steps"

    sampler = part("sampler", _sampler, needs=("diffusion",))

    # -- robust model (only when the config names one)
    robust = None
    if cfg.get("robust_model"):
        def _robust():
            m = instantiate(cfg.robust_model).to(build_device)
            return Counted(m, meter, "robust_model"), _params(m)

        robust = part("robust_model", _robust)

    # -- method: needs the parts its constructor names
    needs: tuple[str, ...] = ()
    try:
        params = inspect.signature(get_class(cfg.method._target_).__init__).parameters
        role_part = {"sampler": "sampler", "generative": "diffusion", "model": model_key, "objective": "target",
                     "robust_model": "robust_model"}
        needs = tuple(role_part[r] for r in PART_ROLES if r in params and role_part[r] in failed)
    except Exception:  # noqa: BLE001 — instantiate_method reports a bad _target_ itself
        pass

    def _method():
        parts = {"sampler": sampler, "generative": generative, "model": model, "robust_model": robust,
                 "objective": objective}
        method = instantiate_method(cfg.method, parts)
        facts = [type(method).__name__]
        tau = cfg.method.get("tau")
        if tau is not None and sampler is not None:
            facts.append(f"{tau} guided steps of {sampler.num_steps}")
        if getattr(method, "perceptual", None) is not None:
            facts.append("VGG perceptual term loaded")
        return method, ", ".join(facts)

    part("method", _method, needs=needs)

    # -- metrics: the factor oracle, read on one image
    oracle_cfg = cfg.metrics.get("oracle") if isinstance(cfg.get("metrics"), DictConfig) else None
    if oracle_cfg:
        if dataset is not None and not getattr(dataset, "has_factors", False):
            checks.append(Check("metrics.oracle", None,
                                f"not used: dataset={_choice(cfg, 'dataset')} has no known factors"))
        else:
            def _oracle():
                net = instantiate(cfg.metrics.oracle).to(build_device)
                if dataset is None:
                    return None, f"loaded, {_params(net)} (not run: the dataset did not load)"
                metrics = OracleMetrics(net, dataset.world, size_tol=cfg.metrics.size_tol, pos_tol=cfg.metrics.pos_tol)
                read = metrics.read(x)
                return metrics, f"reads {len(read)} factors of the first image; {_params(net)}"

            part("metrics.oracle", _oracle)
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


def report(checks: list[Check], cfg: DictConfig | None = None) -> str:
    """The printed report: config line, device, files table, parts, then the one-line verdict."""
    lines = []
    if cfg is not None:
        lines.append(f"config: {summary(cfg)}")
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
    from cfx_cli.cli import _hydra

    results: list[bool] = []

    def task(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            print(f"\n== job {hc.job.num}: {hc.job.override_dirname or '(no overrides)'}")
        checks = doctor(cfg)
        print(report(checks, cfg), flush=True)
        results.append(not problems(checks))

    with tempfile.TemporaryDirectory(prefix="cfx-doctor-") as tmp:  # Hydra's run folder: thrown away
        ours = [f"hydra.run.dir={tmp}", f"hydra.sweep.dir={tmp}", "hydra.output_subdir=null",
                "hydra.help.app_name=cfx doctor"]
        # before the user's first override (Hydra's flags, -m, --cfg job, must come before all overrides),
        # so that the user's own hydra.run.dir=... wins
        first = next((i for i, a in enumerate(args) if not a.startswith("-") and ("=" in a or a.startswith("~"))),
                     0)
        _hydra("cfx doctor", "config", [*args[:first], *ours, *args[first:]], task)
    sys.exit(0 if all(results) else 1)
