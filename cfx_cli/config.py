"""Hydra around cfx: a command as a Hydra application, and a config composed outside one."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from cfx_cli import CONF_DIR


def hydra_app(prog: str, config_name: str, args: list[str], task) -> None:
    """Run ``task(cfg)`` as the Hydra application ``prog`` over conf/``config_name``.yaml with the command
    line ``args`` (overrides, ``-m``, ``--cfg job``, ``--help``, launchers: every Hydra habit)."""
    import hydra

    sys.argv = [prog, *args]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(task)()


def compose(overrides: Sequence[str] = (), config_name: str = "config", folder: str = "") -> DictConfig:
    """conf/[``folder``/]``config_name``.yaml with ``overrides`` (Hydra's compose API, outside any Hydra
    app): by default the config `cfx run OVERRIDES` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR / folder)):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
