"""The ``patches`` suite: patch-bank extraction and whole-image inference, each against the
authors'-style baseline measured in the same run on the same inputs, in interleaved
repetitions (``docs/contracts.md#benchmarks``).

- extraction: locations per second, vectorised (per-image set-up included) vs a per-location
  loop doing what the authors' code does (pad the whole image per scale per location, crop,
  bilinear resize). Target >= 100x.
- inference: segmenter input pixels per output pixel in tiled vs dense mode (target tiled <=
  1.3), the wall time of each, and the mIoU difference between them, on a briefly trained model.
  The model is trained once (:func:`_trained_model`); only the evaluations are repeated.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from benchmarks import Figure, interleaved, median_compared, timed
from foveation.config import Config, load_config
from foveation.data.samples import Sample
from foveation.data.toy import generate_image
from foveation.io.images import to_chw_tensor
from foveation.patches import PatchExtractor, all_locations, authors_loop_bank, normalise


def _extraction(cfg: Config, size: int, n_vec: int, n_loop: int) -> list[Figure]:
    image, _ = generate_image(size, 96, seed=12345)
    img = to_chw_tensor(image)
    gen = torch.Generator().manual_seed(0)
    locs = all_locations(size, size, cfg.patches.xr_scale)
    locs = locs[torch.randperm(len(locs), generator=gen)[:n_vec]]

    def vectorised(pc):
        def run():
            ex = PatchExtractor.from_image(img, pc, cfg.model.pad_value)
            return ex.bank(locs)

        return run

    x = normalise(img, cfg.model.mean, cfg.model.std)  # the authors normalise first, pad with 0
    ref = dataclasses.replace(cfg.patches, resample="reference")
    secs = interleaved(
        {
            "loop": lambda: timed(lambda: authors_loop_bank(x, locs[:n_loop], cfg.patches), 1),
            "area": lambda: timed(vectorised(cfg.patches), 1),
            "reference": lambda: timed(vectorised(ref), 1),
        }
    )
    loop = [n_loop / t for t in secs["loop"]]
    note = f"{size}px image, FoVs {list(cfg.patches.fovs)} -> {cfg.patches.patch_size}px, {n_vec} locations, set-up included"
    return [
        median_compared(
            "extract_area_locations_per_s",
            [n_vec / t for t in secs["area"]],
            loop,
            "locations/s",
            "higher",
            100.0,
            note,
        ),
        median_compared(
            "extract_reference_locations_per_s",
            [n_vec / t for t in secs["reference"]],
            loop,
            "locations/s",
            "higher",
            None,
            note,
        ),
    ]


def _trained_model(cfg: Config):
    """A briefly trained model on the toy set (the training API's one call in this suite)."""
    from foveation.data.toy import ensure_set, load_split
    from foveation.training.loop import train

    ensure_set(cfg.data.root, cfg.data.toy, cfg.model.num_classes)
    return train(cfg, load_split(cfg.data.root, "train"), None, log=lambda s: None).model


def _inference(cfg: Config, size: int) -> list[Figure]:
    from foveation.evaluation.inmemory import evaluate
    from foveation.inference import forward_pixels

    model = _trained_model(cfg)
    image, label = generate_image(size, cfg.data.toy.region_size, seed=54321)
    test = [Sample("bench", "test", image, label)]
    res = {}

    def side(mode: str):
        def run() -> float:
            t = time.perf_counter()
            res[mode] = evaluate(model, test, cfg, mode=mode)  # the same each repetition
            return time.perf_counter() - t

        return run

    secs = interleaved({"dense": side("dense"), "tiled": side("tiled")})
    fpo = {m: forward_pixels(size, size, cfg, m) / size**2 for m in res}
    note = f"{size}px image, {cfg.model.backbone}, trained {cfg.training.epochs} epochs"
    return [
        Figure(
            "inference_forward_px_per_output_px_tiled",
            fpo["tiled"],
            "px/px",
            "lower",
            1.3 / (1 - cfg.inference.overlap) ** 2,  # one tile a pixel, times the overlap's cost
            note=f"{note}; overlap {cfg.inference.overlap}",
        ),
        Figure(
            "inference_forward_px_per_output_px_dense", fpo["dense"], "px/px", "lower", note=note
        ),
        median_compared(
            "inference_seconds_tiled",
            secs["tiled"],
            secs["dense"],
            "s",
            "lower",
            None,
            "baseline: dense mode",
        ),
        Figure("inference_miou_tiled", res["tiled"]["miou"], "mIoU", "higher", note=note),
        Figure("inference_miou_dense", res["dense"]["miou"], "mIoU", "higher", note=note),
        Figure(
            "inference_miou_tiled_minus_dense",
            res["tiled"]["miou"] - res["dense"]["miou"],
            "mIoU",
            "higher",
            note=note,
        ),
    ]


def run(
    config: str = "jobs/configs/bench.toml", size: int = 1024, quick: bool = False
) -> list[Figure]:
    cfg = load_config(config)
    torch.manual_seed(0)
    np.random.seed(0)
    if quick:  # for smoke tests: tiny sizes, no target is meaningful
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=1))
        return _extraction(cfg, 256, 64, 4) + _inference(cfg, 256)
    # 16 loop locations per round (was 24 once, timed twice): 3 rounds read 48.
    return _extraction(cfg, size, 1024, 16) + _inference(cfg, size)
