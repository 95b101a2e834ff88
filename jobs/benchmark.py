"""Run a benchmark suite; print a table, optionally write the JSON list
``docs/contracts.md#benchmarks`` pins. The suites live in the top-level ``benchmarks`` package.

python -m jobs.benchmark SUITE [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks import SUITES, format_table, get_suite
from foveation.io import storage
from jobs._cli import job


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark")
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--json", dest="json_out", help="also write the figures as JSON here")
    p.add_argument("--config", default="jobs/configs/bench.toml", help="config the suite measures")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes for a smoke run (targets not meaningful)"
    )
    args = p.parse_args(argv)
    figures = get_suite(args.suite)(config=args.config, quick=args.quick)
    print(format_table(figures))
    if args.json_out:
        storage.write_bytes(
            args.json_out, json.dumps([f.to_dict() for f in figures], indent=1).encode()
        )
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
