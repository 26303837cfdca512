"""Job records -> tables, for `cfx aggregate` and `cfx report`.

From the records of job folders (``cfx_cli.outputs.job_record``: config choices, metrics), merges the shards of
one job (same config but ``data.shard``) by recomputing the set-level metrics
from their samples, groups by the chosen keys (method by default), and reports
mean ± std over seeds. Missing and failed jobs are listed, never dropped silently:
a job whose shards are not all done, and a job number of a Hydra sweep (counted
from its ``multirun.yaml``) that has no folder. A row that averages jobs whose
configs differ in more than the ``--by`` keys and the seed is flagged.
"""
from __future__ import annotations

import functools
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cfx_cli.errors import CfxError
from cfx_cli.metrics.summary import summarise
from cfx_cli.outputs import Pairs, damage, read_samples

DEFAULT_METRICS = ["flip_rate", "success_rate", "real_flip_rate", "corrected_rate", "adversarial_rate", "mae_to_target",
                   "mae_to_target_before", "l1", "l2", "mnac",
                   "ideal_cf_l1", "shortcut_reveal_rate", "oracle_flip_rate", "oracle_mae", "nfe_unet", "nfe_unet_backward",
                   "nfe_decoder", "nfe_decoder_backward", "nfe_model", "nfe_model_backward", "seconds_per_cf",
                   "peak_mem_mib", "fid", "cout", "metrics_seconds"]

# Record fields that are not config, and config keys that may differ between the jobs of one row.
BOOKKEEPING = {"job", "folders", "state", "error", "metrics", "task"}
NOT_A_MIX = {"seed", "data.shard", "data.num_shards", "device", "batch_size"}
# Settings that do not make the counterfactuals (what a job measured at its end), by prefix.
NOT_A_MIX_PREFIXES = ("hydra.", "hydra/", "metrics.evaluate.")


def job_folders(record: dict) -> list[Path]:
    """The folders of a record: its own, or those of the shards merged into it (folder names may hold ',')."""
    return [Path(f) for f in record.get("folders") or [record["job"]]]


