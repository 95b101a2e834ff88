"""The ``ingest`` suite: the synthetic generator's speed, and ingest of the same slides with Ray
tasks on this machine vs one process (slides and megapixels per minute), in interleaved
repetitions, each into a fresh store (``docs/contracts.md#benchmarks``)."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time

from benchmarks import Figure, interleaved, median_compared
from foveation.config import load_config
from foveation.data.ingest import ingest, ray_tasks, serial_map
from foveation.data.synthetic import TissueScales, generate_slide, write_synthetic_set


def run(config: str = "jobs/configs/bench.toml", quick: bool = False) -> list[Figure]:
    cfg = load_config(config)
    n, size = (4, 512) if quick else (8, 1024)  # 8 slides (was 12) in each of the 3 rounds
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
        runs = itertools.count()  # a fresh store per ingest: unchanged slides are skipped

        def side(map_fn):
            def run() -> float:
                t = time.perf_counter()
                done = ingest(src, f"{tmp}/out{next(runs)}", ic, map_fn=map_fn, log=lambda s: None)
                secs = time.perf_counter() - t
                assert len(done.ingested) == n, done.text()
                return secs

            return run

        timing = interleaved({"serial": side(serial_map), "ray": side(ray_tasks(ic))})
    mp = n * size * size / 1e6
    note = f"{n} slides of {size} px, debug tissue scales, {ic.compression} tiles of {ic.tile_size}"
    return [
        Figure("generator_megapixels_per_s", gen_mps, "MP/s", "higher", 1.0, note=note),
        median_compared(
            "ingest_slides_per_min",
            [60 * n / t for t in timing["ray"]],
            [60 * n / t for t in timing["serial"]],
            "slides/min",
            "higher",
            1.2,
            note,
        ),
        median_compared(
            "ingest_megapixels_per_min",
            [60 * mp / t for t in timing["ray"]],
            [60 * mp / t for t in timing["serial"]],
            "MP/min",
            "higher",
            1.2,
            note,
        ),
    ]
