"""The ``predict`` suite: whole-slide prediction (``inference.outputs.predict_slide``, what
``jobs.predict`` and Serve's slide jobs run per slide) on a trained model (default: the demo's,
``runs/debug/runs/soft/model``, trained first by ``jobs.demo`` where it is missing;
``FOVEATION_PREDICT_MODEL`` to change it), one torch thread.

- overhead: the time that is not the segmenter's forward (reading, banks, F, stitching,
  writing the OME-TIFFs and GeoJSON) per output megapixel, against the segmenter's forward time
  on the same number of locations (target <= 0.2x); also the wall time against the forward's;
- memory: the peak resident memory of predicting a slide of 16x the base's area against the
  base's, each in a fresh process (target <= 1.2x; ``--quick``: 4x);
- throughput: slides per hour through ``jobs.predict``'s Ray Data actor pool with 2 actors
  against 1, one thread each, on 8 slides;
- glass: the wall time of a slide that is 70% glass (tissue in a band across its middle, as a
  core or a biopsy lies on a slide) with glass skipped against every location segmented
  (``predict_slide(skip_background=False)``), interleaved repetitions.
"""

from __future__ import annotations

import os
import tempfile
import time

from benchmarks import Figure, demo_model, interleaved, median_compared, run_child

_CHILD = r"""
import sys, torch
torch.set_num_threads(1)
from foveation.checkpoint import load_checkpoint
from foveation.inference.outputs import predict_slide
model, cfg, _ = load_checkpoint(sys.argv[1])
res, summary = predict_slide(model, cfg, sys.argv[2], sys.argv[3])
report(seconds=summary["seconds"])
"""


def _slide(path: str, side: int, cfg, seed: int) -> None:
    import pyvips

    from foveation.data.synthetic import GeneratorParams, TissueScales, generate_slide

    syn = cfg.data.synthetic
    params = GeneratorParams(
        syn.grade5_fraction, syn.texture_contrast, syn.noise_sigma, regime=syn.regime
    )
    img = generate_slide(side, side, TissueScales.from_patches(cfg.patches), seed, params).image
    pyvips.Image.new_from_array(img).tiffsave(path, tile=True, pyramid=True, compression="deflate")


def _overhead(model, cfg, path: str) -> list[Figure]:
    """The segmenter's forward is timed inside the real run, by hooks around the model's
    forward (F runs through ``model.weights``, outside it, so F counts as overhead)."""
    import torch

    from foveation.inference.outputs import predict_slide

    torch.set_num_threads(1)
    spent = {"forward": 0.0}
    started = {}

    def pre(module, args):
        started["t"] = time.perf_counter()

    def post(module, args, out):
        spent["forward"] += time.perf_counter() - started["t"]

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            _, summary = predict_slide(model, cfg, path, out)
            total = time.perf_counter() - t
    finally:
        for h in hooks:
            h.remove()
    forward = spent["forward"]
    mp = summary["width"] * summary["height"] / 1e6
    note = (
        f"{summary['width']} px slide, {summary['locations']} locations, 1 thread, "
        f"overlap {cfg.inference.overlap}; forward {forward:.1f}s of {total:.1f}s"
    )
    return [
        Figure(
            "predict_overhead_s_per_output_mp",
            (total - forward) / mp,
            "s/MP",
            "lower",
            0.2,
            forward / mp,
            (total - forward) / forward,
            note,
        ),
        Figure(
            "predict_wall_vs_forward", total, "s", "lower", None, forward, total / forward, note
        ),
    ]


def _glass(model, cfg, tmp: str, side: int) -> Figure:
    import numpy as np
    import pyvips
    import torch

    from foveation.inference.outputs import predict_slide

    torch.set_num_threads(1)
    path = os.path.join(tmp, "glass.tif")
    _slide(path, side, cfg, 13)
    img = pyvips.Image.new_from_file(path).numpy()
    band = slice(int(side * 0.35), int(side * 0.65))
    glass = np.full_like(img, 242)
    glass[band] = img[band]
    pyvips.Image.new_from_array(glass).tiffsave(
        path, tile=True, pyramid=True, compression="deflate"
    )

    def timed(skip: bool):
        def go() -> float:
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                predict_slide(model, cfg, path, out, skip_background=skip)
                return time.perf_counter() - t

        return go

    runs = interleaved({"all": timed(False), "skip": timed(True)})
    return median_compared(
        "predict_glass_skipped_s",
        runs["skip"],
        runs["all"],
        "s",
        "lower",
        None,
        f"{side} px slide, 30% of its rows tissue, 1 thread; baseline: every location segmented",
    )


def _memory(uri: str, cfg, tmp: str, base: int, factor: int) -> Figure:
    peaks = {}
    for side in (base, base * factor):
        path = os.path.join(tmp, f"m{side}.tif")
        _slide(path, side, cfg, 11)
        peaks[side] = run_child(_CHILD, uri, path, os.path.join(tmp, f"o{side}"))["peak_mb"]
    big = base * factor
    return Figure(
        "predict_peak_rss",
        peaks[big],
        "MB",
        "lower",
        1.2,
        peaks[base],
        peaks[big] / peaks[base],
        f"{big} px vs {base} px ({factor**2}x the area)",
    )


def _throughput(uri: str, cfg, tmp: str, side: int) -> Figure:
    from foveation.prediction import predict
    from foveation.raycluster import init_ray

    init_ray(quiet=True)
    src = os.path.join(tmp, "bucket")
    os.makedirs(src, exist_ok=True)
    for i in range(8):
        _slide(os.path.join(src, f"s{i}.tif"), side, cfg, 100 + i)
    # A warm-up run first (Ray's worker processes start and import torch once), then the two
    # pool sizes interleaved, so neither pays the cold start nor a drift in the machine's load.
    predict(uri, src, os.path.join(tmp, "warm"), workers=2, device="cpu", log=lambda s: None)
    rounds = iter(range(100))

    def timed(workers: int):
        def go() -> float:
            t = time.perf_counter()
            res = predict(
                uri,
                src,
                os.path.join(tmp, f"out{workers}-{next(rounds)}"),
                workers=workers,
                device="cpu",
                log=lambda s: None,
            )
            if res.failed:
                raise RuntimeError(f"predict: {res.failed}")
            return len(res.predicted) / (time.perf_counter() - t) * 3600

        return go

    runs = interleaved({"one": timed(1), "two": timed(2)})
    return median_compared(
        "predict_slides_per_hour_2_actors",
        runs["two"],
        runs["one"],
        "slides/h",
        "higher",
        None,
        f"8 slides of {side} px, one thread each, after a warm-up run",
    )


def run(config: str, quick: bool = False) -> list[Figure]:
    from foveation.checkpoint import load_checkpoint

    uri = demo_model("FOVEATION_PREDICT_MODEL", quick)
    model, cfg, _ = load_checkpoint(uri)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        path = os.path.join(tmp, "o.tif")
        _slide(path, 512 if quick else 2048, cfg, 7)
        figs = _overhead(model, cfg, path)
        figs.append(_memory(uri, cfg, tmp, 512 if quick else 1024, 2 if quick else 4))
        figs.append(_throughput(uri, cfg, tmp, 256 if quick else 1024))
        figs.append(_glass(model, cfg, tmp, 512 if quick else 1536))
    return figs
