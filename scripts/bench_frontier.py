"""Quality against cost: every method at a few budgets on the synthetic benchmark (issue 19).

    python scripts/bench_frontier.py                      # every method, budgets 0.1/0.15/0.25/0.5/1 of its default
    python scripts/bench_frontier.py --quick              # DiME and FastDiME on 4 images: about a minute
    python scripts/bench_frontier.py --methods dime fastdime --budgets 0.1 0.25 --images 16 --out /tmp/f
    python scripts/bench_frontier.py --point "fastdime sampler.steps=26 method.tau=13"   # one point of your own

Each point is one `cfx run` (the same N test images, seed and explained model for every method) in a child
process of its own, so that its wall time, CPU time and peak resident memory (``ru_maxrss`` of that process
from ``os.wait4``, through a small launcher: the whole process, model loading and the job's end metrics
included) are its own. The
quality and the cost come from the job folder: real-flip, flip and adversarial rates and the distance to the
ideal counterfactual from metrics.csv, UNet forward and backward calls per image from samples.csv.

A *budget* is a fraction of the method's default budget knob as `cfx run method=<m>` composes it
(conf/method/, conf/tuning/): the sampler grid for the guided-diffusion methods, with their start (tau, start,
strength) scaled with it so that the same share of the chain is guided; ACE's PGD iterations; Diff-AE's
iterations. ``--budget-of METHOD=V,V`` gives the knob's values themselves.

The goal measured (issue 19): a point as real as DiME's default (real-flip rate at least DiME's, ideal-CF
distance at most DiME's) with at most 1/30 of DiME's UNet calls. DiME's default point always runs (the
reference). Unless --no-explore, FastDiME (and MaskDiME where conf/method/maskdime.yaml exists) are then
run at a few grids whose guided steps fit under the cap, and the script prints whether the goal is met, or
the closest points. Results are kept: a point whose job folder is done is read back, not run again (--force
re-runs). Outputs in --out: frontier.md (the table), frontier.png (the plot), frontier.csv, jobs/.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# UNet calls per image = forward + backward passes through the generative model's network: ACE, DVCE and
# Diff-AE differentiate through it, DiME and FastDiME do not, and a backward pass costs about two forwards.
CALLS = "unet_calls"
GOAL_RATIO = 30  # issue 19: at most 1/30 of DiME's UNet calls


@dataclass(frozen=True)
class Spec:
    """One line of the plot: a method (and variant) with its budget knob.

    ``knob``: the config key the budget sets (``sampler.steps``: the grid; else an iteration count);
    ``scaled``: keys moved with the grid so that the same fraction of it is guided."""
    key: str
    overrides: tuple[str, ...]
    knob: str
    scaled: tuple[str, ...] = ()


SPECS = {
    "dime": Spec("dime", ("method=dime",), "sampler.steps", ("method.tau",)),
    "fastdime": Spec("fastdime", ("method=fastdime",), "sampler.steps", ("method.tau",)),
    "fastdime-nomask": Spec("fastdime-nomask", ("method=fastdime", "method.variant=nomask"), "sampler.steps",
                            ("method.tau",)),
    "fastdime-2": Spec("fastdime-2", ("method=fastdime", "method.variant=2"), "sampler.steps", ("method.tau",)),
    "fastdime-2+": Spec("fastdime-2+", ("method=fastdime", "method.variant=2+"), "sampler.steps", ("method.tau",)),
    "maskdime": Spec("maskdime", ("method=maskdime",), "sampler.steps", ("method.tau",)),
    "ace": Spec("ace", ("method=ace",), "method.iterations"),
    "dvce": Spec("dvce", ("method=dvce",), "sampler.steps", ("method.start",)),
    "ldce": Spec("ldce", ("method=ldce",), "sampler.steps"),  # strength is already a fraction of the grid
    "diffae": Spec("diffae", ("method=diffae",), "method.iterations"),
}
EXPLORED = ("fastdime", "maskdime")  # the cheap methods searched under the cap
# Settings tried at each searched grid besides the method's own, each alone and together (where the method's
# config has the key). Measured with FastDiME on 32 images (seed 0) at 13-15 guided steps:
# - one scale, the method's first: under the cap a retry (an image not flipped runs a whole pass again at the
#   next scale) leaves no room, and the next scale (3x) on so coarse a grid draws noise: one image retried at
#   60 ended 0.178 from its ideal CF, against ~0.02 for the rest; with one scale it stays unflipped instead.
# - FastDiME's public_mask_noise=false keeps the region outside the mask at z_{t-1}'s noise level, not the level
#   before it as the public code does: on a grid of 26 a step spans ~38 of the 1000 levels, and the mismatch
#   leaves a speckled ring at the mask's edge. MaskDiME's public_last_noise=false ends on x outside its mask
#   rather than on q_sample(x, 0).
# - with both, the l1 term doubled (its config value x2): the coarse grid's edits spread (colour shifts, noise
#   at the object's edge); on 26 steps, 13 guided, l1 0.2 -> 0.4 took the ideal-CF l1 from 0.0209 to 0.0190 (seed
#   0) and 0.0238 to 0.0220 (seed 1) at the same 13 calls; x3 (0.6) loses real flips (0.81 on seed 0).
NOISE_SETTING = {"fastdime": "method.public_mask_noise=false", "maskdime": "method.public_last_noise=false"}


def conf_dir() -> Path:
    from cfx_cli import CONF_DIR

    return Path(CONF_DIR)


def available(key: str) -> bool:
    """Whether this checkout has the method (MaskDiME lands later than the others)."""
    name = SPECS[key].overrides[0].split("=", 1)[1]
    return (conf_dir() / "method" / f"{name}.yaml").exists()


def grid_parts(steps) -> tuple[str, int]:
    """A sampler grid as (prefix, count): 100 -> ("", 100), "ldm100" -> ("ldm", 100), "ddim10" -> ("ddim", 10)."""
    s = str(steps)
    digits = s.lstrip("abcdefghijklmnopqrstuvwxyz")
    if not digits.isdigit():
        raise SystemExit(f"sampler.steps={steps!r}: the frontier scales a grid of one count (an int, 'ddimN' or "
                         f"'ldmN'), not per-section counts; give the method an int grid")
    return s[: len(s) - len(digits)], int(digits)


@dataclass
class Defaults:
    """A spec's default budget and the values its scaled keys take at that budget (from the composed config)."""
    knob_value: int
    prefix: str = ""
    scaled: dict = field(default_factory=dict)


