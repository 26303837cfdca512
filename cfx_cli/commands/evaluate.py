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
The job folder is locked while it is evaluated: a job still running there is refused. A damaged folder (a
samples.csv or metrics.csv cut mid-line, a missing or unreadable image of a sample) is refused in one line
naming the file, exit status 1, and nothing is written; ``--force`` evaluates the samples that are whole and
says how many it used.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cfx_cli import config
from cfx_cli.errors import CfxError, DamagedJob, one_line_errors, override_error
from cfx_cli.job.build import JobParts, resolve_device
from cfx_cli.metrics import suite
from cfx_cli.metrics.summary import finite
from cfx_cli.outputs import (JobLock, Pairs, damage, job_config, metrics_with_values, read_samples, update_metrics,
                             update_samples)


def compose(overrides=()) -> DictConfig:
    """conf/evaluate/default.yaml with Hydra overrides (Hydra's compose API)."""
    return config.compose(overrides, config_name="default", folder="evaluate")


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
        suite.warn(f"the job's metrics.evaluate settings cannot be read ({str(e).splitlines()[0]}); using "
                   f"conf/evaluate/default.yaml")
        return cli
    base = OmegaConf.merge(compose(()), base)  # keys added since the job ran get their defaults
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element().lstrip("+~")
        OmegaConf.update(base, key, OmegaConf.select(cli, key), merge=False, force_add=True)
    return base


def explained(cfg: DictConfig, device):
    """The job's explained model and objective, for COUT, from the job builder."""
    parts = JobParts(cfg, device)
    return parts.model.eval(), parts.objective


def checked_samples(job: Path, force: bool = False):
    """The rows to evaluate: all of samples.csv when the folder is whole (None); with ``force``, the rows whose
    files are whole. A damaged folder without ``force`` is one line naming the first damaged file."""
    problems, spoiled = damage(job)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    if not force:
        raise DamagedJob(f"{problems[0]}{more}: the job folder is damaged, nothing was evaluated: restore the file "
                         f"(or re-run the job into a new hydra.run.dir), or add --force to evaluate the samples "
                         f"that are whole")
    rows = read_samples(job)
    kept = rows[~rows["index"].isin(spoiled)]
    print(f"cfx evaluate: --force: {problems[0]}{more}; evaluating {len(kept)} of the {len(rows)} readable rows of "
          f"samples.csv", file=sys.stderr)
    return kept


def evaluate(job_dir: str | Path, ecfg: DictConfig, force: bool = False) -> dict[str, float]:
    """Compute ``ecfg.metrics`` on the job folder and write them into it; returns the set-level values.
    A damaged folder is refused before anything is read or written (``force``: the whole samples only)."""
    job = Path(job_dir)
    if not (job / "samples.csv").is_file():
        raise CfxError(f"{job} is not a job folder with samples (no samples.csv); give the folder that `cfx run` "
                       f"wrote (its hydra.run.dir)")
    names = suite.metric_names(ecfg)
    device = resolve_device(ecfg.device)
    if not os.access(job, os.W_OK | os.X_OK):  # the lock and the metrics are written there
        raise CfxError(f"{job}: cannot write in the job folder (read-only or no permission): cfx evaluate writes "
                       f"its metrics there; copy the folder somewhere writable and evaluate the copy")
    with JobLock(job):
        samples = checked_samples(job, force)
        cfg = job_config(job)
        pairs = Pairs(job, samples)
        level, per, seconds = suite.compute(pairs, ecfg, cfg, names, device,
                                            explained=lambda: explained(cfg, device))
        # a metric not computed is an empty cell, unless the job already has a value for it (kept)
        existing = metrics_with_values(job)
        write = {k: v for k, v in level.items() if finite(v)}
        asked = names + (["kid_std"] if "kid" in names else [])
        kept = [m for m in asked if m not in write and m in existing]
        if kept:
            suite.warn(f"metrics.csv keeps the job's earlier {', '.join(kept)}")
        update_metrics(job, write, [m for m in asked if m not in write and m not in existing])
        if per:
            update_samples(job, per)
    print(f"cfx evaluate: {job}: {len(pairs)} samples ({int(pairs.success.sum())} successful); metrics took "
          f"{suite.timings(seconds)}")
    shown = [f"{k}={v:.4g}" for k, v in level.items() if k in names or k == "kid_std"]
    print("  ".join(shown) if shown else "no metric computed")
    return level


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cfx evaluate", description=__doc__.split("\n\n")[0],
                                 epilog="settings and their defaults: conf/evaluate/default.yaml (--cfg prints them)")
    ap.add_argument("job", help="a job folder written by cfx run (or the merged folder of a sharded run)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. metrics=[fid,sfid,kid,cout] "
                                                 "realism.features=inception realism.inception_weights=PATH")
    ap.add_argument("--cfg", action="store_true", help="print the composed settings and exit")
    ap.add_argument("--force", action="store_true", help="on a damaged job folder, evaluate the samples whose "
                                                         "files are whole (and say how many)")
    args = ap.parse_args(argv)
    with one_line_errors(override_error):
        ecfg = settings(args.job, args.overrides)
        if args.cfg:
            print(OmegaConf.to_yaml(ecfg))
            return
        evaluate(args.job, ecfg, force=args.force)
