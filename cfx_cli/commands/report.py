"""`cfx report`: job folders -> one self-contained HTML page to look at.

    cfx report <job folder | sweep folder>... [--by KEY...] [--samples N] [--out FILE]

The page (``report.html`` in the first folder by default) holds: what was run and when; the papers' table
(`cfx aggregate --table paper`: their metrics, ↑/↓, the best in bold) and the table of every metric (mean ±
std over seeds, one row per value of the --by keys, method by default); per row,
for each of its job folders, a grid of originals / counterfactuals / difference heat-maps (and masks,
pre-explanations, reconstructions, heat-maps where the method writes them) for the first N samples, each
column labelled with its index, label -> target and whether it succeeded; the failed and unsuccessful
samples; a quality-vs-cost plot (the real-flip rate where an oracle confirms the flips, else the flip or success
rate, against seconds and UNet calls per counterfactual); ✓ real / ⚠ adversarial / ✗ failed per sample;
and the jobs that are not in the table (missing, failed, unreadable). Every image is embedded (base64
PNG) and the style is inline: the file works offline, alone, in any browser.

Exit status as `cfx aggregate`: 1 when some jobs are not in the table (the page is written and lists
them), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cfx_cli.errors import CfxError, one_line_errors
from cfx_cli.outputs import find_jobs, job_record, read_samples
from cfx_cli.paper_table import paper_tables
from cfx_cli.tables import (BOOKKEEPING, DEFAULT_METRICS, check_by, derived_choices, job_folders, merge_shards,
                            missing_sweep_jobs, mixed_rows, render, table)

# Image rows of a grid, in this order; any other folder under images/ follows them.
KINDS = ("original", "counterfactual", "diff", "pre_explanation", "mask", "reconstruction", "heatmap")
KIND_LABEL = {"original": "original", "counterfactual": "counterfactual", "diff": "difference",
              "pre_explanation": "pre-explanation", "mask": "mask", "reconstruction": "reconstruction",
              "heatmap": "heat-map"}
MAX_SIDE = 256       # larger images are embedded downsized to this (a page of ImageNet jobs stays small)
TILE = 84            # displayed tile width in CSS pixels
LABELLED_POINTS = 5  # up to this many plot points are labelled in place


# --------------------------------------------------------------------------- the table (one place)
def report_table(records: list[dict], by: list[str]) -> pd.DataFrame:
    """The page's table as text cells: one row per value of the ``by`` keys (the finished jobs' metrics,
    'mean ± std' over seeds, ``n_jobs``). The only place the page builds its table: another layout
    (a paper's columns) replaces this function."""
    text, _ = render(table(records, by, DEFAULT_METRICS))
    # a metric no job of the row has (a regression rate on a classifier's row): an empty cell, not "(0 of n jobs)"
    return text.replace(to_replace=r"^\(0 of \d+ jobs\)$", value="", regex=True) if len(text) else text


# --------------------------------------------------------------------------- reading the folders
def collect(paths: list[str], by: list[str]) -> tuple[list[dict], dict[str, list[Path]]]:
    """(records as `cfx aggregate` makes them: one per job, shards merged, missing sweep jobs added;
    {record's job: its folders})."""
    jobs = find_jobs(paths)
    if not jobs:
        raise CfxError(f"no job folders under {' '.join(paths)} (a job folder has status.json or .hydra/config.yaml)")
    raw = [job_record(j) for j in jobs]
    check_by(raw, by)
    records = merge_shards(raw) + missing_sweep_jobs(paths, jobs)
    folders = {r["job"]: job_folders(r) for r in records if r["state"] != "missing" or r.get("folders")}
    return records, folders


def _key(r: dict, by: list[str]) -> tuple[str, ...]:
    return tuple("" if r.get(k) is None else str(r.get(k)) for k in by)


def _samples(folders: list[Path]) -> pd.DataFrame | None:
    parts = []
    for f in folders:
        try:
            s = read_samples(f)
        except Exception:  # noqa: BLE001 - no or garbage samples.csv: the job is shown without samples
            continue
        parts.append(s.assign(_folder=str(f)))
    if not parts:
        return None
    return pd.concat(parts).drop_duplicates("index").sort_values("index").reset_index(drop=True)


def _status(folder: Path) -> dict:
    try:
        s = json.loads((folder / "status.json").read_text())
        return s if isinstance(s, dict) else {}
    except (OSError, ValueError):
        return {}


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


# --------------------------------------------------------------------------- images
def png_base64(path: Path, heat: bool = False) -> str:
    """The file as base64 PNG: its own bytes when it is a PNG of at most MAX_SIDE pixels (pixels exactly
    as written), else re-encoded (downsized; ``heat``: grey -> the inferno colour map)."""
    data = path.read_bytes()
    if not heat and data[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) <= MAX_SIDE:
                return base64.b64encode(data).decode()
    with Image.open(path) as im:
        im.load()
    if heat:
        import matplotlib

        grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        im = Image.fromarray((matplotlib.colormaps["inferno"](grey)[..., :3] * 255).round().astype(np.uint8))
    elif im.mode not in ("RGB", "RGBA", "L"):
        im = im.convert("RGB")
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _img(path: Path, alt: str, heat: bool = False) -> str:
    try:
        with Image.open(path) as im:
            w = im.size[0]
        b64 = png_base64(path, heat=heat)
    except Exception:  # noqa: BLE001 - an unreadable image is a cell saying so, not a broken page
        return '<span class="none">unreadable</span>'
    pixelated = ' class="px"' if w < TILE else ""
    width = TILE if w < 128 else 128
    return f'<img{pixelated} width="{width}" src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


# --------------------------------------------------------------------------- text helpers
def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _num(v, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return str(v)
    if f == int(f) or abs(f) >= 100:
        return f"{f:.0f}"
    if abs(f) < 10 ** -digits:
        return f"{f:.{digits}g}"
    return f"{f:.{digits}f}".rstrip("0").rstrip(".")


def _name(row, col: str) -> str:
    """label / target / cf_pred as a class name where samples.csv has one, else the value."""
    name = row.get(f"{col}_name")
    if name is not None and not (isinstance(name, float) and np.isnan(name)) and str(name) != "":
        return str(name)
    v = row.get(col)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "?"
    return _num(v, 2)


def _column_head(row: dict) -> str:
    idx = int(row["index"])
    head = f'<div class="ix">#{idx}</div><div class="lt">{_e(_name(row, "label"))} → {_e(_name(row, "target"))}</div>'
    if _truthy(row.get("failed")):
        err = _text(row.get("error"))
        title = f' title="{_e(err)}"' if err else ""
        return head + f'<div class="st fail"{title}>failed</div>'
    outcome = sample_outcome(row)
    if outcome == "real":
        return head + '<div class="st ok" title="the classifier flipped and the oracle confirms">✓ real</div>'
    if outcome == "corrected":
        return head + ('<div class="st ok" title="the classifier flipped and the oracle confirms, but it saw the target '
                       'on the original already: the classifier had misread it">↺ corrected</div>')
    if outcome == "adversarial":
        return head + (f'<div class="st adv" title="the classifier says {_e(_name(row, "cf_pred"))}; the oracle does '
                       f'not: the image did not become the target">⚠ adversarial</div>')
    if outcome == "success":
        return head + '<div class="st ok">✓ success</div>'
    return head + f'<div class="st no">✗ failed: got {_e(_name(row, "cf_pred"))}</div>'


def sample_outcome(row) -> str:
    """real | corrected | adversarial | failed (the oracle read the counterfactual), success | failed (no oracle):
    the row's ``outcome``, or made from its success and oracle_flip (jobs written before outcomes were)."""
    v = row.get("outcome")
    if isinstance(v, str) and v:
        return v
    if _truthy(row.get("failed")) or not _truthy(row.get("success")):
        return "failed"
    flip = row.get("oracle_flip")
    try:
        flip = float(flip)
    except (TypeError, ValueError):
        return "success"
    return "success" if np.isnan(flip) else "real" if flip > 0.5 else "adversarial"


def outcome_counts(samples: pd.DataFrame | None) -> dict[str, int]:
    """{outcome: number of samples}, in the order real, corrected, adversarial, success, failed."""
    if samples is None or not len(samples):
        return {}
    got = [sample_outcome(r) for r in samples.to_dict("records")]
    return {k: got.count(k) for k in ("real", "corrected", "adversarial", "success", "failed") if got.count(k)}


def counts_text(counts: dict[str, int]) -> str:
    marks = {"real": "✓", "corrected": "↺", "adversarial": "⚠", "success": "✓", "failed": "✗"}
    return " · ".join(f"{marks[k]} {n} {k}" for k, n in counts.items())


# What stands in for ground truth where no oracle reads the counterfactuals (a real dataset).
NO_GROUND_TRUTH = ("no ground truth: no oracle reads these counterfactuals, so a flip may be real or adversarial "
                   "(only the classifier fooled). Stand-ins: FVA and FS (identity kept), MNAC and CD (other "
                   "attributes by an attribute classifier), COUT, FID / sFID (realism), a robust model's flip rate")


def _wrap_header(c: str) -> str:
    return _e(c).replace("_", "_<wbr>")


def _cell_html(s: str) -> str:
    """'mean ± std (k of n jobs)' as the mean with the rest in small grey below it (a narrower table)."""
    if " ± " not in s and " (" not in s:
        return _e(s)
    mean, _, rest = s.partition(" ± ") if " ± " in s else s.partition(" (")
    rest = ("± " + rest) if " ± " in s else "(" + rest
    return f'{_e(mean)}<span class="sd">{_e(rest)}</span>'


def _is_numeric_cell(s: str) -> bool:
    s = s.strip()
    return bool(s) and (s[0].isdigit() or (s[0] in "-+." and len(s) > 1 and s[1].isdigit()))


# --------------------------------------------------------------------------- page parts
def _header(paths: list[str], records: list[dict], folders: dict[str, list[Path]], by: list[str],
            counts: dict[str, int] | None = None, oracle: bool = True) -> str:
    done = [r for r in records if r["state"] == "done"]

    def distinct(key):
        return sorted({str(r.get(key)) for r in records if r.get(key) not in (None, "", "None")})

    starts, ends = [], []
    for r in done:
        for f in folders.get(r["job"], []):
            st = _status(f)
            if st.get("started"):
                starts.append(str(st["started"]))
            if st.get("finished") or st.get("updated"):
                ends.append(str(st.get("finished") or st.get("updated")))
    when = (f"{min(starts).replace('T', ' ')} – {max(ends).replace('T', ' ')}" if starts and ends else "unknown")
    datasets = distinct("dataset") or distinct("dataset.name")
    variants = distinct("method.variant")
    methods = ", ".join(distinct("method")) + (f" (variants: {', '.join(variants)})" if variants else "")
    n_bad = len(records) - len(done)
    rows = [("folders", "<br>".join(_e(Path(p).resolve()) for p in paths)),
            ("jobs", f"{len(records)}: {len(done)} done, " + (f'<span class="bad">{n_bad} not in the table</span>'
                                                              if n_bad else "all in the table")),
            ("methods", _e(methods or "?")),
            ("dataset", _e(", ".join(datasets) or "?")),
            ("models", _e(", ".join(distinct("model")) or "?")),
            ("rows by", _e(" ".join(by))),
            ("outcomes", (_e(counts_text(counts)) if counts else "no samples") + "<br><span class=sub>"
             + ("real: the classifier flipped and the oracle confirms; adversarial: the classifier flipped, the "
                "oracle does not (the image is not the target); failed: no flip" if oracle else _e(NO_GROUND_TRUTH))
             + "</span>"),
            ("run", _e(when)),
            ("page written", _e(time.strftime("%Y-%m-%d %H:%M:%S")))]
    title = " · ".join(Path(p).resolve().name for p in paths)
    dl = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<h1>cfx report <span class=sub>{_e(title)}</span></h1>\n<table class=meta>{dl}</table>"


def _table_html(text: pd.DataFrame, records: list[dict], by: list[str]) -> str:
    if not len(text):
        return '<p class="none">No finished jobs: nothing to table.</p>'
    head = "".join(f"<th{'' if c in by else ' class=n'}>{_wrap_header(c)}</th>" for c in text.columns)
    body = []
    for _, row in text.iterrows():
        cells = []
        for c, v in row.items():
            s = str(v)
            cls = ' class="n"' if c not in by and _is_numeric_cell(s) else ""
            cells.append(f"<td{cls}>{_cell_html(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    mixed = mixed_rows(records, by)
    if mixed:
        note = ("<p class=warn>The ± of these rows is not only over seeds: their jobs differ in config keys not in "
                "--by (add them to --by to split the rows): "
                + "; ".join(f"{_e(label)}: {_e(', '.join(keys))}" for label, keys in mixed) + "</p>")
    return (f'<div class="scroll"><table class="res"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            f"</tbody></table></div>{note}<p class=cap>mean ± std over the jobs of each row (seeds); "
            "rates over all samples, distances and costs per counterfactual.</p>")


def _paper_html(records: list[dict], by: list[str]) -> str:
    """The papers' layout (`cfx aggregate --table paper`): their metrics, ↑/↓, the best in bold."""
    parts = []
    for task, _, text, best, absent in paper_tables(records, by):
        head = "".join(f"<th{'' if i == 0 else ' class=n'}>{_e(c)}</th>" for i, c in enumerate(text.columns))
        body = []
        for i, (_, row) in enumerate(text.iterrows()):
            cells = []
            for j, (c, v) in enumerate(row.items()):
                cell = _cell_html(str(v))
                cell = f"<b>{cell}</b>" if i in best.get(c, ()) and str(v) else cell
                cells.append(f"<td{'' if j == 0 else ' class=n'}>{cell}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<h3>{_e(task.capitalize())}</h3><div class=\"scroll\"><table class=\"res\"><thead><tr>{head}"
                     f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
                     + (f"<p class=cap>No job has: {_e(', '.join(absent))}.</p>" if absent else ""))
    return "".join(parts)


def _varying(rs: list[dict]) -> list[str]:
    """Config keys whose values differ between the jobs of one row, most telling first (seed, model, other
    choices, then values): each job's label."""
    keys = set().union(*(r.keys() for r in rs)) - BOOKKEEPING
    differ = sorted(k for k in keys if not k.startswith(("hydra.", "hydra/")) and k not in derived_choices()
                    and k != "data.shard" and len({str(r.get(k)) for r in rs}) > 1)
    differ = [k for k in differ if not any(k.startswith(p + ".") for p in differ)]
    if "model" in differ:  # the model names the classifier or regressor
        differ = [k for k in differ if k not in ("classifier", "regressor")]
    first = [k for k in ("seed", "model") if k in differ]
    return first + [k for k in differ if "." not in k and k not in first] + [k for k in differ if "." in k]


def _job_label(r: dict, keys: list[str], limit: int = 3) -> str:
    def short(v):
        v = str(v)
        return v if len(v) <= 28 else v[:26] + "…"

    label = ", ".join(f"{k}={short(r.get(k))}" for k in keys[:limit])
    return label + (f", +{len(keys) - limit} more" if len(keys) > limit else "")


def _headline(r: dict) -> str:
    m = r.get("metrics") or {}
    parts = []
    for key, label in (("flip_rate", "flip rate"), ("success_rate", "success rate"), ("l1", "l1"),
                       ("seconds_per_cf", "s/cf")):
        if key in m and np.isfinite(m[key]):
            parts.append(f"{label} {_num(m[key])}")
    extra = [f"{label} {_num(m[key])}" for key, label in (("real_flip_rate", "real"), ("corrected_rate", "corrected"),
                                                          ("adversarial_rate", "adversarial"))
             if key in m and np.isfinite(m[key]) and (key != "corrected_rate" or m[key] > 0)]
    parts[1:1] = extra  # after the flip rate
    if "nfe_unet" in m:
        parts.append(f"{_num(m['nfe_unet'] + m.get('nfe_unet_backward', 0.0))} UNet calls/cf")
    return " · ".join(parts)


def _grid(samples: pd.DataFrame | None, n: int) -> str:
    if samples is None or not len(samples):
        return '<p class="none">no samples.csv: no images to show</p>'
    shown = samples.head(n)
    kinds = []
    for f in shown["_folder"].unique():
        present = [p.name for p in sorted((Path(f) / "images").glob("*")) if p.is_dir()]
        kinds += [k for k in present if k not in kinds]
    kinds = [k for k in KINDS if k in kinds] + sorted(k for k in kinds if k not in KINDS)
    rows = ["<tr><th></th>" + "".join(f"<th>{_column_head(r)}</th>" for r in shown.to_dict("records")) + "</tr>"]
    for kind in kinds:
        cells = []
        for r in shown.to_dict("records"):
            p = Path(r["_folder"]) / "images" / kind / f"{int(r['index'])}.png"
            alt = f"{kind} {int(r['index'])}"
            cells.append(f"<td>{_img(p, alt, heat=kind == 'diff')}</td>" if p.exists()
                         else '<td><span class="none">no image</span></td>')
        rows.append(f'<tr><th class="kind">{_e(KIND_LABEL.get(kind, kind))}</th>{"".join(cells)}</tr>')
    more = f"<p class=cap>first {len(shown)} of {len(samples)} samples</p>" if len(samples) > len(shown) else ""
    return f'<div class="scroll"><table class="grid">{"".join(rows)}</table></div>{more}'


def _sections(records: list[dict], folders: dict[str, list[Path]], by: list[str], text: pd.DataFrame,
              n: int) -> tuple[str, list[dict]]:
    """The per-row image sections, in the table's order; and each job's failures for the failure table."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["state"] == "done":
            groups.setdefault(_key(r, by), []).append(r)
    order = []
    if len(text) and all(k in text.columns for k in by):
        order = [tuple(str(row[k]) for k in by) for _, row in text.iterrows()]
    order = [k for k in order if k in groups] + sorted(k for k in groups if k not in order)
    out, failures = [], []
    for key in order:
        rs = sorted(groups[key], key=lambda r: (str(r.get("seed")), r["job"]))
        varying = _varying(rs)
        title = ", ".join(f"{k}={v}" for k, v in zip(by, key))
        parts = [f'<section data-row="{_e(title)}"><h3 id="row-{len(out)}">{_e(title)} <span class=sub>{len(rs)} job'
                 f'{"s" if len(rs) != 1 else ""}</span></h3>']
        for r in rs:
            fs = folders.get(r["job"], [])
            samples = _samples(fs)
            label = _job_label(r, varying)
            full = "; ".join(f"{k}={r.get(k)}" for k in varying)
            where = ", ".join(f.name for f in fs)
            parts.append(f'<div class="job" data-job="{_e(r["job"])}"><div class="jobhead">'
                         f'<b title="{_e(full)}">{_e(label)}</b> '
                         f'<span class=sub>{_e(where)}'
                         f'</span><br><span class=hl>{_e(_headline(r))}</span> <span class=cnt>'
                         f'{_e(counts_text(outcome_counts(samples)))}</span></div>{_grid(samples, n)}</div>')
            failures.append({"row": title, "label": label, "job": where, "samples": samples})
        parts.append("</section>")
        out.append("".join(parts))
    return "\n".join(out), failures


def _failures_html(failures: list[dict]) -> str:
    rows = []
    for f in failures:
        s = f["samples"]
        if s is None:
            continue
        failed = s[s["failed"].map(_truthy)] if "failed" in s else s.iloc[:0]
        unsucc = s[~s["success"].map(_truthy)] if "success" in s else s.iloc[:0]
        unsucc = unsucc[~unsucc["index"].isin(failed["index"])]
        adv = s[[sample_outcome(r) == "adversarial" for r in s.to_dict("records")]]
        if not len(failed) and not len(unsucc) and not len(adv):
            continue
        adv_idx = ", ".join(str(int(i)) for i in adv["index"])
        errs = "<br>".join(f'#{int(r["index"])}: <span class="err">{_e(_text(r.get("error")) or "(no error recorded)")}'
                           "</span>" for r in failed.to_dict("records"))
        idx = ", ".join(str(int(i)) for i in unsucc["index"])
        rows.append(f"<tr><td>{_e(f['row'])}{', ' + _e(f['label']) if f['label'] else ''}<br>"
                    f"<span class=sub>{_e(f['job'])}</span></td>"
                    f"<td class=n>{len(failed)}</td><td>{errs or '—'}</td>"
                    f"<td class=n>{len(unsucc)} of {len(s)}</td><td>{_e(idx) or '—'}</td>"
                    f"<td class=n>{len(adv)} of {len(s)}</td><td>{_e(adv_idx) or '—'}</td></tr>")
    if not rows:
        return '<p class="ok">Every sample of every finished job succeeded; none failed, none adversarial.</p>'
    return ('<div class="scroll"><table class="res"><thead><tr><th>row / job</th><th>failed</th>'
            '<th>failed samples: error</th><th>not successful</th><th>indices not successful</th>'
            '<th>⚠ adversarial</th><th>indices adversarial</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div><p class=cap>failed: the sample raised an error (no '
            'counterfactual); not successful: a counterfactual that did not reach its target; adversarial: the '
            'classifier flipped but the oracle does not see the target (the classifier fooled, not the image '
            'changed).</p>')


def _problems_html(records: list[dict]) -> str:
    bad = [r for r in records if r["state"] != "done"]
    if not bad:
        return '<p class="ok">None: every job is done and in the table.</p>'
    rows = "".join(f'<tr><td><span class="badge {_e(r["state"])}">{_e(r["state"])}</span></td><td>{_e(r["job"])}'
                   f'</td><td class=err>{_e(r.get("error") or "")}</td></tr>' for r in bad)
    return (f'<table class="res"><thead><tr><th>state</th><th>job</th><th>why</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


# --------------------------------------------------------------------------- the plot
def plot_points(records: list[dict], by: list[str]) -> list[dict]:
    """One point per row of the table: label, per-job (quality, seconds, UNet calls) and their means/stds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["state"] == "done":
            groups.setdefault(_key(r, by), []).append(r)
    points = []
    for key in sorted(groups):
        rs = groups[key]

        def vals(f):
            out = []
            for r in rs:
                v = f(r.get("metrics") or {})
                out.append(float(v) if v is not None and np.isfinite(v) else np.nan)
            return np.array(out, dtype=float)

        real = any("real_flip_rate" in (r.get("metrics") or {}) for r in rs)
        q = vals(lambda m: m.get("real_flip_rate") if real else m.get("flip_rate", m.get("success_rate")))
        sec = vals(lambda m: m.get("seconds_per_cf"))
        nfe = vals(lambda m: (m["nfe_unet"] + m.get("nfe_unet_backward", 0.0)) if "nfe_unet" in m else None)
        quality = ("real-flip rate (oracle-confirmed)" if real else "flip rate (no oracle)"
                   if any("flip_rate" in (r.get("metrics") or {}) for r in rs) else "success rate (no oracle)")
        points.append({"label": ", ".join(key),
                       "quality": q, "seconds": sec, "nfe": nfe, "quality_name": quality})
    return points


def plot_png(points: list[dict], by: list[str] = ("method",)) -> bytes | None:
    """Quality vs cost, two panels (seconds per counterfactual; UNet calls per counterfactual) as PNG bytes."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = sorted({p["quality_name"] for p in points})
    ylabel = " / ".join(names)
    panels = [("seconds", "seconds per counterfactual"),
              ("nfe", "UNet calls per counterfactual (forward + backward)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    colors = plt.get_cmap("tab10")
    for ax, (field, xlabel) in zip(axes, panels):
        xs_all = []
        for i, p in enumerate(points):
            x, y = p[field], p["quality"]
            ok = np.isfinite(x) & np.isfinite(y)
            if not ok.any():
                continue
            x, y = x[ok], y[ok]
            xs_all += list(x)
            c = colors(i % 10)
            if len(x) > 1:  # each job faint, the mean with ± std bars
                ax.scatter(x, y, s=18, color=c, alpha=0.35, linewidths=0)
            xm, ym = x.mean(), y.mean()
            xe = x.std(ddof=1) if len(x) > 1 else None
            ye = y.std(ddof=1) if len(y) > 1 else None
            ax.errorbar([xm], [ym], xerr=xe, yerr=ye, fmt="o", ms=8, color=c, capsize=4, elinewidth=1.5,
                        label=p["label"] + (f" ({len(x)} jobs)" if len(x) > 1 else ""))
            if len(points) <= LABELLED_POINTS:  # a few points: labelled in place; more: the legend below
                ax.annotate(p["label"], (xm, ym), textcoords="offset points", xytext=(7, 7), fontsize=10, color=c,
                            weight="bold")
        if not xs_all:
            ax.text(0.5, 0.5, f"no {xlabel} in the metrics", ha="center", va="center", transform=ax.transAxes)
        else:
            lo, hi = min(xs_all), max(xs_all)
            if lo > 0 and hi / lo > 20:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            else:
                ax.set_xlim(0, hi * 1.25 if hi > 0 else 1)
        ax.set_ylim(-0.03, 1.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_title("quality vs time (higher and further left is better)", fontsize=10, loc="left")
    axes[1].set_title("quality vs UNet calls", fontsize=10, loc="left")
    handles, labels = axes[0].get_legend_handles_labels()
    if len(handles) > 1:
        ncol = min(3, len(handles))
        rows = -(-len(handles) // ncol)
        fig.set_figheight(4.2 + 0.22 * rows)
        fig.legend(handles, labels, fontsize=8.5, loc="lower center", ncol=ncol, frameon=False,
                   title=", ".join(by), title_fontsize=8.5)
        fig.tight_layout(rect=(0, (0.3 + 0.22 * rows) / (4.2 + 0.22 * rows), 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- the page
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2430;margin:24px auto;
max-width:1220px;padding:0 16px;background:#fff}
h1{font-size:24px;margin:0 0 10px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #e3e7ee;padding-bottom:3px}
h3{font-size:16px;margin:18px 0 6px}.sub{color:#6b7585;font-weight:normal;font-size:13px}
table{border-collapse:collapse}.meta th{text-align:left;color:#6b7585;font-weight:normal;padding:1px 14px 1px 0;
vertical-align:top}.meta td{padding:1px 0}
.res{font-size:12.5px}.res th,.res td{border-bottom:1px solid #e3e7ee;padding:4px 8px;text-align:left;
vertical-align:top}.res th{background:#f4f6f9;font-weight:600}.res th.n{text-align:right}.res td.n{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap}.res tbody tr:hover{background:#f8fafc}
.res .sd{display:block;color:#8a93a3;font-size:11px}.scroll{overflow-x:auto}
.cap{color:#6b7585;font-size:12px;margin:4px 0}
.job{margin:6px 0 14px;padding:8px 10px;border:1px solid #e3e7ee;border-radius:6px;display:inline-block;
max-width:100%;box-sizing:border-box;vertical-align:top}
.jobhead{margin-bottom:4px}.hl{color:#3b4556;font-size:12.5px}
.grid{border-spacing:0}.grid td,.grid th{padding:2px;text-align:center;vertical-align:bottom;font-weight:normal}
.grid th.kind{text-align:right;color:#6b7585;font-size:12px;padding-right:6px;vertical-align:middle;white-space:nowrap}
.grid img{display:block;border:1px solid #d5dae2;border-radius:2px}img.px{image-rendering:pixelated}
.ix{font-weight:600;font-size:12px}.lt{font-size:11px;color:#3b4556;white-space:nowrap}
.st{font-size:11px;font-weight:600;white-space:nowrap}.st.ok,.ok{color:#1a7f37}.st.no{color:#b42318}
.st.adv,.cnt{color:#9a6700}.st.adv{background:#fff8c5;border-radius:3px;padding:0 4px}
.st.fail{color:#fff;background:#b42318;border-radius:3px;padding:0 4px}
.none{color:#9aa3b2}.err{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#8a1c12}
.warn{background:#fff7e0;border-left:3px solid #e0a100;padding:4px 8px;font-size:12.5px}
.bad{color:#b42318;font-weight:600}
.badge{border-radius:3px;padding:0 5px;font-size:12px;color:#fff;background:#6b7585}.badge.failed,.badge.unreadable
{background:#b42318}.badge.missing,.badge.incomplete,.badge.interrupted{background:#c27c00}
.plot{max-width:100%}nav a{margin-right:12px}
"""


def build_page(paths: list[str], by: list[str], samples: int = 8) -> tuple[str, list[dict]]:
    """(the HTML page, the records it shows)."""
    records, folders = collect(paths, by)
    text = report_table(records, by)
    sections, failures = _sections(records, folders, by, text, samples)
    counts: dict[str, int] = {}
    for f in failures:
        for k, v in outcome_counts(f["samples"]).items():
            counts[k] = counts.get(k, 0) + v
    oracle = any(f["samples"] is not None and "oracle_flip" in f["samples"]
                 and f["samples"]["oracle_flip"].notna().any() for f in failures)
    png = plot_png(plot_points(records, by), by)
    plot = (f'<img class="plot" src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="quality vs cost">'
            '<p class=cap>One point per row of the table: the mean over its jobs (faint dots: each job) with ± std '
            'bars. Seconds depend on the machine and what else ran on it; UNet calls do not.</p>'
            if png else '<p class="none">No finished jobs: nothing to plot.</p>')
    n_bad = sum(r["state"] != "done" for r in records)
    nav = ('<nav><a href="#table">table</a><a href="#all">all metrics</a><a href="#plot">quality vs cost</a><a href="#images">images</a>'
           f'<a href="#failures">failed samples</a><a href="#jobs">jobs not in the table ({n_bad})</a></nav>')
    body = "\n".join([
        _header(paths, records, folders, by, counts, oracle), nav,
        '<h2 id="table">Results <span class=sub>as the papers table them: mean ± std over seeds, the best in '
        'bold</span></h2>', _paper_html(records, by),
        '<h2 id="all">All metrics <span class=sub>validity, distances, the factor oracle\'s readings, cost</span></h2>',
        _table_html(text, records, by),
        '<h2 id="plot">Quality vs cost</h2>', plot,
        f'<h2 id="images">Counterfactuals <span class=sub>first {samples} samples of each job; difference: '
        'Σ|x_cf − x| per image, scaled to its maximum (dark: unchanged, bright: most changed)</span></h2>',
        sections or '<p class="none">No finished jobs.</p>',
        '<h2 id="failures">Failed, unsuccessful and adversarial samples</h2>', _failures_html(failures),
        '<h2 id="jobs">Jobs not in the table</h2>', _problems_html(records),
    ])
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>cfx report: '
            f'{_e(" ".join(Path(p).name for p in paths))}</title>\n<style>{STYLE}</style></head>\n<body>\n{body}\n'
            "</body></html>\n")
    return page, records


def report(argv: list[str] | None = None) -> tuple[Path, list[dict]]:
    ap = argparse.ArgumentParser(prog="cfx report", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="a job folder, a sweep folder, or folders holding job folders")
    ap.add_argument("--by", nargs="+", default=["method"],
                    help="config keys to group the rows by (method, classifier, method.variant, ...)")
    ap.add_argument("--samples", type=int, default=8, help="samples shown per job (default 8)")
    ap.add_argument("--out", default=None, help="the HTML file, or a folder for report.html (default: the first "
                    "path's report.html)")
    args = ap.parse_args(argv)
    if args.samples < 1:
        raise CfxError(f"--samples {args.samples}: show at least 1 sample")
    for p in args.paths:
        if not Path(p).exists():
            raise CfxError(f"{p} does not exist")
    page, records = build_page(args.paths, args.by, args.samples)
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report.html"
    if out.is_dir():  # --out FOLDER: report.html in it
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out, records


def main(argv: list[str] | None = None) -> None:
    """The CLI: 0 when every job is in the table; 1 (page written) when some are not; 2 on a usage error."""
    with one_line_errors():
        out, records = report(argv)
    bad = [r for r in records if r["state"] != "done"]
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {len(records)} job(s))")
    if bad:
        print(f"cfx report: {len(bad)} of {len(records)} job(s) not in the table (listed on the page)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
