"""The ``io`` suite: slide reading, each figure against a baseline measured in the same run.

- decoded pixels per patch-bank pixel for the paper-size bank (1100..4400 -> 1100):
  pyramid-aware reads vs full-resolution crop and resize (tile overhead included); wall time.
- region reads per second, pyvips reader vs OpenSlide, same local tiled TIFF, one thread,
  tile-aligned and unaligned.
- S3 (a local moto endpoint) vs local file, same reads on an open reader: GETs per region
  against the tiles the region touches, and the throughput ratio.
- Ray Data pipeline patch banks per second vs a plain Python loop with the same reader.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from foveation.benchmarks import Figure, compared
from foveation.config import load_config


def _write_slide(path: str, size: int, tile: int, quality: int = 90) -> None:
    """A pyramidal tiled JPEG TIFF of noise-textured tissue colour (content does not matter
    to I/O, sizes and tiles do)."""
    import pyvips

    from foveation.slides import write_pyramid

    noise = pyvips.Image.gaussnoise(size, size, sigma=25, mean=170)
    rgb = noise.bandjoin([noise.linear(0.7, 40), noise.linear(0.9, 30)]).cast("uchar")
    write_pyramid(rgb, path, tile, "jpeg", quality, sqrt2=True)


def _decoded_per_bank_pixel(path: str, n_locs: int) -> list[Figure]:
    from foveation.slides import SlideReader

    cfg = load_config_paper()
    fovs, P = cfg.patches.fovs, cfg.patches.patch_size
    r = SlideReader(path)
    rng = np.random.default_rng(0)
    centres = rng.uniform(max(fovs) / 2, r.width - max(fovs) / 2, size=(n_locs, 2))
    bank_px = n_locs * len(fovs) * P * P

    t = time.perf_counter()
    for c in centres:
        for f in fovs:
            r.read_region(tuple(c), f, P)
    t_pyr = time.perf_counter() - t
    pyr = r.counters.decoded_pixels

    import torch
    import torch.nn.functional as F

    naive = SlideReader(path)
    t = time.perf_counter()
    for c in centres:
        for f in fovs:
            win = naive.read_level(0, round(c[0] - f / 2), round(c[1] - f / 2), f, f)
            x = torch.from_numpy(win).permute(2, 0, 1)[None].float()
            F.interpolate(x, size=(P, P), mode="area")
    t_naive = time.perf_counter() - t
    note = f"FoVs {list(fovs)} -> {P}, {n_locs} locations, {r.levels[0].tile} tiles, levels {[lv.downsample for lv in r.levels][:5]}"
    return [
        compared(
            "decoded_px_per_bank_px",
            pyr / bank_px,
            naive.counters.decoded_pixels / bank_px,
            "px/px",
            "lower",
            None,
            note,
        ),
        Figure(
            "decoded_px_per_bank_px_target",
            pyr / bank_px,
            "px/px",
            "lower",
            2.5,
            note="pyramid-aware, tile overhead included",
        ),
        compared(
            "bank_read_seconds",
            t_pyr,
            t_naive,
            "s",
            "lower",
            None,
            "baseline: full-resolution crop + area resize",
        ),
    ]


def load_config_paper():
    """The paper's patch set: the decoded-pixel figure is about the paper-size bank."""
    from pathlib import Path

    return load_config(Path(__file__).resolve().parents[3] / "jobs" / "configs" / "paper.toml")


