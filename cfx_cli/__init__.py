"""cfx: diffusion-based counterfactual explanations behind one Hydra interface."""
import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
ZOO_DIR = PACKAGE_DIR / "zoo"


def _conf_dir() -> Path:
    """The Hydra config folder: the top-level conf/, shipped as the package cfx_cli.conf (see pyproject.toml).

    A wheel install holds it inside the package (cfx_cli/conf) and never looks beyond. A source checkout
    (editable install, or the checkout on sys.path) uses the conf/ beside the cfx_cli/ that is running, even
    when another checkout is the editable-installed one. Otherwise, whatever the import system maps
    cfx_cli.conf to (an editable install's import hook maps it onto conf/).
    """
    shipped = PACKAGE_DIR / "conf"
    if (shipped / "config.yaml").is_file():
        return shipped
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "conf"
    try:
        spec = importlib.util.find_spec(f"{__name__}.conf")
    except ImportError:
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "config.yaml").is_file():
            return Path(loc).resolve()
    return shipped


CONF_DIR = _conf_dir()


def _zoo_path(name: str = "") -> str:
    return str(ZOO_DIR / name) if name else str(ZOO_DIR)


# ${cfx.zoo:NAME} in configs: the absolute path of a shipped model, wherever cfx is checked out.
OmegaConf.register_new_resolver("cfx.zoo", _zoo_path, replace=True)