def defaults(spec: Spec) -> Defaults:
    from omegaconf import OmegaConf

    from cfx_cli.config import compose

    cfg = compose(list(spec.overrides))
    value = OmegaConf.select(cfg, spec.knob)
    prefix, count = grid_parts(value) if spec.knob == "sampler.steps" else ("", int(value))
    return Defaults(count, prefix, {k: int(OmegaConf.select(cfg, k)) for k in spec.scaled})


@dataclass
class Point:
    spec: str                 # SPECS key (the plot's line)
    knob_value: int           # the budget knob's value (grid steps or iterations)
    overrides: list[str]      # the cfx run overrides that make it
    kind: str = "grid"        # grid | reference | explore | custom
    label: str = ""           # what sets it apart, for the table

    @property
    def folder_name(self) -> str:
        extra = hashlib.sha1(" ".join(self.overrides).encode()).hexdigest()[:8]
        return f"{self.spec}/{self.knob_value:04d}_{extra}"


def point_at(spec: Spec, d: Defaults, value: int, kind: str = "grid", extra: tuple[str, ...] = ()) -> Point:
    """The spec at knob ``value``; its scaled keys keep their default share of the grid (at least 1)."""
    over = [*spec.overrides]
    label = [f"{spec.knob.split('.')[-1]}={d.prefix}{value}"]
    if spec.knob == "sampler.steps":
        over.append(f"sampler.steps={d.prefix}{value}" if d.prefix else f"sampler.steps={value}")
        for key, default in d.scaled.items():
            scaled = max(1, math.floor(default * value / d.knob_value + 0.5))  # halves up (round() goes to even)
            over.append(f"{key}={scaled}")
            label.append(f"{key.split('.')[-1]}={scaled}")
    else:
        over.append(f"{spec.knob}={value}")
    over.extend(extra)
    label.extend(e.split(".", 1)[-1] for e in extra)
    return Point(spec.key, value, over, kind, " ".join(label))


