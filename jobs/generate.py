"""Generate the scale-dependent synthetic slide set, in the Gleason2019 layout.

python -m jobs.generate --config jobs/configs/debug.toml [--dest DIR_OR_S3]
"""

from __future__ import annotations

import argparse
import sys

from foveation.data.synthetic import write_synthetic_set
from jobs._cli import add_config_arg, job, load_job_config


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--dest", help="where to write (default: data.ingest.source of the config)")
    args = p.parse_args(argv)
    cfg = load_job_config(args.config)
    dest = args.dest or cfg.data.ingest.source
    ids = write_synthetic_set(dest, cfg.data.synthetic, cfg.patches)
    print(f"wrote {len(ids)} synthetic slides to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
