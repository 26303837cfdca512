"""A built wheel carries the configs (cfx_cli/conf, mapped from the top-level conf/) and the zoo, and an
installed copy runs from anywhere without the source tree; the checkout itself still finds conf/."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import FAST  # the job-in-seconds overrides, so this test follows the config schema with test_run

ROOT = Path(__file__).resolve().parents[1]
# What `pip wheel .` gets to see of the checkout: build leftovers, caches and run outputs stay out.
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "outputs", "multirun", "work_train", "runs")


def _run(args, cwd, env=None, timeout=300):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the checkout, so the build writes no build/ or egg-info into the repo
    (and two runs of this test cannot trip over each other's build/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp)
    (whl,) = (tmp / "dist").glob("cfx_cli-*.whl")
    return whl


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", target, wheel],
         cwd=target)
    return target


def _files(top: Path):
    return {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_carries_configs_zoo_and_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cfx_cli/conf/config.yaml" in names
    yamls = {n for n in _files(ROOT / "conf") if n.endswith(".yaml")}
    assert len(yamls) > 10
    assert not {f"cfx_cli/conf/{n}" for n in yamls} - names
    zoo = _files(ROOT / "cfx_cli" / "zoo")
    assert any(n.endswith(".safetensors") for n in zoo)
    assert not {f"cfx_cli/zoo/{n}" for n in zoo} - names
    # pyproject lists the packages (discovery cannot see the package-dir'ed cfx_cli.conf): a new subpackage
    # missing from that list would silently drop out of the wheel.
    modules = {f"cfx_cli/{n}" for n in _files(ROOT / "cfx_cli") if n.endswith(".py")}
    assert not modules - names, "add the missing subpackage to [tool.setuptools] packages in pyproject.toml"
    # Nothing lands outside the package (no top-level conf/ in site-packages).
    assert {n.split("/")[0] for n in names} == {"cfx_cli", wheel.name.split("-py")[0] + ".dist-info"}


def test_installed_copy_runs_outside_the_checkout(site, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    where = _run([sys.executable, "-c", "import cfx_cli; print(cfx_cli.__file__); print(cfx_cli.CONF_DIR); "
                  "print(cfx_cli.ZOO_DIR)"], cwd=cwd, env=env).stdout.split("\n")
    for line in where[:3]:
        assert Path(line).resolve().is_relative_to(site.resolve()), where
    assert Path(where[1]).resolve() == (site / "cfx_cli" / "conf").resolve()

    cfg = _run([sys.executable, "-m", "cfx_cli.cli", "run", "--cfg", "job", "--resolve"], cwd=cwd, env=env).stdout
    assert "method:" in cfg and str(site / "cfx_cli" / "zoo" / "synthetic_shape") in cfg
    assert str(ROOT) not in cfg

    job = tmp_path / "job"
    _run([sys.executable, "-m", "cfx_cli.cli", "run", *FAST, f"hydra.run.dir={job}"], cwd=cwd, env=env)
    lines = (job / "samples.csv").read_text().strip().splitlines()
    assert len(lines) > 1  # a header and a row per image


def _editable_here() -> bool:
    """Is this checkout the one `pip install -e .`-ed into the running interpreter?"""
    for dist in metadata.distributions(name="cfx_cli"):  # a stale cfx_cli.egg-info in the checkout may come first
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        url = info.get("url", "")
        if (info.get("dir_info") or {}).get("editable") and url.startswith("file://"):
            return Path(url[len("file://"):]).resolve() == ROOT
    return False


def test_checkout_finds_conf_dir():
    import cfx_cli

    if Path(cfx_cli.__file__).resolve().is_relative_to(ROOT):  # editable install or checkout on sys.path
        assert cfx_cli.CONF_DIR == ROOT / "conf"
    if _editable_here():  # setuptools' editable import hook maps the package-dir'ed cfx_cli.conf onto conf/
        spec = importlib.util.find_spec("cfx_cli.conf")
        assert [Path(p) for p in spec.submodule_search_locations] == [ROOT / "conf"]
    # A bare checkout on sys.path, with no install (editable import hooks dropped), falls back to conf/.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(ROOT)!r}); import cfx_cli; print(cfx_cli.__file__); print(cfx_cli.CONF_DIR)")
    out = _run([sys.executable, "-c", code], cwd=ROOT).stdout.split("\n")
    assert Path(out[0]).resolve() == ROOT / "cfx_cli" / "__init__.py" and Path(out[1]) == ROOT / "conf"


def test_declared_torch_torchvision_lpips_bounds_hold_here():
    """pyproject's bounds on the libraries whose builds must match (torch, torchvision) and on lpips are met by
    what this interpreter imports, and the pair imports together (a torchvision built for another torch fails
    on its first operator)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    deps = {r.name: r for r in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                     ["dependencies"])}
    assert {"torch", "torchvision", "lpips"} <= set(deps)
    for name in ("torch", "torchvision", "lpips"):
        installed = metadata.version(name)
        assert deps[name].specifier.contains(installed, prereleases=True), f"{name} {installed} vs {deps[name]}"
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.1).tolist() == [0]  # a compiled torchvision op
