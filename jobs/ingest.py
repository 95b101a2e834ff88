"""Ingest raw slides (Gleason2019 layout, a folder or s3:// prefix) into object storage:
pyramidal TIFFs, STAPLE-fused label pyramids, and the Parquet manifest. Slides run as Ray tasks.

    python -m jobs.ingest --config jobs/configs/debug.toml [--source DIR_OR_S3] [--dest URI]
        [--generate]   # first write the synthetic set to the source if it holds no slides
        [--serial]     # one process, no Ray (the benchmark's baseline)
"""

from __future__ import annotations

import argparse
import sys

from foveation.data.ingest import ingest, ray_tasks, serial_map
from foveation.data.prepare import has_files
from foveation.data.synthetic import write_synthetic_set
from jobs._cli import add_config_arg, job, load_job_config


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--source", help="default: data.ingest.source")
    p.add_argument("--dest", help="default: data.ingest.dest")
    p.add_argument(
        "--generate",
        action="store_true",
        help="write the synthetic set first if the source is empty",
    )
    p.add_argument("--serial", action="store_true", help="one process instead of Ray tasks")
    args = p.parse_args(argv)
    cfg = load_job_config(args.config)
    ic = cfg.data.ingest
    source, dest = args.source or ic.source, args.dest or ic.dest
    # Generate only into a source that holds nothing at all: never beside (or over) real data.
    if args.generate and not has_files(source):
        write_synthetic_set(source, cfg.data.synthetic, cfg.patches)
    map_fn = serial_map if args.serial else ray_tasks(ic)

    summary = ingest(
        source,
        dest,
        cfg.ingest_settings(),
        cfg.model.num_classes,
        map_fn=map_fn,
        kept_classes=cfg.evaluation.kept_classes,
        class_names=cfg.evaluation.class_names,
    )
    print(summary.text(reasons=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
