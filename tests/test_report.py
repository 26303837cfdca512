"""`cfx report` on hand-made job folders: the page's header, table, image grids (pixels), failures, plot,
missing and failed jobs, sharded jobs, exit codes, --out; and what Chromium draws of it."""
import base64
import importlib.util
import io
import json
import re
from html import unescape
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cfx_cli.commands import report
from conftest import ROOT, cfx

ERROR = "counterfactual not finite at step 7 <NaN>"


def write_png(path: Path, seed: int, channels: int = 3) -> np.ndarray:
    a = np.random.default_rng(seed).integers(0, 256, (8, 8, channels) if channels > 1 else (8, 8), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


def make_job(folder: Path, *, method="dime", seed=0, num=None, state="done", error=None, metrics=None,
             samples=None, kinds=("original", "counterfactual", "diff"), shard=0, num_shards=1, task="classification"):
    """A job folder as `cfx run` writes it. ``samples``: dicts of samples.csv rows; a failed row gets no
    counterfactual/diff image, as in a real job."""
    cfg = {"dataset": {"name": "synthetic", "num_images": 3},
           "classifier": {"name": "synthetic_shape", "task": task},
           "method": {"name": method, "tau": 15}, "seed": seed, "data": {"shard": shard, "num_shards": num_shards}}
    choices = {"dataset": "synthetic", "classifier": "synthetic_shape", "regressor": None, "method": method}
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": choices}, "job": {"num": num if num is not None else "???"}}}))
    (folder / "status.json").write_text(json.dumps({"state": state, "task": task, "error": error,
                                                    "started": "2026-01-02T03:04:05",
                                                    "finished": "2026-01-02T03:09:00"}))
    if metrics is not None:
        pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}).to_csv(folder / "metrics.csv",
                                                                                      index=False)
    pixels = {}
    if samples is not None:
        pd.DataFrame(samples).to_csv(folder / "samples.csv", index=False)
        for row in samples:
            for k, kind in enumerate(kinds):
                if row.get("failed") and kind != "original":
                    continue
                pixels[kind, row["index"]] = write_png(folder / "images" / kind / f"{row['index']}.png",
                                                       seed=hash((str(folder), row["index"], k)) % 2**32,
                                                       channels=1 if kind == "mask" else 3)
    return pixels


def rows(indices, failed=(), unsuccessful=()):
    out = []
    for i in indices:
        out.append({"index": i, "label": i % 2, "target": 1 - i % 2,
                    "cf_pred": (i % 2) if i in unsuccessful else 1 - i % 2,
                    "success": i not in failed and i not in unsuccessful, "failed": i in failed,
                    "error": ERROR if i in failed else "", "label_name": ["circle", "square"][i % 2],
                    "target_name": ["square", "circle"][i % 2],
                    "cf_pred_name": ["square", "circle"][(i + (i in unsuccessful)) % 2]})
    return out


def metrics(flip, seconds, nfe, l1=0.02):
    return {"num_samples": 3, "flip_rate": flip, "l1": l1, "nfe_unet": nfe, "nfe_unet_backward": 0.0,
            "seconds_per_cf": seconds}


