"""Evaluate trained runs on whole slides and write the report (Table-1 analogue, Table-2 form,
APSM maps, per-class IoU bars, predictions side by side).

    python -m jobs.evaluate --config jobs/configs/debug.toml \
        [--run foveation=runs/debug/model --run onehot-0=runs/x/model ...] \
        [--manifest URI] [--split test] [--out runs/debug/report] [--no-experts]

Without --run, evaluates runs/<config name>/model. One Ray task per (run, slide).
"""

from __future__ import annotations

import argparse
import sys

from foveation.errors import InputError
from jobs._cli import add_config_arg, job, load_job_config


def parse_runs(items: list[str]) -> dict[str, str]:
    runs = {}
    for it in items:
        name, sep, uri = it.partition("=")
        if not sep or not name or not uri:
            raise InputError(f"--run {it!r}: expected NAME=CHECKPOINT_URI")
        runs[name] = uri
    return runs


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--run", action="append", default=[], help="NAME=CHECKPOINT_URI (repeat)")
    p.add_argument("--manifest", help="manifest URI (default: data.ingest.dest)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="report directory or URI (default: runs/<config name>/report)")
    p.add_argument("--no-experts", action="store_true", help="leave out the average-expert row")
    args = p.parse_args(argv)
    cfg = load_job_config(args.config)
    from foveation.evaluation.report import evaluation_report
    from foveation.evaluation.slides import evaluate_runs
    from foveation.io import storage

    runs = parse_runs(args.run) or {cfg.model.mix.label: f"runs/{cfg.name}/model"}
    res = evaluate_runs(
        runs, args.manifest or cfg.data.ingest.dest, args.split, not args.no_experts
    )
    histories = {
        name: storage.join(uri.rstrip("/").rsplit("/", 1)[0], "history")
        for name, uri in runs.items()
    }
    uri, table = evaluation_report(
        res, args.out or f"runs/{cfg.name}/report", histories, title=f"Evaluation of {cfg.name!r}"
    )
    print(table)
    print(f"\nreport: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
