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


def choice(cfg, group: str) -> str | None:
    """The option of config group ``group`` that ``cfg`` (a composed config, or one read back from a job folder)
    was made with, derived in this one place: option files do not restate their own name. A config that an older
    cfx saved has the group's ``name`` key; otherwise the node's ``_target_`` says it: a class that names itself
    (a method: ``fastdime``), else the class name without its kind (``SyntheticDataset`` -> ``synthetic``,
    ``DDIMSampler`` -> ``ddim``). None where a loader function serves several options (the classifiers,
    the diffusion models): Hydra's own record of the choices is ``hydra.runtime.choices`` (HydraConfig while
    a command runs, .hydra/hydra.yaml in a job folder)."""
    node = cfg.get(group) if hasattr(cfg, "get") else None
    if not hasattr(node, "get"):
        return None
    if node.get("name"):
        return str(node.get("name"))
    target = node.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_object

        obj = get_object(target)
    except Exception:  # noqa: BLE001 - a target that does not import: no name to give
        return None
    if not isinstance(obj, type):
        return None
    if isinstance(getattr(obj, "name", None), str):
        return obj.name
    stem = obj.__name__
    for kind in ("Dataset", "Sampler"):
        if stem.endswith(kind) and stem != kind:
            return stem[: -len(kind)].lower()
    return None
