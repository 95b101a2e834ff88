"""The ``geojson`` suite: does a slide's GeoJSON cover each class with its label pixel area?

A slide's polygons are traced on its label map shrunk by mode to at most
``geojson_max_side`` px a side (``inference.outputs.JobSink.geojson``). The mode moves area
between classes, most for rare and speckled ones. On a 6144 px label map (a randomly
initialised tiny model on a smooth colour image: several classes, in blobs and speckle), the
worst class's area error (|polygon area - pixel count| / pixel count) at the default side
(4096: a 2x shrink) and with no shrink, and the seconds each takes to trace. Areas do not
depend on the machine's load; the seconds are one run each, said in the note.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import ROOT, Figure


def _label_map(side: int) -> tuple[np.ndarray, list[str], int]:
    import torch
    import torch.nn.functional as F

    from foveation.config import load_config
    from foveation.inference import ArraySink, ArraySource, segment
    from foveation.models.foveated import build_model

    cfg = load_config(ROOT / "jobs/configs/tiny.toml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(3)
    low = torch.rand((1, 3, side // 32, side // 32), generator=g)
    img = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    img = ((img * 0.8 + torch.rand((1, 3, side, side), generator=g) * 0.1) * 255).clamp(0, 255)
    image = img.byte()[0].permute(1, 2, 0).numpy()
    sink = ArraySink()
    segment(model, ArraySource(image, "geojson"), cfg, sink)
    return sink.mask, list(cfg.evaluation.class_names), cfg.patches.xr_scale


def _traced(labels: np.ndarray, names: list[str], s: int, max_side: int, tmp: str):
    """(worst class's area error, seconds) of tracing ``labels`` at ``max_side``."""
    from shapely.geometry import shape

    from foveation.inference.outputs import JobSink

    sink = JobSink(tmp, s)
    sink.labels, sink.k = labels, len(names)
    sink.height, sink.width = labels.shape
    t = time.perf_counter()
    coll = sink.geojson(names, max_side, 1024, 0.0, 1.0)
    sec = time.perf_counter() - t
    areas = {
        f["properties"]["classification"]["name"]: shape(f["geometry"]).area
        for f in coll["features"]
    }
    errors = [
        abs(areas.get(n, 0.0) - int((labels == k).sum())) / int((labels == k).sum())
        for k, n in enumerate(names)
        if (labels == k).any()
    ]
    return max(errors), sec


def run(config: str, quick: bool = False) -> list[Figure]:
    import tempfile

    side = 1536 if quick else 6144
    default_side = 1024 if quick else 4096
    labels, names, s = _label_map(side)
    shares = ", ".join(f"{n} {float((labels == k).mean()):.4f}" for k, n in enumerate(names))
    with tempfile.TemporaryDirectory() as tmp:
        shrunk, shrunk_s = _traced(labels, names, s, default_side, tmp)
        exact, exact_s = _traced(labels, names, s, side, tmp)
    note = (
        f"{side} px label map of a random-init tiny model (class shares {shares}); "
        f"geojson_max_side {default_side} (mode shrink {side / default_side:g}x) against {side} "
        "(none); seconds from one run each"
    )
    return [
        Figure("geojson_area_error_default_side", shrunk * 100, "%", "lower", 0.5, note=note),
        Figure("geojson_area_error_no_shrink", exact * 100, "%", "lower", 0.5, note=note),
        Figure(
            "geojson_trace_seconds_no_shrink",
            exact_s,
            "s",
            "lower",
            None,
            shrunk_s,
            exact_s / shrunk_s,
            note,
        ),
    ]
