"""scripts/bench_frontier.py: the points it builds from a method's defaults and the verdict, table and plot
it makes of a result set (fake rows here; the real run is the script's own, docs/frontier.md)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "scripts" / "bench_frontier.py")
bf = importlib.util.module_from_spec(_spec)
sys.modules["bench_frontier"] = bf  # dataclasses look their module up there
_spec.loader.exec_module(bf)


def _row(spec, calls, real, ideal, kind="grid", label="x", fwd=None):
    return {"spec": spec, "kind": kind, "label": label, "knob_value": 1, "images": 32, "real_flip_rate": real,
            "flip_rate": 1.0, "adversarial_rate": 1.0 - real, "ideal_cf_l1": ideal, "l1": 0.03,
            "unet_forward": calls if fwd is None else fwd, "unet_backward": 0.0 if fwd is None else calls - fwd,
            "unet_calls": calls, "seconds_per_cf": 0.5, "job_peak_mib": 500.0, "wall_s": 20.0, "cpu_s": 18.0,
            "max_rss_mib": 600.0, "folder": "-"}


def test_grid_points_keep_the_guided_share():
    # DiME's tuning guides 30 of 100 steps: on a grid of 10 that is 3 steps, of 40 it is 12
    d = bf.Defaults(100, "", {"method.tau": 30})
    p = bf.point_at(bf.SPECS["dime"], d, 10)
    assert p.overrides == ["method=dime", "sampler.steps=10", "method.tau=3"]
    assert "method.tau=12" in bf.point_at(bf.SPECS["dime"], d, 40).overrides
    # a guided share that would round to 0 steps keeps one
    assert "method.tau=1" in bf.point_at(bf.SPECS["dime"], d, 2).overrides
    # LDCE's grid keeps its prefix; ACE's budget is its iterations, the grid untouched
    assert "sampler.steps=ldm25" in bf.point_at(bf.SPECS["ldce"], bf.Defaults(100, "ldm"), 25).overrides
    ace = bf.point_at(bf.SPECS["ace"], bf.Defaults(50), 12)
    assert ace.overrides == ["method=ace", "method.iterations=12"]


def test_budget_fractions_and_absolute_values():
    table = {"dime": bf.Defaults(100, "", {"method.tau": 30}), "diffae": bf.Defaults(100)}
    pts = bf.budget_points(["dime", "diffae"], [0.1, 0.25, 1.0], {"diffae": [7, 3]}, table)
    assert [(p.spec, p.knob_value) for p in pts] == [("dime", 10), ("dime", 25), ("dime", 100),
                                                     ("diffae", 7), ("diffae", 3)]
    assert bf.parse_absolute(["ace=5,10"]) == {"ace": [5, 10]}
    with pytest.raises(SystemExit, match="--budget-of 'ace=five'"):
        bf.parse_absolute(["ace=five"])
    with pytest.raises(SystemExit, match="unknown method 'dim'"):
        bf.custom_point("dim sampler.steps=10", table)
    p = bf.custom_point("dime sampler.steps=26 method.tau=13", table)
    assert (p.knob_value, p.overrides) == (26, ["method=dime", "sampler.steps=26", "method.tau=13"])


def test_grid_parts():
    assert bf.grid_parts("ldm100") == ("ldm", 100)
    assert bf.grid_parts(50) == ("", 50)
    with pytest.raises(SystemExit, match="'10,15,20'"):
        bf.grid_parts("10,15,20")


def test_explore_points_fit_one_pass_under_the_cap():
    # cap 465 / 30 = 15.5 calls: FastDiME guiding half of its 100-step grid is searched at 15, 13 and 11 guided
    # steps, i.e. grids of 30, 26 and 22
    table = {"fastdime": bf.Defaults(100, "", {"method.tau": 50})}
    pts = bf.explore_points(465 / 30, table, ["fastdime", "maskdime"])
    got = sorted((p.knob_value, [o for o in p.overrides if o.startswith("method.tau")][0]) for p in pts)
    assert got == [(22, "method.tau=11"), (26, "method.tau=13"), (30, "method.tau=15")]
    assert {p.kind for p in pts} == {"explore"}
    # each grid once per setting of the method
    pts = bf.explore_points(465 / 30, table, ["fastdime"], {"fastdime": [(), ("method.public_mask_noise=false",)]})
    assert len(pts) == 6 and sum("method.public_mask_noise=false" in p.overrides for p in pts) == 3
    assert len({p.folder_name for p in pts}) == 6


def test_verdict_goal_met_picks_the_cheapest_point_at_the_bar():
    ref = _row("dime", 465.0, 0.59, 0.0224, kind="reference")
    rows = [ref,
            _row("fastdime", 55.0, 0.97, 0.016),            # as real, 1/8.5 of the calls
            _row("fastdime", 13.8, 1.00, 0.0220),           # as real, under 15.5: the goal
            _row("fastdime", 12.0, 1.00, 0.0250),           # cheaper but further from the ideal CF
            _row("dime", 6.0, 0.20, 0.05)]
    v = bf.verdict(rows, ref)
    assert v["cap"] == pytest.approx(15.5)
    assert v["met"] and v["best"] is rows[2]
    text = bf.verdict_text(v, ref)
    assert "GOAL MET" in text and "13.8 UNet calls" in text and "1/33.7" in text


def test_verdict_not_met_names_the_cheapest_good_and_the_closest_under_the_cap():
    ref = _row("dime", 465.0, 0.59, 0.0224, kind="reference")
    a = _row("fastdime", 55.0, 0.97, 0.016)
    b = _row("fastdime", 14.0, 1.00, 0.0250)   # misses the distance by 0.0026 / 0.0224 = 0.116
    c = _row("dime", 6.0, 0.50, 0.0200)        # misses the real-flip rate by 0.09 / 0.59 = 0.153
    failed = {"spec": "ace", "kind": "grid", "label": "iterations=5", "failed": "boom"}
    v = bf.verdict([ref, a, b, c, failed], ref)
    assert not v["met"] and v["cheapest_good"] is a
    assert v["closest_under_cap"] == [b, c]
    assert v["miss"](b) == pytest.approx(0.0026 / 0.0224)
    assert v["miss"](c) == pytest.approx(0.09 / 0.59)
    assert "GOAL NOT MET" in bf.verdict_text(v, ref)


def test_table_rows_marks_and_ratios(tmp_path):
    ref = _row("dime", 465.0, 0.59, 0.0224, kind="reference", label="steps=100 tau=30")
    rows = [_row("ace", 93.0, 0.0, 0.016, fwd=31.0, label="iterations=5"), ref,
            _row("fastdime", 15.5, 0.59, 0.0224, label="steps=30 tau=15"),
            {"spec": "ldce", "kind": "grid", "label": "steps=ldm10", "failed": "exit 1"}]
    md = bf.table(rows, ref).splitlines()
    assert len(md) == 2 + 4
    body = [line.split(" | ") for line in md[2:]]
    # ordered as SPECS: dime, fastdime, ..., ace, ...; the failed point last
    assert [cells[0].strip("| ") for cells in body] == ["dime", "fastdime", "ace", "ldce"]
    assert body[0][-1].strip(" |") == "ref"
    assert body[1][-1].strip(" |") == "✓"           # exactly at the bar counts
    assert "1/30.0" in body[1] and "1/5.0" in body[2]
    assert body[2][7:9] == ["31.0", "62.0"]         # ACE: forward and backward calls apart
    assert "failed: exit 1" in md[-1]


def test_plot_writes_both_panels(tmp_path):
    from PIL import Image

    ref = _row("dime", 465.0, 0.59, 0.0224, kind="reference")
    rows = [ref, _row("dime", 120.0, 0.5, 0.02), _row("fastdime", 55.0, 0.97, 0.016),
            _row("fastdime", 13.8, 1.0, 0.022, kind="explore")]
    path = tmp_path / "f.png"
    bf.plot(rows, ref, 15.5, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (12 * 110, round(4.6 * 110))


def test_every_spec_names_keys_of_its_composed_config():
    """The knobs the script turns exist in `cfx run method=<m>`'s config, and the defaults it reads are theirs."""
    from omegaconf import OmegaConf

    from cfx_cli.config import compose

    for key in ("dime", "ace", "ldce"):
        spec = bf.SPECS[key]
        cfg = compose(list(spec.overrides))
        d = bf.defaults(spec)
        assert f"{d.prefix}{d.knob_value}" == str(OmegaConf.select(cfg, spec.knob))
        for k, v in d.scaled.items():
            assert 0 < v < d.knob_value and v == OmegaConf.select(cfg, k)


