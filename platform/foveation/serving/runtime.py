"""The model side of serving, without Ray: segmenting one uploaded image (optionally with its
tile forwards handed to a batcher), and the whole-slide job runner.

``segment_image`` runs the whole-image inference (``inference.segment``) on the image.
When a ``forward`` function is given, the segmenter forwards of the tiles go through it
instead of the model (the Serve replica passes one that queues them on ``@serve.batch``, so
tiles of concurrent requests share one forward); F and everything else run in place.

``JobRunner`` owns whole-slide jobs: it validates a slide, records the job in the store,
segments the slide out of core (the slide reader as the region source, ``JobSink`` as the
sink) with up to ``jobs.max_concurrent`` at once (each on a thread here, or as a Ray task the
thread waits on: ``SlidePredictor``), writes progress and results, honours cancellation, and
on start resumes the jobs a previous runner left queued or running (from their saved rows).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from foveation.config import Config
from foveation.inference import ArraySink, ArraySource, segment
from foveation.inference.outputs import JobCancelled, predict_slide
from foveation.io import storage
from foveation.models.foveated import FoveatedSegmenter
from foveation.serving.errors import RequestError
from foveation.serving.jobstore import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobStore,
)
from foveation.serving.settings import ServeConfig, device_here
from foveation.serving.uris import check_slide_uri

log = logging.getLogger(__name__)

SlidePredictor = Callable[..., tuple[dict, dict]]
"""``predict(slide_uri, prefix, progress=, cancelled=, **outputs) -> (results, summary)``:
where a job's slide is segmented (``outputs.predict_slide``'s keywords). ``JobRunner``'s
default runs it in the runner's own thread with its model; the Serve deployment passes one
that runs it as a Ray task anywhere in the cluster (``serve.deployments``)."""

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(bank [N, D, 3, P, P] uint8, F's weights [N, D]) -> logits [N, K, P/4, P/4]."""


class _RoutedModel:
    """The model as ``inference.segment`` sees it, with the segmenter forward routed to
    ``forward`` (F, the APSM and the geometry stay the model's)."""

    def __init__(self, model: FoveatedSegmenter, forward: Forward) -> None:
        self._model, self._forward = model, forward
        self.output_stride = model.output_stride

    def eval(self) -> _RoutedModel:
        return self

    def weights(self, xr: torch.Tensor) -> torch.Tensor:
        return self._model.weights(xr)

    def apsm(self, w: torch.Tensor) -> torch.Tensor:
        return self._model.apsm(w)

    def __call__(self, bank: torch.Tensor, w: torch.Tensor, ctx=None):
        return self._forward(bank, w), None