def budget_points(keys, fractions, absolute: dict[str, list[int]], table: dict[str, Defaults]) -> list[Point]:
    points = []
    for key in keys:
        d = table[key]
        values = absolute.get(key) or sorted({max(1, round(f * d.knob_value)) for f in fractions})
        points += [point_at(SPECS[key], d, v) for v in values]
    return points


def reference_point(table: dict[str, Defaults]) -> Point:
    """DiME as `cfx run method=dime` runs it (its synthetic tuning): the bar and the cost every point is held to."""
    d = table["dime"]
    return point_at(SPECS["dime"], d, d.knob_value, kind="reference")


def explore_points(cap: float, table: dict[str, Defaults], keys, settings=None) -> list[Point]:
    """FastDiME / MaskDiME under the cap: guided steps g = floor(cap) and two and four fewer, at the default
    noise level (the grid is g over the default's guided share), so that one pass fits under the cap and the
    scales' retries (every image not flipped runs again) are what spends the rest; each grid with the
    ``settings`` of that method (``explore_settings()``; none: its own only). Measured with FastDiME, fewer
    guided steps (10 of 20) flip on edge noise the oracle does not read (adversarial)."""
    points = []
    for key in keys:
        if key not in table:
            continue
        d = table[key]
        share = d.scaled["method.tau"] / d.knob_value
        for g in sorted({max(2, math.floor(cap) - k) for k in (0, 2, 4)}):
            for extra in (settings or {}).get(key, [()]):
                points.append(point_at(SPECS[key], d, max(g + 1, round(g / share)), kind="explore", extra=extra))
    return points


def changes(cfg, override: str) -> bool:
    """Whether ``override`` (key=value) changes the composed ``cfg``: its key is there (a setting of another
    version is skipped) and holds another value (a tuning that already sets it needs no second point)."""
    from omegaconf import OmegaConf

    key, value = override.split("=", 1)
    current = OmegaConf.select(cfg, key)
    return current is not None and str(current).lower() != value.lower()


def explore_settings(keys=EXPLORED) -> dict[str, list[tuple[str, ...]]]:
    """Per searched method: its own setting, one scale (its first), its noise setting, both, and both with the
    l1 term doubled."""
    from omegaconf import OmegaConf

    from cfx_cli.config import compose

    out = {}
    for key in keys:
        if not available(key):
            continue
        cfg = compose(list(SPECS[key].overrides))
        scales = OmegaConf.select(cfg, "method.scales")
        one = (f"method.scales=[{float(scales[0])}]",) if scales is not None and len(scales) > 1 else ()
        noise = (NOISE_SETTING[key],) if key in NOISE_SETTING and changes(cfg, NOISE_SETTING[key]) else ()
        l1 = OmegaConf.select(cfg, "method.lambda_l1")
        sparse = (f"method.lambda_l1={2 * float(l1):g}",) if l1 else ()
        options = [(), one, noise, one + noise, one + noise + sparse]
        out[key] = list(dict.fromkeys(options))  # unique (a missing part repeats one), the plain one first
    return out


def custom_point(text: str, table: dict[str, Defaults]) -> Point:
    """``--point "fastdime sampler.steps=26 method.tau=13"``: a spec key, then `cfx run` overrides."""
    key, *over = text.split()
    if key not in SPECS:
        raise SystemExit(f"--point {text!r}: unknown method {key!r}; use one of {sorted(SPECS)}")
    knob = SPECS[key].knob
    value = next((o.split("=", 1)[1] for o in over if o.startswith(knob + "=")), None)
    value = grid_parts(value)[1] if value is not None else table[key].knob_value
    return Point(key, value, [*SPECS[key].overrides, *over], "custom", " ".join(o.split(".", 1)[-1] for o in over))


