"""Manifest rows decoded into memory as ``Sample``s: for the single-device trainer (the science
check, which tests the method, not Ray) and for Ray Train workers whose shard of the training
slides is small enough to hold (``data.pipeline.loader``: the pattern of MONAI's
``CacheDataset``: decode once, cut fresh locations every epoch in-process)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from foveation.config import Config
from foveation.io import storage


@dataclass(frozen=True)
class Sample:
    """One slide decoded into memory, the unit both in-memory paths (the toy set and a manifest
    split) hand to the single-device trainer and to in-memory evaluation."""

    slide_id: str
    split: str
    image: np.ndarray  # uint8 [H, W, 3]
    label: np.ndarray  # uint8 [H, W]


def load_row(row: dict, split: str) -> Sample:
    """Decode one manifest row's image and label at full resolution (what it fetched from
    storage goes to the data metrics)."""
    from foveation.data.readmetrics import record_storage
    from foveation.io.slides import SlideReader

    image = SlideReader(storage.absolute(row["image_uri"]))
    try:
        label = SlideReader(storage.absolute(row["label_uri"]), rgb=False)
        try:
            img = image.read_level(0, 0, 0, image.height, image.width)[..., :3]
            lab = label.read_level(0, 0, 0, label.height, label.width, (255,))[..., 0]
            record_storage((image, label))
        finally:
            label.close()
    finally:
        image.close()
    return Sample(row["slide_id"], split, img, lab)


def load_rows(rows: list[dict], split: str) -> list[Sample]:
    """Decode each manifest row's image and label at full resolution."""
    return [load_row(row, split) for row in rows]


def load_shard(
    rows: list[dict], split: str, max_error_fraction: float, refill: bool = True
) -> tuple[list[Sample], dict[str, str]]:
    """Decode a worker's shard as the streamed pipeline treats slides: an unreadable one is
    skipped (slide id -> error), unless more than ``max_error_fraction`` of them are, which
    raises naming them. With ``refill`` the shard keeps its length (good slides fill the gaps,
    in turn), so every rank still takes the same number of training steps; a validation shard
    is not refilled (a slide scored twice would weigh twice)."""
    from foveation.data.readmetrics import record_skipped
    from foveation.io.slides import SlideError

    good, failed = [], {}
    for row in rows:
        try:
            good.append(load_row(row, split))
        except (SlideError, OSError, ValueError) as exc:
            if row["slide_id"] not in failed:  # a shard may list a slide twice (wrap-round)
                record_skipped("read")
            failed[row["slide_id"]] = str(exc)
    if failed and (not good or len(failed) > max_error_fraction * len(rows)):
        raise SlideError(
            f"{len(failed)} of {len(rows)} slides unreadable (more than data.pipeline."
            f"max_error_fraction = {max_error_fraction}): {failed}"
        )
    if not refill:
        return good, failed
    return [good[i % len(good)] for i in range(len(rows))], failed


def load_manifest_split(manifest: str, split: str) -> list[Sample]:
    from foveation.data.manifest import read_manifest

    rows = [r for r in read_manifest(manifest).to_pylist() if r["split"] == split]
    return load_rows(rows, split)


def shard(rows: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``rows``: every ``world``-th row from ``rank`` on, wrapping round
    so that every rank gets ``ceil(len(rows) / world)`` rows, hence the same number of steps (a
    rank that ran out early would leave the others waiting in an all-reduce)."""
    per = math.ceil(len(rows) / world)
    return [rows[(rank + world * i) % len(rows)] for i in range(per)]


def decoded_bytes(row: dict) -> int:
    """What a manifest row holds once decoded: RGB and label, one byte each per pixel."""
    return 4 * int(row["width"]) * int(row["height"])


def choose_loader(cfg: Config, rows: list[dict], world: int) -> str:
    """ "stream" or "memory" for a training run over ``rows`` on ``world`` workers: the configured
    loader, or for "auto", memory when the largest possible shard decodes to at most
    ``data.pipeline.memory_limit_mb``."""
    pc = cfg.data.pipeline
    if pc.loader != "auto":
        return pc.loader
    per = math.ceil(len(rows) / world)
    largest = sum(sorted((decoded_bytes(r) for r in rows), reverse=True)[:per])
    return "memory" if largest <= pc.memory_limit_mb * 2**20 else "stream"
