import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# pytest -n N (pytest-xdist): N worker processes share the cores, so each gets its share of intra-op threads
# (two workers of one thread each finish the suite sooner on 2 cores than one of two threads: the tensors are
# small and much of the time is interpreter, I/O and process starts); the cfx processes a test starts inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)


def cfx(*args, cwd=None, check=True, timeout=600, subprocess_=False):
    """`cfx ARGS` as the console entry point runs it (``cfx_cli.cli.main``): its exit status, standard output
    and error as a CompletedProcess. In this process (no interpreter start, no re-import of torch) unless
    ``subprocess_``: the real console script in its own process (signals, kills, locks, a fresh interpreter)."""
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *args], cwd=cwd or ROOT, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    else:
        proc = _in_process(list(args), cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"cfx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _in_process(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``cfx_cli.cli.main(args)`` with what a process would own put back after: the working folder, sys.argv,
    the environment (--debug sets variables), torch's threads (cfx train threads=N), the root logger's handlers
    (Hydra sets its own); SystemExit and an uncaught error become the exit status, as Python's own."""
    import contextlib
    import io
    import logging
    import traceback

    from cfx_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), list(sys.argv), dict(os.environ), torch.get_num_threads(), list(logging.root.handlers),
             logging.root.level)
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - as the interpreter: the traceback, exit status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved[0])
        sys.argv[:] = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        logging.root.handlers[:] = saved[4]
        logging.root.setLevel(saved[5])
    return subprocess.CompletedProcess(["cfx", *args], code, out.getvalue(), err.getvalue())


# A job in seconds on a CPU: conf/debug/fast.yaml (4 images, 50 steps; each method's budget: conf/debug/fast/).
FAST = ["debug=fast"]


@pytest.fixture
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cfx_cli import CONF_DIR

    def _compose(overrides=(), config_name="config"):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors and many calls: two OpenMP threads wait on
    each other more than they compute (measured ten-fold slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
