"""One job: build the parts from the config, explain every image, write the job folder."""
from __future__ import annotations

import errno
import inspect
import json
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cfx_cli.errors import CfxError, Interrupted, UnreadableItem
from cfx_cli.methods.base import CFResult, SampleRNG
from cfx_cli.metrics.cost import PeakMemory
from cfx_cli.models.counting import CostMeter, Counted
from cfx_cli.metrics.sample import OracleMetrics, distances
from cfx_cli.evaluate import in_job, metric_names
from cfx_cli.metrics.summary import summarise
from cfx_cli.objectives import build_objective
from cfx_cli.outputs import JobLock, JobWriter, diff_image, flatten_config, read_samples, write_json


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


def explained_model(cfg: DictConfig):
    """The regressor when one is chosen (``regressor=...`` switches the job to regression), else the classifier."""
    node, key = (cfg.regressor, "regressor") if cfg.get("regressor") else (cfg.get("classifier"), "classifier")
    if not node:
        raise CfxError("no explained model: choose classifier=<name> or regressor=<name>")
    model = instantiate(node)
    return model, key


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    if not 0 <= shard < num_shards:
        raise CfxError(f"data.shard={shard} must lie in 0..{num_shards - 1} (data.num_shards={num_shards})")
    return list(range(shard, n, num_shards))


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


# The typed parts a method may ask for by naming them in its constructor.
PART_ROLES = ("sampler", "generative", "model", "robust_model", "objective")


def check_resolution(dataset, generative) -> int | None:
    """Images travel at the generative model's resolution: the dataset must deliver it. Returns it."""
    data_size = getattr(dataset, "image_size", None) or getattr(getattr(dataset, "world", None), "image_size", None)
    if data_size and generative.image_size and int(data_size) != int(generative.image_size):
        raise CfxError(f"dataset.image_size={data_size} but the diffusion model makes {generative.image_size}×"
                       f"{generative.image_size} images: set dataset.image_size={generative.image_size} "
                       f"(images travel at the generative model's resolution)")
    return int(data_size) if data_size and generative.image_size else None


def build_sampler(cfg: DictConfig, generative):
    """The ``sampler`` group's sampler over the (counted) generative model."""
    sampler_cfg = OmegaConf.to_container(cfg.sampler, resolve=True)
    sampler_cfg.pop("name", None)
    return instantiate(sampler_cfg, model=generative)


def check_node(node: DictConfig | None, prefix: str) -> None:
    """The keys of a ``_target_`` node against its callable's defaults (``check_type``), before Hydra calls it:
    dataset.num_images=abc must be one line naming the key, not int()'s traceback."""
    if not node or "_target_" not in node:
        return
    from hydra.utils import get_method

    try:
        target = get_method(node._target_)
        params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    except Exception:  # noqa: BLE001 - Hydra's own error names an unknown target
        return
    for key, value in OmegaConf.to_container(node, resolve=True).items():
        if key in params and not key.startswith("_"):
            check_type(f"{prefix}.{key}", value, params[key].default)


def build(cfg: DictConfig, device: torch.device, model=None) -> dict:
    """Every part of a job, built once; the UNet and the explained models are wrapped in counters.
    ``model``: an explained model given directly (the Python API) instead of the config's."""
    for group in ("dataset", "classifier", "regressor", "robust_model", "diffusion", "sampler"):
        if not (model is not None and group in ("classifier", "regressor")):
            check_node(cfg.get(group), group)
    for key in ("size_tol", "pos_tol"):
        if key in cfg.metrics:
            check_type(f"metrics.{key}", cfg.metrics[key], 0.1)
    meter = CostMeter()
    dataset = instantiate(cfg.dataset)
    if model is None:
        model, model_key = explained_model(cfg)
    else:
        model_key = "regressor" if model.task == "regression" else "classifier"
    model = Counted(model.to(device), meter, "model")
    generative = instantiate(cfg.diffusion).to(device)
    check_resolution(dataset, generative)
    if hasattr(generative, "set_class_names") and getattr(dataset, "classes", None):
        generative.set_class_names(dataset.classes)  # a text-conditional model's prompts name the classes
    if isinstance(getattr(generative, "decoder", None), nn.Module):  # a latent model's decoder: nfe_decoder
        generative.decoder = Counted(generative.decoder, meter, "decoder")
    generative = Counted(generative, meter, "unet")
    sampler = build_sampler(cfg, generative)
    objective = build_objective(model, OmegaConf.to_container(cfg.target, resolve=True),
                                query=getattr(dataset, "query_index", None))
    robust = None
    if cfg.get("robust_model"):
        robust = Counted(instantiate(cfg.robust_model).to(device), meter, "robust_model")
    parts = {"sampler": sampler, "generative": generative, "model": model, "robust_model": robust,
             "objective": objective}
    method = instantiate_method(cfg.method, parts)
    oracle = None
    if getattr(dataset, "has_factors", False) and cfg.metrics.get("oracle"):
        oracle = OracleMetrics(instantiate(cfg.metrics.oracle).to(device), dataset.world,
                               size_tol=cfg.metrics.size_tol, pos_tol=cfg.metrics.pos_tol)
    return {"dataset": dataset, "model": model, "model_key": model_key, "objective": objective,
            "diffusion": generative, "sampler": sampler, "method": method, "oracle": oracle, "meter": meter}


