"""`cfx run | train | evaluate | aggregate | report | doctor | calibrate`: dispatch only.

Each subcommand is one module of ``cfx_cli.commands`` with ``main(args)``: `cfx run ARGS` is exactly a
Hydra application (`--cfg job`, `--help`, `-m`, launchers, overrides), as are `cfx train WHAT ARGS` and
`cfx doctor ARGS`; `cfx aggregate` and `cfx report` are plain argparse commands, `cfx evaluate JOB
[overrides]` takes Hydra overrides of conf/evaluate/default.yaml.
"""
from __future__ import annotations

import os
import sys

from cfx_cli.errors import debug, exit_code, user_error

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


def command(name: str):
    """The module of subcommand ``name`` (``check``: doctor), imported only when it runs; None if unknown."""
    if name == "run":
        from cfx_cli.commands import run as module
    elif name == "train":
        from cfx_cli.commands import train as module
    elif name == "evaluate":
        from cfx_cli.commands import evaluate as module
    elif name == "aggregate":
        from cfx_cli.commands import aggregate as module
    elif name == "report":
        from cfx_cli.commands import report as module
    elif name in ("doctor", "check"):
        from cfx_cli.commands import doctor as module
    elif name == "calibrate":
        from cfx_cli.commands import calibrate as module
    else:
        return None
    return module


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a job (loading, composing): one line, not a traceback
        print("cfx: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[:1] or (len(argv) > 1 and argv[1] == "--debug"):  # cfx --debug run ... | cfx run --debug ...
        argv.remove("--debug")
        os.environ["CFX_DEBUG"] = "1"
    if debug():
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    module = command(cmd)
    if module is None:
        print(f"cfx: error: unknown command {cmd!r}; use run, train, aggregate, evaluate, calibrate or doctor (cfx --help)",
              file=sys.stderr)
        sys.exit(2)
    if cmd in ("run", "train", "doctor", "check"):
        problem = output_dir_problem(rest)
        if problem:
            print(f"cfx: error: {problem}", file=sys.stderr)
            sys.exit(2)
        hydra_command(module, rest)
        return
    module.main(rest)


def hydra_command(module, args: list[str]) -> None:
    """A Hydra application's command (run, train, doctor). Hydra reports an error it catches (a bad override,
    an unknown group option, a failed task) itself and exits 1; HYDRA_FULL_ERROR=1 lets the error reach
    here instead, so that one a user can fix (``user_error``: an unknown group option, in a -m sweep too)
    is one line and exit status 2, like cfx's other config errors. Any other goes back to Hydra's own
    report, as before."""
    if debug():  # HYDRA_FULL_ERROR is set already: every error in full
        module.main(args)
        return
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        module.main(args)
    except Exception as e:  # noqa: BLE001 - one line for what a user can fix, Hydra's report for the rest
        _restore("HYDRA_FULL_ERROR", saved)
        # the command line as Hydra parsed it: config.hydra_app hands it over in sys.argv, after "cfx <command>"
        # (`cfx train WHAT` becomes trainable=WHAT there)
        parsed = sys.argv[1:] if sys.argv[0].startswith("cfx ") else args
        msg = user_error(e, parsed)
        if msg is not None:
            print(f"cfx: error: {msg}", file=sys.stderr)
            sys.exit(exit_code(e))
        from hydra._internal.utils import run_and_report

        tb = e.__traceback__  # from Hydra's run_job on, as Hydra shows a task's error (its own frames cut)
        while tb is not None and tb.tb_frame.f_code.co_name != "run_job":
            tb = tb.tb_next
        error = e.with_traceback(tb) if tb is not None else e

        def again():
            raise error

        run_and_report(again)  # prints as Hydra would have (compact for its own errors), then exits 1
        raise  # unreachable unless Hydra's report changes: the error as Python reports it
    finally:
        _restore("HYDRA_FULL_ERROR", saved)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def output_dir_problem(args: list[str]) -> str | None:
    """Before Hydra makes its output folder (where a problem is Hydra's traceback): ``hydra.run.dir`` /
    ``hydra.sweep.dir`` naming a file, a folder under a file, or a place this user cannot write; the one
    line naming the key and the fix, or None."""
    from pathlib import Path

    for arg in args:
        key, _, value = arg.lstrip("+").partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value or "${" in value:
            continue
        path = Path(value.strip("'\""))
        if path.exists() and not path.is_dir():
            return f"{key}={value} is a file: give a folder (a new or an existing job folder)"
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return f"{key}={value} is under {existing}, which is a file: give a folder elsewhere"
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            return f"{key}={value}: cannot write in {existing} (read-only or no permission): choose a writable {key}"
    return None


if __name__ == "__main__":
    main()
