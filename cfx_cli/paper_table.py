"""`cfx aggregate --table paper`: a table laid out as the papers lay theirs out.

Rows are methods (the ``--by`` keys), columns the papers' metrics in their order, each header with its
direction (↑ higher is better, ↓ lower is better), cells mean ± std over seeds, the best mean of each
column in bold (Markdown ``**`` and LaTeX ``\\textbf``). Rates are percentages, as in the papers' tables.
A column no job has is left out and named below the table (e.g. FVA without face-verification weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cfx_cli.tables import latex_escape, sigma_l, table


@dataclass(frozen=True)
class Column:
    metric: str        # the metrics.csv name
    header: str
    higher_is_better: bool | None   # None: no better direction (no arrow, no bold)
    percent: bool = False

    @property
    def title(self) -> str:
        arrow = "" if self.higher_is_better is None else " ↑" if self.higher_is_better else " ↓"
        return f"{self.header}{' (%)' if self.percent else ''}{arrow}"


# DiME / ACE / FastDiME / DVCE / LDCE tables (classification) and the regression papers' tables.
CLASSIFICATION = (Column("fid", "FID", False), Column("sfid", "sFID", False), Column("fva", "FVA", True, True),
                  Column("fs", "FS", True), Column("mnac_successful", "MNAC", False), Column("cd", "CD", False),
                  Column("cout", "COUT", True), Column("flip_rate", "Flip rate", True, True),
                  Column("real_flip_rate", "Real flips", True, True), Column("corrected_rate", "Corrected", None, True),
                  Column("adversarial_rate", "Adversarial", False, True), Column("sigma_l", "σ_L", True))
# Real flips / Corrected / Adversarial (where an oracle reads the counterfactuals, the synthetic benchmark): the
# model's flip confirmed by the oracle (the edit made the image the target), confirmed on an original the model had
# misread (the oracle saw the target there already), or not confirmed (the classifier fooled, the image not
# changed into the target).
REGRESSION = (Column("success_rate", "Success", True, True), Column("real_flip_rate", "Real", True, True),
              Column("corrected_rate", "Corrected", None, True),
              Column("adversarial_rate", "Adversarial", False, True), Column("mae_to_target", "MAE", False),
              Column("oracle_mae", "Oracle MAE", False),
              Column("fid", "FID", False), Column("lpips", "LPIPS", False), Column("sigma_l", "σ_L", True))
LAYOUT = {"classification": CLASSIFICATION, "regression": REGRESSION}

# The papers' names of cfx's methods, for the rows.
METHOD_NAMES = {"dime": "DiME", "fastdime": "FastDiME", "ace": "ACE", "dvce": "DVCE", "ldce": "LDCE",
                "diffae": "Diff-AE", "diffae_re": "Diff-AE-RE", "maskdime": "MaskDiME"}


def _row_label(row: pd.Series, by: list[str], task: str) -> str:
    parts = []
    for key in by:
        value = row[key]
        if key == "method":
            name = METHOD_NAMES.get(str(value), str(value))
            parts.append("AC-RE" if name == "ACE" and task == "regression" else name)
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _cell(v, percent: bool) -> tuple[str, float]:
    """(text, mean) of a (mean, std, count, n) cell."""
    mean, std, count, n = v
    if np.isnan(mean):
        return "", np.nan
    k = 100.0 if percent else 1.0
    m, sd = mean * k, std * k
    digits = 1 if percent or abs(m) >= 100 else 2 if abs(m) >= 1 else 3
    text = f"{m:.{digits}f}" if np.isnan(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"
    return (text if count == n else f"{text} ({count} of {n} jobs)"), m


def paper_table(df: pd.DataFrame, by: list[str], task: str) -> tuple[pd.DataFrame, dict[str, set[int]], list[str]]:
    """(text table, {column title: rows holding the best mean}, metrics with no value in any row) from
    ``aggregate.table``'s frame of one task."""
    layout = LAYOUT[task]
    text = pd.DataFrame({"Method": [_row_label(r, by, task) for _, r in df.iterrows()]})
    best: dict[str, set[int]] = {}
    absent = []
    for col in layout:
        if col.metric not in df.columns:
            absent.append(col.metric)
            continue
        cells = [_cell(v, col.percent) if isinstance(v, tuple) else ("", np.nan) for v in df[col.metric]]
        text[col.title] = [c[0] for c in cells]
        means = np.array([c[1] for c in cells], dtype=float)
        if np.isfinite(means).any() and col.higher_is_better is not None:
            target = np.nanmax(means) if col.higher_is_better else np.nanmin(means)
            best[col.title] = {i for i, m in enumerate(means) if np.isfinite(m) and np.isclose(m, target)}
    text["Jobs"] = [str(n) for n in df["n_jobs"]]
    return text, best, absent


def to_markdown(text: pd.DataFrame, best: dict[str, set[int]]) -> str:
    bold = text.copy()
    for title, rows in best.items():
        for i in rows:
            bold.iloc[i, bold.columns.get_loc(title)] = f"**{bold.iloc[i, bold.columns.get_loc(title)]}**"
    return bold.to_markdown(index=False)


def to_latex(text: pd.DataFrame, best: dict[str, set[int]]) -> str:
    """A booktabs tabular: arrows as $\\uparrow$/$\\downarrow$, σ as $\\sigma$, the best cell in \\textbf."""
    def header(title: str) -> str:
        t = latex_escape(title.replace(" ↑", "").replace(" ↓", "").replace("σ_L", "SIGMA"))
        t = t.replace("SIGMA", "$\\sigma_L$")
        return t + (" $\\uparrow$" if title.endswith("↑") else " $\\downarrow$" if title.endswith("↓") else "")

    cols = list(text.columns)
    lines = [f"\\begin{{tabular}}{{l{'r' * (len(cols) - 1)}}}", "\\toprule",
             " & ".join(header(c) for c in cols) + " \\\\", "\\midrule"]
    for i, (_, row) in enumerate(text.iterrows()):
        cells = []
        for c in cols:
            cell = latex_escape(row[c])
            cells.append(f"\\textbf{{{cell}}}" if i in best.get(c, ()) and cell else cell)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def paper_tables(records: list[dict], by: list[str]) -> list[tuple]:
    """(task, numeric frame, text table, {column: best rows}, metrics no job has) per task with finished jobs,
    in the papers' layout (σ_L included where jobs differ only in their seed)."""
    out = []
    for task, layout in LAYOUT.items():
        rs = [r for r in records if r["state"] == "done" and (r.get("task") or "classification") == task]
        if not rs:
            continue
        df = table(rs, by, [c.metric for c in layout])
        sigma = sigma_l(rs, by)
        if sigma:
            df["sigma_l"] = [sigma.get(tuple(str(row[k]) for k in by), (np.nan, np.nan, 0, row["n_jobs"]))
                             for _, row in df.iterrows()]
        out.append((task, df, *paper_table(df, by, task)))
    return out

