"""The Ray Data pipeline: manifest -> slides -> sampled locations -> patch banks -> batches.

    manifest rows of a split
        -> map_batches(BankReader) a pool of reader actors, each caching its open slides; per
                                 slide: a cheap tissue mask from a low pyramid level,
                                 ``locations_per_image`` x_r locations on tissue (seeded by
                                 seed, epoch and slide id), and the training batch
                                 (bank, xr, label, loc, slide_id) for them, cut by
                                 ``batches.BatchExtractor`` over the slide readers
      -> iter_torch_batches      on a Ray Train worker (its shard) or the driver

Streaming and bounded: only location rows and in-flight batches exist at once, never a whole
slide, so memory does not grow with the number of slides. A slide that cannot be opened or
read is retried once with a fresh reader, then skipped and logged; at the end of an epoch
``Pipeline.check`` fails the job with a summary if more than ``max_error_fraction`` of the
slides were skipped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from foveation.config import Config, config_from_dict
from foveation.data.batches import empty_batch, sample_locations
from foveation.data.readmetrics import record_banks, record_skipped, record_storage
from foveation.errors import FoveationError
from foveation.io import storage

log = logging.getLogger(__name__)


class PipelineError(FoveationError, RuntimeError):
    pass


def _wait(ref) -> None:
    """Wait for an error record: fire-and-forget calls can arrive after the driver asks, or be
    lost when Ray Data tears the actors down."""
    import ray

    ray.get(ref)


class BankReader:
    """A Ray Data actor: cuts training batches for batches of location rows."""

    def __init__(self, cfg_dict: dict, errors, epoch, seed: int, cache_slides: int = 8) -> None:
        self.cfg = config_from_dict(cfg_dict)
        if not isinstance(epoch, int):  # an EpochClock: read once, when this execution starts
            import ray

            epoch = ray.get(epoch.get.remote())
        self.epoch, self.seed = epoch, seed
        self.errors = errors
        import ray

        self.node = ray.util.get_node_ip_address()
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.cache_slides = cache_slides

    def _reader(self, image_uri: str, label_uri: str, fresh: bool = False):
        from foveation.data.batches import BatchExtractor
        from foveation.io.slides import SlideReader

        if fresh or image_uri not in self.cache:
            pc = self.cfg.data.pipeline
            image = SlideReader(image_uri, block_size=pc.block_size, max_blocks=pc.max_blocks)
            label = (
                SlideReader(
                    label_uri, block_size=pc.block_size, max_blocks=pc.max_blocks, rgb=False
                )
                if label_uri
                else None
            )
            self.cache[image_uri] = BatchExtractor(self.cfg, image, label)
            while len(self.cache) > self.cache_slides:  # bounded: at most a few open slides
                self._evict(next(iter(self.cache)))
        self.cache.move_to_end(image_uri)
        return self.cache[image_uri]

    def _evict(self, image_uri: str) -> None:
        bank = self.cache.pop(image_uri, None)
        if bank is not None:  # close now: an S3 reader holds its block cache until closed
            for r in (bank.image, bank.label):
                if r is not None:
                    r.close()

    def sample(self, slide_id: str, image_uri: str, label_uri: str) -> np.ndarray:
        """This epoch's locations [n, 2] of one slide (``batches.sample_locations``)."""
        ex = self._reader(image_uri, label_uri)
        return sample_locations(ex.image, self.cfg, self.seed, self.epoch, slide_id, ex.label)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Slide rows in, training-batch rows out (``locations_per_image`` per slide)."""
        t0, parts = time.perf_counter(), []
        for sid, image_uri, label_uri in zip(
            batch["slide_id"], batch["image_uri"], batch["label_uri"], strict=True
        ):
            sid, image_uri, label_uri = str(sid), str(image_uri), str(label_uri)
            for attempt in range(2):  # a failing slide gets one fresh reader, then it is skipped
                try:
                    if attempt:
                        self._evict(image_uri)
                    with _ReadMetrics(self, image_uri, label_uri) as m:
                        locs = self.sample(sid, image_uri, label_uri)
                        m.batch = m.bank.batch(locs, sid)
                    parts.append(m.batch)
                    break
                except Exception as exc:
                    if attempt == 1:
                        _wait(
                            self.errors.record.remote(sid, "read", f"{type(exc).__name__}: {exc}")
                        )
                        record_skipped("read")
                        self._evict(image_uri)
        if not parts:
            return empty_batch(self.cfg)
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(next(iter(out.values())))
        _wait(self.errors.read.remote(self.node, len(parts), n, time.perf_counter() - t0))
        return out


class _ReadMetrics:
    """Records one slide's read (``foveation_data_*``): its time, the banks and bytes it
    produced, and what the slide's range caches fetched from object storage since the last
    record. Opening the slide (on its first read, or after an eviction) counts in both: a
    small slide is often read whole by its first GET."""

    def __init__(self, owner: BankReader, image_uri: str, label_uri: str) -> None:
        self.t0 = time.perf_counter()
        self.bank = owner._reader(image_uri, label_uri)  # opens the slide if not cached
        self.batch: dict[str, np.ndarray] | None = None

    def __enter__(self) -> _ReadMetrics:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None or self.batch is None:
            return
        try:
            self._record()
        except Exception as exc:  # a good read never fails for its metrics
            log.warning("data metrics not recorded: %s: %s", type(exc).__name__, exc)

    def _record(self) -> None:
        record_banks(time.perf_counter() - self.t0, self.batch)
        readers = (self.bank.image, self.bank.label)
        since = getattr(self.bank, "recorded_stats", None)
        self.bank.recorded_stats = record_storage(readers, since)


def epoch_clock(epoch: int = 0):
    """An actor holding the current epoch. One Ray Data dataset handed to Ray Train is executed
    again for every epoch; its reader actors read the epoch from this clock when each execution
    starts, so every epoch samples fresh locations while the dataset (and its sharding across
    workers) stays the same object. Rank 0 sets it before the workers iterate their shards.
    It lives on the driver's node (``raycluster.on_this_node``): losing a worker node never
    takes it with it."""
    import ray

    @ray.remote(num_cpus=0)
    class EpochClock:
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def set(self, epoch: int) -> None:
            self.epoch = epoch

        def get(self) -> int:
            return self.epoch

    from foveation.raycluster import on_this_node

    return EpochClock.options(**on_this_node()).remote(epoch)


@dataclass(frozen=True)
class NodeReads:
    """What the reader actors of one node read over a run: the slides' reads, the training
    locations they cut, and the seconds spent on them (so locations per second per node)."""

    node: str  # the node's IP, as Ray names it
    slides: int
    locations: int
    seconds: float

    @property
    def locations_per_s(self) -> float:
        return self.locations / self.seconds if self.seconds > 0 else 0.0


def _read_log_class():
    import ray

    @ray.remote(num_cpus=0)
    class _ReadLog:
        """The pipeline's record of skipped slides and of reads by node (``NodeReads``)."""

        def __init__(self) -> None:
            self.errors: dict[str, list[str]] = {}
            self.reads: dict[str, list[float]] = {}

        def record(self, slide_id: str, stage: str, error: str) -> None:
            self.errors.setdefault(slide_id, []).append(f"{stage}: {error}")

        def read(self, node: str, slides: int, locations: int, seconds: float) -> None:
            total = self.reads.setdefault(node, [0, 0, 0.0])
            total[0] += slides
            total[1] += locations
            total[2] += seconds

        def get(self) -> dict[str, list[str]]:
            return self.errors

        def by_node(self) -> dict[str, list[float]]:
            return self.reads

    return _ReadLog


