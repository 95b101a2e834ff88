"""The ``io`` suite: slide reading, each figure against a baseline measured in the same run.

- decoded pixels per patch-bank pixel for the paper-size bank (1100..4400 -> 1100):
  pyramid-aware reads vs full-resolution crop and resize (tile overhead included); wall time.
- region reads per second, pyvips reader vs OpenSlide, same local tiled TIFF, one thread,
  tile-aligned and unaligned.
- S3 (a local moto endpoint) vs local file, same reads on an open reader: GETs per region
  against the tiles the region touches, and the throughput ratio.
- Ray Data pipeline patch banks per second vs a plain Python loop with the same reader.

Every ratio is the median of interleaved repetitions, baseline first
(``docs/contracts.md#benchmarks``); each repetition opens its readers afresh and reads its own
random positions (the same for both sides), so neither side finds the other's reads in a cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile
import time

import numpy as np

from benchmarks import Figure, interleaved, median_compared
from foveation.config import load_config


def _write_slide(path: str, size: int, tile: int, quality: int = 90) -> None:
    """A pyramidal tiled JPEG TIFF of noise-textured tissue colour (content does not matter
    to I/O, sizes and tiles do)."""
    import pyvips

    from foveation.io.slides import write_pyramid

    noise = pyvips.Image.gaussnoise(size, size, sigma=25, mean=170)
    rgb = noise.bandjoin([noise.linear(0.7, 40), noise.linear(0.9, 30)]).cast("uchar")
    write_pyramid(rgb, path, tile, "jpeg", quality, sqrt2=True)


def _decoded_per_bank_pixel(path: str, n_locs: int) -> list[Figure]:
    import torch
    import torch.nn.functional as F

    from foveation.io.slides import SlideReader

    cfg = load_config_paper()
    fovs, P = cfg.patches.fovs, cfg.patches.patch_size
    bank_px = n_locs * len(fovs) * P * P
    rounds = {"naive": itertools.count(), "pyramid": itertools.count()}

    def centres(side: str) -> tuple[SlideReader, np.ndarray]:
        r = SlideReader(path)
        rng = np.random.default_rng(next(rounds[side]))  # the same centres for both sides
        return r, rng.uniform(max(fovs) / 2, r.width - max(fovs) / 2, size=(n_locs, 2))

    def pyramid() -> tuple[float, int]:
        r, cs = centres("pyramid")
        t = time.perf_counter()
        for c in cs:
            for f in fovs:
                r.read_region(tuple(c), f, P)
        return time.perf_counter() - t, r.counters.decoded_pixels

    def naive() -> tuple[float, int]:
        r, cs = centres("naive")
        t = time.perf_counter()
        for c in cs:
            for f in fovs:
                win = r.read_level(0, round(c[0] - f / 2), round(c[1] - f / 2), f, f)
                x = torch.from_numpy(win).permute(2, 0, 1)[None].float()
                F.interpolate(x, size=(P, P), mode="area")
        return time.perf_counter() - t, r.counters.decoded_pixels

    got = interleaved({"naive": naive, "pyramid": pyramid})
    r = SlideReader(path)
    note = f"FoVs {list(fovs)} -> {P}, {n_locs} locations, {r.levels[0].tile} tiles, levels {[lv.downsample for lv in r.levels][:5]}"
    decoded = median_compared(
        "decoded_px_per_bank_px",
        [px / bank_px for _, px in got["pyramid"]],
        [px / bank_px for _, px in got["naive"]],
        "px/px",
        "lower",
        None,
        note,
    )
    return [
        decoded,
        Figure(
            "decoded_px_per_bank_px_target",
            decoded.value,
            "px/px",
            "lower",
            2.5,
            note="pyramid-aware, tile overhead included",
        ),
        median_compared(
            "bank_read_seconds",
            [t for t, _ in got["pyramid"]],
            [t for t, _ in got["naive"]],
            "s",
            "lower",
            None,
            "baseline: full-resolution crop + area resize",
        ),
    ]


def load_config_paper():
    """The paper's patch set: the decoded-pixel figure is about the paper-size bank."""
    from pathlib import Path

    return load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "paper.toml")