# --------------------------------------------------------------------------------------------- running a point

# The point's process is started by this small launcher, not by the benchmark itself: on Linux a child's ru_maxrss
# starts from the RSS of the process that forked it (the copied address space counts at exec), so a child of
# this script (torch, pandas, matplotlib loaded: ~1 GB) would report at least that. The launcher is a bare
# interpreter (~13 MB); it forks and execs the job and writes the job's own rusage (from wait4) to a file.
LAUNCHER = """import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as fh:
    json.dump({"maxrss_kib": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""
MEASURE = "launcher-wait4"  # how max_rss_mib was measured; a point recorded otherwise is measured again


def run_point(point: Point, args) -> dict:
    """`cfx run` of one point in a process of its own (skipped when its folder is done and was measured this
    way), then its row. A folder that is not (a killed run) starts afresh, so that its time is one whole run."""
    folder = Path(args.out) / "jobs" / point.folder_name
    record = folder / "point.json"
    if not args.force and record.exists() and _state(folder) == "done":
        measured = json.loads(record.read_text())
        if measured.get("measure") == MEASURE:
            return read_row(point, folder, measured)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "cfx_cli.cli", "run", *point.overrides, f"dataset.num_images={args.images}",
           f"seed={args.seed}", f"device={args.device}", "metrics.evaluate.metrics=[]", f"hydra.run.dir={folder}"]
    if args.batch_size:
        cmd.append(f"batch_size={args.batch_size}")
    print(f"[{point.spec} {point.label}] running", flush=True)
    usage_file = folder / "rusage.json"
    with open(folder / "child.log", "w") as log:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-c", LAUNCHER, str(usage_file), *cmd], stdout=log,
                            stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
    usage = json.loads(usage_file.read_text()) if usage_file.exists() else {"maxrss_kib": float("nan"),
                                                                             "cpu_s": float("nan")}
    measured = {"wall_s": wall, "cpu_s": usage["cpu_s"], "max_rss_mib": usage["maxrss_kib"] / 1024,
                "measure": MEASURE, "returncode": rc, "command": cmd, "code": code_version()}
    if rc != 0:
        tail = (folder / "child.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        print(f"[{point.spec} {point.label}] failed (exit {rc}): {tail[0]}", flush=True)
        return {"spec": point.spec, "kind": point.kind, "label": point.label, "failed": tail[0], **measured}
    record.write_text(json.dumps(measured, indent=1))
    return read_row(point, folder, measured)


def _state(folder: Path) -> str | None:
    try:
        return json.loads((folder / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def read_row(point: Point, folder: Path, measured: dict) -> dict:
    """A point's row from its job folder: metrics.csv (rates, distance) and samples.csv (calls per image)."""
    import pandas as pd

    metrics = dict(pd.read_csv(folder / "metrics.csv").values)
    samples = pd.read_csv(folder / "samples.csv")
    fwd, bwd = samples["nfe_unet"].mean(), samples["nfe_unet_backward"].mean()
    return {"spec": point.spec, "kind": point.kind, "label": point.label, "knob_value": point.knob_value,
            "images": len(samples), "real_flip_rate": metrics["real_flip_rate"], "flip_rate": metrics["flip_rate"],
            "adversarial_rate": metrics["adversarial_rate"], "ideal_cf_l1": metrics["ideal_cf_l1"],
            "l1": metrics["l1"], "unet_forward": fwd, "unet_backward": bwd, CALLS: fwd + bwd,
            "seconds_per_cf": metrics["seconds_per_cf"], "job_peak_mib": metrics.get("peak_mem_mib", float("nan")),
            "wall_s": measured["wall_s"], "cpu_s": measured["cpu_s"], "max_rss_mib": measured["max_rss_mib"],
            "code": measured.get("code", "?"), "folder": str(folder)}


