"""`cfx run [-m] [overrides...]`: exactly a Hydra application (`--cfg job`, `--help`, `-m`, launchers); one
job folder per run (``cfx_cli.job.loop.job``)."""
from __future__ import annotations

import sys
from pathlib import Path

from cfx_cli.config import hydra_app
from cfx_cli.errors import Interrupted, user_error


def task(cfg):
    """One job of the run (or of the sweep) in Hydra's output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cfx_cli.job.loop import headline, job

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        # a single run that stops before its first sample leaves no folder behind (nothing for `cfx aggregate`
        # to list as failed, nothing to resume); a sweep's job keeps its own, which its summary counts
        metrics = job(cfg, job_dir, remove_if_unwritten=None if sweep else (f"{hc.job.name}.log",))
    except (Interrupted, KeyboardInterrupt) as e:  # one line, not a traceback; the sweep stops too
        name = getattr(e, "signal_name", "SIGINT")
        where = (f"{job_dir} is marked interrupted; re-run the same command to resume" if Path(job_dir).exists()
                 else "before the first sample: nothing was written")
        print(f"cfx: interrupted ({name}): {where}", file=sys.stderr)
        sys.exit(143 if name == "SIGTERM" else 130)
    except Exception as e:
        msg = user_error(e)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        if sweep:  # one bad job must not stop the sweep; status.json says failed
            return None
        sys.exit(2)
    print(f"job folder: {job_dir}\n{headline(metrics)}")
    return metrics


def main(args: list[str]) -> None:
    from cfx_cli.outputs import remove_unwritten
    from cfx_cli.sweep import _SWEEP, report_sweep

    try:
        hydra_app("cfx run", "config", args, task)
    except Exception:
        # a sweep refused before its first job (Hydra checks every job's config first: an unknown option)
        # leaves no folder holding only Hydra's multirun.yaml, which `cfx aggregate` would count as missing jobs
        if _SWEEP.get("dir"):
            remove_unwritten(_SWEEP.pop("dir"), also=("multirun.yaml",))
        raise
    report_sweep()
