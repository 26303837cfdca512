"""`cfx aggregate` on hand-made job folders: mixed rows, missing shards and sweep jobs, LaTeX, --by errors."""
import json
import re

import pandas as pd
import pytest
import yaml

from cfx_cli import tables
from cfx_cli.commands import aggregate
from cfx_cli.errors import CfxError
from conftest import cfx


def make_job(folder, *, method="dime", seed=0, shard=0, num_shards=1, state="done", metrics=None, samples=None,
             num=None, classifier="synthetic_shape", task="classification", error=None, **values):
    """A job folder as `cfx run` writes it: .hydra/{config,hydra}.yaml, status.json, metrics.csv, samples.csv.

    ``values`` are dotted config keys (method.respacing=50) set on top of the defaults below.
    """
    cfg = {"dataset": {"name": "synthetic", "num_images": 4},
           "classifier": {"name": classifier, "path": f"zoo/{classifier}.pt", "task": task},
           "method": {"name": method, "respacing": 50, "tau": 15},
           "seed": seed, "device": "auto", "batch_size": 4, "data": {"shard": shard, "num_shards": num_shards}}
    for key, v in values.items():
        *parents, last = key.split("__")
        d = cfg
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    choices = {"dataset": "synthetic", "classifier": classifier, "regressor": None, "method": method,
               "tuning": f"{method}_synthetic", "tuning_regressor": f"{method}_None", "hydra/launcher": "basic"}
    hydra = {"hydra": {"runtime": {"choices": choices}, "job": {"num": num if num is not None else "???"}}}
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / "status.json").write_text(json.dumps({"state": state, "task": task, "error": error}))
    if samples is not None:
        pd.DataFrame(samples).to_csv(folder / "samples.csv", index=False)
    if metrics is not None:
        pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}).to_csv(folder / "metrics.csv",
                                                                                      index=False)
    return folder


def run(capsys, *argv):
    df = aggregate.aggregate([str(a) for a in argv])
    cap = capsys.readouterr()
    return df, cap.out, cap.err


# --------------------------------------------------------------------------- 1: rows mixing configs
def test_row_mixing_other_config_values_is_flagged(tmp_path, capsys):
    make_job(tmp_path / "a", method="dime", seed=0, metrics={"flip_rate": 1.0})
    make_job(tmp_path / "b", method="dime", seed=1, classifier="synthetic_shape_biased", method__respacing=100,
             metrics={"flip_rate": 0.5})
    # fastdime: differs only in seed, device, batch_size: a plain mean over seeds, no warning.
    make_job(tmp_path / "c", method="fastdime", seed=0, metrics={"flip_rate": 0.75})
    make_job(tmp_path / "d", method="fastdime", seed=1, device="cpu", batch_size=2, metrics={"flip_rate": 0.25})
    _, out, err = run(capsys, tmp_path)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["cfx aggregate: warning: row method=dime mixes jobs that differ in classifier, "
                        "method.respacing; add them to --by"]
    # the grouping asked for is kept, the note under the Markdown table names the keys
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["method"]) == ["dime", "fastdime"] and list(table["n_jobs"]) == [2, 2]
    assert table.loc[0, "flip_rate_mean"] == pytest.approx(0.75)
    note = out.split("Note:")[1].split("job(s) not included")[0]
    assert "- method=dime: classifier, method.respacing" in note and "fastdime" not in note
    assert "method=dime: classifier, method.respacing" in (tmp_path / "table.md").read_text()

    # with the keys in --by the rows are clean
    _, out, err = run(capsys, tmp_path, "--by", "method", "classifier", "method.respacing")
    assert "warning" not in err and "Note:" not in out
    assert len(pd.read_csv(tmp_path / "table.csv")) == 3


# --------------------------------------------------------------------------- 2a: incomplete shards
def _samples(indices, l1):
    return {"index": indices, "success": [True] * len(indices), "l1": [l1] * len(indices)}