# ------------------------------------------------------------------------------------- the verdict and table

def meets_bar(row: dict, ref: dict) -> bool:
    """As real as DiME's default: at least its real-flip rate and at most its distance to the ideal CF."""
    return row["real_flip_rate"] >= ref["real_flip_rate"] and row["ideal_cf_l1"] <= ref["ideal_cf_l1"]


def verdict(rows: list[dict], ref: dict, ratio: float = GOAL_RATIO) -> dict:
    """Whether some point meets DiME's bar within 1/``ratio`` of its calls; the cheapest that does, and
    where it is not met: the cheapest point meeting the bar (what it costs) and, under the cap, the points
    that miss it least (how far they miss)."""
    cap = ref[CALLS] / ratio
    others = [r for r in rows if r is not ref and "failed" not in r]
    good = sorted((r for r in others if meets_bar(r, ref)), key=lambda r: r[CALLS])
    met = [r for r in good if r[CALLS] <= cap]
    under = [r for r in others if r[CALLS] <= cap]
    # how far a point under the cap misses the bar: the larger relative shortfall of its two measures
    def miss(r):
        return max(0.0, ref["real_flip_rate"] - r["real_flip_rate"]) / max(ref["real_flip_rate"], 1e-9) + \
            max(0.0, r["ideal_cf_l1"] - ref["ideal_cf_l1"]) / ref["ideal_cf_l1"]
    return {"cap": cap, "met": bool(met), "best": met[0] if met else None,
            "cheapest_good": good[0] if good else None,
            "closest_under_cap": sorted(under, key=lambda r: (miss(r), r[CALLS]))[:3], "miss": miss}


def describe(row: dict, ref: dict) -> str:
    return (f"{row['spec']} ({row['label']}): real flip {row['real_flip_rate']:.2f}, ideal-CF "
            f"{row['ideal_cf_l1']:.4f}, {row[CALLS]:.1f} UNet calls per image = 1/{ref[CALLS] / row[CALLS]:.1f} "
            f"of DiME's")


def verdict_text(v: dict, ref: dict) -> str:
    head = (f"DiME's default: real flip {ref['real_flip_rate']:.2f}, ideal-CF {ref['ideal_cf_l1']:.4f}, "
            f"{ref[CALLS]:.1f} UNet calls per image; the cap (1/{GOAL_RATIO}): {v['cap']:.1f} calls.")
    if v["met"]:
        return f"{head}\nGOAL MET. Cheapest point as real as DiME's under the cap: {describe(v['best'], ref)}."
    lines = [head, "GOAL NOT MET."]
    if v["cheapest_good"] is not None:
        lines.append(f"Cheapest point as real as DiME's: {describe(v['cheapest_good'], ref)}.")
    for r in v["closest_under_cap"]:
        lines.append(f"Under the cap, closest to the bar: {describe(r, ref)}.")
    return "\n".join(lines)


COLUMNS = [("method", "spec", "{}"), ("setting", "label", "{}"), ("images", "images", "{:d}"),
           ("real flip", "real_flip_rate", "{:.2f}"), ("flip", "flip_rate", "{:.2f}"),
           ("adv.", "adversarial_rate", "{:.2f}"), ("ideal-CF l1", "ideal_cf_l1", "{:.4f}"),
           ("UNet fwd", "unet_forward", "{:.1f}"), ("UNet bwd", "unet_backward", "{:.1f}"),
           ("calls / DiME's", "ratio", "{}"), ("s / CF", "seconds_per_cf", "{:.2f}"),
           ("wall s", "wall_s", "{:.0f}"), ("CPU s", "cpu_s", "{:.0f}"), ("peak RSS MiB", "max_rss_mib", "{:.0f}"),
           ("job peak MiB", "job_peak_mib", "{:.0f}")]


