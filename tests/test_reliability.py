"""A job folder on a shared cluster, with real processes: one live process per folder (a second is
refused in one line and changes nothing), SIGTERM records `interrupted` and exits cleanly, and a
holder killed with SIGKILL leaves no stale lock: the next run resumes and finishes the job."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import ROOT

ARGS = ["run", "debug=fast", "method=dime", "dataset.num_images=8", "batch_size=1", "device=cpu"]


def start(job_dir):
    return subprocess.Popen([sys.executable, "-m", "cfx_cli.cli", *ARGS, f"hydra.run.dir={job_dir}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def wait_for_rows(job_dir, proc, n=1, timeout=120):
    """Until samples.csv has n rows (the job is past its start and writing)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        path = job_dir / "samples.csv"
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        time.sleep(0.1)
    raise AssertionError("the job wrote no rows in time")


def state(job_dir):
    return json.loads((job_dir / "status.json").read_text())


def test_one_process_per_job_folder_sigterm_and_sigkill(tmp_path):
    job_dir = tmp_path / "job"
    first = start(job_dir)
    wait_for_rows(job_dir, first)

    # a second process into the same folder (a re-queued SLURM job racing its predecessor): refused,
    # in one line naming the holder, and the holder's record (.hydra/, status) is left as it was
    hydra_before = (job_dir / ".hydra" / "overrides.yaml").read_bytes()
    second = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *ARGS, "method.lambda_l1=0.1",
                             f"hydra.run.dir={job_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and "is in use by pid" in err[0] and str(first.pid) in err[0], second.stderr
    assert (job_dir / ".hydra" / "overrides.yaml").read_bytes() == hydra_before
    assert state(job_dir)["state"] == "running"

    # SIGTERM (a time limit): the job records `interrupted` and exits cleanly with one line
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 143, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and "interrupted (SIGTERM)" in lines[0], err
    assert state(job_dir)["state"] == "interrupted"

    # resumed, then killed outright: the OS drops the lock with the process
    third = start(job_dir)
    wait_for_rows(job_dir, third, n=len(pd.read_csv(job_dir / "samples.csv")) + 1)
    third.kill()
    third.communicate(timeout=60)

    # ... so the next run takes the folder and finishes the job: every image once
    last = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *ARGS, f"hydra.run.dir={job_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    s = pd.read_csv(job_dir / "samples.csv")
    assert sorted(s["index"]) == list(range(8))
    assert state(job_dir)["state"] == "done"