class Pipeline:
    """One split of a manifest as a Ray Data pipeline; ``epoch(e)`` gives that epoch's dataset."""

    def __init__(self, manifest: str, split: str, cfg: Config, seed: int | None = None) -> None:
        from foveation.data.manifest import read_manifest

        self.cfg = cfg
        self.seed = cfg.training.seed if seed is None else seed
        rows = [r for r in read_manifest(manifest).to_pylist() if r["split"] == split]
        if not rows:
            raise PipelineError(f"{manifest}: no slides in split {split!r}")
        # Manifest URIs relative to the driver's directory mean nothing to a worker elsewhere.
        self.rows = [
            {
                "slide_id": r["slide_id"],
                "image_uri": storage.absolute(r["image_uri"]),
                "label_uri": storage.absolute(r["label_uri"]) if r["label_uri"] else "",
            }
            for r in rows
        ]
        from foveation.raycluster import on_this_node

        self.errors = _read_log_class().options(**on_this_node()).remote()

    def epoch(self, epoch=0):
        """The dataset of one epoch: ``epoch`` is an int, or an ``epoch_clock`` read each time
        the dataset is executed."""
        import ray.data

        pc = self.cfg.data.pipeline
        cfg_dict = self.cfg.to_dict()
        # One block per slide, so slides spread over the reader actors; each actor samples a
        # slide's locations and cuts their banks in one go (no separate sampling stage).
        ds = ray.data.from_items(self.rows, override_num_blocks=len(self.rows))
        return ds.map_batches(
            BankReader,
            fn_constructor_kwargs={
                "cfg_dict": cfg_dict,
                "errors": self.errors,
                "epoch": epoch,
                "seed": self.seed,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=pc.reader_actors
            ),  # `concurrency` is deprecated (2.51)
            num_cpus=pc.actor_cpus,
            batch_format="numpy",
        )

    def skipped(self) -> dict[str, list[str]]:
        import ray

        return ray.get(self.errors.get.remote())

    def reads_by_node(self) -> list[NodeReads]:
        """Where the reader actors ran and what each node read, over every epoch so far."""
        import ray

        reads = ray.get(self.errors.by_node.remote())
        return [
            NodeReads(node, int(s), int(n), float(t)) for node, (s, n, t) in sorted(reads.items())
        ]

    def check(self) -> dict[str, list[str]]:
        """Raise with a summary when too many slides were skipped; else return the skipped."""
        skipped = self.skipped()
        limit = self.cfg.data.pipeline.max_error_fraction * len(self.rows)
        if len(skipped) > limit:
            lines = [f"  {sid}: {'; '.join(errs)}" for sid, errs in sorted(skipped.items())]
            raise PipelineError(
                f"{len(skipped)} of {len(self.rows)} slides could not be read (more than "
                f"data.pipeline.max_error_fraction = {self.cfg.data.pipeline.max_error_fraction}):\n"
                + "\n".join(lines)
            )
        return skipped


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        """numpy batch -> torch tensors (uint8 stays uint8 until the device), slide ids a list."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            from foveation.data.batches import to_torch

            return to_torch({k: np.array(v) for k, v in batch.items()})

    return Collate


def torch_batches(ds, batch_size: int, local_shuffle_buffer_size: int | None = None):
    """Training batches from a pipeline dataset (or a Ray Train worker's shard of it)."""
    return ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=_collate_class()(),
        local_shuffle_buffer_size=local_shuffle_buffer_size,
    )
