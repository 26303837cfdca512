"""`cfx evaluate`: metrics added to finished jobs from their saved images, the job's own numbers untouched,
a sharded run's merged folder measured on all its rows, missing weights reported, never faked."""
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from conftest import cfx
from cfx_cli import ZOO_DIR
from cfx_cli.commands.evaluate import compose, main
from cfx_cli.outputs import load_pairs
from cfx_cli.metrics import realism as R
from cfx_cli.outputs import JobWriter, read_samples
from cfx_cli.metrics.summary import summarise

# A job in seconds: 12 synthetic images in two shards of 6 (one batch each), 8 guided steps at a strong scale
# (most counterfactuals flip).
JOB = ["debug=fast", "device=cpu", "dataset.num_images=12", "batch_size=6", "data.num_shards=2", "method.tau=8",
       "method.scales=[80.0]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster on a busy machine


@pytest.fixture(scope="module")
def shards(tmp_path_factory, one_thread):
    """Both shards of a finished job, as `cfx run` leaves them (.hydra/config.yaml included)."""
    from cfx_cli.api import compose as run_compose
    from cfx_cli.job.loop import job

    root = tmp_path_factory.mktemp("evaluate")
    folders = []
    for shard in (0, 1):
        cfg = run_compose([*JOB, f"data.shard={shard}"])
        folder = root / f"shard{shard}"
        job(cfg, folder)
        (folder / ".hydra").mkdir()
        OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # what Hydra writes (unresolved)
        folders.append(folder)
    return folders


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def raw(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def oracle_fid(folder):
    """FID recomputed here: oracle trunk features of all originals vs the successful counterfactuals."""
    rows, x, x_cf = load_pairs(folder)  # a folder, or the shard folders of one job
    net = R.build_extractor("oracle", oracle=str(ZOO_DIR / "synthetic_oracle"))
    ok = rows["success"].to_numpy(bool).copy()
    return R.fid(R.extract(net, x), R.extract(net, x_cf)[torch.from_numpy(ok)]), ok


def test_evaluate_adds_realism_and_cout_and_keeps_the_jobs_numbers(shards, tmp_path, capsys):
    job = copy(shards[0], tmp_path / "job")
    metrics_before, samples_before = raw(job / "metrics.csv"), raw(job / "samples.csv")
    main([str(job)])  # default: metrics=[fid,sfid,kid,cout], oracle features on the synthetic benchmark
    out = capsys.readouterr()
    assert "oracle feature space" in out.out and "metrics took" in out.out and "cout" in out.out
    after = raw(job / "metrics.csv")
    # the job's own rows are byte-for-byte as they were, in their order (but the re-measured cout); the new ones
    # follow
    kept = metrics_before["metric"] != "cout"
    assert after.iloc[:len(metrics_before)][kept].equals(metrics_before[kept])
    assert list(after["metric"][:len(metrics_before)]) == list(metrics_before["metric"])
    new = dict(zip(after["metric"], after["value"]))
    assert {"fid", "sfid", "kid", "kid_std", "cout"} <= set(new)
    fid, ok = oracle_fid(job)
    assert ok.sum() >= 2 and float(new["fid"]) == pytest.approx(fid, rel=1e-9)
    assert np.isfinite(float(new["sfid"])) and float(new["sfid"]) > 0 and np.isfinite(float(new["kid"]))
    samples = raw(job / "samples.csv")
    assert samples[list(samples_before.columns)].equals(samples_before)  # every cell of every old column
    cout = pd.to_numeric(samples["cout"], errors="coerce")
    correct = (samples["label"] == samples["pred"]).to_numpy()
    assert cout[correct].between(-1, 1).all() and cout[~correct].isna().all()
    assert float(new["cout"]) == pytest.approx(cout.mean(), rel=1e-4)
    # evaluating again replaces the rows (no duplicates) with the same values (seeded)
    main([str(job), "metrics=[sfid]"])
    again = raw(job / "metrics.csv")
    assert list(again["metric"]) == list(after["metric"]) and again.equals(after)


def test_a_sharded_runs_merged_folder_is_measured_on_all_rows(shards, tmp_path):
    merged = copy(shards[0], tmp_path / "merged")
    with open(shards[1] / "samples.csv", newline="") as fh:
        rows = fh.read().split("\n", 1)[1]
    with open(merged / "samples.csv", "a", newline="") as fh:
        fh.write(rows)
    for kind in ("original", "counterfactual", "diff", "mask"):
        for f in (shards[1] / "images" / kind).glob("*.png"):
            shutil.copy(f, merged / "images" / kind / f.name)
    JobWriter(merged).write_metrics(summarise(read_samples(merged), "classification"))
    assert len(read_samples(merged)) == 12
    evaluated = {}
    parts = [copy(s, tmp_path / s.name) for s in shards]  # the fixture's folders stay as the job left them
    for folder in (*parts, merged):
        main([str(folder), "metrics=[fid,cout]"])
        evaluated[folder] = dict(pd.read_csv(folder / "metrics.csv").values)
    fid, _ = oracle_fid(merged)
    assert evaluated[merged]["fid"] == pytest.approx(fid, rel=1e-9)  # the set of all 12, not a mean of shards
    assert evaluated[merged]["fid"] != pytest.approx(np.mean([evaluated[s]["fid"] for s in parts]), rel=1e-6)
    # per-sample values do not depend on the sharding
    cout = read_samples(merged).set_index("index")["cout"]
    by_shard = pd.concat([read_samples(s).set_index("index")["cout"] for s in parts])
    assert np.allclose(cout.sort_index(), by_shard.sort_index(), equal_nan=True)


def test_missing_inception_weights_give_a_warning_and_an_empty_cell(shards, tmp_path, capsys):
    job = copy(shards[1], tmp_path / "job")
    before = raw(job / "metrics.csv")
    main([str(job), "metrics=[fid,kid]", "realism.features=inception",
          f"realism.inception_weights={tmp_path / 'pt_inception-2015-12-05-6726825d.pth'}"])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(line) == 1 and "fid, kid not computed" in line[0] and "does not exist" in line[0]
    after = raw(job / "metrics.csv")
    assert after.iloc[:len(before)].equals(before)
    cells = dict(zip(after["metric"], after["value"]))
    assert cells["fid"] == "" and cells["kid"] == "" and cells["kid_std"] == ""
    assert np.isnan(dict(pd.read_csv(job / "metrics.csv").values)["fid"])


class ChannelMeans(torch.nn.Module):
    """An attribute oracle for the test: attribute c is on when channel c is bright on average."""

    def forward(self, x):
        return x.mean((2, 3))


def test_mnac_and_cd_through_a_configured_attribute_oracle(shards, tmp_path):
    from cfx_cli.metrics.attributes import changed_attributes, correlation_difference

    job = copy(shards[0], tmp_path / "job")
    labels = np.random.default_rng(0).integers(0, 2, size=(50, 3))
    np.save(tmp_path / "labels.npy", labels)
    main([str(job), "metrics=[mnac,cd]", f"attributes.oracle={{_target_:{__name__}.ChannelMeans}}",
          "attributes.query=0", f"attributes.train_labels={tmp_path / 'labels.npy'}"])
    rows, x, x_cf = load_pairs(job, read_samples(job))
    a, b = (x.mean((2, 3)) > 0).numpy(), (x_cf.mean((2, 3)) > 0).numpy()
    ok = rows["success"].to_numpy(bool)
    changed = changed_attributes(a, b)
    mnac = rows["mnac"].to_numpy(float)
    assert np.allclose(mnac[ok], changed[ok]) and np.isnan(mnac[~ok]).all()  # per sample: successful ones only
    metrics = dict(pd.read_csv(job / "metrics.csv").values)
    assert metrics["mnac"] == pytest.approx(changed[ok].mean())
    assert metrics["cd"] == pytest.approx(correlation_difference(a[ok], b[ok], 0, labels))


def test_the_cli_command(shards, tmp_path, capsys):
    job = copy(shards[0], tmp_path / "job")
    proc = cfx("evaluate", str(job), "metrics=[kid]", "realism.kid_subsets=3")  # the console entry point
    assert "kid=" in proc.stdout and "metrics took kid" in proc.stdout
    assert "kid" in dict(pd.read_csv(job / "metrics.csv").values)
    for args, message in (([str(job), "metrics=[fidd]"], "cfx: error: metrics=fidd is unknown"),
                          ([str(tmp_path / "nothing")], "no samples.csv"),
                          ([str(job), "realism.nokey=1"], "cfx: error: ")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err


def test_the_settings_compose():
    cfg = compose(["metrics=[fid,cout]", "realism.sfid_splits=3"])
    assert list(cfg.metrics) == ["fid", "cout"] and cfg.realism.sfid_splits == 3
    assert cfg.realism.oracle == str(ZOO_DIR / "synthetic_oracle")
    from cfx_cli.cli import USAGE

    assert "evaluate   JOB [overrides...]" in USAGE


@pytest.fixture(scope="module")
def whole(tmp_path_factory, one_thread):
    """The same 12 images as one job (no shards), as `cfx run` leaves it."""
    from cfx_cli.api import compose as run_compose
    from cfx_cli.job.loop import job

    folder = tmp_path_factory.mktemp("whole") / "job"
    cfg = run_compose([*JOB, "data.num_shards=1"])
    job(cfg, folder)
    (folder / ".hydra").mkdir()
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return folder


def test_a_job_measures_its_metrics_and_cfx_evaluate_reproduces_them(whole, tmp_path):
    own = dict(pd.read_csv(whole / "metrics.csv").values)
    fid, ok = oracle_fid(whole)  # recomputed here from the saved images
    assert ok.sum() >= 2 and own["fid"] == pytest.approx(fid, rel=1e-9)
    assert {"sfid", "kid", "kid_std", "cout", "lpips", "cd"} <= set(own) and own["metrics_seconds"] > 0
    samples = read_samples(whole)
    assert own["cout"] == pytest.approx(samples["cout"].mean(), rel=1e-9)
    job = copy(whole, tmp_path / "job")
    main([str(job), "metrics=[fid,sfid,kid,cout]"])
    again = dict(pd.read_csv(job / "metrics.csv").values)
    for name in ("fid", "sfid", "kid", "kid_std", "cout"):
        assert again[name] == pytest.approx(own[name], rel=1e-6, abs=1e-9), name
    assert np.allclose(read_samples(job)["cout"], samples["cout"], equal_nan=True, atol=1e-6)


def test_a_sharded_run_gets_its_set_level_metrics_from_aggregate_over_all_shards(shards, whole, tmp_path, capsys):
    from cfx_cli.commands import aggregate

    for s in shards:  # a shard measures per-sample metrics only: FID of half the set would be another number
        own = dict(pd.read_csv(s / "metrics.csv").values)
        assert "cout" in own and "fid" not in own and "sfid" not in own
    root = tmp_path / "run"
    for s in shards:
        copy(s, root / s.name)
    df = aggregate.aggregate([str(root), "--metrics", "fid", "sfid", "kid", "cout", "flip_rate"])
    err = capsys.readouterr().err
    assert "fid, sfid, kid, kid_std, cd over the merged samples of 2 shards" in err
    fid, _ = oracle_fid([root / s.name for s in shards])
    assert len(df) == 1 and df["fid"].iloc[0][0] == pytest.approx(fid, rel=1e-9)
    # the same images in one job: the same set-level numbers
    own = dict(pd.read_csv(whole / "metrics.csv").values)
    assert df["fid"].iloc[0][0] == pytest.approx(own["fid"], rel=1e-6)
    assert df["sfid"].iloc[0][0] == pytest.approx(own["sfid"], rel=1e-6)


def test_paper_table_has_sigma_l_across_seeds(whole, tmp_path, capsys):
    """σ_L: per image, LPIPS between the counterfactuals of the two seeds (here in the oracle's features, as the
    synthetic metrics configure it), averaged over the images."""
    from cfx_cli.commands import aggregate
    from cfx_cli.api import compose as run_compose
    from cfx_cli.metrics.perceptual import build_lpips
    from cfx_cli.job.loop import job

    root = tmp_path / "sweep"
    seed0 = copy(whole, root / "0_method=fastdime,seed=0")  # Hydra's sweep folder names hold ','
    cfg = run_compose([*JOB, "data.num_shards=1", "seed=1"])
    seed1 = root / "1_method=fastdime,seed=1"
    job(cfg, seed1)
    (seed1 / ".hydra").mkdir()
    OmegaConf.save(cfg, seed1 / ".hydra" / "config.yaml")
    df = aggregate.aggregate([str(root), "--table", "paper"])
    (rows0, _, a), (rows1, _, b) = load_pairs(seed0), load_pairs(seed1)
    both = torch.from_numpy(rows0["success"].to_numpy(bool) & rows1["success"].to_numpy(bool))
    assert 2 <= both.sum() < len(both)  # over the images whose counterfactual succeeded with both seeds
    a, b = a[both], b[both]
    assert not torch.equal(a, b)  # the seeds made other counterfactuals
    net = build_lpips("oracle", oracle=str(ZOO_DIR / "synthetic_oracle"))
    with torch.no_grad():
        expected = float(net(a, b).mean())
    assert df["sigma_l"].iloc[0][0] == pytest.approx(expected, rel=1e-6)
    md = (root / "paper_table.md").read_text()
    shown = f"{expected:.2f}" if expected >= 1 else f"{expected:.3f}"  # two decimals from 1 on, three below
    assert "σ_L ↑" in md and "FastDiME" in md and f"**{shown}**" in md
    # the report of this real synthetic sweep: the same table, every job's grid, the plot
    from cfx_cli.commands.report import build_page

    page, records = build_page([str(root)], ["method"], samples=4)
    assert len(records) == 2 and "σ_L ↑" in page and f"<b>{shown}</b>" in page
    assert page.count('class="job"') == 2 and page.count("data:image/png;base64,") >= 2 * 3 * 4 + 1


def test_fva_fs_over_the_successful_counterfactuals_s3_over_the_correctly_classified():
    from cfx_cli.metrics.summary import closeness

    rows = pd.DataFrame({"success": [True, False, True, True], "label": [0, 0, 1, 1], "pred": [0, 1, 1, 0],
                         "fs": [0.9, 0.1, 0.4, 0.6], "fva": [1.0, 0.0, 0.0, 1.0], "s3": [0.8, 0.2, 0.5, 0.1]})
    got = closeness(rows)
    # by hand: successful rows 0, 2, 3; correctly classified rows 0, 2
    assert got["fs"] == pytest.approx((0.9 + 0.4 + 0.6) / 3) and got["fva"] == pytest.approx(2 / 3)
    assert got["s3"] == pytest.approx((0.8 + 0.5) / 2)


def test_a_metric_whose_weights_are_missing_does_not_fail_the_job(tmp_path, capsys):
    from cfx_cli.api import compose as run_compose
    from cfx_cli.job.loop import job

    cfg = run_compose(["debug=fast", "device=cpu", "dataset.num_images=4", "metrics.evaluate.metrics=[fva,fs,cout]",
                       f"metrics.evaluate.identity.weights={tmp_path / 'resnet50_ft_weight.pkl'}"])
    metrics = job(cfg, tmp_path / "job")
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "fva, fs not computed" in ln]
    assert len(line) == 1 and "metrics.evaluate.identity.weights=" in line[0], err
    status = __import__("json").loads((tmp_path / "job" / "status.json").read_text())
    assert status["state"] == "done" and "cout" in metrics and "fva" not in metrics


def test_a_job_resumed_with_other_end_metrics_is_not_refused(whole, tmp_path):
    """The metrics measured at the end do not make the samples: another list re-measures, it is not another job."""
    from cfx_cli.api import compose as run_compose
    from cfx_cli.job.loop import job

    folder = copy(whole, tmp_path / "job")
    samples = raw(folder / "samples.csv")
    metrics = job(run_compose([*JOB, "data.num_shards=1", "metrics.evaluate.metrics=[kid]"]), folder)
    assert "kid" in metrics and "fid" not in metrics
    assert raw(folder / "samples.csv")[list(samples.columns)].equals(samples)  # nothing regenerated


def test_cfx_evaluate_starts_from_the_jobs_own_settings(whole, tmp_path):
    from cfx_cli.commands.evaluate import settings

    own = settings(whole)  # what the job was measured with: the synthetic oracle's LPIPS, its metric list
    assert own.lpips.net == "oracle" and "cd" in own.metrics and own.batch_size == 6
    changed = settings(whole, ["metrics=[lpips]", "lpips.net=alex", "batch_size=2"])
    assert list(changed.metrics) == ["lpips"] and changed.lpips.net == "alex" and changed.batch_size == 2
    assert changed.attributes.query == "auto"  # the rest stays the job's
    old = copy(whole, tmp_path / "old")  # a job made before jobs recorded metrics.evaluate: the defaults
    cfg = OmegaConf.load(old / ".hydra" / "config.yaml")
    del cfg.metrics["evaluate"]
    OmegaConf.save(cfg, old / ".hydra" / "config.yaml")
    assert settings(old).lpips.net == "alex" and list(settings(old).metrics) == ["fid", "sfid", "kid", "cout"]


def test_mnac_of_the_papers_counts_the_successful_counterfactuals():
    from cfx_cli.metrics.summary import summarise

    rows = pd.DataFrame({"index": range(4), "success": [True, False, True, False], "failed": [False] * 4,
                         "mnac": [1.0, 3.0, 2.0, 0.0], "cf_pred": 0, "target": 0, "pred": 1})
    got = summarise(rows, "classification")
    assert got["mnac"] == pytest.approx(6 / 4) and got["mnac_successful"] == pytest.approx(3 / 2)


def test_a_damaged_job_folder_is_refused_in_one_line_and_nothing_is_written(shards, tmp_path, capsys):
    """samples.csv cut mid-row, a counterfactual deleted or truncated: exit 1, one line naming the file, the
    job's files byte for byte as they were; --force evaluates the whole samples and says how many."""
    def files(job):
        return {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()}

    cut = copy(shards[0], tmp_path / "cut")
    data = (cut / "samples.csv").read_bytes()
    (cut / "samples.csv").write_bytes(data[:-15])  # a row cut mid-line
    gone = copy(shards[0], tmp_path / "gone")
    (gone / "images" / "counterfactual" / "4.png").unlink()
    torn = copy(shards[0], tmp_path / "torn")
    png = torn / "images" / "counterfactual" / "2.png"
    png.write_bytes(png.read_bytes()[:40])
    for job, needle in ((cut, f"{cut / 'samples.csv'} is cut mid-line"),
                        (gone, f"{gone / 'images' / 'counterfactual' / '4.png'} is missing (sample 4)"),
                        (torn, f"{png} cannot be read")):
        before = files(job)
        with pytest.raises(SystemExit) as exit_:
            main([str(job), "metrics=[kid]", "realism.kid_subsets=3"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 1 and len(err) == 1 and needle in err[0] and "--force" in err[0], err
        assert files(job) == before

    # --force: the 5 samples whose images are whole (shard 0 holds 6: indices 0, 2, ..., 10)
    main([str(gone), "metrics=[kid]", "realism.kid_subsets=3", "--force"])
    out, err = capsys.readouterr()
    assert "evaluating 5 of the 6 readable rows" in err and f"{gone}: 5 samples" in out, (out, err)
    assert "kid" in dict(pd.read_csv(gone / "metrics.csv").values)


def test_a_read_only_job_folder_is_one_line(shards, tmp_path, capsys, monkeypatch):
    import os

    job = copy(shards[0], tmp_path / "job")
    before = (job / "metrics.csv").read_bytes()
    real = os.access  # (as root chmod cannot make a folder read-only: the permission is what os.access says)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(job) else real(p, mode, **kw))
    with pytest.raises(SystemExit) as exit_:
        main([str(job), "metrics=[kid]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and f"{job}: cannot write in the job folder" in err[0], err
    assert (job / "metrics.csv").read_bytes() == before


def test_process_level_a_truncated_counterfactual_is_one_line_exit_1(shards, tmp_path):
    """The console script in its own process on a torn counterfactual PNG: exit 1, one line, no traceback."""
    job = copy(shards[0], tmp_path / "job")
    png = job / "images" / "counterfactual" / "0.png"
    png.write_bytes(png.read_bytes()[:30])
    before = (job / "metrics.csv").read_bytes()
    proc = cfx("evaluate", str(job), "metrics=[kid]", check=False, subprocess_=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    assert err[0].startswith(f"cfx: error: {png} cannot be read (") and "(sample 0)" in err[0], err
    assert (job / "metrics.csv").read_bytes() == before