@pytest.fixture
def sweep(tmp_path):
    """A sweep of method=dime,fastdime × seed=0,1,2: four jobs done, (dime, 2) failed, (fastdime, 2) missing."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
        "overrides": {"task": ["method=dime,fastdime", "seed=0,1,2"]}}}))
    px = {}
    px["dime", 0] = make_job(root / "0_method=dime,seed=0", method="dime", seed=0, num=0,
                             metrics=metrics(0.75, 2.5, 472.0), samples=rows([0, 1, 2]))
    px["dime", 1] = make_job(root / "1_method=dime,seed=1", method="dime", seed=1, num=1,
                             metrics=metrics(0.25, 3.5, 480.0), samples=rows([0, 1, 2], failed=[1], unsuccessful=[2]))
    make_job(root / "2_method=dime,seed=2", method="dime", seed=2, num=2, state="failed",
             error="RuntimeError: CUDA out of memory")
    kinds = ("original", "counterfactual", "diff", "mask")
    px["fastdime", 0] = make_job(root / "3_method=fastdime,seed=0", method="fastdime", seed=0, num=3,
                                 metrics=metrics(1.0, 0.5, 106.0), samples=rows([0, 1, 2]), kinds=kinds)
    px["fastdime", 1] = make_job(root / "4_method=fastdime,seed=1", method="fastdime", seed=1, num=4,
                                 metrics=metrics(0.5, 0.7, 110.0), samples=rows([0, 1, 2]), kinds=kinds)
    return root, px


def section(page: str, row: str) -> str:
    m = re.search(rf'<section data-row="{re.escape(row)}">(.*?)</section>', page, re.S)
    assert m, f"no section for {row}"
    return m.group(1)


def job_divs(sec: str) -> dict[str, str]:
    parts = re.split(r'<div class="job" data-job="', sec)[1:]
    return {unescape(p.split('"', 1)[0]): p for p in parts}


def decode(html_part: str, alt: str) -> np.ndarray:
    m = re.search(rf'src="data:image/png;base64,([^"]+)" alt="{re.escape(alt)}"', html_part)
    assert m, f"no embedded image {alt}"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(m.group(1)))))


def h2_part(page: str, anchor: str) -> str:
    return page.split(f'<h2 id="{anchor}">', 1)[1].split("<h2 ", 1)[0]


# --------------------------------------------------------------------------- the page
def test_page_of_a_sweep(sweep, capsys):
    root, px = sweep
    with pytest.raises(SystemExit) as e:  # a failed and a missing job: the page is written, exit 1
        report.main([str(root)])
    assert e.value.code == 1
    cap = capsys.readouterr()
    assert "2 of 6 job(s) not in the table" in cap.err and f"wrote {root / 'report.html'}" in cap.out
    page = (root / "report.html").read_text()

    # self-contained: no external resources, every image inline
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "<link" not in page and "<script" not in page
    assert "url(" not in page and "@import" not in page

    # header: folder, jobs, methods, dataset, when
    header = page.split('<h2 id="table">')[0]
    assert str(root.resolve()) in header and "6: 4 done" in header and "2 not in the table" in header
    assert "dime, fastdime" in header and "synthetic" in header and "2026-01-02 03:04:05" in header

    # the papers' layout: their names, rates in percent, the best in bold
    paper = h2_part(page, "table")
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", paper.split("<tbody>")[1])]
    assert "Flip rate (%) ↑" in paper and [r[0] for r in rows] == ["DiME", "FastDiME"]
    assert rows[0][1] == '50.0<span class="sd">± 35.4</span>'              # (0.75, 0.25) in percent
    assert rows[1][1] == '<b>75.0<span class="sd">± 35.4</span></b>'       # the higher flip rate, bold

    # all metrics: one row per method, mean ± std over the seeds of metrics.csv
    table = h2_part(page, "all")
    body = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])]
    assert [r[0] for r in body] == ["dime", "fastdime"]
    cells = dict(zip(re.findall(r"<th[^>]*>(.*?)</th>", table), body[0]))
    assert cells["n_<wbr>jobs"] == "2"
    assert cells["flip_<wbr>rate"] == '0.500<span class="sd">± 0.354</span>'         # (0.75, 0.25)
    assert cells["seconds_<wbr>per_<wbr>cf"] == '3.000<span class="sd">± 0.707</span>'  # (2.5, 3.5)

    # one grid per job, grouped by method; <img> count = samples × image kinds (no image of the failed sample)
    dime, fast = job_divs(section(page, "method=dime")), job_divs(section(page, "method=fastdime"))
    assert len(dime) == 2 and len(fast) == 2
    counts = {Path(j).name: d.count("<img") for j, d in {**dime, **fast}.items()}
    assert counts == {"0_method=dime,seed=0": 9, "1_method=dime,seed=1": 7,
                      "3_method=fastdime,seed=0": 12, "4_method=fastdime,seed=1": 12}
    assert page.count('<section data-row=') == 2
    # the embedded pixels are the files' pixels
    d0 = dime[str(root / "0_method=dime,seed=0")]
    assert np.array_equal(decode(d0, "counterfactual 2"), px["dime", 0]["counterfactual", 2])
    f1 = fast[str(root / "4_method=fastdime,seed=1")]
    assert np.array_equal(decode(f1, "mask 1"), px["fastdime", 1]["mask", 1])
    # the difference is drawn as a heat-map of the file's grey values
    grey = np.asarray(Image.fromarray(px["dime", 0]["diff", 0]).convert("L")) / 255.0
    heat = (matplotlib.colormaps["inferno"](grey)[..., :3] * 255).round()
    assert np.abs(decode(d0, "diff 0").astype(float) - heat).max() <= 1
    # columns: index, label -> target names, success
    d1 = dime[str(root / "1_method=dime,seed=1")]
    assert "#2" in d1 and "circle → square" in d1 and "square → circle" in d1
    assert d1.count("✓ success") == 1 and "✗ failed: got circle" in d1 and ">failed<" in d1 and "no image" in d1
    # no oracle in these jobs: the header says there is no ground truth and names the stand-ins
    head = page.split("<nav>", 1)[0]
    assert "no ground truth" in head and "FVA" in head and "MNAC" in head

    # failed and unsuccessful samples
    fails = h2_part(page, "failures")
    assert "#1:" in fails and "counterfactual not finite at step 7 &lt;NaN&gt;" in fails
    assert "1 of 3" in fails and "1_method=dime,seed=1" in fails
    assert "fastdime" not in fails and "0_method=dime,seed=0" not in fails  # no failures there

    # the plot: an embedded PNG, not blank
    plot = decode(h2_part(page, "plot"), "quality vs cost")
    assert plot.shape[1] >= 800 and len(np.unique(plot.reshape(-1, plot.shape[-1]), axis=0)) > 20

    # jobs not in the table: the failed one with its error, the missing job number of the sweep
    jobs = h2_part(page, "jobs")
    assert "2_method=dime,seed=2" in jobs and "RuntimeError: CUDA out of memory" in jobs and ">failed<" in jobs
    assert "job 5 of the sweep" in jobs and "method=fastdime seed=2" in jobs and ">missing<" in jobs


def test_samples_option_limits_the_columns(sweep):
    root, _ = sweep
    out, _ = report.report([str(root), "--samples", "2", "--out", str(root / "two.html")])
    fast = job_divs(section(out.read_text(), "method=fastdime"))
    assert [d.count("<img") for d in fast.values()] == [8, 8]
    assert all("first 2 of 3 samples" in d for d in fast.values())


def test_cli_exit_codes_and_out(sweep, tmp_path):
    root, _ = sweep
    # every job done: exit 0, the page where --out says (a new folder), none in the job folder
    done = tmp_path / "done"
    done.mkdir()
    make_job(done / "a", method="dime", seed=0, metrics=metrics(1.0, 1.0, 10.0), samples=rows([0]))
    make_job(done / "b", method="fastdime", seed=0, metrics=metrics(0.5, 0.2, 5.0), samples=rows([0]))
    out = tmp_path / "pages" / "mine.html"
    proc = cfx("report", str(done), "--out", str(out), check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "<html" in out.read_text() and not (done / "report.html").exists()
    assert f"wrote {out}" in proc.stdout
    # a failed and a missing job: exit 1, the page written and the count said
    proc = cfx("report", str(root), check=False)
    assert proc.returncode == 1 and (root / "report.html").is_file() and "not in the table" in proc.stderr
    assert "report     PATH" in cfx("--help").stdout


def test_usage_errors_exit_2_in_one_line(tmp_path, capsys):
    make_job(tmp_path / "a", method="dime", metrics=metrics(1.0, 1.0, 10.0), samples=rows([0]))
    for argv, says in [([str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'} does not exist"),
                       ([str(tmp_path), "--by", "colour"], "--by colour: no job has this config key"),
                       ([str(tmp_path / "a" / "images")], "no job folders under"),
                       ([str(tmp_path), "--samples", "0"], "--samples 0")]:
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("cfx: error: ") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


def test_by_other_keys_and_a_single_job(sweep):
    root, _ = sweep
    page = report.report([str(root), "--by", "seed", "--out", str(root / "s.html")])[0].read_text()
    assert page.count("<section data-row=") == 2 and 'data-row="seed=0"' in page and 'data-row="seed=1"' in page
    assert len(job_divs(section(page, "seed=0"))) == 2  # dime and fastdime, labelled by the method
    assert "<b title=\"method=dime\">method=dime</b>" in section(page, "seed=0")
    # one job folder: its page, beside it
    job = root / "3_method=fastdime,seed=0"
    out, records = report.report([str(job)])
    assert out == job / "report.html" and len(records) == 1
    assert len(job_divs(section(out.read_text(), "method=fastdime"))) == 1
    # --out a folder: report.html in it
    assert report.report([str(job), "--out", str(root.parent)])[0] == root.parent / "report.html"
    assert (root.parent / "report.html").is_file()


def test_sharded_job_shows_the_images_of_every_shard(tmp_path):
    """Shards are one job: one grid with the samples of both folders (whose names hold commas)."""
    px0 = make_job(tmp_path / "0_method=ace,data.shard=0", method="ace", shard=0, num_shards=2, num=0,
                   metrics=metrics(1.0, 1.0, 10.0), samples=rows([0, 1]))
    px1 = make_job(tmp_path / "1_method=ace,data.shard=1", method="ace", shard=1, num_shards=2, num=1,
                   metrics=metrics(0.0, 1.0, 10.0), samples=rows([2, 3], unsuccessful=[2, 3]))
    out, records = report.report([str(tmp_path)])
    assert [r["state"] for r in records] == ["done"]
    (grid,) = job_divs(section(out.read_text(), "method=ace")).values()
    assert grid.count("<img") == 12
    assert np.array_equal(decode(grid, "original 1"), px0["original", 1])
    assert np.array_equal(decode(grid, "counterfactual 3"), px1["counterfactual", 3])
    assert "0_method=ace,data.shard=0, 1_method=ace,data.shard=1" in grid


def test_plot_points_regression_and_seeds():
    recs = [{"job": "a", "state": "done", "method": "fastdime", "seed": s,
             "metrics": {"success_rate": q, "seconds_per_cf": t, "nfe_unet": 100.0, "nfe_unet_backward": 20.0}}
            for s, q, t in [(0, 0.8, 1.0), (1, 0.6, 3.0)]]
    recs.append({"job": "b", "state": "failed", "method": "dime", "metrics": {}})
    (p,) = report.plot_points(recs, ["method"])
    assert p["label"] == "fastdime" and p["quality_name"] == "success rate (no oracle)"
    assert list(p["quality"]) == [0.8, 0.6] and list(p["seconds"]) == [1.0, 3.0] and list(p["nfe"]) == [120.0, 120.0]
    png = report.plot_png([p])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert report.plot_png([]) is None


def test_report_table_is_text_cells():
    recs = [{"job": j, "state": "done", "method": "dime", "seed": s, "metrics": {"flip_rate": f}}
            for j, s, f in [("a", 0, 1.0), ("b", 1, 0.5)]]
    t = report.report_table(recs, ["method"])
    assert list(t.columns) == ["method", "n_jobs", "flip_rate"]
    assert t.iloc[0].tolist() == ["dime", "2", "0.750 ± 0.354"]


# --------------------------------------------------------------------------- what a browser draws
def test_chromium_draws_the_page(sweep, tmp_path):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is absent (Debian: apt-get install chromium); cannot render the page")
    root, _ = sweep
    out, _ = report.report([str(root)])
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shot)
    png = shot.screenshot(out, tmp_path / "page.png", width=1000, height=1800)
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert a.shape[:2] == (1800, 1000)
    ink = (np.abs(a - 255).sum(-1) > 60)
    assert ink.mean() > 0.03, "the screenshot is (nearly) blank"
    # colour: the plot's markers and the random images, not only black text on white
    colourful = (a.max(-1) - a.min(-1)) > 80
    assert colourful.mean() > 0.005
    # the top of the page (header text) and a lower band (images) both have content
    assert ink[:200].mean() > 0.01 and ink[900:1800].mean() > 0.01


# --------------------------------------------------------------------------- real vs adversarial flips
def test_outcomes_of_hand_made_rows_and_the_plot_uses_real_flips(tmp_path):
    """Rows with the oracle's confirmation: 0 real (flipped, confirmed), 1 adversarial (flipped, not
    confirmed), 2 failed; an old job's rows (no outcome column) get theirs from success and oracle_flip."""
    samples = rows([0, 1, 2], unsuccessful=[2])
    for r, flip in zip(samples, (1.0, 0.0, 0.0)):
        r["oracle_flip"] = flip
    make_job(tmp_path / "job", metrics={**metrics(2 / 3, 1.0, 10.0), "real_flip_rate": 1 / 3,
                                        "adversarial_rate": 1 / 3}, samples=samples)
    out, _ = report.report([str(tmp_path / "job")])
    page = out.read_text()
    head = page.split("<nav>", 1)[0]
    assert "✓ 1 real · ⚠ 1 adversarial · ✗ 1 failed" in head and "no ground truth" not in head
    grid = section(page, "method=dime")
    assert grid.count("✓ real") == 1 and grid.count("⚠ adversarial") == 1 and grid.count("✗ failed: got") == 1
    fails = h2_part(page, "failures")
    assert "1 of 3" in fails and "adversarial" in fails
    (p,) = report.plot_points([{"job": "a", "state": "done", "method": "dime",
                                "metrics": {"flip_rate": 1.0, "real_flip_rate": 0.25, "seconds_per_cf": 1.0}}],
                              ["method"])
    assert list(p["quality"]) == [0.25] and p["quality_name"].startswith("real-flip rate")