def forward_tiles(model: FoveatedSegmenter, bank: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The segmenter forward of a batch of tiles, as ``inference.segment`` runs it."""
    with torch.inference_mode():
        logits, _ = model(bank, w)
    return logits


@dataclass
class ImageResult:
    mask: np.ndarray  # uint8 [H, W] class ids
    counts: list[int]
    apsm: np.ndarray | None  # float32 [h, w] on the x_r grid

    def fractions(self) -> list[float]:
        total = max(1, sum(self.counts))
        return [c / total for c in self.counts]


def segment_image(
    model: FoveatedSegmenter,
    cfg: Config,
    image: np.ndarray,
    forward: Forward | None = None,
    device: str = "cpu",
) -> ImageResult:
    """Segment one uint8 RGB image [H, W, 3] with the tiled whole-image inference."""
    sink = ArraySink()
    runner = model if forward is None else _RoutedModel(model, forward)
    segment(runner, ArraySource(image), cfg, sink, device=device)
    counts = np.bincount(sink.mask.ravel(), minlength=cfg.model.num_classes)
    return ImageResult(sink.mask, [int(c) for c in counts], sink.apsm)


class JobRunner:
    """Runs whole-slide jobs on ``settings.jobs.max_concurrent`` threads; see the module doc."""

    def __init__(
        self,
        model: FoveatedSegmenter | None,
        cfg: Config | None,
        settings: ServeConfig,
        checkpoint: str = "",
        on_state: Callable[[JobRecord, int, int], None] | None = None,
        predictor: SlidePredictor | None = None,
    ) -> None:
        """``on_state(record, running, queued)``: called after every change of a job's state
        or progress (metrics), with the numbers of jobs running and queued. ``predictor``:
        where slides are segmented (default: here, with ``model`` and ``cfg``, which a
        runner with a predictor does not need)."""
        if predictor is None and (model is None or cfg is None):
            raise ValueError("JobRunner needs a model and its config, or a predictor")
        self.model, self.cfg, self.settings = model, cfg, settings
        self.checkpoint = checkpoint
        self.on_state = on_state
        self.predict: SlidePredictor = predictor or self._predict_here
        self.store = JobStore(settings.jobs.store)
        self.pool = ThreadPoolExecutor(settings.jobs.max_concurrent, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._done: dict[str, threading.Event] = {}

    # -- requests ------------------------------------------------------------------------
    def submit(self, slide_uri: object) -> JobRecord:
        """Validate the slide (allowed, present, readable, not too big), record the job and
        queue it; a :class:`RequestError` otherwise."""
        from foveation.io.slides import SlideError, SlideReader

        uri = check_slide_uri(slide_uri, self.settings.jobs.allowed_prefixes)
        try:
            present = storage.exists(uri)
        except storage.StorageError as exc:
            raise RequestError(502, "storage_unavailable", f"slide_uri {uri!r}: {exc}") from None
        if not present:
            raise RequestError(404, "slide_not_found", f"slide_uri {uri!r}: no such slide")
        try:
            reader = SlideReader(uri)
        except (SlideError, storage.StorageError) as exc:
            raise RequestError(422, "unreadable_slide", str(exc)) from None
        try:
            w, h = reader.width, reader.height
        finally:
            reader.close()
        limit = self.settings.limits.max_slide_pixels
        if w * h > limit:
            raise RequestError(
                413, "slide_too_large", f"slide {uri!r}: {w} x {h} pixels exceeds {limit}"
            )
        with self._lock:
            queued = sum(r.state == QUEUED for r in self._records.values())
        if queued >= self.settings.jobs.max_queued:
            raise RequestError(
                503,
                "jobs_full",
                f"{queued} jobs are already waiting (serve.jobs.max_queued); retry later",
            )
        rec = self.store.create(uri, {"width": w, "height": h, "checkpoint": self.checkpoint})
        self._schedule(rec)
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; a finished one is a 409 saying how it ended."""
        rec = self._latest(job_id)
        if rec.final:
            raise RequestError(
                409, "job_finished", f"job {job_id} already ended ({rec.state}); nothing to cancel"
            )
        with self._lock:
            event = self._cancel.get(job_id)
        if event is None:  # not ours (another runner's, or lost): record the request only
            return self._save(rec, cancel_requested=True)
        event.set()
        rec = self._save(self._latest(job_id), cancel_requested=True)
        if rec.state == QUEUED:
            rec = self._save(rec, state=CANCELLED)
        return rec

    def get(self, job_id: str) -> JobRecord:
        return self._latest(job_id)

    def resume(self) -> list[str]:
        """Queue again every job a previous runner left queued or running (cancelled ones
        are marked so); returns their ids."""
        resumed = []
        for rec in self.store.list():
            if rec.final:
                continue
            if rec.cancel_requested:
                self._save(rec, state=CANCELLED)
                continue
            log.info("resuming job %s (%s, attempt %d)", rec.id, rec.state, rec.attempts + 1)
            self._schedule(self._save(rec, state=QUEUED))
            resumed.append(rec.id)
        return resumed

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until a job this runner scheduled is final (tests, tools)."""
        with self._lock:
            done = self._done.get(job_id)
        if done is not None:
            done.wait(timeout)
        return self._latest(job_id)

    def shutdown(self) -> None:
        with self._lock:
            for event in self._cancel.values():
                event.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------
    def _predict_here(self, slide_uri: str, prefix: str, **kw) -> tuple[dict, dict]:
        return predict_slide(
            self.model, self.cfg, slide_uri, prefix, device=device_here(self.settings), **kw
        )

    def _latest(self, job_id: str) -> JobRecord:
        with self._lock:
            rec = self._records.get(job_id)
        return rec if rec is not None else self.store.get(job_id)

    def _save(self, rec: JobRecord, **changes) -> JobRecord:
        with self._lock:
            current = self._records.get(rec.id, rec)
            if current.cancel_requested:
                changes.setdefault("cancel_requested", True)
            rec = self.store.update(current, **changes)
            self._records[rec.id] = rec
            running = sum(r.state == RUNNING for r in self._records.values())
            queued = sum(r.state == QUEUED for r in self._records.values())
            # Under the lock: the counts reach on_state in the order they were taken, so
            # the last value recorded is the current one (on_state must be quick).
            if self.on_state is not None and ("state" in changes or "progress" in changes):
                self.on_state(rec, running, queued)
        return rec

    def _schedule(self, rec: JobRecord) -> None:
        with self._lock:
            self._records[rec.id] = rec
            self._cancel[rec.id] = threading.Event()
            self._done[rec.id] = threading.Event()
        self.pool.submit(self._run, rec.id)

    def _run(self, job_id: str) -> None:
        try:
            self._segment(job_id)
        except Exception:  # never lose a job silently: the state says what happened
            log.exception("job %s failed", job_id)
        finally:
            with self._lock:
                self._cancel.pop(job_id, None)
                done = self._done.get(job_id)
            if done is not None:
                done.set()

    def _segment(self, job_id: str) -> None:
        cancelled = self._cancel[job_id].is_set
        rec = self._latest(job_id)
        if cancelled() or rec.cancel_requested:
            self._save(rec, state=CANCELLED)
            return
        rec = self._save(rec, state=RUNNING, attempts=rec.attempts + 1, progress=0.0, error=None)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= self.settings.jobs.progress_interval_s:
                last[0] = now
                self._save(self._latest(job_id), progress=round(0.95 * done / total, 4))

        try:
            jc = self.settings.jobs
            results, summary = self.predict(
                rec.slide_uri,
                self.store.uri(job_id),
                progress=progress,
                cancelled=cancelled,
                geojson_max_side=jc.geojson_max_side,
                geojson_tile=jc.geojson_tile,
                geojson_simplify_px=jc.geojson_simplify_px,
                checkpoint_interval_s=jc.checkpoint_interval_s,
                resume_key=str(rec.options.get("checkpoint", self.checkpoint)),
            )
            results["heatmap"] = results.get(jc.heatmap, results["probabilities"])
            self._save(
                self._latest(job_id),
                state=SUCCEEDED,
                progress=1.0,
                results=results,
                summary=summary,
            )
        except JobCancelled:
            self._save(self._latest(job_id), state=CANCELLED)
        except Exception as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._save(self._latest(job_id), state=FAILED, error=f"{type(exc).__name__}: {msg}")
            raise
