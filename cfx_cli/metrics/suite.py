"""The metrics measured on a job's saved images, whoever asks: `cfx run` at a job's end (its
``metrics.evaluate``), `cfx evaluate` on a finished job, `cfx aggregate` over the merged shards of a sharded
run (set-level metrics) and across seeds (σ_L).

Every function reads a :class:`cfx_cli.outputs.Pairs` (the samples that have both images) and writes
nothing: the caller writes what it gets. The explained model, for COUT, comes from the caller too
(``explained() -> (model, objective)``, the job builder's). A metric that cannot be computed (a missing
weights file, too few counterfactuals) is a one-line warning and no value, never a value from random weights.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from cfx_cli.errors import CfxError
from cfx_cli.metrics.realism import REALISM
from cfx_cli.metrics.summary import closeness, finite

ATTRIBUTE_METRICS = ("mnac", "cd")
CLOSENESS = ("lpips", "fva", "fs", "s3")  # per sample (their set values: cfx_cli.metrics.summary.closeness)
KNOWN = (*REALISM, "cout", *CLOSENESS, *ATTRIBUTE_METRICS)
# Metrics of the whole set (not a mean of per-sample values): a sharded run gets them from its merged shards.
SET_LEVEL = (*REALISM, "cd")


def warn(msg: str) -> None:
    print(f"cfx evaluate: warning: {msg}", file=sys.stderr)


def metric_names(ecfg: DictConfig, prefix: str = "") -> list[str]:
    names = [str(m) for m in (ecfg.metrics if not isinstance(ecfg.metrics, str) else [ecfg.metrics])]
    unknown = [m for m in names if m not in KNOWN]
    if unknown:
        raise CfxError(f"{prefix}metrics={unknown[0]} is unknown; choose among {', '.join(KNOWN)} "
                       f"(e.g. {prefix}metrics=[fid,cout])")
    return names


def realism_metrics(ecfg: DictConfig, cfg: DictConfig | None, names: list[str], pairs, success, device
                    ) -> dict[str, float]:
    from cfx_cli.metrics.realism import MissingWeights, build_extractor, extract, realism

    r = ecfg.realism
    kind = str(r.features)
    if kind == "auto":
        from cfx_cli.config import choice

        dataset = choice(cfg, "dataset") if cfg is not None else None
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
        if not finite(values.get(name)):
            warn(f"{name} not computed: {int(np.sum(success))} successful counterfactual(s) of {len(pairs)} images "
                 f"({name} needs at least 2 on each side{', in each half' if name == 'sfid' else ''})")
    print(f"cfx evaluate: {', '.join(names)} in the {kind} feature space ({real.shape[1]} features)")
    return values


def cout_metric(ecfg: DictConfig, cfg: DictConfig | None, pairs, device, explained=None) -> np.ndarray | None:
    """COUT per sample, with the job's explained model and objective (``explained()``)."""
    from cfx_cli.metrics.cout import cout

    if cfg is None or explained is None:
        warn("cout not computed: the job has no .hydra/config.yaml naming its classifier")
        return None
    if cfg.get("regressor"):
        warn("cout not computed: it needs a classifier, and this job explains a regressor")
        return None
    model, objective = explained()
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


def closeness_metrics(ecfg: DictConfig, names: list[str], pairs, device, prefix: str = ""
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


def attribute_metrics(ecfg: DictConfig, cfg: DictConfig | None, names: list[str], pairs, success, device
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


def compute(pairs, ecfg: DictConfig, cfg: DictConfig | None, names: list[str], device, prefix: str = "",
            soft: bool = False, explained=None) -> tuple[dict[str, float], dict[str, dict[int, float]], dict[str, float]]:
    """``names`` on ``pairs``: (set-level values, per-sample columns by index, seconds per metric group).
    Writes nothing. ``prefix``: where the settings sit in the config, for messages naming a key. ``soft``
    (inside a job, whose counterfactuals are already saved): a group that cannot be computed (a missing
    file, say) is one warning line, and the job still ends done."""
    success = pairs.success
    level: dict[str, float] = {}
    per: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}
    index = pairs.index.tolist()

    def realism_group(wanted):
        level.update(realism_metrics(ecfg, cfg, wanted, pairs, success, device))

    def cout_group(wanted):
        values = cout_metric(ecfg, cfg, pairs, device, explained)
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


def timings(seconds: dict[str, float]) -> str:
    return "; ".join(f"{k} {v:.2f} s" for k, v in seconds.items()) if seconds else "0 s"


def set_level(level: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in level.items() if k in SET_LEVEL or k == "kid_std"}



def settings_of(cfg: dict | DictConfig | None) -> DictConfig | None:
    """A finished job's ``metrics.evaluate`` settings (what it was measured with), or None."""
    if cfg is None:
        return None
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    ecfg = OmegaConf.select(cfg, "metrics.evaluate")
    return ecfg if ecfg is not None and ecfg.get("metrics") else None


def merged_set_level(pairs, cfg: dict | DictConfig, device) -> dict[str, float]:
    """The set-level metrics a sharded run asked for (its ``metrics.evaluate``), over all its shards'
    samples at once (``pairs`` of all the shard folders; never a mean of per-shard values)."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    ecfg = settings_of(cfg)
    names = [m for m in metric_names(ecfg) if m in SET_LEVEL] if ecfg is not None else []
    if not names:
        return {}
    level, _, _ = compute(pairs, ecfg, cfg, names, device)
    return set_level(level)


def sigma_l(pairs: list, cfg: dict | DictConfig, device) -> float | None:
    """σ_L of jobs that differ only in their seed (``pairs``: each job's, from its folder or its shard folders):
    per image whose counterfactual succeeded in every job, the mean LPIPS over pairs of seeds; the mean over
    those images (DiME's compute_LPIPS uses net=vgg: lpips.net=vgg for its numbers). None when the jobs'
    config asks no LPIPS (``metrics.evaluate``)."""
    from cfx_cli.metrics.perceptual import sigma_l as per_image

    ecfg = settings_of(cfg)
    if ecfg is None or ecfg.get("lpips") is None or "lpips" not in metric_names(ecfg):
        return None
    # DiME's compute_LPIPS: the images whose counterfactual succeeded in every run
    common = set.intersection(*({int(i) for i, ok in zip(p.index, p.success) if ok} for p in pairs))
    if not common:
        raise CfxError(f"the {len(pairs)} seeds' jobs share no image whose counterfactual succeeded in each")
    idx = sorted(common)
    images = [p.images(idx) for p in pairs]
    net = lpips_model(ecfg, "metrics.evaluate.")
    return float(per_image(images, net, int(ecfg.batch_size), device).mean())
