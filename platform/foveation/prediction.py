"""Batch prediction over a bucket of slides on Ray Data (``jobs.predict``).

Input: an ingest manifest (``manifest.parquet``, optionally one split), a slide list (CSV or
Parquet: ``data.slidelist``) or a folder / ``s3://`` prefix of slide files. Slides are rows of a
Ray Data dataset mapped by ``predict_batch`` tasks (at most ``workers`` at once, each worker
process loading the model once, a GPU each when the cluster has GPUs): each reads its slide out of
core (``io.slides.SlideReader``: pyramid levels, S3 range reads, OpenSlide for vendor formats)
and writes what a Serve slide job writes (``inference.outputs.predict_slide``: the pyramidal
OME-TIFF label map, the class probabilities, the APSM, QuPath GeoJSON) under
``<out>/<slide id>/``, then ``summary.json`` last: a slide is finished exactly when its
summary exists, so a rerun skips finished slides and redoes a slide cut off half-way (each
file is itself written atomically). A slide that fails is reported with its cause and skipped;
``<out>/predict-summary.json`` says what was predicted, skipped and failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from foveation.errors import failure_lines
from foveation.io import storage
from foveation.io.formats import SLIDE_SUFFIXES

DONE_FILE = "summary.json"
SUMMARY_FILE = "predict-summary.json"


@dataclass(frozen=True)
class SlideItem:
    slide_id: str
    uri: str
    mpp: float | None = None  # the slide list's (or manifest's) mpp, over the file's


@dataclass
class PredictSummary:
    out: str
    predicted: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self, reasons: bool = True) -> str:
        """The summary; ``reasons=False`` (the job, whose log printed each slide's line)
        names the failed slides without repeating why."""
        lines = [
            f"predict into {self.out}: {len(self.predicted)} predicted, "
            f"{len(self.already_done)} already done, {len(self.failed)} failed "
            f"({self.seconds:.1f}s)"
        ]
        lines += failure_lines(self.failed, "FAILED", reasons, SUMMARY_FILE)
        return "\n".join(lines)


def list_slides(source: str, split: str | None = None) -> list[SlideItem]:
    """The slides of a manifest (rows of ``split`` when given), a slide list, or a folder or
    prefix (files with a slide suffix; the ingest's ``.s2.tif`` companions left out)."""
    from foveation.data.slidelist import is_slide_list, scan_list, slide_id_of
    from foveation.errors import DataError

    if source.lower().endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        names = pq.read_schema(io.BytesIO(storage.read_bytes(source))).names
        if "label_uri" in names and "schema_version" in names:  # an ingest manifest
            from foveation.data.manifest import read_manifest

            rows = read_manifest(source).to_pylist()
            rows = [r for r in rows if split is None or r["split"] == split]
            items = [
                SlideItem(r["slide_id"], storage.absolute(r["image_uri"]), r.get("mpp"))
                for r in rows
            ]
            if not items:
                raise DataError(f"{source}: no slides in split {split!r}")
            return sorted(items, key=lambda s: s.slide_id)
    if is_slide_list(source):
        return [SlideItem(s.slide_id, s.image_uri, s.mpp) for s in scan_list(source)]
    try:
        files = storage.list_files(source, SLIDE_SUFFIXES)
    except storage.StorageError as exc:
        raise DataError(f"{source!r}: cannot list slides ({exc})") from None
    files = [f for f in files if not f.lower().endswith(".s2.tif")]
    items: dict[str, SlideItem] = {}
    for f in files:
        sid = slide_id_of(f)
        if sid in items:
            raise DataError(f"{source}: two slides are named {sid!r} ({items[sid].uri}, {f})")
        items[sid] = SlideItem(sid, f)
    if not items:
        raise DataError(f"{source!r}: no slide files ({', '.join(SLIDE_SUFFIXES)})")
    return [items[k] for k in sorted(items)]


_PREDICTORS: dict[tuple, SlidePredictor] = {}
"""Predictors loaded by ``predict_batch`` tasks, per worker process (Ray reuses a task's
worker, so the model is loaded once per process, not per slide)."""


def predict_batch(batch: dict, **settings) -> dict:
    """One Ray Data task's slides (``batch``), by this process's predictor for ``settings``.
    Tasks rather than an actor pool: a Ray Data actor holds its constructor arguments in the
    object store and restarts (Ray warns on every run that a lost argument would fail the
    restart); a task is retried with its arguments, and the model stays cached here."""
    key = tuple(sorted((k, repr(v)) for k, v in settings.items()))
    if key not in _PREDICTORS:
        _PREDICTORS.clear()
        _PREDICTORS[key] = SlidePredictor(**settings)
    return _PREDICTORS[key](batch)


class SlidePredictor:
    """The model loaded once, then one slide per row (``predict_batch``)."""

    def __init__(self, checkpoint: str, out: str, device: str, threads: int, outputs: dict):
        import torch

        from foveation.checkpoint import load_checkpoint

        torch.set_num_threads(max(1, threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.cfg, _ = load_checkpoint(checkpoint)
        self.model.to(device).eval()
        self.out, self.device, self.outputs = out, device, outputs

    def __call__(self, batch: dict) -> dict:
        from foveation.inference.outputs import predict_slide

        status, errors, seconds = [], [], []
        mpps = batch.get("mpp", [None] * len(batch["uri"]))
        for sid, uri, mpp in zip(batch["slide_id"], batch["uri"], mpps, strict=True):
            t0 = time.perf_counter()
            prefix = storage.join(self.out, str(sid))
            given = None if mpp is None or mpp != mpp else float(mpp)  # NaN: none given
            try:
                results, summary = predict_slide(
                    self.model,
                    self.cfg,
                    str(uri),
                    prefix,
                    device=self.device,
                    slide_mpp=given,
                    **self.outputs,
                )
                record = {"slide_id": str(sid), "slide_uri": str(uri), "results": results}
                record["summary"] = summary
                storage.write_bytes(
                    storage.join(prefix, DONE_FILE), json.dumps(record, indent=1).encode()
                )
                status.append("predicted")
                errors.append("")
            except Exception as exc:  # one bad slide is reported, never the end of the job
                msg = (str(exc).strip().splitlines() or [""])[0]
                status.append("failed")
                errors.append(f"{uri}: {type(exc).__name__}: {msg}")
            seconds.append(time.perf_counter() - t0)
        return {
            "slide_id": list(batch["slide_id"]),
            "status": status,
            "error": errors,
            "seconds": seconds,
        }


@dataclass
class PredictPlan:
    """What a prediction will do, decided without Ray: the slides still to predict, and the
    summary so far (those already done, those whose file is missing)."""

    todo: list[SlideItem]
    summary: PredictSummary
    started: float


def plan_prediction(
    checkpoint: str,
    source: str,
    out: str,
    split: str | None = None,
    log: Callable[[str], None] = print,
) -> PredictPlan:
    """Every check that needs no Ray, first (a bad input answers in seconds, not after Ray's
    start): the checkpoint's config, the source's slides, which are done, which are missing."""
    from foveation.checkpoint import read_config
    from foveation.data.slidelist import is_slide_list

    read_config(checkpoint)  # a missing or bad checkpoint fails here, named, before any work
    t0 = time.perf_counter()
    res = PredictSummary(out)
    slides = list_slides(source, split)
    named = is_slide_list(source)  # a list or manifest names files; a listed folder found them
    todo = []
    for s in slides:
        if storage.exists(storage.join(out, s.slide_id, DONE_FILE)):
            res.already_done.append(s.slide_id)
        elif named and not storage.exists(s.uri):
            res.failed[s.slide_id] = f"{s.uri}: no such slide file"
            log(f"  {s.slide_id}: FAILED {s.uri}: no such slide file")
        else:
            todo.append(s)
    log(
        f"predict: {len(slides)} slides from {source}: {len(res.already_done)} already done, "
        f"{len(todo)} to predict"
    )
    return PredictPlan(todo, res, t0)


def predict(
    checkpoint: str,
    source: str,
    out: str,
    split: str | None = None,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    device: str = "auto",
    outputs: dict | None = None,
    log: Callable[[str], None] = print,
    plan: PredictPlan | None = None,
) -> PredictSummary:
    """Predict every slide of ``source`` not yet finished under ``out``; see the module.
    ``plan``: ``plan_prediction``'s, when the caller made it first (to start Ray only if
    there is work)."""
    plan = plan or plan_prediction(checkpoint, source, out, split, log)
    res, todo, t0 = plan.summary, plan.todo, plan.started
    if todo:
        import ray

        # The per-slide lines below say the progress; Ray Data's bars would print hundreds.
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = device != "cpu" and gpus >= 1
        ds = ray.data.from_items([asdict(s) for s in todo]).map_batches(
            predict_batch,
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=1 if use_gpu else 0,
            fn_kwargs={
                "checkpoint": checkpoint,
                "out": out,
                "device": ("cuda" if use_gpu else "cpu") if device == "auto" else device,
                "threads": max(1, int(cpus_per_worker)),
                "outputs": outputs or {},
            },
        )
        for k, row in enumerate(ds.iter_rows(), start=1):
            sid = row["slide_id"]
            if row["status"] == "predicted":
                res.predicted.append(sid)
                log(f"  [{k}/{len(todo)}] {sid}: predicted in {row['seconds']:.1f}s")
            else:
                res.failed[sid] = row["error"]
                log(f"  [{k}/{len(todo)}] {sid}: FAILED {row['error']}")
    res.seconds = time.perf_counter() - t0
    storage.write_bytes(storage.join(out, SUMMARY_FILE), json.dumps(asdict(res), indent=1).encode())
    return res
