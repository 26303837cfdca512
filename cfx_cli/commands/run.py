"""`cfx run [-m] [overrides...]`: exactly a Hydra application (`--cfg job`, `--help`, `-m`, launchers); one
job folder per run (``cfx_cli.job.loop.job``)."""
from __future__ import annotations

import sys

from cfx_cli.config import hydra_app
from cfx_cli.errors import Interrupted, user_error


def task(cfg):
    """One job of the run (or of the sweep) in Hydra's output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cfx_cli.job.loop import headline, job

    hc = HydraConfig.get()
    job_dir = hc.runtime.output_dir
    try:
        metrics = job(cfg, job_dir)
    except (Interrupted, KeyboardInterrupt) as e:  # one line, not a traceback; the sweep stops too
        name = getattr(e, "signal_name", "SIGINT")
        print(f"cfx: interrupted ({name}): {job_dir} is marked interrupted; re-run the same command to resume",
              file=sys.stderr)
        sys.exit(143 if name == "SIGTERM" else 130)
    except Exception as e:
        msg = user_error(e)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # one bad job must not stop the sweep; status.json says failed
            return None
        sys.exit(2)
    print(f"job folder: {job_dir}\n{headline(metrics)}")
    return metrics


def main(args: list[str]) -> None:
    from cfx_cli.sweep import report_sweep

    hydra_app("cfx run", "config", args, task)
    report_sweep()
