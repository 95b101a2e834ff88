"""What every job's command line shares: the --config flag and loading it with a clear error."""

from __future__ import annotations

import argparse
import sys

from foveation.config import Config, ConfigError, load_config

DEFAULT_CONFIG = "jobs/configs/debug.toml"
BAD_CONFIG = 2  # exit status of a config that does not load


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)")


def load_or_none(path: str) -> Config | None:
    """The validated config, or None after printing why it is not one (no traceback)."""
    from foveation.models.foveated import check_config

    try:
        cfg = load_config(path)
        check_config(cfg, path)  # the checks that need the model registries, before any work
        return cfg
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