def table(rows: list[dict], ref: dict) -> str:
    """Markdown, one row per point, by method then cost; a point as real as DiME's is marked ✓ (DiME's own: ref)."""
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " | bar |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    order = {k: i for i, k in enumerate(SPECS)}
    for r in sorted((r for r in rows if "failed" not in r), key=lambda r: (order[r["spec"]], r[CALLS])):
        cells = []
        for _, key, fmt in COLUMNS:
            if key == "ratio":
                cells.append(f"1/{ref[CALLS] / r[CALLS]:.1f}" if r[CALLS] else "–")
            else:
                cells.append(fmt.format(int(r[key]) if fmt == "{:d}" else r[key]))
        mark = "ref" if r is ref else ("✓" if meets_bar(r, ref) else "")
        lines.append("| " + " | ".join(cells) + f" | {mark} |")
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['spec']} | {r['label']} | failed: {r['failed']} |" + " |" * (len(COLUMNS) - 2))
    return "\n".join(lines)


def plot(rows: list[dict], ref: dict, cap: float, path: Path) -> None:
    """Real-flip rate and ideal-CF distance against UNet calls per image (log x), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ok = [r for r in rows if "failed" not in r]
    specs = [k for k in SPECS if any(r["spec"] == k for r in ok)]
    cmap = plt.get_cmap("tab10")
    for ax, key, name in ((axes[0], "real_flip_rate", "real-flip rate"), (axes[1], "ideal_cf_l1", "ideal-CF l1")):
        for i, spec in enumerate(specs):
            line = sorted((r for r in ok if r["spec"] == spec and r["kind"] in ("grid", "reference")),
                          key=lambda r: r[CALLS])
            extra = [r for r in ok if r["spec"] == spec and r["kind"] in ("explore", "custom")]
            if line:
                ax.plot([r[CALLS] for r in line], [r[key] for r in line], "o-", color=cmap(i % 10), label=spec)
            if extra:
                ax.plot([r[CALLS] for r in extra], [r[key] for r in extra], "^", color=cmap(i % 10), mfc="none",
                        label=f"{spec} (search)" if not line else None)
        ax.plot([ref[CALLS]], [ref[key]], "*", color="black", ms=16, zorder=5, label="DiME default")
        ax.axhline(ref[key], color="grey", lw=0.8, ls=":")
        ax.axvline(cap, color="red", lw=1, ls="--", label=f"1/{GOAL_RATIO} of DiME's calls ({cap:.1f})")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 10, 20, 50, 100 rather than 10^k, no minor labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("UNet calls per image (forward + backward)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("higher is better")
    axes[1].set_title("lower is better")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], ref: dict, v: dict, args) -> str:
    out = Path(args.out)
    fields = sorted({k for r in rows for k in r if k != "command"})
    with open(out / "frontier.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, ref, v["cap"], out / "frontier.png")
    from importlib.metadata import version

    codes = sorted({r.get("code", "?") for r in rows})
    text = (f"# Quality against cost on the synthetic benchmark\n\ncfx at {', '.join(codes)}, torch "
            f"{version('torch')}; "
            f"{args.images} test images (seed {args.seed}), "
            f"clean shape classifier, device {args.device}; one `cfx run` per point (`python3 scripts/bench_frontier.py {' '.join(sys.argv[1:])}`).\n"
            f"UNet calls per image: forward + backward passes (samples.csv nfe_unet, nfe_unet_backward). Wall and CPU "
            f"seconds, peak RSS: the point's whole process (start-up, model loading and the job's end metrics "
            f"included; ru_maxrss from wait4), on shared cores; s / CF: the job's own time per counterfactual "
            f"(metrics.csv seconds_per_cf); job peak: the job's peak RSS while its batches ran (metrics.csv "
            f"peak_mem_mib, /proc/self/statm every 10 ms). ✓: as real as DiME's default (real-flip rate "
            f">= and ideal-CF l1 <= DiME's).\n\n{table(rows, ref)}\n\n```\n{verdict_text(v, ref)}\n```\n")
    (out / "frontier.md").write_text(text)
    return text


def code_version() -> str:
    """The commit of the cfx_cli that ran (the checkout the child processes import), '+ changes' if dirty."""
    import cfx_cli

    repo = Path(cfx_cli.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "cfx_cli", "conf"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{repo} (not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")


# --------------------------------------------------------------------------------------------------- the CLI

def parse_absolute(items) -> dict[str, list[int]]:
    out = {}
    for item in items or []:
        key, _, values = item.partition("=")
        if key not in SPECS or not values:
            raise SystemExit(f"--budget-of {item!r}: use METHOD=V,V,... with METHOD one of {sorted(SPECS)}")
        try:
            out[key] = [int(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"--budget-of {item!r}: the values must be integers (grid steps or iterations), "
                             f"e.g. {key}=10,25,50") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"of {list(SPECS)} (default: all present)")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.15, 0.25, 0.5, 1.0],
                   help="fractions of each method's default budget knob (default 0.1 0.15 0.25 0.5 1)")
    p.add_argument("--budget-of", action="append", metavar="METHOD=V,V", help="the knob's own values for a method")
    p.add_argument("--point", action="append", default=[], help='an extra point: "METHOD override override ..."')
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--out", default="outputs/frontier")
    p.add_argument("--quick", action="store_true", help="DiME and FastDiME, 4 images, budgets 0.25 and 1, no search")
    p.add_argument("--no-explore", action="store_true", help="skip the search under the cap")
    p.add_argument("--explore", nargs="+", default=list(EXPLORED), choices=EXPLORED,
                   help=f"the methods searched under the cap (default: {' '.join(EXPLORED)}, where present)")
    p.add_argument("--force", action="store_true", help="re-run points whose job folder is already done")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.budgets, args.images, args.no_explore = ["dime", "fastdime"], [0.25, 1.0], 4, True
    bad = [f for f in args.budgets if not 0 < f <= 1]
    if bad:
        raise SystemExit(f"--budgets {bad[0]}: a fraction of the default budget in (0, 1]; for the knob's own "
                         f"values use --budget-of METHOD=V,V")
    if args.images < 1:
        raise SystemExit(f"--images {args.images}: at least 1")
    keys = args.methods or [k for k in SPECS if available(k)]
    unknown = [k for k in keys if k not in SPECS]
    if unknown:
        raise SystemExit(f"--methods {unknown[0]}: unknown; use some of {list(SPECS)}")
    missing = [k for k in keys if not available(k)]
    if missing:
        raise SystemExit(f"--methods {missing[0]}: conf/method has no such method in this checkout "
                         f"({conf_dir()}); leave it out")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    needed = set(keys) | {"dime"} | {k for k in args.explore if available(k) and not args.no_explore}
    needed |= {t.split()[0] for t in args.point if t.split() and t.split()[0] in SPECS}
    table_ = {k: defaults(SPECS[k]) for k in SPECS if k in needed}

    ref_point = reference_point(table_)
    ref = run_point(ref_point, args)
    if "failed" in ref:
        raise SystemExit(f"DiME's default point failed: {ref['failed']} (see {args.out}/jobs/{ref_point.folder_name})")
    rows = [ref]
    seen = {ref_point.folder_name}
    # the search under the cap first (the finding), then every method's budgets, cheapest first
    searched = [k for k in args.explore if available(k)]
    todo = [] if args.no_explore else explore_points(ref[CALLS] / GOAL_RATIO, table_, searched,
                                                     explore_settings(searched))
    todo += [custom_point(t, table_) for t in args.point]
    todo += budget_points(keys, args.budgets, parse_absolute(args.budget_of), table_)
    for point in todo:
        if point.folder_name in seen:
            continue
        seen.add(point.folder_name)
        rows.append(run_point(point, args))
        if "failed" not in rows[-1]:
            print(f"  {describe(rows[-1], ref)}", flush=True)
        write_outputs(rows, ref, verdict(rows, ref), args)  # a partial table after every point
    v = verdict(rows, ref)
    write_outputs(rows, ref, v, args)
    print(verdict_text(v, ref))
    print(f"table: {args.out}/frontier.md  plot: {args.out}/frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
