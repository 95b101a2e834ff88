"""Train the foveated segmenter with Ray Train + DeepSpeed on the Ray Data pipeline.

    python -m jobs.train --config jobs/configs/debug.toml [--out runs/debug] [--manifest URI]
        [--resume | --overwrite]

Plain ``python`` starts a local Ray; under ``ray job submit`` (``RAY_ADDRESS`` set) it joins
that cluster. Workers, GPUs and precision come from the config's [distributed] and [training].
Writes <out>/train (Ray Train's checkpoints), <out>/model (the best one) and <out>/history.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import add_config_arg, job, load_job_config


def parser() -> argparse.ArgumentParser:
    """The command line (also what tests check the cluster manifests' entrypoints against)."""
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--out", help="output directory or URI (default: runs/<config name>)")
    p.add_argument("--manifest", help="manifest URI (default: data.ingest.dest)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in <out> if any")
    g.add_argument("--overwrite", action="store_true", help="discard the run in <out> first")
    return p


@job
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = load_job_config(args.config)
    from foveation.training.trainer import fit

    res = fit(cfg, args.out or f"runs/{cfg.name}", args.manifest, args.resume, args.overwrite)
    m = res.metrics
    print(f"\nbest val mIoU {m.get('val_miou', 0.0):.3f} at epoch {m.get('epoch')}")
    print(f"model: {res.model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
