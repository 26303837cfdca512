"""Sweeps through Hydra launchers, then `cfx aggregate` into tables."""
import json

import pandas as pd
import pytest

from conftest import cfx

TINY = ["dataset.num_images=2", "batch_size=2", "sampler.steps=50", "method.tau=10", "method.scales=[10.0]"]


def test_joblib_sweep_and_aggregate(tmp_path):
    sweep = tmp_path / "sweep"
    cfx("run", "-m", "method=dime,fastdime", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        *TINY, f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if (p / "status.json").exists())
    assert len(jobs) == 4
    assert all(json.loads((j / "status.json").read_text())["state"] == "done" for j in jobs)
    out = cfx("aggregate", str(sweep)).stdout
    assert "| method" in out and "dime" in out and "fastdime" in out and "±" in out
    table = pd.read_csv(sweep / "table.csv")
    assert list(table["method"]) == ["dime", "fastdime"] and list(table["n_jobs"]) == [2, 2]
    # Mean over seeds, computed by hand from the jobs' metrics.csv.
    flips = [dict(pd.read_csv(j / "metrics.csv").values)["flip_rate"] for j in jobs
             if "method=fastdime" in j.name]
    assert table.loc[1, "flip_rate_mean"] == sum(flips) / 2
    assert (sweep / "table.tex").read_text().startswith("\\begin{tabular}")


def test_submitit_local_sweep_lists_failed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cfx("run", "-m", "method=fastdime", "method.variant=mask,bogus", "hydra/launcher=submitit_local",
               "hydra.launcher.timeout_min=10", *TINY, f"hydra.sweep.dir={sweep}", check=False)
    # the sweep runs every job, then says (last line, exit 1) that one failed, so that a script notices
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cfx run: 1 of 2 jobs of the sweep {sweep} did not finish")
    agg = cfx("aggregate", str(sweep), "--by", "method", "method.variant", "--out", str(tmp_path / "tables"),
              check=False)
    out = agg.stdout
    assert agg.returncode == 1 and agg.stderr.strip().endswith("1 of 2 job(s) not in the table (listed above)")
    assert "1 job(s) not included" in out and "failed" in out and "method.variant='bogus' is unknown" in out
    table = pd.read_csv(tmp_path / "tables" / "table.csv")
    assert list(table["method.variant"]) == ["mask"]


def test_shards_are_merged_before_set_level_metrics(tmp_path):
    for shard in (0, 1):
        cfx("run", "dataset.num_images=4", "batch_size=2", "sampler.steps=50", "method.tau=10",
            "method.scales=[10.0]", f"data.shard={shard}", "data.num_shards=2", f"hydra.run.dir={tmp_path / str(shard)}")
    s0 = pd.read_csv(tmp_path / "0" / "samples.csv")
    s1 = pd.read_csv(tmp_path / "1" / "samples.csv")
    assert sorted(s0["index"]) == [0, 2] and sorted(s1["index"]) == [1, 3]
    cfx("aggregate", str(tmp_path), "--metrics", "flip_rate", "l1", "num_samples")
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["n_jobs"]) == [1]  # two shards, one job
    both = pd.concat([s0, s1])
    assert table.loc[0, "num_samples_mean"] == 4
    assert table.loc[0, "l1_mean"] == pytest.approx(both["l1"].mean(), rel=1e-5)


def test_sweep_names_the_live_process_holding_a_job_folder(tmp_path):
    """A sweep's job whose folder another live process holds (an earlier submission still running there) is
    refused the folder; the sweep's last line names the job and the holder that the lock file records."""
    import subprocess
    import sys

    from conftest import ROOT

    sweep = tmp_path / "sweep"
    job_dir = sweep / "job0"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cfx_cli.outputs import JobLock, JobWriter\n"
         f"lock = JobLock({str(job_dir)!r}); lock.acquire(); JobWriter({str(job_dir)!r}).status(state='running')\n"
         "print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = cfx("run", "-m", "seed=0", *TINY,
                   f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}", check=False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert f"hydra.run.dir={job_dir} is in use by pid {holder.pid} on " in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cfx run: 1 of 1 jobs of the sweep {sweep} did not finish "
                           f"(job0: running, lock taken by pid {holder.pid} on ")
    assert not (job_dir / "samples.csv").exists()
