"""The paper's experiment on a data set: the one-hot baselines, Random, Average and foveation
with the same budget, evaluated together; prints the Table-1 analogue.

    python -m jobs.reproduce --config jobs/configs/debug.toml [--out runs/<name>-reproduce]
        [--trainer ray|single] [--seeds 0 1 2] [--only soft onehot-0 ...]

``--trainer single`` trains on one device over slides decoded into memory (the science check:
jobs/configs/science.toml). With several seeds, the learned mix and the best one-hot baseline
get every seed and the report adds mean and spread.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import add_config_arg, job, load_job_config


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.reproduce", description=__doc__.splitlines()[0]
    )
    add_config_arg(p)
    p.add_argument("--out", help="default: runs/<config name>-reproduce")
    p.add_argument("--trainer", choices=("ray", "single"), default="ray")
    p.add_argument("--seeds", type=int, nargs="+", help="default: training.seed")
    p.add_argument("--only", nargs="+", help="run labels to keep (onehot-0, random, soft...)")
    args = p.parse_args(argv)
    cfg = load_job_config(args.config)
    from foveation.data.prepare import ensure_store
    from foveation.experiments.reproduce import reproduce

    store = ensure_store(cfg)
    res = reproduce(
        cfg,
        args.out or f"runs/{cfg.name}-reproduce",
        store,
        args.trainer,
        tuple(args.seeds) if args.seeds else None,
        tuple(args.only) if args.only else None,
    )
    print()
    print(res.table)
    print(f"\n{res.seconds / 60:.1f} min; report: {res.report_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