def _pyvips_vs_openslide(path: str, n: int, tile: int) -> list[Figure]:
    import openslide

    from foveation.slides import SlideReader

    r = SlideReader(path)
    osr = openslide.OpenSlide(path)
    W = r.width
    rng = np.random.default_rng(1)
    out = []
    for kind in ("aligned", "unaligned"):
        if kind == "aligned":
            pos = rng.integers(0, (W - 512) // tile, size=(n, 2)) * tile
        else:
            pos = rng.integers(1, W - 513, size=(n, 2))
        pos = [(int(a), int(b)) for a, b in pos]
        t = time.perf_counter()
        for y, x in pos:
            r.read_level(0, y, x, 512, 512)
        t_vips = time.perf_counter() - t
        t = time.perf_counter()
        for y, x in pos:
            np.asarray(osr.read_region((x, y), 0, (512, 512)))
        t_os = time.perf_counter() - t
        out.append(
            compared(
                f"region_reads_per_s_{kind}",
                n / t_vips,
                n / t_os,
                "regions/s",
                "higher",
                1.0,
                "512 px, level 0, one thread; baseline OpenSlide",
            )
        )
    return out


def _s3_vs_local(path: str, n: int, tile: int) -> list[Figure]:
    from moto.server import ThreadedMotoServer

    from foveation import storage
    from foveation.slides import SlideReader

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
        local, remote = SlideReader(path), SlideReader(uri, block_size=256 * 1024, max_blocks=256)
        rng = np.random.default_rng(2)
        pos = [(int(a), int(b)) for a, b in rng.integers(1, local.width - 513, size=(n, 2))]
        before = remote.range_file.stats.snapshot()
        touched = 0
        t = time.perf_counter()
        for y, x in pos:
            remote.read_level(0, y, x, 512, 512)
            touched += (math.ceil((y + 512) / tile) - y // tile) * (
                math.ceil((x + 512) / tile) - x // tile
            )
        t_s3 = time.perf_counter() - t
        gets = remote.range_file.stats.gets - before.gets
        t = time.perf_counter()
        for y, x in pos:
            local.read_level(0, y, x, 512, 512)
        t_local = time.perf_counter() - t
    finally:
        storage.configure(previous)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
    return [
        Figure(
            "s3_gets_per_region",
            gets / n,
            "GETs",
            "lower",
            touched / n + 2,
            note=f"512 px unaligned, {tile} px tiles, 256 KiB blocks; target = tiles touched + 2",
        ),
        compared(
            "s3_region_reads_per_s",
            n / t_s3,
            n / t_local,
            "regions/s",
            "higher",
            None,
            "baseline: the same reads from the local file",
        ),
    ]


def _pipeline_vs_loop(config: str, n_slides: int) -> list[Figure]:
    from foveation.config import IngestConfig, SyntheticConfig
    from foveation.data.ingest import ingest, read_manifest
    from foveation.data.pipeline import Pipeline, tissue_locations, torch_batches
    from foveation.data.slidebank import SlideBankReader
    from foveation.data.synthetic import write_synthetic_set
    from foveation.raycluster import init_ray
    from foveation.slides import SlideReader

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
        pipe = Pipeline(f"{tmp}/out", "train", cfg)
        # Both sides cold, as an epoch starts: the pipeline starts its reader actors, the loop
        # opens its readers. (Ray itself is already up.)
        t = time.perf_counter()
        n_pipe = sum(len(b["bank"]) for b in torch_batches(pipe.epoch(0), 64))
        t_pipe = time.perf_counter() - t
        t = time.perf_counter()
        n_loop = 0
        for row in read_manifest(f"{tmp}/out").to_pylist():
            image, label = SlideReader(row["image_uri"]), SlideReader(row["label_uri"], rgb=False)
            locs = tissue_locations(image, cfg)
            pick = locs[
                np.random.default_rng(0).choice(
                    len(locs), cfg.training.locations_per_image, replace=False
                )
            ]
            n_loop += len(SlideBankReader(cfg, image, label).batch(pick)["bank"])
        t_loop = time.perf_counter() - t
    note = f"{n_slides} slides of 1024 px, {cfg.training.locations_per_image} locations each, {cfg.data.pipeline.reader_actors} reader actors"
    return [
        compared(
            "pipeline_banks_per_s",
            n_pipe / t_pipe,
            n_loop / t_loop,
            "banks/s",
            "higher",
            None,
            note + "; baseline: a plain loop",
        )
    ]


def run(config: str = "jobs/configs/debug.toml", quick: bool = False) -> list[Figure]:
    size, tile = (5000, 256) if quick else (9000, 256)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/slide.tif"
        _write_slide(path, size, tile)
        figs = _decoded_per_bank_pixel(path, 3 if quick else 12)
        figs += _pyvips_vs_openslide(path, 20 if quick else 100, tile)
        figs += _s3_vs_local(path, 10 if quick else 40, tile)
    figs += _pipeline_vs_loop(config, 4 if quick else 12)
    return [dataclasses.replace(f) for f in figs]
