"""Train, evaluate and report on the embedded default (one machine, local disk, CPU).

python -m jobs.train --config jobs/configs/debug.toml [--out runs/debug]
"""

from __future__ import annotations

import argparse
import sys

from foveation.config import ConfigError, load_config
from foveation.experiment import run_local


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config", default="jobs/configs/debug.toml", help="TOML config (default: %(default)s)"
    )
    p.add_argument(
        "--out", default=None, help="output directory or URI (default: runs/<config name>)"
    )
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{cfg.name}"
    res = run_local(cfg, out)
    print()
    print(res.table)
    print(f"\nreport and figures: {res.report_uri}\ncheckpoint: {res.checkpoint_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