@dataclass
class BatchExplanation:
    """One batch explained and judged, as `cfx run` and the Python API (``cfx_cli.api``) both get it."""

    x_cf: Tensor          # the counterfactuals (the input where one failed)
    pred: Tensor          # the model's prediction on the input
    target: Tensor        # y*
    cf_pred: Tensor       # the prediction on the counterfactual
    success: Tensor       # judged on the counterfactual (or on the method's ``judged`` image)
    failed: Tensor        # not a finite image
    cost: dict            # nfe_<role>[_backward] per sample
    result: CFResult      # the method's own output (extras: masks, pre-explanations; info)


def explain_batch(parts: dict, x: Tensor, indices, seed: int, device, labels: Tensor | None = None
                  ) -> BatchExplanation:
    """Target, counterfactuals, judgement and cost of one batch: the one code path of every method.
    ``labels``: the dataset's, for targets chosen from them (target=young_old)."""
    model, objective, method, meter = parts["model"], parts["objective"], parts["method"], parts["meter"]
    with torch.no_grad():
        out = model(x)
        pred, target = objective.prediction(out), objective.target(out, labels)
    meter.start(len(x))
    try:
        result = method.explain(x, target, SampleRNG(seed, indices, device, meter=meter))
        cost = cost_columns(meter)
    finally:
        meter.stop()
    failed = ~torch.isfinite(result.x_cf).flatten(1).all(1)
    x_cf = torch.where(failed.view(-1, 1, 1, 1), x, result.x_cf)  # keep the file valid; the row says failed
    with torch.no_grad():  # success is judged here, on the final image, for every method alike
        cf_out = model(x_cf)
        cf_pred, success = objective.prediction(cf_out), objective.success(cf_out, target)
        if result.judged is not None:  # a paper reproduction that judged another image
            result.info["success_final"] = success.float()
            success = objective.success(model(result.judged), target)
    return BatchExplanation(x_cf, pred, target, cf_pred, success, failed, cost, result)


def sanity(parts: dict, todo: list[int], batch_size: int, limit: int = 256) -> tuple[dict, list[str]]:
    """Before spending compute: does the explained model fit the data? One line each: its outputs against
    the dataset's classes, its accuracy (or MAE) on the images about to be explained (up to ``limit``; a
    warning near chance), the images' channels against the generative model's. Returns (numbers, lines)."""
    dataset, model, objective, generative = parts["dataset"], parts["model"], parts["objective"], parts["diffusion"]
    info, lines = {}, []
    classes = list(getattr(dataset, "classes", None) or [])
    outputs = getattr(model, "num_classes", None)
    if model.task == "classification" and classes and outputs and getattr(model, "head", "softmax") == "softmax" \
            and outputs != len(classes):
        lines.append(f"warning: the classifier has {outputs} outputs but the dataset has {len(classes)} classes "
                     f"({', '.join(map(str, classes[:4]))}{', ...' if len(classes) > 4 else ''}): labels and "
                     f"predictions may not mean the same classes")
    sample = todo[:limit]
    labels, preds, values = [], [], []
    for start in range(0, len(sample), batch_size):
        try:
            batch = dataset.batch(sample[start:start + batch_size])
        except UnreadableItem:  # the job marks those later; the check uses what it can read
            continue
        x = batch["x"].to(next(iter(model.parameters()), torch.zeros(())).device)
        channels = getattr(generative, "channels", None)
        if channels and x.shape[1] != channels:
            raise CfxError(f"the dataset's images have {x.shape[1]} channels but the diffusion model makes {channels}: "
                           f"convert the images (dataset) or choose a {x.shape[1]}-channel diffusion model")
        with torch.no_grad():
            out = model(x)
        preds.append(objective.prediction(out).cpu())
        labels.append(batch["label"].cpu())
        values.append(batch["value"].cpu())
    if not preds:
        return info, lines
    pred, label, value = torch.cat(preds), torch.cat(labels), torch.cat(values)
    if model.task == "classification":
        known = label >= 0
        if known.any():
            acc = float((pred[known] == label[known]).float().mean())
            chance = 1.0 / max(2, len(classes) or 2)
            info.update(model_accuracy=acc, accuracy_images=int(known.sum()))
            line = (f"the classifier's accuracy on {int(known.sum())} of the images to explain: {acc:.2f} "
                    f"(chance {chance:.2f})")
            if acc <= chance + 0.1:
                line = "warning: " + line + ": is it the right model for this data?"
            lines.append(line)
    elif torch.isfinite(value).any():
        known = torch.isfinite(value)
        mae = float((pred[known].float() - value[known]).abs().mean())
        info.update(model_mae=mae)
        lines.append(f"the regressor's MAE on {int(known.sum())} of the images to explain: {mae:.3f}")
    return info, lines


