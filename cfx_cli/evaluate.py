"""`cfx evaluate <job folder> [overrides]`: recompute or add metrics on an existing job from its saved images
(images/original, images/counterfactual) and samples.csv, without regenerating anything.

    cfx evaluate outputs/runs/fastdime-synthetic/2025-01-01_12-00-00
    cfx evaluate JOB metrics=[fid,sfid,kid] realism.features=inception realism.inception_weights=/w/pt_inception.pth
    cfx evaluate JOB metrics=[mnac,cd] attributes.oracle={_target_:my.Oracle} attributes.train_labels=labels.npy

Settings: the job's own (its metrics.evaluate: what `cfx run` measured it with), else conf/evaluate/default.yaml;
Hydra overrides on top (key=value, lists as metrics=[fid,cout]). Set-level
values replace their rows of the job's metrics.csv (its other rows are kept as written) or are added;
per-sample values (cout, mnac) become samples.csv columns. Every row of samples.csv counts, whatever the
job's data.shard, so a folder that holds the merged rows of a sharded run gets set-level metrics over all
of them. A metric that cannot be computed (a missing weights file, too few counterfactuals) is a one-line
warning and an empty cell, never a value from random weights; a value the job already has is then kept.
The job folder is locked while it is evaluated: a job still running there is refused.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cfx_cli.errors import CfxError
from cfx_cli.metrics.realism import REALISM

ATTRIBUTE_METRICS = ("mnac", "cd")
CLOSENESS = ("lpips", "fva", "fs", "s3")  # per sample (their set values: cfx_cli.metrics.summary.closeness)
KNOWN = (*REALISM, "cout", *CLOSENESS, *ATTRIBUTE_METRICS)


def compose(overrides=()) -> DictConfig:
    """conf/evaluate/default.yaml with Hydra overrides (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cfx_cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR / "evaluate")):
            return hydra_compose(config_name="default", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def settings(job, overrides=()) -> DictConfig:
    """The job's own ``metrics.evaluate`` settings (what ``cfx run`` measured it with: the synthetic
    benchmark's oracle features, its LPIPS, ...) with the command line's overrides on top; for a job
    without them (made before cfx measured metrics in the job), conf/evaluate/default.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cli = compose(overrides)
    cfg = job_config(Path(job)) if Path(job).is_dir() else None
    own = OmegaConf.select(cfg, "metrics.evaluate") if cfg is not None else None
    if own is None:
        return cli
    try:
        base = OmegaConf.create(OmegaConf.to_container(own, resolve=True))
    except Exception as e:  # noqa: BLE001 - an interpolation this machine cannot resolve
        warn(f"the job's metrics.evaluate settings cannot be read ({str(e).splitlines()[0]}); using "
             f"conf/evaluate/default.yaml")
        return cli
    base = OmegaConf.merge(compose(()), base)  # keys added since the job ran get their defaults
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element().lstrip("+~")
        OmegaConf.update(base, key, OmegaConf.select(cli, key), merge=False, force_add=True)
    return base


def warn(msg: str) -> None:
    print(f"cfx evaluate: warning: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ reading the job
def job_config(job: Path) -> DictConfig | None:
    path = job / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_image(path: Path) -> torch.Tensor:
    img = Image.open(path)
    img = img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class Pairs:
    """The samples that have both images (images/original/<index>.png, images/counterfactual/<index>.png),
    in index order, read batch by batch (a large job's images need not fit in memory at once). Several
    folders (the shards of one job) are read as one set: each row's images come from its own folder."""

    def __init__(self, jobs, samples: pd.DataFrame | None = None):
        from cfx_cli.outputs import read_samples

        jobs = [Path(jobs)] if isinstance(jobs, (str, Path)) else [Path(j) for j in jobs]
        frames = [(read_samples(j) if samples is None else samples).assign(_images=str(j / "images")) for j in jobs]
        rows = pd.concat(frames).drop_duplicates("index")
        has = [(Path(f) / "original" / f"{i}.png").is_file() and (Path(f) / "counterfactual" / f"{i}.png").is_file()
               for i, f in zip(rows["index"], rows["_images"])]
        self.rows = rows[np.asarray(has, dtype=bool)].sort_values("index")
        if self.rows.empty:
            raise CfxError(f"{', '.join(map(str, jobs))}: no sample has both images/original/<index>.png and "
                           f"images/counterfactual/<index>.png")
        self.index = self.rows["index"].astype(int).to_numpy()
        self.folders = [Path(f) for f in self.rows["_images"]]

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, batch_size: int, kind: str = "counterfactual"):
        """(slice of the rows, originals, counterfactuals) for each batch: N×C×H×W in [-1, 1]."""
        for start in range(0, len(self.index), batch_size):
            sl = slice(start, min(start + batch_size, len(self.index)))
            pairs = list(zip(self.index[sl], self.folders[sl]))
            yield (sl, torch.stack([load_image(f / "original" / f"{i}.png") for i, f in pairs]),
                   torch.stack([load_image(f / kind / f"{i}.png") for i, f in pairs]))


def load_pairs(job, samples: pd.DataFrame | None = None) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The rows that have both images, and all their originals and counterfactuals at once (``job``: a
    folder, or the shard folders of one job)."""
    pairs = Pairs(job, samples)
    _, x, x_cf = next(pairs.batches(len(pairs)))
    return pairs.rows, x, x_cf


def _success(rows: pd.DataFrame) -> np.ndarray:
    ok = rows["success"].astype(bool).to_numpy().copy() if "success" in rows else np.zeros(len(rows), bool)
    if "failed" in rows:
        ok &= ~(rows["failed"].astype(str) == "True").to_numpy()
    return ok


# -------------------------------------------------------------------------------------------------- metrics
def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v))


def realism_metrics(ecfg: DictConfig, cfg: DictConfig | None, names: list[str], pairs: Pairs, success, device
                    ) -> dict[str, float]:
    from cfx_cli.metrics.realism import MissingWeights, build_extractor, extract, realism

    r = ecfg.realism
    kind = str(r.features)
    if kind == "auto":
        dataset = str(OmegaConf.select(cfg, "dataset.name", default="")) if cfg is not None else ""
        kind = "oracle" if dataset == "synthetic" else "inception"
    try:
        net = build_extractor(kind, oracle=r.oracle, inception_weights=r.inception_weights)
    except MissingWeights as e:
        warn(f"{', '.join(names)} not computed: {e}")
        return {}
    bs = int(ecfg.batch_size)
    real, fake = [], []
    for _, x, x_cf in pairs.batches(bs):
        real.append(extract(net, x, bs, device))
        fake.append(extract(net, x_cf, bs, device))
    real, fake = torch.cat(real), torch.cat(fake)
    values = realism(real, fake, success, names, splits=int(r.sfid_splits), seed=int(ecfg.seed),
                     kid_subsets=int(r.kid_subsets), kid_subset_size=int(r.kid_subset_size))
    for name in names:
        if not _finite(values.get(name)):
            warn(f"{name} not computed: {int(np.sum(success))} successful counterfactual(s) of {len(pairs)} images "
                 f"({name} needs at least 2 on each side{', in each half' if name == 'sfid' else ''})")
    print(f"cfx evaluate: {', '.join(names)} in the {kind} feature space ({real.shape[1]} features)")
    return values


def _objective(cfg: DictConfig, model):
    """The classification objective of the job (its head and query read the model's outputs)."""
    from hydra.utils import instantiate

    from cfx_cli.objectives import build_objective

    target = OmegaConf.to_container(cfg.target, resolve=True) if cfg.get("target") else {}
    query = None
    if getattr(model, "head", "softmax") == "sigmoid" and (getattr(model, "num_classes", None) or 1) > 1 \
            and (target or {}).get("query") is None:
        query = getattr(instantiate(cfg.dataset), "query_index", None)  # CelebA: the dataset's attribute
    return build_objective(model, target, query=query)


def cout_metric(ecfg: DictConfig, cfg: DictConfig | None, pairs: Pairs, device) -> np.ndarray | None:
    from cfx_cli.metrics.cout import cout
    from cfx_cli.run import explained_model

    if cfg is None:
        warn("cout not computed: the job has no .hydra/config.yaml naming its classifier")
        return None
    if cfg.get("regressor"):
        warn("cout not computed: it needs a classifier, and this job explains a regressor")
        return None
    model, _ = explained_model(cfg)
    model = model.to(device).eval()
    objective = _objective(cfg, model)
    rows, bs = pairs.rows, int(ecfg.batch_size)
    label = torch.tensor(pd.to_numeric(rows["label"], errors="coerce").fillna(-1).astype(int).to_numpy())
    target = torch.tensor(pd.to_numeric(rows["target"], errors="coerce").fillna(-1).astype(int).to_numpy())
    values = np.concatenate([cout(model, objective, x, x_cf, label[sl], target[sl], steps=int(ecfg.cout.steps),
                                  batch_size=bs) for sl, x, x_cf in pairs.batches(bs)])
    if not np.isfinite(values).any():
        warn("cout not computed: no input is correctly classified (cout is defined on those only)")
    return values


def lpips_model(ecfg: DictConfig, prefix: str = ""):
    """LPIPS as ``lpips`` configures it (MissingWeights when a file is not there)."""
    from cfx_cli.metrics.perceptual import build_lpips

    c = ecfg.lpips
    return build_lpips(str(c.net), backbone_weights=c.get("backbone_weights"), lin_weights=c.get("lin_weights"),
                       oracle=c.get("oracle"), key=f"{prefix}lpips")


def closeness_metrics(ecfg: DictConfig, names: list[str], pairs: Pairs, device, prefix: str = ""
                      ) -> dict[str, np.ndarray]:
    """Per-sample lpips, fs and fva (face verification), s3 (SimSiam) columns; a network whose weights are
    missing is one warning and no column."""
    from cfx_cli.metrics import identity
    from cfx_cli.metrics.perceptual import lpips_distance
    from cfx_cli.metrics.realism import MissingWeights

    bs = int(ecfg.batch_size)
    columns: dict[str, np.ndarray] = {}

    def per_pair(net, fn) -> np.ndarray:
        return np.concatenate([fn(net, x, x_cf, bs, device) for _, x, x_cf in pairs.batches(bs)])

    jobs = []
    if "lpips" in names:
        jobs.append((["lpips"], lambda: lpips_model(ecfg, prefix), lambda net: {"lpips": per_pair(net, lpips_distance)}))
    faces = [m for m in ("fva", "fs") if m in names]
    if faces:
        def face_columns(net):
            cos = per_pair(net, identity.face_similarity)
            return {"fs": cos, "fva": identity.fva(cos, float(ecfg.identity.threshold)).astype(float)}
        jobs.append((faces, lambda: identity.build_face_verifier(ecfg.identity.weights, key=f"{prefix}identity.weights"),
                     face_columns))
    if "s3" in names:
        jobs.append((["s3"], lambda: identity.build_simsiam(ecfg.s3.weights, key=f"{prefix}s3.weights"),
                     lambda net: {"s3": per_pair(net, identity.s3_similarity)}))
    for wanted, build, run in jobs:
        try:
            net = build()
        except MissingWeights as e:
            warn(f"{', '.join(wanted)} not computed: {e}")
            continue
        columns.update(run(net.to(device).eval()))
    return columns


def attribute_metrics(ecfg: DictConfig, cfg: DictConfig | None, names: list[str], pairs: Pairs, success, device
                      ) -> tuple[dict, dict]:
    from hydra.utils import instantiate

    from cfx_cli.metrics.attributes import AttributeMetrics, load_labels

    a = ecfg.attributes
    if not a.get("oracle"):
        warn(f"{', '.join(names)} not computed: no attribute oracle (attributes.oracle is null; give a _target_ "
             f"node building an nn.Module that maps [-1, 1] images to N x A attribute scores)")
        return {}, {}
    query = a.get("query")
    if query is None and cfg is not None and OmegaConf.select(cfg, "dataset.query", default=None) is not None:
        from cfx_cli.data.celeba import resolve_query

        try:
            query = resolve_query(cfg.dataset.query)
        except CfxError:
            query = None
    oracle = instantiate(a.oracle).to(device)
    if query == "auto":  # the oracle knows its queried attribute (the synthetic one: the classifier's shape)
        task = "regression" if cfg is not None and cfg.get("regressor") else "classification"
        query = oracle.query_for(task) if hasattr(oracle, "query_for") else None
    labels = None
    if "cd" in names:
        if a.get("train_labels") is None or query is None:
            warn("cd not computed: it needs attributes.train_labels (the training labels) and attributes.query "
                 "(the queried attribute's column)")
            names = [n for n in names if n != "cd"]
        elif isinstance(a.train_labels, DictConfig):  # a _target_ node making the N×A labels
            labels = np.asarray(instantiate(a.train_labels))
        else:
            labels = load_labels(a.train_labels)
    metrics = AttributeMetrics(oracle, threshold=float(a.threshold), query=None if query is None else int(query),
                               train_labels=labels, exclude_query=bool(a.exclude_query),
                               batch_size=int(ecfg.batch_size))
    if not names:
        return {}, {}
    a, b = [], []
    for _, x, x_cf in pairs.batches(int(ecfg.batch_size)):
        a.append(metrics.predict(x))
        b.append(metrics.predict(x_cf))
    return metrics.from_predictions(np.concatenate(a), np.concatenate(b), success, names)


# ---------------------------------------------------------------------------------------- writing the job
def _atomic_write_rows(path: Path, rows: list[list[str]]) -> None:
    """Rows to ``path`` (temporary file, then renamed), keeping the line ending the file has (samples.csv:
    the csv module's \\r\\n; metrics.csv: pandas' \\n)."""
    ending = "\n"
    if path.is_file():
        with open(path, "rb") as fh:
            ending = "\r\n" if fh.readline().endswith(b"\r\n") else "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh, lineterminator=ending).writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _cell(v) -> str:
    return f"{float(v):.6g}" if _finite(v) else ""


def update_metrics(job: Path, values: dict[str, float], missing: list[str]) -> None:
    """Replace (or add) the rows of ``values`` in metrics.csv, leaving every other row as written; a metric
    of ``missing`` gets an empty value unless the file already has one."""
    path = job / "metrics.csv"
    rows: list[list[str]] = []
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    if not rows or rows[0][:2] != ["metric", "value"]:
        rows = [["metric", "value"], *rows]
    where = {r[0]: i for i, r in enumerate(rows) if i}
    for name, v in values.items():
        cell = repr(float(v)) if _finite(v) else ""
        if name in where:
            rows[where[name]] = [name, cell]
        else:
            where[name] = len(rows)
            rows.append([name, cell])
    for name in missing:
        if name not in where:
            rows.append([name, ""])
    _atomic_write_rows(path, rows)


def update_samples(job: Path, columns: dict[str, dict[int, float]]) -> None:
    """Set (or add) per-sample columns of samples.csv by index, leaving every other cell as written."""
    path = job / "samples.csv"
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    at = header.index("index")
    for name in columns:
        if name not in header:
            header.append(name)
            for r in rows[1:]:
                if len(r) == len(header) - 1:  # a torn row (killed mid-write) stays as it is
                    r.append("")
    for name, by_index in columns.items():
        col = header.index(name)
        for r in rows[1:]:
            if len(r) != len(header):
                continue
            try:
                r[col] = _cell(by_index.get(int(r[at])))
            except ValueError:
                continue
    _atomic_write_rows(path, rows)


# -------------------------------------------------------------------------------------------------- driver
def metric_names(ecfg: DictConfig, prefix: str = "") -> list[str]:
    names = [str(m) for m in (ecfg.metrics if not isinstance(ecfg.metrics, str) else [ecfg.metrics])]
    unknown = [m for m in names if m not in KNOWN]
    if unknown:
        raise CfxError(f"{prefix}metrics={unknown[0]} is unknown; choose among {', '.join(KNOWN)} "
                       f"(e.g. {prefix}metrics=[fid,cout])")
    return names


def compute(pairs: Pairs, ecfg: DictConfig, cfg: DictConfig | None, names: list[str], device, prefix: str = "",
            soft: bool = False) -> tuple[dict[str, float], dict[str, dict[int, float]], dict[str, float]]:
    """``names`` on ``pairs``: (set-level values, per-sample columns by index, seconds per metric group).
    Writes nothing. ``prefix``: where the settings sit in the config, for messages naming a key. ``soft``
    (inside a job, whose counterfactuals are already saved): a group that cannot be computed (a missing
    file, say) is one warning line, and the job still ends done."""
    from cfx_cli.metrics.summary import closeness

    success = _success(pairs.rows)
    level: dict[str, float] = {}
    per: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    index = pairs.index.tolist()

    def realism_group(wanted):
        level.update(realism_metrics(ecfg, cfg, wanted, pairs, success, device))

    def cout_group(wanted):
        values = cout_metric(ecfg, cfg, pairs, device)
        if values is not None:
            per["cout"] = dict(zip(index, values.tolist()))
            level["cout"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def closeness_group(wanted):
        columns = closeness_metrics(ecfg, wanted, pairs, device, prefix)
        per.update({k: dict(zip(index, v.tolist())) for k, v in columns.items()})
        level.update({k: v for k, v in closeness(pairs.rows.assign(**columns)).items() if k in wanted})

    def attribute_group(wanted):
        columns, values = attribute_metrics(ecfg, cfg, wanted, pairs, success, device)
        per.update({k: dict(zip(index, v.tolist())) for k, v in columns.items()})
        level.update(values)

    for group, run in ((REALISM, realism_group), (("cout",), cout_group), (CLOSENESS, closeness_group),
                       (ATTRIBUTE_METRICS, attribute_group)):
        wanted = [m for m in group if m in names]
        if not wanted:
            continue
        t0 = time.time()
        try:
            run(wanted)
        except Exception as e:  # noqa: BLE001 - see soft
            if not soft or isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warn(f"{', '.join(wanted)} not computed ({prefix}...): {first}; the job's counterfactuals are saved: "
                 f"`cfx evaluate` adds them later")
        seconds[", ".join(wanted)] = time.time() - t0
    return level, per, seconds


def _timings(seconds: dict[str, float]) -> str:
    return "; ".join(f"{k} {v:.2f} s" for k, v in seconds.items()) if seconds else "0 s"


def evaluate(job_dir: str | Path, ecfg: DictConfig) -> dict[str, float]:
    """Compute ``ecfg.metrics`` on the job folder and write them into it; returns the set-level values."""
    from cfx_cli.outputs import JobLock
    from cfx_cli.run import resolve_device

    job = Path(job_dir)
    if not (job / "samples.csv").is_file():
        raise CfxError(f"{job} is not a job folder with samples (no samples.csv); give the folder that `cfx run` "
                       f"wrote (its hydra.run.dir)")
    names = metric_names(ecfg)
    device = resolve_device(ecfg.device)
    with JobLock(job):
        cfg = job_config(job)
        pairs = Pairs(job)
        level, per, seconds = compute(pairs, ecfg, cfg, names, device)
        # a metric not computed is an empty cell, unless the job already has a value for it (kept)
        existing = _metric_names(job)
        write = {k: v for k, v in level.items() if _finite(v)}
        asked = names + (["kid_std"] if "kid" in names else [])
        kept = [m for m in asked if m not in write and m in existing]
        if kept:
            warn(f"metrics.csv keeps the job's earlier {', '.join(kept)}")
        update_metrics(job, write, [m for m in asked if m not in write and m not in existing])
        if per:
            update_samples(job, per)
    success = _success(pairs.rows)
    print(f"cfx evaluate: {job}: {len(pairs)} samples ({int(success.sum())} successful); metrics took "
          f"{_timings(seconds)}")
    shown = [f"{k}={v:.4g}" for k, v in level.items() if k in names or k == "kid_std"]
    print("  ".join(shown) if shown else "no metric computed")
    return level


# Metrics of the whole set (not a mean of per-sample values): a sharded run gets them from its merged shards.
SET_LEVEL = (*REALISM, "cd")


def in_job(job: Path, cfg: DictConfig, device) -> tuple[dict[str, float], float]:
    """The job's ``metrics.evaluate`` metrics at its end (the job holds its folder's lock): per-sample ones
    into samples.csv; returns (set-level values, seconds). A shard of a sharded run leaves the set-level
    ones to ``cfx aggregate``, which computes them on all the shards' samples together."""
    ecfg = OmegaConf.select(cfg, "metrics.evaluate")
    if ecfg is None or not ecfg.get("metrics"):
        return {}, 0.0
    names = metric_names(ecfg)
    if int(OmegaConf.select(cfg, "data.num_shards", default=1) or 1) > 1:
        left = [m for m in names if m in SET_LEVEL]
        if left:
            print(f"cfx: {', '.join(left)} are measured over all the shards together by `cfx aggregate` "
                  f"(this job is one shard)", file=sys.stderr)
        names = [m for m in names if m not in SET_LEVEL]
    if not names:
        return {}, 0.0
    t0 = time.time()
    try:
        pairs = Pairs(job)
    except CfxError:  # no sample has both images (every sample failed): nothing to measure
        return {}, 0.0
    level, per, seconds = compute(pairs, ecfg, cfg, names, device, prefix="metrics.evaluate.", soft=True)
    if per:
        update_samples(job, per)
    elapsed = time.time() - t0
    print(f"cfx: metrics {', '.join(names)} took {_timings(seconds)}", file=sys.stderr)
    return _set_level(level), elapsed


def _recorded(cfg: dict | DictConfig) -> tuple[DictConfig, DictConfig | None, torch.device | None]:
    """A finished job's config, its ``metrics.evaluate`` settings (from .hydra/config.yaml) and the device to measure
    on here: whatever this machine has (the job may have run on a GPU that the aggregating machine lacks)."""
    from cfx_cli.run import resolve_device

    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    ecfg = OmegaConf.select(cfg, "metrics.evaluate")
    if ecfg is None or not ecfg.get("metrics"):
        return cfg, None, None
    return cfg, ecfg, resolve_device("auto")


def _set_level(level: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in level.items() if k in SET_LEVEL or k == "kid_std"}


def merged_set_level(jobs: list[Path], cfg: dict | DictConfig) -> dict[str, float]:
    """The set-level metrics a sharded run asked for (its ``metrics.evaluate``), over all its shards'
    samples at once (never a mean of per-shard values)."""
    cfg, ecfg, device = _recorded(cfg)
    names = [m for m in metric_names(ecfg) if m in SET_LEVEL] if ecfg is not None else []
    if not names:
        return {}
    level, _, _ = compute(Pairs(jobs), ecfg, cfg, names, device)
    return _set_level(level)


def sigma_l(jobs: list[list[Path]], cfg: dict | DictConfig) -> float | None:
    """σ_L of jobs that differ only in their seed (each given by its folder, or its shard folders): per
    image whose counterfactual succeeded in every job, the mean LPIPS over pairs of seeds; the mean over
    those images (DiME's compute_LPIPS uses net=vgg: lpips.net=vgg for its numbers). None when the jobs'
    config asks no LPIPS (``metrics.evaluate``)."""
    from cfx_cli.metrics.perceptual import sigma_l as per_image

    _, ecfg, device = _recorded(cfg)
    if ecfg is None or ecfg.get("lpips") is None or "lpips" not in metric_names(ecfg):
        return None
    pairs = [Pairs(j) for j in jobs]
    # DiME's compute_LPIPS: the images whose counterfactual succeeded in every run
    common = set.intersection(*({int(i) for i, ok in zip(p.index, _success(p.rows)) if ok} for p in pairs))
    if not common:
        raise CfxError(f"the {len(jobs)} seeds' jobs share no image whose counterfactual succeeded in each")
    idx = sorted(common)
    images = []
    for p in pairs:
        where = dict(zip(p.index.tolist(), p.folders))
        images.append(torch.stack([load_image(where[i] / "counterfactual" / f"{i}.png") for i in idx]))
    net = lpips_model(ecfg, "metrics.evaluate.")
    return float(per_image(images, net, int(ecfg.batch_size), device).mean())


def _metric_names(job: Path) -> set[str]:
    path = job / "metrics.csv"
    if not path.is_file():
        return set()
    with open(path, newline="") as fh:
        return {r[0] for r in csv.reader(fh) if r and r[0] != "metric" and len(r) > 1 and r[1] != ""}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cfx evaluate", description=__doc__.split("\n\n")[0],
                                 epilog="settings and their defaults: conf/evaluate/default.yaml (--cfg prints them)")
    ap.add_argument("job", help="a job folder written by cfx run (or the merged folder of a sharded run)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. metrics=[fid,sfid,kid,cout] "
                                                 "realism.features=inception realism.inception_weights=PATH")
    ap.add_argument("--cfg", action="store_true", help="print the composed settings and exit")
    args = ap.parse_args(argv)
    from cfx_cli.cli import _user_error

    try:
        ecfg = settings(args.job, args.overrides)
        if args.cfg:
            print(OmegaConf.to_yaml(ecfg))
            return
        evaluate(args.job, ecfg)
    except Exception as e:  # noqa: BLE001 - one line for what a user can fix, a traceback for a bug
        msg = _user_error(e) or _override_error(e)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        raise SystemExit(2)


def _override_error(exc: BaseException) -> str | None:
    """Hydra's own message for a bad override (unknown key, syntax), on one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return str(exc).strip().splitlines()[0]
    return None