def merge_shards(records: list[dict]) -> list[dict]:
    """One record per job: shards (same config but data.shard) are merged through their samples.

    A sharded job is complete only when every shard 0..num_shards-1 is done; otherwise it is
    reported as missing (or failed), with how many shards are done, even if one shard folder exists.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = tuple(sorted((k, str(v)) for k, v in r.items()
                           if k not in BOOKKEEPING and k not in ("data.shard", "device", "batch_size")))
        groups.setdefault(key, []).append(r)
    merged = []
    for rs in groups.values():
        expected = _int(rs[0].get("data.num_shards"), 1)
        if expected <= 1:
            for r in rs:  # a finished job without metrics is never averaged as if it had none
                if r["state"] == "done" and not r["metrics"]:
                    r["state"], r["error"] = "incomplete", "state done but metrics.csv is missing or empty"
            merged.extend(rs)
            continue
        r = dict(rs[0], job=",".join(x["job"] for x in rs), folders=[x["job"] for x in rs])
        done = [x for x in rs if x["state"] == "done"]
        done_shards = {_int(x.get("data.shard"), 0) for x in done}
        absent = [i for i in range(expected) if i not in done_shards]
        if absent:
            failed = any(x["state"] == "failed" for x in rs)
            bad = next((x for x in rs if x["state"] == "unreadable"), None)  # a damaged shard says why
            r["state"] = "unreadable" if bad else "failed" if failed else "missing"
            r["error"] = (f"{len(done_shards & set(range(expected)))}/{expected} shards done; "
                          f"shard{'s' if len(absent) > 1 else ''} {', '.join(map(str, absent))} "
                          f"{'failed or ' if failed else ''}missing" + (f"; {bad['error']}" if bad else ""))
            r["metrics"] = {}
        elif (damaged := next((p for x in done for p in damage(x["job"], Path(x["job"], "images").is_dir())[0]),
                              None)) is not None:
            # its set-level metrics read every shard's images: a missing or unreadable one is named, not skipped
            # (a folder without images/ at all gets no set-level values, and a warning, from merged_set_level)
            r["state"], r["error"], r["metrics"] = "unreadable", damaged, {}
        else:
            r["state"], r["error"] = "done", None
            r["task"] = next((x["task"] for x in done if x.get("task")), None)
            samples = pd.concat([read_samples(x["job"]) for x in done]).drop_duplicates("index")
            r["metrics"] = summarise(samples, r.get("task") or "classification")
            r["metrics"].update(merged_set_level([Path(x["job"]) for x in done]))
        merged.append(r)
    return merged


def merged_set_level(shards: list[Path]) -> dict[str, float]:
    """FID, sFID, KID, CD of a sharded run over all its shards' samples together (never a mean of shards),
    as its config's ``metrics.evaluate`` asks; a problem is one warning line and no value."""
    from cfx_cli.job.build import resolve_device
    from cfx_cli.metrics.suite import merged_set_level as compute

    cfg_file = shards[0] / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return {}
    try:  # measured on whatever this machine has (the job may have run on a GPU that it lacks)
        values = compute(Pairs(shards), yaml.safe_load(cfg_file.read_text()) or {}, resolve_device("auto"))
    except Exception as e:  # noqa: BLE001 - the table goes on without them
        print(f"cfx aggregate: warning: set-level metrics of the sharded job {shards[0].parent}/... not computed: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return {}
    if values:
        print(f"cfx aggregate: {', '.join(values)} over the merged samples of {len(shards)} shards "
              f"({', '.join(map(str, shards))})", file=sys.stderr)
    return values


def _int(v, default: int) -> int:
    try:
        return int(v) if v is not None and str(v) != "" else default
    except (TypeError, ValueError):
        return default


def sweep_jobs(multirun_yaml: Path) -> list[str] | None:
    """The jobs a Hydra sweep launches, in job-number order, each as its swept 'key=value' choices.

    Counted as Hydra's BasicSweeper does: ``hydra.sweeper.params`` (experiment files) then the
    command line's ``hydra.overrides.task``, parsed by Hydra's own override parser; a later
    override of a key replaces an earlier one; the jobs are the product of the choices.
    None when the sweep cannot be enumerated (another sweeper, an interval sweep, ...).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = (yaml.safe_load(multirun_yaml.read_text()) or {}).get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    target = str(sweeper.get("_target_") or "")
    if target and not target.endswith("BasicSweeper"):
        return None
    params = sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] if isinstance(params, dict) else []
    args += [str(a) for a in ((hydra_cfg.get("overrides") or {}).get("task") or [])]
    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(args):
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                return None
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            choices[key] = [o.input_line or key]
    swept = [v for v in choices.values() if len(v) != 1]
    return [" ".join(combo) for combo in itertools.product(*swept)]


def _job_num(job: Path, sweep: Path) -> int | None:
    hydra_file = job / ".hydra" / "hydra.yaml"
    if hydra_file.exists():
        num = ((yaml.safe_load(hydra_file.read_text()) or {}).get("hydra") or {}).get("job") or {}
        num = num.get("num") if isinstance(num, dict) else None
        if isinstance(num, int):
            return num
    m = re.match(r"(\d+)(_|$)", job.relative_to(sweep).parts[0])
    return int(m.group(1)) if m else None


def missing_sweep_jobs(paths: list[str], jobs: list[Path]) -> list[dict]:
    """A 'missing' record for each job number of a sweep under ``paths`` that has no job folder."""
    sweeps = set()
    for p in map(Path, paths):
        sweeps.update(m.parent for m in [p / "multirun.yaml", *p.rglob("multirun.yaml")] if m.is_file())
    missing = []
    for sweep in sorted(sweeps):
        try:
            expected = sweep_jobs(sweep / "multirun.yaml")
        except Exception as e:  # a sweep Hydra itself could not expand without its config (glob, ...)
            print(f"cfx aggregate: warning: cannot count the jobs of the sweep {sweep}: "
                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            continue
        if expected is None:
            continue
        found = {_job_num(j, sweep) for j in jobs if j != sweep and j.is_relative_to(sweep)}
        for num, choice in enumerate(expected):
            if num not in found:
                missing.append({"job": str(sweep / f"{num}_*"), "state": "missing", "metrics": {},
                                "error": f"job {num} of the sweep {sweep}: no folder"
                                         + (f" ({choice})" if choice else "")})
    return missing


def check_by(records: list[dict], by: list[str]) -> None:
    keys = set().union(*(r.keys() for r in records)) - BOOKKEEPING
    bad = [k for k in by if k not in keys]
    if bad:
        examples = [k for k in ("method", "classifier", "method.variant", "dataset.num_images") if k in keys]
        examples = examples or sorted(keys)[:4]
        raise CfxError(f"--by {' '.join(bad)}: no job has {'this config key' if len(bad) == 1 else 'these config keys'}"
                       f"; keys look like {', '.join(examples)}")


def _label(by: list[str], values) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in zip(by, values))


@functools.lru_cache(maxsize=1)
def derived_choices() -> frozenset[str]:
    """Config groups chosen from other choices: 'model', and the defaults list's interpolated entries (as Hydra
    records their choices: ``group@package`` where the entry names a package, e.g. ``tuning@_global_``)."""
    derived = {"model"}
    try:
        from cfx_cli import CONF_DIR

        for d in (yaml.safe_load((CONF_DIR / "config.yaml").read_text()) or {}).get("defaults") or []:
            if isinstance(d, dict):
                derived.update(k.split()[-1] for k, v in d.items() if "${" in str(v))
    except Exception:  # no primary config to read: only 'model'
        pass
    return frozenset(derived)


def mixed_rows(records: list[dict], by: list[str]) -> list[tuple[str, list[str]]]:
    """(row label, config keys) for each row whose finished jobs differ in more than --by and the seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["state"] == "done":
            groups.setdefault(tuple(str(r.get(k)) for k in by), []).append(r)
    out = []
    for rs in groups.values():
        if len(rs) < 2:
            continue
        keys = set().union(*(r.keys() for r in rs)) - BOOKKEEPING - NOT_A_MIX - set(by)
        differ = sorted(k for k in keys if not k.startswith(NOT_A_MIX_PREFIXES)
                        and len({str(r.get(k, "<unset>")) for r in rs}) > 1)
        # A differing choice (classifier) implies its values differ (classifier.path, ...): name the choice.
        differ = [k for k in differ if not any(k.startswith(p + ".") for p in differ)]
        # Choices that follow from others (model is classifier or regressor; tuning: ${method}_${diffusion}).
        differ = [k for k in differ if k not in derived_choices()]
        if differ:
            out.append((_label(by, [rs[0].get(k) for k in by]), differ))
    return sorted(out)


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
        for m in present:  # (mean, std, how many jobs have the metric, n_jobs): a NaN is not a zero
            vals = g[m].dropna().astype(float)
            row[m] = (vals.mean() if len(vals) else np.nan, vals.std(ddof=1) if len(vals) > 1 else np.nan,
                      len(vals), len(g))
        out.append(row)
    return pd.DataFrame(out)