def test_one_shard_of_two_is_missing_not_a_job(tmp_path, capsys):
    make_job(tmp_path / "s0", shard=0, num_shards=2, samples=_samples([0, 2], 0.1), metrics={"flip_rate": 1.0})
    df, out, _ = run(capsys, tmp_path, "--metrics", "flip_rate", "l1")
    assert len(df) == 0 and "(no finished jobs)" in out
    assert re.search(r"1 job\(s\) not included.*\n  missing .*s0  \(1/2 shards done; shard 1 missing\)", out)

    # the second shard done (on another device, with another batch size: the same job): one job,
    # its metrics recomputed over both shards' samples
    make_job(tmp_path / "s1", shard=1, num_shards=2, samples=_samples([1, 3], 0.3), metrics={"flip_rate": 1.0},
             device="cuda", batch_size=2)
    df, out, _ = run(capsys, tmp_path, "--metrics", "flip_rate", "l1", "num_samples")
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["n_jobs"]) == [1] and table.loc[0, "num_samples_mean"] == 4
    assert table.loc[0, "l1_mean"] == pytest.approx(0.2) and "not included" not in out


def test_failed_shard_makes_the_job_failed(tmp_path, capsys):
    make_job(tmp_path / "s0", shard=0, num_shards=2, samples=_samples([0, 2], 0.1))
    make_job(tmp_path / "s1", shard=1, num_shards=2, state="failed", error="boom")
    _, out, _ = run(capsys, tmp_path)
    assert "failed" in out and "1/2 shards done; shard 1 failed or missing" in out


