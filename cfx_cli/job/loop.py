"""The job loop: one job folder, owned for the job's lifetime; its parts built once (``cfx_cli.job.build``),
every image explained batch by batch (``cfx_cli.job.explain``), each batch written as it ends
(``cfx_cli.outputs``), so that a killed job resumes where it stopped; the job's end metrics last."""
from __future__ import annotations

import errno
import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from cfx_cli.config import choice
from cfx_cli.errors import CfxError, Interrupted, UnreadableItem
from cfx_cli.job.build import JobParts, check_settings, fit_defaults, resolve_device, shard_indices
from cfx_cli.job.explain import BAR_FORMAT, BatchProgress, explain_batch
from cfx_cli.job.identity import check_models
from cfx_cli.metrics import suite
from cfx_cli.metrics.cost import PeakMemory
from cfx_cli.metrics.sample import distances, outcomes
from cfx_cli.metrics.summary import summarise
from cfx_cli.outputs import JobLock, JobWriter, Pairs, diff_image, flatten_config, read_samples, remove_unwritten


def job(cfg: DictConfig, job_dir: str | Path, remove_if_unwritten: tuple[str, ...] | None = None) -> dict:
    """Run (or resume) one job into ``job_dir``, owning the folder for its lifetime (one process per
    job folder); returns its set-level metrics.

    ``remove_if_unwritten`` (a tuple, maybe empty, of other files the caller's start wrote there: Hydra's job
    log): a job that stops before its first sample removes its folder, still under its lock, where nothing
    else is in it (``outputs.remove_unwritten``). None: the folder stays, its status.json saying why (a sweep's
    job, which the sweep's summary and ``cfx aggregate`` must count)."""
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
    except BaseException:
        if remove_if_unwritten is not None:
            remove_unwritten(writer.dir, remove_if_unwritten)
        raise
    finally:
        lock.release()


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


