"""cfx: diffusion-based counterfactual explanations behind one Hydra interface."""
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
ZOO_DIR = PACKAGE_DIR / "zoo"
CONF_DIR = PACKAGE_DIR.parent / "conf"


def _zoo_path(name: str = "") -> str:
    return str(ZOO_DIR / name) if name else str(ZOO_DIR)


# ${cfx.zoo:NAME} in configs: the absolute path of a shipped model, wherever cfx is checked out.
OmegaConf.register_new_resolver("cfx.zoo", _zoo_path, replace=True)