def _step_progress(bar, every: float = 0.5):
    """Inside a batch the bar moves with the UNet: its postfix counts the batch's calls (forward and
    backward), redrawn at most every ``every`` seconds."""
    state = {"calls": 0, "shown": 0.0, "n": None}

    def listener(role: str, kind: str) -> None:
        if role != "unet":
            return
        if state["n"] != bar.n:  # a new batch
            state.update(calls=0, n=bar.n)
        state["calls"] += 1
        now = time.time()
        if now - state["shown"] >= every:
            state["shown"] = now
            bar.set_postfix_str(f"UNet calls in this batch: {state['calls']}", refresh=True)

    return listener


def _name(classes: list[str], index) -> str:
    try:
        return classes[int(index)] if 0 <= int(index) < len(classes) else ""
    except (TypeError, ValueError):
        return ""


def load_batch(dataset, chunk: list[int]):
    """The chunk's batch, without the items that cannot be read, and a failed row for each of those
    (its file and the reason): one bad image must not end a job."""
    try:
        return dataset.batch(chunk), []
    except UnreadableItem:
        pass
    good, bad = [], []
    for i in chunk:
        try:
            dataset.batch([i])
            good.append(i)
        except UnreadableItem as e:
            bad.append({"index": i, "id": e.item, "success": False, "failed": True, "error": e.reason})
    return (dataset.batch(good) if good else None), bad


def _rows(batch, pred, target, cf_pred, success, result, failed, dist, oracle_vals, cost, seconds, peak_mib, task):
    rows = []
    for i, index in enumerate(batch["index"]):
        row = {"index": index, "id": batch["id"][i],
               "label": batch["label"][i].item() if task == "classification" else batch["value"][i].item(),
               "pred": pred[i].item(), "target": target[i].item(), "cf_pred": cf_pred[i].item(),
               "success": bool(success[i]) and not bool(failed[i]), "failed": bool(failed[i]),
               "l1": dist["l1"][i], "l2": dist["l2"][i]}
        for k, v in (oracle_vals or {}).items():
            row[k] = v[i]
        for k, v in result.info.items():
            row[k] = v[i].item()
        row.update({k: int(v[i]) for k, v in cost.items()})
        row.update(seconds=seconds, peak_mem_mib=round(peak_mib, 1),
                   error="the counterfactual is not finite (NaN or inf)" if bool(failed[i]) else "")
        rows.append(row)
    return rows


def cost_columns(meter: CostMeter) -> dict:
    """nfe_<role> (forward evaluations) and nfe_<role>_backward per sample; the UNet and the
    explained model always get both columns, other roles (robust_model) when they were used."""
    roles = ["unet", "model", *sorted(r for r in meter.counts if r not in ("unet", "model"))]
    cols = {}
    for role in roles:
        cols[f"nfe_{role}"] = meter.column(role, "forward")
        cols[f"nfe_{role}_backward"] = meter.column(role, "backward")
    return cols


# Keys that do not change a sample's counterfactual: a job may resume with other values
# (more images, another batch size or device).
RESUMABLE_KEYS = ("device", "batch_size", "dataset.num_images")
# The metrics measured at the job's end do not make its samples: a resumed job may measure others.
RESUMABLE_PREFIXES = ("metrics.evaluate.",)


def result_config(cfg: DictConfig) -> dict:
    """The resolved config, flattened, without the keys a resumed job may change."""
    config = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    return json.loads(json.dumps({k: v for k, v in config.items()
                                  if k not in RESUMABLE_KEYS and not k.startswith(RESUMABLE_PREFIXES)}, default=str))