def _pyvips_vs_openslide(path: str, n: int, tile: int) -> list[Figure]:
    return [
        median_compared(
            f"region_reads_per_s_{kind}",
            *_region_rates(path, n, tile, kind),
            "regions/s",
            "higher",
            1.0,
            "512 px, level 0, one thread; baseline OpenSlide",
        )
        for kind in ("aligned", "unaligned")
    ]


def _region_rates(path: str, n: int, tile: int, kind: str) -> tuple[list[float], list[float]]:
    """Regions per second of the pyvips reader and of OpenSlide, per repetition."""
    import openslide

    from foveation.io.slides import SlideReader

    W = SlideReader(path).width
    rounds = {"openslide": itertools.count(1), "pyvips": itertools.count(1)}

    def positions(side: str) -> list[tuple[int, int]]:
        rng = np.random.default_rng(next(rounds[side]))  # the same for both sides
        if kind == "aligned":
            pos = rng.integers(0, (W - 512) // tile, size=(n, 2)) * tile
        else:
            pos = rng.integers(1, W - 513, size=(n, 2))
        return [(int(a), int(b)) for a, b in pos]

    def vips() -> float:
        r, pos = SlideReader(path), positions("pyvips")
        t = time.perf_counter()
        for y, x in pos:
            r.read_level(0, y, x, 512, 512)
        return n / (time.perf_counter() - t)

    def osl() -> float:
        osr, pos = openslide.OpenSlide(path), positions("openslide")
        t = time.perf_counter()
        for y, x in pos:
            np.asarray(osr.read_region((x, y), 0, (512, 512)))
        rate = n / (time.perf_counter() - t)
        osr.close()
        return rate

    rates = interleaved({"openslide": osl, "pyvips": vips})
    return rates["pyvips"], rates["openslide"]


def _s3_vs_local(path: str, n: int, tile: int) -> list[Figure]:
    from moto.server import ThreadedMotoServer

    from foveation.io import storage
    from foveation.io.slides import SlideReader

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    previous = storage.configure(endpoint_url=f"http://{host}:{port}")
    try:
        import boto3

        boto3.client(
            "s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1"
        ).create_bucket(Bucket="bench")
        uri = "s3://bench/slide.tif"
        storage.upload_file(path, uri)
        width = SlideReader(path).width
        rounds = {"local": itertools.count(2), "s3": itertools.count(2)}
        stats = {"gets": 0, "touched": 0}

        def positions(side: str) -> list[tuple[int, int]]:
            rng = np.random.default_rng(next(rounds[side]))  # the same for both sides
            return [(int(a), int(b)) for a, b in rng.integers(1, width - 513, size=(n, 2))]

        def s3() -> float:
            remote = SlideReader(uri, block_size=256 * 1024, max_blocks=256)
            pos = positions("s3")
            before = remote.range_file.stats.snapshot()
            t = time.perf_counter()
            for y, x in pos:
                remote.read_level(0, y, x, 512, 512)
            rate = n / (time.perf_counter() - t)
            stats["gets"] += remote.range_file.stats.gets - before.gets
            for y, x in pos:
                stats["touched"] += (math.ceil((y + 512) / tile) - y // tile) * (
                    math.ceil((x + 512) / tile) - x // tile
                )
            return rate

        def local() -> float:
            r, pos = SlideReader(path), positions("local")
            t = time.perf_counter()
            for y, x in pos:
                r.read_level(0, y, x, 512, 512)
            return n / (time.perf_counter() - t)

        rates = interleaved({"local": local, "s3": s3})
    finally:
        storage.configure(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
    reads = n * len(rates["s3"])
    return [
        Figure(
            "s3_gets_per_region",
            stats["gets"] / reads,
            "GETs",
            "lower",
            stats["touched"] / reads + 2,
            note=f"512 px unaligned, {tile} px tiles, 256 KiB blocks, {reads} reads in all; target = tiles touched + 2",
        ),
        median_compared(
            "s3_region_reads_per_s",
            rates["s3"],
            rates["local"],
            "regions/s",
            "higher",
            None,
            "baseline: the same reads from the local file",
        ),
    ]


def _loop_banks(cfg, image_uri: str, label_uri: str) -> int:
    """The plain loop's work for one slide: open it, pick the locations, cut their banks
    (``BatchExtractor``'s one call in this suite). Returns the number of banks."""
    from foveation.data.batches import BatchExtractor, tissue_locations
    from foveation.io.slides import SlideReader

    image, label = SlideReader(image_uri), SlideReader(label_uri, rgb=False)
    locs = tissue_locations(image, cfg)
    pick = locs[
        np.random.default_rng(0).choice(len(locs), cfg.training.locations_per_image, replace=False)
    ]
    return len(BatchExtractor(cfg, image, label).batch(pick)["bank"])


def _pipeline_vs_loop(config: str, n_slides: int) -> list[Figure]:
    from foveation.config import IngestConfig, SyntheticConfig
    from foveation.data.ingest import ingest
    from foveation.data.manifest import read_manifest
    from foveation.data.pipeline import Pipeline, torch_batches
    from foveation.data.synthetic import write_synthetic_set
    from foveation.raycluster import init_ray

    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_set(
            f"{tmp}/raw",
            SyntheticConfig(n_slides=n_slides, size=1024, seed=4),
            cfg.patches,
            log=lambda s: None,
        )
        ic = IngestConfig(
            crop_size=None,
            tile_size=256,
            compression="jpeg",
            quality=95,
            val_fraction=0.0,
            test_fraction=0.0,
        )
        ingest(f"{tmp}/raw", f"{tmp}/out", ic, log=lambda s: None)
        init_ray()

        # Both sides cold, as an epoch starts: the pipeline starts its reader actors, the loop
        # opens its readers. (Ray itself is already up.)
        def pipeline() -> float:
            pipe = Pipeline(f"{tmp}/out", "train", cfg)
            t = time.perf_counter()
            n = sum(len(b["bank"]) for b in torch_batches(pipe.epoch(0), 64))
            return n / (time.perf_counter() - t)

        def loop() -> float:
            t = time.perf_counter()
            n = 0
            for row in read_manifest(f"{tmp}/out").to_pylist():
                n += _loop_banks(cfg, row["image_uri"], row["label_uri"])
            return n / (time.perf_counter() - t)

        rates = interleaved({"loop": loop, "pipeline": pipeline})
    note = f"{n_slides} slides of 1024 px, {cfg.training.locations_per_image} locations each, {cfg.data.pipeline.reader_actors} reader actors"
    return [
        median_compared(
            "pipeline_banks_per_s",
            rates["pipeline"],
            rates["loop"],
            "banks/s",
            "higher",
            None,
            note + "; baseline: a plain loop",
        )
    ]


def run(config: str = "jobs/configs/bench.toml", quick: bool = False) -> list[Figure]:
    size, tile = (5000, 256) if quick else (9000, 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/slide.tif"
        _write_slide(path, size, tile)
        # Per round (3 rounds): 6 bank locations, 40 regions, 20 S3 regions, 8 slides (was
        # one round of 12, 100, 40, 12), so the suite stays within minutes on 2 cores.
        figs = _decoded_per_bank_pixel(path, 3 if quick else 6)
        figs += _pyvips_vs_openslide(path, 20 if quick else 40, tile)
        figs += _s3_vs_local(path, 10 if quick else 20, tile)
    figs += _pipeline_vs_loop(config, 4 if quick else 8)
    return [dataclasses.replace(f) for f in figs]