# --------------------------------------------------------------------------- 2b: absent sweep jobs
def make_sweep(sweep, task, params=None, present=(), sweeper="hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    sweep.mkdir(parents=True)
    multirun = {"hydra": {"sweep": {"dir": "/somewhere/else"},
                          "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
                          "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun, sort_keys=False))  # as OmegaConf.save
    for num, name in present:
        make_job(sweep / f"{num}_{name}", num=num, metrics={"flip_rate": 1.0})


def test_sweep_lists_job_numbers_without_a_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_sweep(sweep, ["method=dime,fastdime", "seed=0,1", "dataset.num_images=4"],
               present=[(0, "method=dime,seed=0"), (1, "method=dime,seed=1"), (2, "method=fastdime,seed=0")])
    _, out, _ = run(capsys, sweep)
    listing = out.split("job(s) not included")[1]
    assert out.count("job(s) not included") == 1 and "\n1 job(s) not included" in out
    assert f"  missing  {sweep}/3_*  (job 3 of the sweep {sweep}: no folder (method=fastdime seed=1))" in listing
    assert "job 0 " not in listing and "job 2 " not in listing


def test_sweep_counts_experiment_params_with_hydras_parser(tmp_path):
    # as BasicSweeper: hydra.sweeper.params first, the command line replaces a key (seed: 3 choices, not 2)
    sweep = tmp_path / "sweep"
    make_sweep(sweep, ["experiment=synthetic_table", "seed=0,1,2", "method.tau=range(10,30,10)"],
               params={"method": "dime,fastdime", "classifier": "synthetic_shape,synthetic_shape_biased",
                       "seed": "0,1"})
    jobs = tables.sweep_jobs(sweep / "multirun.yaml")
    assert len(jobs) == 2 * 2 * 3 * 2
    assert jobs[0] == "method=dime classifier=synthetic_shape seed=0 method.tau=10"
    assert jobs[-1] == "method=fastdime classifier=synthetic_shape_biased seed=2 method.tau=20"
    missing = tables.missing_sweep_jobs([str(tmp_path)], [])
    assert [m["error"].split(":")[0] for m in missing] == [f"job {n} of the sweep {sweep}" for n in range(24)]
    assert all(m["state"] == "missing" for m in missing)


def test_sweep_with_other_sweeper_is_not_counted(tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep(sweep, ["method.tau=interval(5,30)"], sweeper="hydra_plugins.optuna.OptunaSweeper")
    assert tables.sweep_jobs(sweep / "multirun.yaml") is None
    assert tables.missing_sweep_jobs([str(sweep)], []) == []


# --------------------------------------------------------------------------- 3: LaTeX
def test_latex_escapes_specials_and_pm(tmp_path, capsys):
    for seed in (0, 1):
        make_job(tmp_path / f"v{seed}", seed=seed, method__variant="no_mask&50%",
                 metrics={"flip_rate": 0.5 + seed / 4, "ideal_cf_l1": 0.1, "seconds_per_cf": 2.0})
    run(capsys, tmp_path, "--by", "method", "method.variant")
    tex = (tmp_path / "table.tex").read_text()
    assert tex.startswith("\\begin{tabular}{llrrrr}") and tex.rstrip().endswith("\\end{tabular}")
    assert "method.variant & n\\_jobs & flip\\_rate & ideal\\_cf\\_l1 & seconds\\_per\\_cf \\\\" in tex
    assert "dime & no\\_mask\\&50\\% & 2 & 0.625 $\\pm$ 0.177 & 0.100 $\\pm$ 0.000" in tex
    assert "±" not in tex
    assert not re.search(r"(?<!\\)[_&%#]", tex.replace(" & ", " ")), "bare LaTeX special outside a command"
    assert tables.latex_escape("a_b {x} ~ ^ \\ $") == (r"a\_b \{x\} \textasciitilde{} \textasciicircum{} "
                                                         r"\textbackslash{} \$")


# --------------------------------------------------------------------------- 4: --by a key no job has
def test_by_unknown_key_is_a_one_line_error(tmp_path, capsys):
    make_job(tmp_path / "a", method__variant="mask", metrics={"flip_rate": 1.0})
    with pytest.raises(SystemExit) as exc:
        aggregate.main([str(tmp_path), "--by", "method", "nonsense"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("cfx: error: --by nonsense: no job has this config key; keys look like "
                                       "method, classifier, method.variant, dataset.num_images\n")
    with pytest.raises(CfxError):
        aggregate.aggregate([str(tmp_path), "--by", "nonsense"])
    assert not (tmp_path / "table.csv").exists()


def test_by_unknown_key_through_the_cli(tmp_path):
    make_job(tmp_path / "a", method__variant="mask", metrics={"flip_rate": 1.0})
    proc = cfx("aggregate", str(tmp_path), "--by", "nonsense", check=False, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "cfx: error: --by nonsense: no job has this config key; keys look like method, classifier, "
        "method.variant, dataset.num_images"]


# --------------------------------------------------------------------------- 5: default metrics
def test_mae_to_target_before_is_a_default_metric(tmp_path, capsys):
    m = aggregate.DEFAULT_METRICS
    assert m[m.index("mae_to_target") + 1] == "mae_to_target_before"
    make_job(tmp_path / "r", task="regression", metrics={"success_rate": 1.0, "mae_to_target": 0.02,
                                                         "mae_to_target_before": 0.3})
    run(capsys, tmp_path)
    table = pd.read_csv(tmp_path / "table.csv")
    cols = list(table.columns)
    assert cols.index("mae_to_target_before_mean") == cols.index("mae_to_target_std") + 1
    assert table.loc[0, "mae_to_target_before_mean"] == pytest.approx(0.3)


# --------------------------------------------------------------------------- counting, unreadable folders
def test_a_metric_missing_in_some_jobs_says_over_how_many(tmp_path, capsys):
    """A NaN metric in one of two jobs is averaged over one, and the cell says so; a done job without
    metrics.csv is listed as incomplete, not counted as a job with no metrics."""
    make_job(tmp_path / "a", seed=0, metrics={"flip_rate": 1.0, "mnac": 0.5})
    make_job(tmp_path / "b", seed=1, metrics={"flip_rate": 0.5, "mnac": float("nan")})
    make_job(tmp_path / "c", seed=2)  # done, no metrics.csv
    df, out, _ = run(capsys, tmp_path, "--metrics", "flip_rate", "mnac")
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["n_jobs"]) == [2]
    assert table.loc[0, "flip_rate_mean"] == 0.75 and "flip_rate_n" not in table  # both jobs have it
    assert table.loc[0, "mnac_mean"] == 0.5 and table.loc[0, "mnac_n"] == 1
    assert "0.500 (1 of 2 jobs)" in out and "0.750 ± 0.354 |" in out
    assert re.search(r"incomplete .*/c  \(state done but metrics.csv is missing or empty\)", out)


def test_unreadable_job_folders_are_listed_and_the_rest_tabled(tmp_path, capsys):
    make_job(tmp_path / "good", metrics={"flip_rate": 1.0})
    make_job(tmp_path / "torn", metrics={"flip_rate": 0.0})
    (tmp_path / "torn" / "status.json").write_text('{"state": "do')  # a truncated status.json
    make_job(tmp_path / "garbage", seed=1)
    (tmp_path / "garbage" / "metrics.csv").write_bytes(b"\x00\xff\x00 not a csv")
    df, out, _ = run(capsys, tmp_path, "--metrics", "flip_rate")
    assert list(pd.read_csv(tmp_path / "table.csv")["n_jobs"]) == [1]
    assert re.search(r"unreadable .*/torn  \(JSONDecodeError", out)
    assert re.search(r"unreadable .*/garbage  \(", out)


def test_exit_code_says_whether_every_job_is_in_the_table(tmp_path, capsys):
    make_job(tmp_path / "a", metrics={"flip_rate": 1.0})
    assert aggregate.main([str(tmp_path)]).attrs["not_included"] == 0  # exit 0
    make_job(tmp_path / "b", seed=1, state="failed", error="boom")
    with pytest.raises(SystemExit) as exc:
        aggregate.main([str(tmp_path)])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "cfx aggregate: 1 of 2 job(s) not in the table (listed above)"


def test_a_model_given_by_path_is_labelled_by_its_path(tmp_path, capsys):
    make_job(tmp_path / "zoo", metrics={"flip_rate": 1.0})
    mine = make_job(tmp_path / "mine", seed=1, metrics={"flip_rate": 0.5})
    (mine / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["classifier.path=/data/my_digits_cnn"]))
    df, out, _ = run(capsys, tmp_path, "--by", "model", "--metrics", "flip_rate")
    assert sorted(pd.read_csv(tmp_path / "table.csv")["model"]) == ["/data/my_digits_cnn", "synthetic_shape"]


# --------------------------------------------------------------------------- --table paper
def test_paper_table_lays_out_the_papers_columns_with_the_best_in_bold(tmp_path, capsys):
    for method, seed, fid, flip, cout in (("dime", 0, 10.0, 0.90, 0.2), ("dime", 1, 12.0, 1.00, 0.4),
                                          ("fastdime", 0, 20.0, 0.97, 0.5), ("fastdime", 1, 22.0, 0.99, 0.7)):
        make_job(tmp_path / f"{method}{seed}", method=method, seed=seed,
                 metrics={"flip_rate": flip, "fid": fid, "cout": cout, "l1": 0.1})
    make_job(tmp_path / "acre", method="ace", task="regression",
             metrics={"success_rate": 0.5, "mae_to_target": 0.25, "fid": 30.0})
    df, out, err = run(capsys, tmp_path, "--table", "paper")
    md = (tmp_path / "paper_table.md").read_text()
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Method"))
    assert "FID ↓" in header and "COUT ↑" in header and "Flip rate (%) ↑" in header and "l1" not in header
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines
           if ln.startswith("| DiME") or ln.startswith("| FastDiME") or ln.startswith("| AC-RE")}
    # by hand: mean and sample std of (10, 12) = 11, 1.414; flips in percent; the best of each column bold
    assert row["DiME"][0] == "**11.00 ± 1.41**" and row["FastDiME"][0] == "21.00 ± 1.41"   # FID: lower is better
    assert row["FastDiME"][1] == "**0.600 ± 0.141**" and row["DiME"][1] == "0.300 ± 0.141"  # COUT: higher
    assert row["FastDiME"][2] == "**98.0 ± 1.4**" and row["DiME"][2] == "95.0 ± 7.1"        # flip rate, %
    assert "No job has: sfid, fva, fs, mnac_successful, cd, real_flip_rate, corrected_rate, adversarial_rate, sigma_l." in md
    # the regression paper's columns, with ACE named as its regression variant
    reg_header = [ln for ln in lines if ln.startswith("| Method")][1]
    assert "Success (%) ↑" in reg_header and "MAE ↓" in reg_header
    assert row["AC-RE"][:3] == ["**50.0**", "**0.250**", "**30.00**"]
    tex = (tmp_path / "paper_table.tex").read_text()
    assert r"FID $\downarrow$" in tex and r"\textbf{11.00 $\pm$ 1.41}" in tex and r"Flip rate (\%) $\uparrow$" in tex
    numeric = pd.read_csv(tmp_path / "paper_table.csv")
    assert set(numeric["task"]) == {"classification", "regression"} and "fid_mean" in numeric


def test_real_and_adversarial_flips_in_both_tables(tmp_path, capsys):
    """Jobs on the synthetic benchmark: the flip rate, and of it the real (oracle-confirmed) and adversarial
    flips, in the default table and the papers' (in %, real higher is better, adversarial lower)."""
    for method, seed, flip, real in (("dime", 0, 1.0, 0.5), ("dime", 1, 1.0, 0.75), ("fastdime", 0, 0.9, 0.9)):
        make_job(tmp_path / f"{method}{seed}", method=method, seed=seed,
                 metrics={"flip_rate": flip, "real_flip_rate": real, "adversarial_rate": flip - real})
    df, out, err = run(capsys, tmp_path)
    assert list(df.columns[:5]) == ["method", "n_jobs", "flip_rate", "real_flip_rate", "adversarial_rate"]
    dime = df[df["method"] == "dime"].iloc[0]
    assert dime["real_flip_rate"][0] == pytest.approx(0.625) and dime["adversarial_rate"][0] == pytest.approx(0.375)
    run(capsys, tmp_path, "--table", "paper")
    lines = (tmp_path / "paper_table.md").read_text().splitlines()
    header = [c.strip() for c in next(ln for ln in lines if ln.startswith("| Method")).split("|")[1:-1]]
    row = {ln.split("|")[1].strip(): dict(zip(header[1:], [c.strip() for c in ln.split("|")[2:-1]])) for ln in lines
           if ln.startswith("| DiME") or ln.startswith("| FastDiME")}
    # by hand: DiME real (50, 75) → 62.5 ± 17.7, adversarial (50, 25) → 37.5 ± 17.7; FastDiME 90 and 0
    assert row["DiME"]["Real flips (%) ↑"] == "62.5 ± 17.7" and row["FastDiME"]["Real flips (%) ↑"] == "**90.0**"
    assert row["DiME"]["Adversarial (%) ↓"] == "37.5 ± 17.7" and row["FastDiME"]["Adversarial (%) ↓"] == "**0.0**"


def test_jobs_measured_with_other_end_metrics_are_one_row_not_a_mix(tmp_path, capsys):
    make_job(tmp_path / "a", seed=0, metrics={"flip_rate": 1.0}, metrics__evaluate__metrics="[fid]")
    make_job(tmp_path / "b", seed=1, metrics={"flip_rate": 0.5}, metrics__evaluate__metrics="[fid, cd]")
    df, out, err = run(capsys, tmp_path)
    assert len(df) == 1 and df["n_jobs"].iloc[0] == 2 and "mixes" not in err


# --------------------------------------------------------------------------- damaged job folders
def test_a_metrics_csv_cut_mid_line_is_listed_not_averaged(tmp_path, capsys):
    """One job's metrics.csv cut mid-line: not a silent "(1 of 2 jobs)", the job is listed as unreadable with
    the file named, the table holds the other job only, and the exit status is 1."""
    make_job(tmp_path / "a", seed=0, metrics={"flip_rate": 1.0, "l1": 0.25})
    make_job(tmp_path / "b", seed=1, metrics={"flip_rate": 0.5, "l1": 0.75})
    path = tmp_path / "b" / "metrics.csv"
    path.write_bytes(path.read_bytes()[:-4])  # "l1,0.75\n" -> "l1,0."
    with pytest.raises(SystemExit) as exc:
        aggregate.main([str(tmp_path), "--metrics", "flip_rate", "l1"])
    out = capsys.readouterr().out
    assert exc.value.code == 1
    assert re.search(rf"unreadable .*/b  \({re.escape(str(path))} is cut mid-line", out), out
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["n_jobs"]) == [1] and table.loc[0, "l1_mean"] == 0.25 and "of 2 jobs" not in out


def test_a_shard_with_an_open_quote_in_samples_csv_is_one_line(tmp_path, capsys):
    make_job(tmp_path / "s0", shard=0, num_shards=2, samples=_samples([0, 2], 0.1), metrics={"flip_rate": 1.0})
    make_job(tmp_path / "s1", shard=1, num_shards=2, samples=_samples([1, 3], 0.3), metrics={"flip_rate": 1.0})
    with open(tmp_path / "s1" / "samples.csv", "a") as fh:
        fh.write('5,"True,0.3\n')  # an open quote: the rest of the file is one field
    with pytest.raises(SystemExit) as exc:
        aggregate.main([str(tmp_path), "--metrics", "flip_rate", "l1"])
    out = capsys.readouterr().out
    assert exc.value.code == 1 and "Traceback" not in out
    assert re.search(r"unreadable .*s0,.*s1  \(1/2 shards done; shard 1 missing; .*s1/samples.csv cannot be read "
                     r"\(Error: unexpected end of data\)", out), out


def test_out_naming_a_file_is_one_line(tmp_path):
    make_job(tmp_path / "a", metrics={"flip_rate": 1.0})
    (tmp_path / "table").write_text("a file")
    for out in (tmp_path / "table", tmp_path / "table" / "under"):
        proc = cfx("aggregate", str(tmp_path), "--out", str(out), check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(f"cfx: error: --out {out}"), err
    assert (tmp_path / "table").read_text() == "a file"


def test_a_shard_missing_a_counterfactual_image_is_named(tmp_path, capsys):
    """A sharded job's set-level metrics read every shard's images: one deleted is named, not skipped."""
    from PIL import Image

    for shard, idx in ((0, [0, 2]), (1, [1, 3])):
        folder = make_job(tmp_path / f"s{shard}", shard=shard, num_shards=2, samples=_samples(idx, 0.1),
                          metrics={"flip_rate": 1.0})
        for kind in ("original", "counterfactual"):
            (folder / "images" / kind).mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.new("RGB", (4, 4)).save(folder / "images" / kind / f"{i}.png")
    (tmp_path / "s1" / "images" / "counterfactual" / "3.png").unlink()
    with pytest.raises(SystemExit) as exc:
        aggregate.main([str(tmp_path), "--metrics", "flip_rate", "l1"])
    out = capsys.readouterr().out
    assert exc.value.code == 1
    assert re.search(r"unreadable .*s0,.*s1  \(.*s1/images/counterfactual/3.png is missing \(sample 3\)\)", out), out
