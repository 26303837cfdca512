"""After a ``cfx run -m`` sweep: say, in one last line and the exit code, whether every job finished.

Hydra runs the jobs (in this process or through a launcher) and returns normally even when some
failed (each failed job's status.json says why); a script needs to notice. The callback records
where the sweep writes; ``report_sweep`` reads the jobs' status.json files there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

_SWEEP: dict = {}


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary`` (conf/config.yaml): remembers the sweep folder."""

    def on_multirun_start(self, config, **kwargs) -> None:
        _SWEEP["dir"] = str(config.hydra.sweep.dir)


def report_sweep() -> None:
    """The sweep's jobs whose status.json is not ``done``, in one last line, then exit 1."""
    sweep = _SWEEP.pop("dir", None)
    if not sweep or not Path(sweep).is_dir():
        return
    states = {}
    for status in Path(sweep).glob("*/status.json"):
        try:
            states[status.parent.name] = json.loads(status.read_text()).get("state", "?")
        except (OSError, ValueError):
            states[status.parent.name] = "unreadable"
        if states[status.parent.name] == "running":
            states[status.parent.name] += _holder(status.parent)
    bad = sorted(k for k, v in states.items() if v != "done")
    if bad:
        shown = ", ".join(f"{k}: {states[k]}" for k in bad[:3]) + (" ..." if len(bad) > 3 else "")
        print(f"cfx run: {len(bad)} of {len(states)} jobs of the sweep {sweep} did not finish ({shown})",
              file=sys.stderr)
        sys.exit(1)


def _holder(job: Path) -> str:
    """Who last took the job folder's lock (``cfx_cli.outputs.JobLock`` writes "pid N on HOST (since T)").
    A job still ``running`` after its sweep returned is another process's: alive elsewhere (this sweep's
    job was refused the folder: an earlier submission still runs there) or killed outright (SIGKILL, a lost
    node), which the pid and host let a person tell apart."""
    try:
        text = (job / ".cfx" / "lock").read_text().strip()
    except OSError:
        return ""
    return f", lock taken by {text}" if text else ""
