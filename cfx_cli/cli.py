"""`cfx run | train | aggregate | evaluate ...`: a small dispatcher in front of Hydra.

`cfx run ARGS` is exactly a Hydra application (`--cfg job`, `--help`, `-m`,
launchers, overrides), as is `cfx train WHAT ARGS`; `cfx aggregate` is a plain
argparse command, `cfx evaluate JOB [overrides]` takes Hydra overrides of conf/evaluate/default.yaml.
"""
from __future__ import annotations

import sys

USAGE = """usage: cfx [--debug] <command> [args]

  --debug    full tracebacks for every error, also the ones cfx reports in one line (same as CFX_DEBUG=1;
             sets HYDRA_FULL_ERROR=1)

commands:
  run        [-m] [overrides...]        explain images; one job folder per run (Hydra app: --help, --cfg job)
  train      WHAT [overrides...]        reproduce a shipped model (synthetic_ddpm, synthetic_shape,
                                        synthetic_shape_biased, synthetic_shape_robust, synthetic_size,
                                        synthetic_oracle, synthetic_ldm, synthetic_diffae) or train on
                                        your images (classifier|ddpm dataset=folder dataset.root=...)
  aggregate  PATH... [--by KEY...] [--table paper]
                                        job folders or sweep folders -> tables (Markdown, CSV, LaTeX)
  report     PATH... [--by KEY...]      job or sweep folders -> one offline HTML page: table, images, plot
  evaluate   JOB [overrides...]         add or recompute metrics (fid sfid kid cout lpips fva fs s3 mnac cd) on a
                                        finished job from its saved images (settings: conf/evaluate/default.yaml)
  calibrate  [overrides...] --values V... [--rate R] [--images N]
                                        the smallest guidance strength reaching a flip rate on a few images
  doctor     [overrides...]             before a long job: every file it needs, and whether each part loads
                                        (alias: check; same config and overrides as run; exit 1 on a problem)

examples:
  cfx run                                          # FastDiME on the synthetic benchmark
  cfx run method=dime classifier=synthetic_shape_biased
  cfx run method=fastdime regressor=synthetic_size target=absolute target.value=0.8
  cfx run -m method=dime,fastdime seed=0,1 hydra/launcher=joblib
  cfx aggregate outputs/multirun
  cfx evaluate outputs/runs/fastdime-synthetic/<date> metrics=[fid,sfid,kid,cout]
"""

TRAIN_USAGE = """usage: cfx train WHAT [overrides...]

Reproduce a shipped model of the synthetic benchmark into outputs/zoo/WHAT (out=zoo: over the shipped
cfx_cli/zoo/WHAT itself; out=FOLDER: anywhere).

WHAT: synthetic_ddpm, synthetic_shape, synthetic_shape_biased, synthetic_shape_robust, synthetic_size,
      synthetic_oracle, synthetic_ldm, synthetic_diffae; classifier | ddpm with dataset=folder dataset.root=...
      (settings in conf/trainable/WHAT.yaml; each shipped model records its command)

overrides: device=cpu|cuda  threads=N  seed=N  out=FOLDER|zoo  work_dir=FOLDER (checkpoints: a killed run
           resumes there)  trainable.steps=N  trainable.batch_size=N ...

examples:
  cfx train synthetic_shape
  cfx train synthetic_ddpm device=cuda
  cfx train synthetic_ddpm trainable.steps=500 out=/tmp/my_ddpm     # a quick try, anywhere
  cfx train synthetic_shape out=zoo                                  # replace the shipped model
"""


def _debug() -> bool:
    import os

    return os.environ.get("CFX_DEBUG", "").strip() not in ("", "0", "false")


def _user_error(exc: BaseException) -> str | None:
    """The one-line message of an error a user can fix, or None for a bug (shown in full; with --debug,
    every error is shown in full)."""
    from omegaconf.errors import MissingMandatoryValue

    from cfx_cli.errors import CfxError

    if _debug():
        return None

    seen = exc
    while seen is not None:
        if isinstance(seen, CfxError):
            return str(seen)
        if isinstance(seen, MissingMandatoryValue):
            key = getattr(seen, "full_key", None) or "a key"
            return f"{key} has no value (???): set it on the command line, e.g. {key}=..."
        seen = seen.__cause__ or seen.__context__
    return None


def _run_task(cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cfx_cli.run import headline, job

    from cfx_cli.errors import Interrupted

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
        msg = _user_error(e)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # one bad job must not stop the sweep; status.json says failed
            return None
        sys.exit(2)
    print(f"job folder: {job_dir}\n{headline(metrics)}")
    return metrics


def _train_task(cfg):
    from cfx_cli.train.main import train

    try:
        train(cfg)
    except Exception as e:
        msg = _user_error(e)
        if msg is None:
            raise
        print(f"cfx: error: {msg}", file=sys.stderr)
        sys.exit(2)


def _hydra(prog: str, config_name: str, args: list[str], task) -> None:
    import hydra

    from cfx_cli import CONF_DIR

    sys.argv = [prog, *args]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)()


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a job (loading, composing): one line, not a traceback
        print("cfx: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[:1] or (len(argv) > 1 and argv[1] == "--debug"):  # cfx --debug run ... | cfx run --debug ...
        import os

        argv.remove("--debug")
        os.environ["CFX_DEBUG"] = "1"
    if _debug():
        import os

        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from cfx_cli.sweep import report_sweep

        _hydra("cfx run", "config", rest, _run_task)
        report_sweep()
    elif cmd == "train":
        if rest and rest[0] in ("-h", "--help"):
            print(TRAIN_USAGE)
            return
        if not rest or "=" in rest[0] or rest[0].startswith("-"):
            from cfx_cli import CONF_DIR

            whats = ", ".join(sorted(p.stem for p in (CONF_DIR / "trainable").glob("*.yaml")))
            print(f"cfx: error: cfx train needs WHAT: one of {whats}", file=sys.stderr)
            sys.exit(2)
        _hydra("cfx train", "train", [f"trainable={rest[0]}", *rest[1:]], _train_task)
    elif cmd in ("doctor", "check"):
        from cfx_cli.doctor import main as doctor_main

        doctor_main(rest)
    elif cmd == "calibrate":
        from cfx_cli.calibrate import main as calibrate_main

        calibrate_main(rest)
    elif cmd == "aggregate":
        from cfx_cli.aggregate import main as aggregate_main

        aggregate_main(rest)
    elif cmd == "report":
        from cfx_cli.report import main as report_main

        report_main(rest)
    elif cmd == "evaluate":
        from cfx_cli.evaluate import main as evaluate_main

        evaluate_main(rest)
    else:
        print(f"cfx: error: unknown command {cmd!r}; use run, train, aggregate, evaluate, calibrate or doctor (cfx --help)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
