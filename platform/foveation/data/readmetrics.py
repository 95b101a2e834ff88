"""The ``foveation_data_*`` metrics (the data dashboard), recorded alike by both training
loaders: the streamed pipeline's reader actors (``data.pipeline``) and the memory loader, which
decodes a worker's slides once and cuts every epoch's banks from them (``data.samples``,
``training.loop.in_memory_batches``). Before, only the streamed pipeline recorded them, so the
data dashboard stayed empty for the default ("auto") loader on small sets.

For the memory loader a "read" is cutting one slide's banks for one epoch from the decoded
slide (no I/O: its latency shows the extraction cost), and the object-storage traffic is the
one whole decode of each slide. A metric is worth less than the batch it describes: nothing
here raises (``monitoring.record`` drops what it cannot record)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from foveation import monitoring


def record_banks(seconds: float, batch: dict[str, np.ndarray]) -> None:
    """One slide's banks for one epoch: the time they took, how many, how many bytes."""
    monitoring.record("foveation_data_read_seconds", seconds)
    monitoring.record("foveation_data_patch_banks_total", len(batch["loc"]))
    monitoring.record("foveation_data_bank_bytes_total", batch["bank"].nbytes)


def record_storage(readers: Iterable[Any], since: dict | None = None) -> dict:
    """What the range files of ``readers`` (``io.slides.SlideReader``, None skipped) fetched
    since the snapshots ``since`` (by file; a file without one: since it opened, as a companion
    pyramid opened after the last record); returns new snapshots, to pass as ``since`` next
    time."""
    from foveation.io.rangeio import RangeStats

    files = [f for r in readers if r is not None for f in r.range_files]
    since = since or {}
    for f in files:
        d = f.stats - since.get(id(f), RangeStats())
        scheme = f.uri.split("://", 1)[0] if "://" in f.uri else "file"
        monitoring.record("foveation_data_storage_gets_total", d.gets, scheme=scheme)
        monitoring.record("foveation_data_storage_bytes_total", d.bytes_fetched, scheme=scheme)
        monitoring.record("foveation_data_cache_blocks_total", d.hits, result="hit")
        monitoring.record("foveation_data_cache_blocks_total", d.misses, result="miss")
    return {id(f): f.stats.snapshot() for f in files}


def record_skipped(stage: str = "read") -> None:
    """A slide skipped after it could not be read."""
    monitoring.record("foveation_data_skipped_slides_total", stage=stage)
