"""Train, evaluate and report on the embedded default (one machine, local disk, CPU).

python -m jobs.train --config jobs/configs/debug.toml [--out runs/debug]
"""

from __future__ import annotations

import argparse
import sys

from foveation.experiment import run_local
from jobs._cli import BAD_CONFIG, add_config_arg, load_or_none


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument(
        "--out", default=None, help="output directory or URI (default: runs/<config name>)"
    )
    args = p.parse_args(argv)
    cfg = load_or_none(args.config)
    if cfg is None:
        return BAD_CONFIG
    out = args.out or f"runs/{cfg.name}"
    res = run_local(cfg, out)
    print()
    print(res.table)
    print(f"\nreport and figures: {res.report_uri}\ncheckpoint: {res.checkpoint_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
