"""`cfx run -m ... hydra/launcher=slurm` on a real SLURM cluster: the one-node cluster that
scripts/slurm_local.sh starts on this machine (or any cluster `sinfo` answers for, whose default partition
takes 1-CPU jobs). Skipped, saying why, without one. The jobs are debug=fast jobs of a few images."""
import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import FAST, ROOT, cfx


def _no_cluster() -> str | None:
    """Why these tests cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (no sinfo): `bash scripts/slurm_local.sh` installs and starts a one-node cluster"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "the SLURM cluster does not answer (sinfo timed out): start it with `bash scripts/slurm_local.sh`"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed") for s in states):
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"node states: {states or 'none'}"
        return f"the SLURM cluster takes no job ({why}): start it with `bash scripts/slurm_local.sh`"
    return None


_WHY_NOT = _no_cluster()  # once: a stopped controller takes sinfo ~10 s of retries to report
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

# What the preset asks for (a GPU, 8 CPUs, 32 GB) would not fit this machine: one CPU, no GPU, a small job;
# no set-level metrics at the job's end (seconds of each job, and not what these tests are about).
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10", "metrics.evaluate.metrics=[]"]
# One image per batch: samples.csv grows a row at a time, so a test can act while the job is half done.
SLOW = ["method=fastdime", *FAST, "dataset.num_images=6", "batch_size=1"]


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "cfx_cli.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait(what, check, timeout=120, proc=None):
    """Poll ``check()`` until it returns something true; fail saying ``what`` (and the sweep's output)."""
    end = time.time() + timeout
    while time.time() < end:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the sweep ended ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {timeout} s")


def _rows(job_dir) -> int:
    f = job_dir / "samples.csv"
    return len(pd.read_csv(f)) if f.exists() and f.stat().st_size else 0


def _job_dir(sweep):
    dirs = [p for p in sweep.glob("0_*") if p.is_dir()] if sweep.is_dir() else []
    return dirs[0] if dirs else None


def _slurm_job(sweep) -> str:
    """The SLURM id of the sweep's one job (submitit's folder <sweep>/.submitit/<id>/, `<array>_<task>`
    when Hydra submitted an array)."""
    ids = [p.name for p in (sweep / ".submitit").iterdir() if any(p.glob("*_submitted.pkl"))]
    assert len(ids) == 1, ids
    return ids[0]


def _squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _scontrol(*args) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"scontrol {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not end in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _indices(job_dir) -> list[int]:
    return sorted(pd.read_csv(job_dir / "samples.csv")["index"])


def test_sweep_on_slurm_is_tabled_and_names_its_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cfx("run", "-m", "method=fastdime", "method.variant=mask,bogus", *FAST, "dataset.num_images=2",
               "batch_size=2", *SLURM, f"hydra.sweep.dir={sweep}", subprocess_=True, check=False)
    # both jobs ran, then the sweep says (last line, exit 1) which failed, so that a script notices
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cfx run: 1 of 2 jobs of the sweep {sweep} did not finish (1_")
    assert "method.variant=bogus" in last and last.endswith(": failed)")
    # they ran as SLURM jobs: submitit's batch script for an array of two 1-CPU tasks, the preset's setup line
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%" in script and "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --job-name=cfx" in script and "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in script
    assert len(list((sweep / ".submitit").glob("*_[01]/*_result.pkl"))) == 2
    good, bad = (json.loads(next(sweep.glob(f"{n}_*/status.json")).read_text()) for n in (0, 1))
    assert good["state"] == "done" and bad["state"] == "failed"
    assert "method.variant='bogus' is unknown" in bad["error"]
    agg = cfx("aggregate", str(sweep), "--by", "method", "method.variant", "--metrics", "flip_rate", "l1",
              "num_samples", check=False)
    assert agg.returncode == 1 and agg.stderr.strip().endswith("1 of 2 job(s) not in the table (listed above)")
    assert "method.variant='bogus' is unknown" in agg.stdout
    table = pd.read_csv(sweep / "table.csv")
    assert list(table["method.variant"]) == ["mask"] and list(table["n_jobs"]) == [1]
    samples = pd.read_csv(next(sweep.glob("0_*/samples.csv")))
    assert table.loc[0, "num_samples_mean"] == len(samples) == 2
    assert table.loc[0, "l1_mean"] == pytest.approx(samples["l1"].mean(), rel=1e-5)
    assert table.loc[0, "flip_rate_mean"] == pytest.approx(samples["success"].mean())


def test_live_job_keeps_its_folder_and_requeued_resumes(tmp_path):
    """A job's folder takes one process: while the job lives (here suspended by SLURM: stopped, not ended) the
    same sweep submitted again is refused the folder; requeued (as a pre-emption: SIGTERM, then SLURM starts
    it again), the job resumes from its folder with every sample exactly once."""
    sweep = tmp_path / "sweep"
    first = _popen("run", "-m", *SLOW, *SLURM, f"hydra.sweep.dir={sweep}")
    job_dir = _wait("job folder", lambda: _job_dir(sweep), proc=first)
    _wait("first sample", lambda: _rows(job_dir), proc=first)
    job = _slurm_job(sweep)
    _scontrol("suspend", job)
    try:
        holder = (job_dir / ".cfx" / "lock").read_text().split()[1]
        rows = _rows(job_dir)
        second = cfx("run", "-m", *SLOW, *SLURM, f"hydra.sweep.dir={sweep}", subprocess_=True, check=False)
        assert second.returncode == 1, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"cfx run: 1 of 1 jobs of the sweep {sweep} did not finish ({job_dir.name}: running")
        assert f"lock taken by pid {holder} on " in last  # who holds it
        refused = [p for p in (sweep / ".submitit").glob("*/*_log.err") if p.parent.name.split("_")[0] != job]
        assert any(f"is in use by pid {holder} on " in p.read_text() for p in refused)
        assert _rows(job_dir) == rows  # the refused job wrote nothing
    finally:
        _scontrol("resume", job)
    _scontrol("requeue", job)
    _wait("requeued job pending", lambda: _squeue_state(job) == "PENDING", timeout=60, proc=first)
    # SLURM holds a requeued job back for its credential lifetime (AuthInfo cred_expire, 120 s): start it now
    _scontrol("update", f"JobId={job}", "StartTime=now")
    code, out, err = _finish(first)
    assert code == 0, err
    assert _indices(job_dir) == list(range(6))  # every sample exactly once
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "done" and status["total"] == 6
    assert rows <= status["resumed_from"] < 6  # the second start kept what the first had written
    assert "Restarts=1" in _scontrol("show", "job", job)
    log = "".join(p.read_text() for p in (sweep / ".submitit" / job).glob("*_log.err"))
    assert "cfx: interrupted (SIGTERM)" in log  # the first start's own last line
    assert dict(pd.read_csv(job_dir / "metrics.csv").values)["num_samples"] == 6
