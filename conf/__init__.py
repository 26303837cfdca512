"""The Hydra configs, shipped as the package cfx_cli.conf (see pyproject.toml and cfx_cli.CONF_DIR)."""