def _fmt(v) -> str:
    if isinstance(v, tuple):
        mean, std, count, n = v
        if np.isnan(mean):
            return f"(0 of {n} jobs)" if n else ""
        digits = 1 if abs(mean) >= 100 else 3
        cell = f"{mean:.{digits}f}" if np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
        return cell if count == n else f"{cell} ({count} of {n} jobs)"  # say when some jobs lack it
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
            if any(v[2] != v[3] for v in df[c]):  # the count, where some jobs lack the metric
                numeric[f"{c}_n"] = [v[2] for v in df[c]]
        else:
            numeric[c] = list(df[c])
    return text, pd.DataFrame(numeric)


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(s) -> str:
    """Text -> LaTeX text: specials escaped, '±' as $\\pm$."""
    return " $\\pm$ ".join("".join(_LATEX_SPECIALS.get(c, c) for c in part)
                           for part in str(s).replace(" ± ", "±").split("±"))


def to_latex(text: pd.DataFrame, numeric_cols: set[str] = frozenset()) -> str:
    """A booktabs tabular that compiles: headers and cells escaped, numbers right-aligned."""
    cols = list(text.columns)
    align = "".join("r" if c in numeric_cols else "l" for c in cols)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(latex_escape(c) for c in cols) + " \\\\", "\\midrule"]
    for _, row in text.iterrows():
        lines.append(" & ".join(latex_escape(v) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def sigma_l(records: list[dict], by: list[str]) -> dict[tuple, tuple]:
    """σ_L per table row: the mean pairwise LPIPS between the counterfactuals of one image made by jobs
    that differ only in their seed (DiME's diversity), over the images they share. A row whose jobs
    have one seed each has none. {row key: (mean, nan, groups measured, jobs)}."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        same = tuple(sorted((k, str(v)) for k, v in r.items() if k not in BOOKKEEPING and k not in NOT_A_MIX
                            and not k.startswith(NOT_A_MIX_PREFIXES)))
        groups.setdefault(same, []).append(r)
    per_row: dict[tuple, list[float]] = {}
    for rs in groups.values():
        seeds = {str(r.get("seed")) for r in rs}
        if len(seeds) < 2:
            continue
        rs = [next(r for r in rs if str(r.get("seed")) == s) for s in sorted(seeds)]
        value = _sigma_l_of([job_folders(r) for r in rs])
        if value is not None:
            per_row.setdefault(tuple(str(rs[0].get(k)) for k in by), []).append(value)
    return {k: (float(np.mean(v)), np.nan, len(v), len(v)) for k, v in per_row.items()}


def _sigma_l_of(jobs: list[list[Path]]) -> float | None:
    from cfx_cli.job.build import resolve_device
    from cfx_cli.metrics.suite import sigma_l as compute

    try:
        cfg = yaml.safe_load((jobs[0][0] / ".hydra" / "config.yaml").read_text()) or {}
        return compute([Pairs(j) for j in jobs], cfg, resolve_device("auto"))
    except Exception as e:  # noqa: BLE001 - the table goes on without it
        print(f"cfx aggregate: warning: σ_L of {jobs[0][0]} and its other seeds not computed: "
              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return None
