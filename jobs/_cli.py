"""What every job's command line shares: the --config flag, loading it, and the one error handler.

Every job's ``main`` is wrapped in :func:`job`: an error the platform raises for its user
(``foveation.errors.FoveationError``: a bad config, data file, checkpoint, slide or argument, a
run that could not start or finish) is printed as one ``error: <input>: <what was expected>``
line and the job exits non-zero, whichever job it is; anything else is a bug and keeps its
traceback. The jobs list no error types of their own, so a new error type of the platform is
handled by every job the day it is added.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from foveation.config import Config, ConfigError, load_config
from foveation.errors import FoveationError

DEFAULT_CONFIG = "jobs/configs/debug.toml"
BAD_CONFIG = 2  # exit status of a config that does not load (or that the platform refuses)
FAILED = 1  # exit status of any other error the platform reports

Main = Callable[[list[str] | None], int]


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: %(default)s)")


def load_job_config(path: str) -> Config:
    """The validated config, with the checks that need the model registries run too, before any
    work starts; a ConfigError naming the file and the field otherwise."""
    from foveation.models.foveated import check_config

    cfg = load_config(path)
    check_config(cfg, path)
    return cfg


def job(main: Main) -> Main:
    """``main(argv) -> exit status`` under the one handler every job shares: a
    ``FoveationError`` becomes its message on stderr (no traceback) and exit status
    ``BAD_CONFIG`` for a config error, ``FAILED`` for any other."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except FoveationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return BAD_CONFIG if isinstance(exc, ConfigError) else FAILED

    return run
