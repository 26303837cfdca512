"""`cfx aggregate`: job folders -> paper-style tables.

Finds every job folder (a folder with ``.hydra/config.yaml`` or ``status.json``)
under the given paths, reads its config choices and metrics, merges the shards of
one job (same config but ``data.shard``) by recomputing the set-level metrics
from their samples, groups by the chosen keys (method by default), and reports
mean ± std over seeds. Missing and failed jobs are listed, never dropped silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cfx_cli.metrics.summary import summarise
from cfx_cli.outputs import read_metrics, read_samples

DEFAULT_METRICS = ["flip_rate", "success_rate", "mae_to_target", "l1", "l2", "mnac", "ideal_cf_l1",
                   "shortcut_reveal_rate", "oracle_flip_rate", "nfe_unet", "nfe_model", "seconds_per_cf",
                   "peak_mem_mib"]


def find_jobs(paths: list[str]) -> list[Path]:
    jobs = set()
    for p in map(Path, paths):
        if not p.exists():
            raise SystemExit(f"cfx aggregate: error: {p} does not exist")
        for marker in [p / "status.json", *p.rglob("status.json"), *p.rglob(".hydra/config.yaml")]:
            if marker.exists():
                jobs.add(marker.parent.parent if marker.parent.name == ".hydra" else marker.parent)
    return sorted(jobs)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):  # e.g. method.scales: a value to group by, and to tell sweeps' jobs apart
            out[key] = "[" + ", ".join(str(x) for x in v) + "]"
        else:
            out[key] = v
    return out


def job_record(job: Path) -> dict:
    """Config choices and values of one job, its state and its metrics."""
    rec: dict = {"job": str(job)}
    cfg_file, hydra_file = job / ".hydra" / "config.yaml", job / ".hydra" / "hydra.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    rec.update(_flatten(cfg or {}))
    if hydra_file.exists():
        choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        rec.update({k: v for k, v in choices.items() if not k.startswith("hydra/")})
    if "method" not in rec:
        rec["method"] = rec.get("method.name")
    if rec.get("regressor") in (None, "null") and "classifier" in rec:
        rec["model"] = rec.get("classifier")
    else:
        rec["model"] = rec.get("regressor")
    status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else {}
    rec["state"] = status.get("state", "missing")
    rec["error"] = status.get("error")
    rec["task"] = status.get("task")
    rec["metrics"] = read_metrics(job)
    return rec


def merge_shards(records: list[dict]) -> list[dict]:
    """One record per job: shards (same config but data.shard) are merged through their samples."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = tuple(sorted((k, str(v)) for k, v in r.items()
                           if k not in ("job", "state", "error", "metrics", "data.shard")))
        groups.setdefault(key, []).append(r)
    merged = []
    for rs in groups.values():
        if len(rs) == 1 or int(rs[0].get("data.num_shards", 1) or 1) == 1:
            merged.extend(rs)
            continue
        r = dict(rs[0], job=",".join(x["job"] for x in rs))
        expected = int(rs[0]["data.num_shards"])
        bad = [x for x in rs if x["state"] != "done"]
        if bad or len(rs) < expected:
            r["state"] = "failed" if bad else "missing"
            r["error"] = f"{len(rs) - len(bad)}/{expected} shards done"
            r["metrics"] = {}
        else:
            samples = pd.concat([read_samples(x["job"]) for x in rs]).drop_duplicates("index")
            r["metrics"] = summarise(samples, r.get("task") or "classification")
        merged.append(r)
    return merged


def table(records: list[dict], by: list[str], metrics: list[str]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r["state"] == "done":
            rows.append({**{k: r.get(k) for k in by}, "seed": r.get("seed"), **r["metrics"]})
    if not rows:
        return pd.DataFrame(columns=[*by, "n_jobs"])
    df = pd.DataFrame(rows)
    present = [m for m in metrics if m in df.columns and df[m].notna().any()]
    out = []
    for key, g in df.groupby(by, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n_jobs"] = len(g)
        for m in present:
            vals = g[m].dropna().astype(float)
            row[m] = (vals.mean(), vals.std(ddof=1) if len(vals) > 1 else np.nan)
        out.append(row)
    return pd.DataFrame(out)


def _fmt(v) -> str:
    if isinstance(v, tuple):
        mean, std = v
        if np.isnan(mean):
            return ""
        digits = 1 if abs(mean) >= 100 else 3
        return f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v)


def render(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(text table with 'mean ± std' cells, numeric table with _mean/_std columns)."""
    text = df.map(_fmt) if len(df) else df
    numeric = {}
    for c in df.columns:
        if len(df) and isinstance(df[c].iloc[0], tuple):
            numeric[f"{c}_mean"] = [v[0] for v in df[c]]
            numeric[f"{c}_std"] = [v[1] for v in df[c]]
        else:
            numeric[c] = list(df[c])
    return text, pd.DataFrame(numeric)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="cfx aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="job folders or folders holding them (e.g. a sweep folder)")
    ap.add_argument("--by", nargs="+", default=["method"],
                    help="config keys to group by: choices (method, classifier, regressor, model, dataset, ...) "
                         "or values (method.variant, target.mode, ...)")
    ap.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    ap.add_argument("--out", default=None, help="folder for table.{md,csv,tex} (default: the first path)")
    args = ap.parse_args(argv)
    jobs = find_jobs(args.paths)
    if not jobs:
        print(f"cfx aggregate: error: no job folders under {' '.join(args.paths)}", file=sys.stderr)
        raise SystemExit(2)
    records = merge_shards([job_record(j) for j in jobs])
    df = table(records, args.by, args.metrics)
    text, numeric = render(df)
    out = Path(args.out or args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    md = text.to_markdown(index=False) if len(text) else "(no finished jobs)"
    (out / "table.md").write_text(md + "\n")
    numeric.to_csv(out / "table.csv", index=False)
    (out / "table.tex").write_text(text.to_latex(index=False) if len(text) else "")
    print(md)
    problems = [r for r in records if r["state"] != "done"]
    if problems:
        print(f"\n{len(problems)} job(s) not included:")
        for r in problems:
            print(f"  {r['state']:8s} {r['job']}" + (f"  ({r['error']})" if r.get("error") else ""))
    print(f"\nwrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.tex'}")
    return df
