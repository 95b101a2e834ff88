"""The ``wsi`` suite: whole-slide ingest out of core (``data.wsi``).

A 4096 px square Aperio SVS (the base) and one of 16x its area (16384 px), both written tile by
tile from the same synthetic tissue, each with QuPath polygons, are ingested by a serial
``ingest_slide`` in a fresh process each; the figure is the peak resident memory of the large
one against the base's (target <= 1.2: memory must not grow with the slide). Also the seconds
per megapixel of each. ``--quick``: 1024 and 2048 px (4x), for a smoke run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from benchmarks import Figure, run_child

_CHILD = r"""
import sys, time
from foveation.config import IngestConfig
from foveation.data.gleason import RawSlide
from foveation.data.ingest import ingest_slide
src, ann, dest = sys.argv[1:4]
cfg = IngestConfig(crop_size=None, tile_size=256, compression="jpeg")
t = time.perf_counter()
out = ingest_slide(RawSlide("s", src, (ann,), (1,), label_kind="qupath"), dest, cfg)
report(status=out.status, error=out.error, seconds=time.perf_counter() - t)
"""


def _write_svs(path: str, side: int, block: np.ndarray) -> None:
    """A side x side Aperio SVS whose tiles repeat ``block`` (256 px tiles), with levels at
    /4 and /16, written tile by tile."""
    import tifffile

    head = "Aperio Image Library v12.0.0 \r\n"

    def tiles(s: int, f: int):
        b = block[::f, ::f]
        for r in range(0, s, 256):
            for c in range(0, s, 256):
                yield np.ascontiguousarray(np.roll(b, (r // 7, c // 5), (0, 1))[:256, :256])

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, f in enumerate((1, 4, 16)):
            s = side // f
            desc = f"{head}{side}x{side} [0,0 {side}x{side}] (256x256) -|AppMag = 20|MPP = 0.5"
            tw.write(
                tiles(s, f),
                shape=(s, s, 3),
                dtype=np.uint8,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                description=desc if k == 0 else f"{head}{side}x{side} -> {s}x{s}",
                metadata=None,
            )


def _geojson(side: int) -> bytes:
    feats = []
    for i in range(8):
        x0, y0 = (i * side) // 9, (i * side) // 11
        r = side // 6
        ring = [[x0, y0], [x0 + r, y0], [x0 + r, y0 + r], [x0, y0 + r], [x0, y0]]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"classification": {"name": ["benign", "grade3", "grade4"][i % 3]}},
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": feats}).encode()


def _measure(tmp: str, side: int, block: np.ndarray) -> dict:
    src = os.path.join(tmp, f"s{side}.svs")
    ann = os.path.join(tmp, f"s{side}.geojson")
    _write_svs(src, side, block)
    with open(ann, "wb") as f:
        f.write(_geojson(side))
    res = run_child(_CHILD, src, ann, os.path.join(tmp, f"store{side}"))
    if res["status"] != "ingested":
        raise RuntimeError(f"wsi: ingest of {side} px failed: {res['error']}")
    return res


def run(config: str, quick: bool = False) -> list[Figure]:
    from foveation.config import PatchSetConfig
    from foveation.data.synthetic import TissueScales, generate_slide

    base, big = (1024, 2048) if quick else (4096, 16384)
    block = generate_slide(512, 512, TissueScales.from_patches(PatchSetConfig()), 3).image
    block = np.tile(block, (2, 2, 1))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-wsi-") as tmp:
        a = _measure(tmp, base, block)
        b = _measure(tmp, big, block)
    area = (big / base) ** 2
    note = f"{base} px vs {big} px ({area:.0f}x the area), serial ingest, one process each"
    return [
        Figure(
            "wsi_ingest_peak_rss",
            b["peak_mb"],
            "MB",
            "lower",
            1.2,
            a["peak_mb"],
            b["peak_mb"] / a["peak_mb"],
            note,
        ),
        Figure(
            "wsi_ingest_seconds_per_mp",
            b["seconds"] / (big * big / 1e6),
            "s/MP",
            "lower",
            None,
            a["seconds"] / (base * base / 1e6),
            None,
            f"{note}; suite {time.perf_counter() - t0:.0f}s",
        ),
    ]