def test_launcher_measures_the_job_not_the_benchmark(tmp_path):
    """A child forked by a big process reports at least that process's RSS as its ru_maxrss (Linux counts the
    copied address space at exec); through the launcher a child allocating 64 MiB reports about that, although
    this test holds 400 MiB."""
    import json
    import subprocess

    held = b"\x01" * (400 * 2**20)  # written: resident
    out = tmp_path / "rusage.json"
    rc = subprocess.run([sys.executable, "-c", bf.LAUNCHER, str(out), sys.executable, "-c",
                         "x = bytearray(64 * 2**20)"]).returncode
    assert rc == 0 and len(held)
    mib = json.loads(out.read_text())["maxrss_kib"] / 1024
    assert 64 <= mib < 200, mib
    # the exit status comes through
    assert subprocess.run([sys.executable, "-c", bf.LAUNCHER, str(out), sys.executable, "-c",
                           "raise SystemExit(3)"]).returncode == 3


def test_a_search_setting_is_kept_only_where_it_changes_the_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"method": {"public_last_noise": False, "tau": 5, "scales": [8.0, 10.0]}})
    assert not bf.changes(cfg, "method.public_last_noise=false")     # the tuning already sets it
    assert not bf.changes(cfg, "method.public_mask_noise=false")     # another method's key
    assert bf.changes(cfg, "method.tau=6") and bf.changes(cfg, "method.scales=[8.0]")
