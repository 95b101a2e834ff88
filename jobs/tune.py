"""Search patch-set configurations with Ray Tune: each trial a short jobs.train run.

    python -m jobs.tune --config jobs/configs/tune-debug.toml [--out runs/<name>]
        [--manifest URI] [--resume | --overwrite]

The space, the scheduler (ASHA), the concurrency and the per-trial budget come from the
config's [tune] section; the presets "fov", "resolution" and "tradeoff" are the paper's three
analyses (jobs/configs/tune-*.toml). The data set is generated and ingested first when the
manifest is missing (as jobs.demo does). Writes <out>/results.parquet (and .csv), <out>/best.toml
(train it with jobs.train), <out>/tradeoff.png and .csv, Tune's experiment in <out>/sweep and
every trial's training run in <out>/trials/<id>. An interrupted sweep continues with --resume;
finished trials are kept.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs._cli import add_config_arg, job, load_job_config


def parser() -> argparse.ArgumentParser:
    """The command line (also what tests check the cluster manifests' entrypoints against)."""
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--out", help="output directory or URI (default: runs/<config name>)")
    p.add_argument("--manifest", help="manifest URI (default: data.ingest.dest, made if missing)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the sweep in <out>")
    g.add_argument("--overwrite", action="store_true", help="discard the sweep in <out> first")
    return p


@job
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_job_config(args.config)
    from foveation.data.prepare import ensure_store, has_files
    from foveation.tuning.sweep import run_sweep

    t0 = time.perf_counter()
    manifest = args.manifest
    if manifest is None and not has_files(cfg.data.ingest.dest):
        ensure_store(cfg)
    res = run_sweep(cfg, args.out or f"runs/{cfg.name}", manifest, args.resume, args.overwrite)
    took = time.perf_counter() - t0
    if res.interrupted:
        print(
            f"error: the sweep stopped before every trial finished ({took:.0f} s); run the same "
            "command with --resume to continue it",
            file=sys.stderr,
        )
        return 1
    print(f"\nsweep done in {took:.0f} s; best config: {res.best_config_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
