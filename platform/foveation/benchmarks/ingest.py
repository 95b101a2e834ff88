"""The ``ingest`` suite: the synthetic generator's speed, and ingest of the same slides with Ray
tasks on this machine vs one process (slides and megapixels per minute)."""

from __future__ import annotations

import dataclasses
import tempfile
import time

from foveation.benchmarks import Figure, compared
from foveation.config import load_config
from foveation.data.ingest import ingest, ray_tasks, serial_map
from foveation.data.synthetic import TissueScales, generate_slide, write_synthetic_set


def run(config: str = "jobs/configs/debug.toml", quick: bool = False) -> list[Figure]:
    cfg = load_config(config)
    n, size = (4, 512) if quick else (12, 1024)
    syn = dataclasses.replace(cfg.data.synthetic, n_slides=n, size=size)
    ic = dataclasses.replace(cfg.data.ingest, crop_size=None)
    scales = TissueScales.from_patches(cfg.patches)

    t = time.perf_counter()
    for i in range(n):
        generate_slide(size, size, scales, seed=100 + i)
    gen_mps = n * size * size / 1e6 / (time.perf_counter() - t)

    from foveation.raycluster import init_ray

    init_ray()  # a running cluster, as a job finds it: start-up is not ingest time
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/raw"
        write_synthetic_set(src, syn, cfg.patches, log=lambda s: None)
        timing = {}
        for name, fn in (
            ("serial", serial_map),
            ("ray", ray_tasks(ic)),
        ):
            t = time.perf_counter()
            s = ingest(src, f"{tmp}/{name}", ic, map_fn=fn, log=lambda s: None)
            timing[name] = time.perf_counter() - t
            assert len(s.ingested) == n, s.text()
    mp = n * size * size / 1e6
    note = f"{n} slides of {size} px, debug tissue scales, {ic.compression} tiles of {ic.tile_size}"
    return [
        Figure("generator_megapixels_per_s", gen_mps, "MP/s", "higher", 1.0, note=note),
        compared(
            "ingest_slides_per_min",
            60 * n / timing["ray"],
            60 * n / timing["serial"],
            "slides/min",
            "higher",
            1.2,
            note,
        ),
        compared(
            "ingest_megapixels_per_min",
            60 * mp / timing["ray"],
            60 * mp / timing["serial"],
            "MP/min",
            "higher",
            1.2,
            note,
        ),
    ]