_NO_SPACE_OR_ACCESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class ResumeRefused(CfxError):
    """A resume that must leave the job folder as it was (status.json included)."""


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
    # what was built first (method._target_, ...; an older cfx's method.name), then changed values, then keys
    # only one side has
    keys = sorted((k for k in set(previous) | set(config) if previous.get(k) != config.get(k)),
                  key=lambda k: (not k.endswith(("._target_", ".name")), k not in previous or k not in config, k))
    shown = ", ".join(f"{k}={previous.get(k)!r}->{config.get(k)!r}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
    raise CfxError(f"hydra.run.dir={writer.dir} holds {len(done)} samples made with another config ({shown}): "
                   f"re-run with the same overrides to resume, or choose a new hydra.run.dir")


def beyond(writer, done: set[int], n: int, num_images) -> str | None:
    """A resume with fewer images than the folder holds (``dataset.num_images`` lowered, a folder dataset that
    lost files) is refused, never narrowed: samples.csv and images/ would describe more samples than
    status.json and metrics.csv. The message, or None."""
    extra = sorted(i for i in done if i >= n)
    if not extra:
        return None
    return (f"hydra.run.dir={writer.dir} holds {len(extra)} sample(s) beyond the dataset's {n} images (indices "
            f"{extra[0]}..{extra[-1]}; dataset.num_images={num_images}): resume with dataset.num_images of at least "
            f"{extra[-1] + 1} (a job folder is never narrowed), or run into a new hydra.run.dir")


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



def _job(cfg: DictConfig, writer: JobWriter) -> dict:
    """The job inside its folder: records its state in status.json (running, done, failed, interrupted)."""
    for note in fit_defaults(cfg):
        print(f"cfx: {note}", file=sys.stderr)
    config = result_config(cfg)
    check_resume(writer, config)
    models = check_models(writer, config, len(writer.done_indices()))  # the same model files under the same paths
    previous_status = writer.read_status()
    writer.start()
    writer.snapshot_hydra()
    started = time.time()
    writer.status(state="running", started=writer.read_status().get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
                  error=None, config=config, model_files=models)
    progress = {}
    try:
        device = resolve_device(cfg.device)
        writer.status(device=str(device))
        bs = check_settings(cfg)
        torch.manual_seed(cfg.seed)
        if OmegaConf.select(cfg, "metrics.evaluate.metrics"):  # a typo fails now, not after the whole job
            suite.metric_names(cfg.metrics.evaluate, "metrics.evaluate.")
        parts = JobParts(cfg, device).all()
        dataset = parts["dataset"]
        if len(dataset) == 0:
            raise CfxError(f"the dataset has no images (dataset.num_images={cfg.dataset.get('num_images')}): "
                           f"ask for at least one")
        indices = shard_indices(len(dataset), cfg.data.shard, cfg.data.num_shards)
        if (fewer := beyond(writer, writer.done_indices(), len(dataset), cfg.dataset.get("num_images"))):
            raise ResumeRefused(fewer)
        check_items(writer, dataset)
        done = writer.done_indices()
        todo = [i for i in indices if i not in done]
        checks, lines = sanity(parts, todo, bs)
        for line in lines:
            print(f"cfx: {line}", file=sys.stderr)
        classes = [str(c) for c in getattr(dataset, "classes", None) or []]
        task = parts["model"].task
        if classes and task == "classification":  # the class mapping, for people and for the tables
            writer.write_classes(classes)
        writer.status(total=len(indices), resumed_from=len(done & set(indices)), task=task, sanity=checks)
        explain_all(cfg, parts, writer, indices, todo, classes if task == "classification" else [], device, progress)
        metrics = finish(cfg, parts, writer, indices, device)
        writer.status(state="done", written=int(metrics["num_samples"]), failed_samples=int(metrics["num_failed"]),
                      seconds=round(time.time() - started, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return metrics
    except BaseException as e:  # record why, then let the CLI report it
        bar = progress.get("bar")
        if bar is not None:  # wipe the bar's line so that the error line stands alone
            bar.leave = False
            bar.close()
        try:
            if isinstance(e, ResumeRefused):  # leave the folder as the last accepted run left it
                writer.put_back(previous_status)
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


def explain_all(cfg: DictConfig, parts: dict, writer: JobWriter, indices: list[int], todo: list[int],
                classes: list[str], device, progress: dict) -> None:
    """Every index of ``todo``, batch by batch: explained, judged, measured and written (images, then rows)."""
    dataset, objective, task = parts["dataset"], parts["objective"], parts["model"].task
    bs = int(cfg.batch_size)
    # delay: an error in the first batch (a bad target, say) prints its line without a bar before it
    bar = progress["bar"] = tqdm(total=len(indices), initial=len(indices) - len(todo), desc=choice(cfg, "method"),
                                 unit="cf", delay=1.0, bar_format=BAR_FORMAT)
    steps = BatchProgress(bar, parts["meter"], parts["method"])  # the bar moves inside each batch too
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
        steps.start(len(chunk))
        with PeakMemory(device) as peak:
            res = explain_batch(parts, x, batch["index"], cfg.seed, device, labels=batch.get("label"))
        seconds = (time.time() - t0) / len(x)
        oracle_vals = None
        if parts["oracle"] is not None:
            oracle_vals = parts["oracle"](x, res.x_cf, batch["factors"], res.target, task,
                                          getattr(objective, "tolerance", 0.05))
        rows = _rows(batch, res.pred, res.target, res.cf_pred, res.success.cpu(), res.result, res.failed.cpu(),
                     distances(x, res.x_cf), oracle_vals, res.cost, seconds, peak.mib, task)
        images = {"original": x, "counterfactual": res.x_cf,
                  "diff": torch.stack([diff_image(a, b) for a, b in zip(x, res.x_cf)]), **res.result.extras}
        if classes:
            for row in rows:
                row.update({f"{k}_name": _name(classes, row[k]) for k in ("label", "target", "cf_pred")})
        rows += [{**dict.fromkeys(rows[0]), **r} for r in pending]
        writer.add(rows, images)
        steps.finish()
        writer.status(written=len(indices) - len(todo) + start + len(chunk))
        pending = []
    if pending:  # the last chunks were all unreadable
        writer.add(pending, {})
    bar.close()


def finish(cfg: DictConfig, parts: dict, writer: JobWriter, indices: list[int], device) -> dict:
    """The set-level metrics of the job's samples, the papers' metrics (``metrics.evaluate``: per-sample ones
    into samples.csv), metrics.csv and grid.png; returns the metrics."""
    extra, metrics_seconds = end_metrics(cfg, parts, writer, device)
    samples = read_samples(writer.dir)
    samples = samples[samples["index"].isin(indices)]
    metrics = {**summarise(samples, parts["model"].task), **extra}
    if metrics_seconds:
        metrics["metrics_seconds"] = round(metrics_seconds, 3)
    writer.write_metrics(metrics)
    writer.write_grid()
    return metrics


def end_metrics(cfg: DictConfig, parts: dict, writer: JobWriter, device) -> tuple[dict[str, float], float]:
    """The job's ``metrics.evaluate`` metrics at its end (the job holds its folder's lock): per-sample ones
    into samples.csv; returns (set-level values, seconds). A shard of a sharded run leaves the set-level
    ones to ``cfx aggregate``, which computes them on all the shards' samples together."""
    ecfg = suite.settings_of(cfg)
    if ecfg is None:
        return {}, 0.0
    names = suite.metric_names(ecfg)
    if int(OmegaConf.select(cfg, "data.num_shards", default=1) or 1) > 1:
        left = [m for m in names if m in suite.SET_LEVEL]
        if left:
            print(f"cfx: {', '.join(left)} are measured over all the shards together by `cfx aggregate` "
                  f"(this job is one shard)", file=sys.stderr)
        names = [m for m in names if m not in suite.SET_LEVEL]
    if not names:
        return {}, 0.0
    t0 = time.time()
    try:
        pairs = Pairs(writer.dir)
    except CfxError:  # no sample has both images (every sample failed): nothing to measure
        return {}, 0.0
    level, per, seconds = suite.compute(pairs, ecfg, cfg, names, device, prefix="metrics.evaluate.", soft=True,
                                        explained=lambda: (parts["model"], parts["objective"]))
    if per:
        writer.update_samples(per)
    elapsed = time.time() - t0
    print(f"cfx: metrics {', '.join(names)} took {suite.timings(seconds)}", file=sys.stderr)
    return suite.set_level(level), elapsed


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
            bad.append({"index": i, "id": e.item, "success": False, "failed": True, "outcome": "failed",
                        "error": e.reason})
    return (dataset.batch(good) if good else None), bad


def _rows(batch, pred, target, cf_pred, success, result, failed, dist, oracle_vals, cost, seconds, peak_mib, task):
    rows = []
    ok = success.numpy().astype(bool) & ~failed.numpy().astype(bool)
    oracle_vals = oracle_vals or {}
    outcome = outcomes(ok, oracle_vals.get("oracle_flip"), oracle_vals.get("oracle_was_target"))
    for i, index in enumerate(batch["index"]):
        row = {"index": index, "id": batch["id"][i],
               "label": batch["label"][i].item() if task == "classification" else batch["value"][i].item(),
               "pred": pred[i].item(), "target": target[i].item(), "cf_pred": cf_pred[i].item(),
               "success": bool(success[i]) and not bool(failed[i]), "failed": bool(failed[i]),
               "l1": dist["l1"][i], "l2": dist["l2"][i]}
        for k, v in oracle_vals.items():
            row[k] = v[i]
        row["outcome"] = outcome[i]
        for k, v in result.info.items():
            row[k] = v[i].item()
        row.update({k: int(v[i]) for k, v in cost.items()})
        row.update(seconds=seconds, peak_mem_mib=round(peak_mib, 1),
                   error="the counterfactual is not finite (NaN or inf)" if bool(failed[i]) else "")
        rows.append(row)
    return rows


def _name(classes: list[str], index) -> str:
    try:
        return classes[int(index)] if 0 <= int(index) < len(classes) else ""
    except (TypeError, ValueError):
        return ""


def headline(metrics: dict[str, float]) -> str:
    keys = ["flip_rate", "success_rate", "real_flip_rate", "corrected_rate", "adversarial_rate", "mae_to_target", "l1", "mnac", "ideal_cf_l1", "shortcut_reveal_rate",
            "nfe_unet", "seconds_per_cf", "num_failed"]
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics and not np.isnan(metrics[k]))