def check_resume(writer: JobWriter, config: dict) -> None:
    """Refuse to append to a job folder whose samples were made with another config."""
    previous = writer.read_status().get("config")
    done = writer.done_indices()
    if not done or previous == config:
        return
    writer.restore_hydra()
    if previous is None:
        raise CfxError(f"hydra.run.dir={writer.dir} holds {len(done)} samples but no record of their config "
                       f"(an older cfx made them): choose a new hydra.run.dir")
    # names of config choices first (method.name, ...), then changed values, then keys only one side has
    keys = sorted((k for k in set(previous) | set(config) if previous.get(k) != config.get(k)),
                  key=lambda k: (not k.endswith(".name"), k not in previous or k not in config, k))
    shown = ", ".join(f"{k}={previous.get(k)!r}->{config.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
    raise CfxError(f"hydra.run.dir={writer.dir} holds {len(done)} samples made with another config ({shown}): "
                   f"re-run with the same overrides to resume, or choose a new hydra.run.dir")


@contextmanager
def signals_as_interrupts():
    """SIGTERM (SLURM's time limit and pre-emption) and SIGINT (Ctrl-C) raise ``Interrupted`` inside
    the job, so that it records ``interrupted`` and stops cleanly; the previous handlers come back after.
    (Only the main thread can set handlers; elsewhere the signals keep their defaults.)"""
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def job(cfg: DictConfig, job_dir: str | Path) -> dict:
    """Run (or resume) one job into ``job_dir``, owning the folder for its lifetime (one process per
    job folder); returns its set-level metrics."""
    try:
        writer = JobWriter(job_dir)
        lock = JobLock(job_dir)
        lock.acquire()
    except CfxError:
        writer.restore_hydra()  # this refused process's Hydra rewrote .hydra/: put back the holder's
        raise
    except OSError as e:  # a read-only or full file system, no permission
        raise CfxError(f"hydra.run.dir={job_dir}: cannot write there ({e.strerror or e}); choose a writable "
                       f"hydra.run.dir") from None
    try:
        with signals_as_interrupts():
            return _job(cfg, writer)
    finally:
        lock.release()


_NO_SPACE_OR_ACCESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class ResumeRefused(CfxError):
    """A resume that must leave the job folder as it was (status.json included)."""


def check_items(writer: JobWriter, dataset) -> None:
    """Each done row must still name the same item: a folder dataset that gained or lost a file since
    would otherwise explain one image twice and another never."""
    done = read_samples(writer.dir) if writer.done_indices() else None
    if done is None or "id" not in done or not hasattr(dataset, "ids"):
        return
    done = done[done["index"] < len(dataset)]
    now = dataset.ids(done["index"].astype(int).tolist())
    for (index, was), is_ in zip(zip(done["index"], done["id"].astype(str)), now):
        if was != str(is_):
            raise ResumeRefused(f"hydra.run.dir={writer.dir}: its sample {index} was made from {was!r}, which is now "
                                f"{is_!r} (the dataset changed since): re-run into a new hydra.run.dir")


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


def _job(cfg: DictConfig, writer: JobWriter) -> dict:
    for note in fit_defaults(cfg):
        print(f"cfx: {note}", file=sys.stderr)
    config = result_config(cfg)
    check_resume(writer, config)
    previous_status = writer.read_status()
    writer.start()
    writer.snapshot_hydra()
    started = time.time()
    writer.status(state="running", started=writer.read_status().get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
                  error=None, config=config)
    bar = None
    try:
        device = resolve_device(cfg.device)
        writer.status(device=str(device))
        if int_key(cfg, "batch_size") < 1:  # the historical message for the common mistake
            raise CfxError(f"batch_size={cfg.batch_size} must be at least 1")
        int_key(cfg, "seed", 0, 2**32 - 1)  # numpy and torch seeds
        int_key(cfg, "data.num_shards", 1)
        int_key(cfg, "data.shard", 0)
        torch.manual_seed(cfg.seed)
        if OmegaConf.select(cfg, "metrics.evaluate.metrics"):  # a typo fails now, not after the whole job
            metric_names(cfg.metrics.evaluate, "metrics.evaluate.")
        parts = build(cfg, device)
        dataset, model, objective = parts["dataset"], parts["model"], parts["objective"]
        task = model.task
        if len(dataset) == 0:
            raise CfxError(f"the dataset has no images (dataset.num_images={cfg.dataset.get('num_images')}): "
                           f"ask for at least one")
        indices = shard_indices(len(dataset), cfg.data.shard, cfg.data.num_shards)
        check_items(writer, dataset)
        done = writer.done_indices()
        todo = [i for i in indices if i not in done]
        bs = int(cfg.batch_size)
        checks, lines = sanity(parts, todo, bs)
        for line in lines:
            print(f"cfx: {line}", file=sys.stderr)
        classes = [str(c) for c in getattr(dataset, "classes", None) or []]
        if classes and task == "classification":  # the class mapping, for people and for the tables
            write_json(writer.dir / "classes.json", dict(enumerate(classes)))
        writer.status(total=len(indices), resumed_from=len(done & set(indices)), task=task, sanity=checks)
        # delay: an error in the first batch (a bad target, say) prints its line without a bar before it
        bar = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=f"{cfg.method.name}", unit="cf",
                   delay=1.0)
        parts["meter"].listener = _step_progress(bar)
        pending = []  # rows of unreadable items: written beside the next readable batch (same columns)
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            batch, unreadable = load_batch(dataset, chunk)
            pending += unreadable
            if batch is None:  # every item of the chunk unreadable
                bar.update(len(chunk))
                continue
            x = batch["x"].to(device)
            t0 = time.time()
            with PeakMemory(device) as peak:
                res = explain_batch(parts, x, batch["index"], cfg.seed, device, labels=batch.get("label"))
            pred, target, cf_pred, success, failed, x_cf = (res.pred, res.target, res.cf_pred, res.success, res.failed,
                                                            res.x_cf)
            result, cost = res.result, res.cost
            seconds = (time.time() - t0) / len(x)
            oracle_vals = None
            if parts["oracle"] is not None:
                oracle_vals = parts["oracle"](x, x_cf, batch["factors"], target, task,
                                              getattr(objective, "tolerance", 0.05))
            rows = _rows(batch, pred, target, cf_pred, success.cpu(), result, failed.cpu(), distances(x, x_cf),
                         oracle_vals, cost, seconds, peak.mib, task)
            images = {"original": x, "counterfactual": x_cf,
                      "diff": torch.stack([diff_image(a, b) for a, b in zip(x, x_cf)])}
            images.update({k: v for k, v in result.extras.items()})
            if classes and task == "classification":
                for row in rows:
                    row.update({f"{k}_name": _name(classes, row[k]) for k in ("label", "target", "cf_pred")})
            rows += [{**dict.fromkeys(rows[0]), **r} for r in pending]
            writer.add(rows, images)
            bar.update(len(chunk))
            writer.status(written=len(indices) - len(todo) + start + len(chunk))
            pending = []
        if pending:  # the last chunks were all unreadable
            writer.add(pending, {})
        bar.close()
        # the papers' metrics (metrics.evaluate): per-sample ones into samples.csv, set-level ones here
        extra, metrics_seconds = in_job(writer.dir, cfg, device)
        samples = read_samples(writer.dir)
        samples = samples[samples["index"].isin(indices)]
        metrics = {**summarise(samples, task), **extra}
        if metrics_seconds:
            metrics["metrics_seconds"] = round(metrics_seconds, 3)
        writer.write_metrics(metrics)
        writer.write_grid()
        writer.status(state="done", written=len(samples), failed_samples=int(metrics["num_failed"]),
                      seconds=round(time.time() - started, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return metrics
    except BaseException as e:  # record why, then let the CLI report it
        if bar is not None:  # wipe the bar's line so that the error line stands alone
            bar.leave = False
            bar.close()
        try:
            if isinstance(e, ResumeRefused):  # leave the folder as the last accepted run left it
                write_json(writer.status_path, previous_status)
                writer.restore_hydra()
            elif isinstance(e, (Interrupted, KeyboardInterrupt)):
                writer.status(state="interrupted", error=f"stopped by {getattr(e, 'signal_name', 'SIGINT')}; "
                                                         f"re-run the same command to resume")
            else:
                writer.status(state="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
        except OSError:  # a full disk may refuse the record too; the error below still says what happened
            pass
        if isinstance(e, OSError) and e.errno in _NO_SPACE_OR_ACCESS:
            raise CfxError(f"hydra.run.dir={writer.dir}: cannot write ({e.strerror}: {e.filename or ''}); free "
                           f"space or choose a writable hydra.run.dir, then re-run to resume") from e
        raise


def headline(metrics: dict[str, float]) -> str:
    keys = ["flip_rate", "success_rate", "mae_to_target", "l1", "mnac", "ideal_cf_l1", "shortcut_reveal_rate",
            "nfe_unet", "seconds_per_cf", "num_failed"]
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not np.isnan(metrics[k]))
