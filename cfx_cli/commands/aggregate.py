"""`cfx aggregate`: job folders -> paper-style tables (Markdown, CSV, LaTeX).

Finds every job folder (a folder with ``.hydra/config.yaml`` or ``status.json``) under the given paths,
reads its config choices and metrics, merges the shards of one job by recomputing the set-level metrics
from their samples, groups by the chosen keys (method by default), and reports mean ± std over seeds
(``cfx_cli.tables``; ``--table paper``: ``cfx_cli.paper_table``). Missing and failed jobs are listed, never
dropped silently; a row that averages jobs whose configs differ in more than the ``--by`` keys and the
seed is flagged.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from cfx_cli import paper_table as P
from cfx_cli.errors import CfxError, one_line_errors
from cfx_cli.outputs import find_jobs, job_record
from cfx_cli.tables import (DEFAULT_METRICS, check_by, merge_shards, missing_sweep_jobs, mixed_rows, render, table,
                            to_latex)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """The CLI: exit 1 (with the count on the last line) when some jobs are not in the table, so that a
    script notices; 2 on a usage error."""
    with one_line_errors():
        df = aggregate(argv)
    if df.attrs.get("not_included"):
        print(f"cfx aggregate: {df.attrs['not_included']} of {df.attrs['jobs']} job(s) not in the table (listed above)",
              file=sys.stderr)
        raise SystemExit(1)
    return df


def aggregate(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="cfx aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="job folders or folders holding them (e.g. a sweep folder)")
    ap.add_argument("--by", nargs="+", default=["method"],
                    help="config keys to group by: choices (method, classifier, regressor, model, dataset, ...) "
                         "or values (method.variant, target.mode, ...)")
    ap.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS)
    ap.add_argument("--out", default=None, help="folder for table.{md,csv,tex} (default: the first path)")
    ap.add_argument("--table", choices=("default", "paper"), default="default",
                    help="paper: the papers' layout (FID, sFID, FVA, FS, MNAC, CD, COUT, flip rate; for regression "
                         "success, MAE, FID, LPIPS; σ_L across seeds), best value bold, into paper_table.{md,csv,tex}")
    args = ap.parse_args(argv)
    jobs = find_jobs(args.paths)
    if not jobs:
        print(f"cfx aggregate: error: no job folders under {' '.join(args.paths)}", file=sys.stderr)
        raise SystemExit(2)
    records = [job_record(j) for j in jobs]
    check_by(records, args.by)
    records = merge_shards(records) + missing_sweep_jobs(args.paths, jobs)
    if args.table == "paper":
        return paper(args, records)
    df = table(records, args.by, args.metrics)
    mixed = mixed_rows(records, args.by)
    for label, keys in mixed:
        print(f"cfx aggregate: warning: row {label} mixes jobs that differ in {', '.join(keys)}; add them to --by",
              file=sys.stderr)
    text, numeric = render(df)
    out = out_folder(args)
    md = text.to_markdown(index=False) if len(text) else "(no finished jobs)"
    if mixed:
        md += ("\n\nNote: the ± spread of these rows is not only over seeds: their jobs differ in config keys "
               "not in --by (add them to --by to split the rows):\n"
               + "\n".join(f"- {label}: {', '.join(keys)}" for label, keys in mixed))
    (out / "table.md").write_text(md + "\n")
    numeric.to_csv(out / "table.csv", index=False)
    (out / "table.tex").write_text(to_latex(text, set(df.columns) - set(args.by)) if len(text) else "")
    print(md)
    problems = list_problems(records)
    print(f"\nwrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.tex'}")
    df.attrs["not_included"] = len(problems)
    df.attrs["jobs"] = len(records)
    return df


def out_folder(args) -> Path:
    """The folder the tables go to (``--out``, else the first path), made if need be; a file there, or a
    folder that cannot be made, is one line."""
    out = Path(args.out or args.paths[0])
    key = "--out" if args.out else "the first path (no --out)"
    if out.exists() and not out.is_dir():
        raise CfxError(f"{key} {out} is a file: the tables go to a folder; give --out FOLDER")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CfxError(f"{key} {out}: cannot make that folder ({e.strerror or e}); give --out a writable "
                       f"folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CfxError(f"{key} {out}: cannot write there (read-only or no permission); give --out a writable folder")
    return out


def list_problems(records: list[dict]) -> list[dict]:
    problems = [r for r in records if r["state"] != "done"]
    if problems:
        print(f"\n{len(problems)} job(s) not included (missing, failed, incomplete or interrupted):")
        for r in problems:
            print(f"  {r['state']:8s} {r['job']}" + (f"  ({r['error']})" if r.get("error") else ""))
    return problems


def paper(args, records: list[dict]) -> pd.DataFrame:
    """--table paper: one table per task (classification, regression) in the papers' layout."""
    out = out_folder(args)
    md, tex, numeric, frames = [], [], [], []
    for task, df, text, best, absent in P.paper_tables(records, args.by):
        md.append(f"**{task.capitalize()}** (mean ± std over seeds; best in bold)\n\n" + P.to_markdown(text, best)
                  + (f"\n\nNo job has: {', '.join(absent)}." if absent else ""))
        tex.append(P.to_latex(text, best))
        numeric.append(render(df)[1].assign(task=task))
        frames.append(df)
    body = "\n\n".join(md) if md else "(no finished jobs)"
    mixed = mixed_rows(records, args.by)
    for label, keys in mixed:
        print(f"cfx aggregate: warning: row {label} mixes jobs that differ in {', '.join(keys)}; add them to --by",
              file=sys.stderr)
    if mixed:
        body += ("\n\nNote: the ± spread of these rows is not only over seeds: their jobs differ in config keys "
                 "not in --by: " + "; ".join(f"{label}: {', '.join(keys)}" for label, keys in mixed))
    (out / "paper_table.md").write_text(body + "\n")
    (out / "paper_table.tex").write_text("\n".join(tex))
    (pd.concat(numeric) if numeric else pd.DataFrame()).to_csv(out / "paper_table.csv", index=False)
    print(body)
    problems = list_problems(records)
    print(f"\nwrote {out / 'paper_table.md'}, {out / 'paper_table.csv'}, {out / 'paper_table.tex'}")
    df = pd.concat(frames) if frames else pd.DataFrame()
    df.attrs["not_included"] = len(problems)
    df.attrs["jobs"] = len(records)
    return df

