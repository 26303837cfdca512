import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, os.cpu_count() or 1))


def cfx(*args, cwd=None, check=True, timeout=600):
    """Run the real `cfx` console entry point in a subprocess; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "cfx_cli.cli", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"cfx {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# A job in seconds on a CPU: conf/debug/fast.yaml (4 images, 50 steps, tau 15).
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
