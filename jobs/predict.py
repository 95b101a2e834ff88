"""Batch prediction over a bucket of slides on Ray Data: labels, probabilities, APSM and QuPath
GeoJSON per slide, written atomically; a rerun skips finished slides.

    python -m jobs.predict --checkpoint runs/debug/runs/soft/model \
        --input runs/data/debug-store/manifest.parquet [--split test] \
        --out runs/predict [--workers 2] [--cpus-per-worker 1] [--device auto|cpu|cuda]

--input: an ingest manifest, a slide list (CSV/Parquet with image_uri), or a folder or s3://
prefix of slide files (every format of ``foveation.io.formats``: SVS, NDPI, MRXS, TIFF,
OME-TIFF, PNG, JPEG...). Joins RAY_ADDRESS when set
(``ray job submit`` runs it on a cluster unchanged), else starts a local Ray. Exit status 1
when a slide failed (the others are still written), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import job


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a trained model directory or URI")
    p.add_argument("--input", required=True, help="manifest, slide list, folder or s3:// prefix")
    p.add_argument("--out", required=True, help="where each slide's outputs go (path or s3://)")
    p.add_argument("--split", help="with a manifest: only this split")
    p.add_argument("--workers", type=int, default=1, help="slides predicted at once (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--geojson-simplify-px", type=float, default=0.0)
    p.add_argument(
        "--geojson-max-side",
        type=int,
        default=4096,
        help="polygons traced on the labels shrunk by mode to this side at most (%(default)s)",
    )
    args = p.parse_args(argv)
    if args.workers < 1 or args.cpus_per_worker <= 0 or args.geojson_max_side < 16:
        print(
            "error: --workers must be >= 1, --cpus-per-worker > 0, --geojson-max-side >= 16",
            file=sys.stderr,
        )
        return 2
    from foveation.prediction import plan_prediction, predict
    from foveation.raycluster import init_ray, ray_logs_dir

    # Every input checked, and the finished slides found, before Ray starts: a bad input
    # answers in seconds, and a rerun with nothing left to do never starts Ray.
    plan = plan_prediction(args.checkpoint, args.input, args.out, args.split)
    if plan.todo:
        init_ray(quiet=True)  # Ray's own output to its log files, as the demo does
        print(f"predicting with {args.workers} worker(s); Ray's logs: {ray_logs_dir()}")
    res = predict(
        args.checkpoint,
        args.input,
        args.out,
        split=args.split,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        device=args.device,
        outputs={
            "geojson_simplify_px": args.geojson_simplify_px,
            "geojson_max_side": args.geojson_max_side,
        },
        plan=plan,
    )
    print(res.text(reasons=False))
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
