"""Generate the scale-dependent synthetic slide set, in the Gleason2019 layout.

python -m jobs.generate --config jobs/configs/debug.toml [--dest DIR_OR_S3]
"""

from __future__ import annotations

import argparse
import sys

from foveation.config import ConfigError, load_config
from foveation.data.synthetic import write_synthetic_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="jobs/configs/debug.toml")
    p.add_argument("--dest", help="where to write (default: data.ingest.source of the config)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dest = args.dest or cfg.data.ingest.source
    ids = write_synthetic_set(dest, cfg.data.synthetic, cfg.patches)
    print(f"wrote {len(ids)} synthetic slides to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