def adversarial_job(tmp_path) -> Path:
    """DiME with a scale 20× its tuned one under debug=fast: the classifier flips on all 4 images, the oracle
    sees the target shape on 2 (indices 0, 1); 2 and 3 are colour noise (measured: samples.csv of this run)."""
    job = tmp_path / "adv"
    cfx("run", "debug=fast", "method=dime", "method.scales=[300]", f"hydra.run.dir={job}")
    return job


def test_report_of_an_adversarial_run_says_so(tmp_path):
    job = adversarial_job(tmp_path)
    s = pd.read_csv(job / "samples.csv")
    assert s["success"].all()  # the classifier is fooled on every image
    assert list(s["outcome"]) == [("corrected" if w else "real") if f else "adversarial"
                                  for f, w in zip(s["oracle_flip"], s["oracle_was_target"])]
    assert (s["outcome"] == "adversarial").sum() >= 1
    m = dict(pd.read_csv(job / "metrics.csv").itertuples(index=False))
    assert m["flip_rate"] == 1.0 and m["real_flip_rate"] + m["corrected_rate"] + m["adversarial_rate"] == 1.0
    assert m["real_flip_rate"] == ((s["oracle_flip"] == 1) & (s["oracle_was_target"] == 0)).mean()
    out, _ = report.report([str(job)])
    page = out.read_text()
    n_adv = int((s["outcome"] == "adversarial").sum())
    assert f"⚠ {n_adv} adversarial" in page.split("<nav>", 1)[0]
    assert section(page, "method=dime").count("⚠ adversarial") == n_adv
    assert "Every sample of every finished job succeeded" not in page
    if Path("/usr/bin/chromium").exists():  # what a person sees: the adversarial badges drawn in amber
        spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
        shot = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shot)
        a = np.asarray(Image.open(shot.screenshot(out, tmp_path / "page.png", width=1200, height=2400))
                       .convert("RGB")).astype(int)
        badge = (np.abs(a - np.array([0xff, 0xf8, 0xc5])).sum(-1) <= 6)  # .st.adv's background
        assert badge.sum() >= 50 * n_adv, "no adversarial badge drawn"
