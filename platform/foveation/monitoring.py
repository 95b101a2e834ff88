"""Every Prometheus metric of the platform, defined once here and created lazily on first use
(nothing happens at import).

Two exporters, one set of definitions (docs/contracts.md#metrics-naming):

- inside Ray (tasks, actors, Train workers, Serve replicas, and a driver that joined Ray)
  :func:`record` goes through ``ray.util.metrics``; Ray's metrics agent on each node exports
  the series with a ``ray_`` prefix (``foveation_serve_requests_total`` is scraped as
  ``ray_foveation_serve_requests_total``) next to Ray's own metrics, so one Prometheus job
  fed by Ray's service-discovery file finds them all (``infra/prometheus/prometheus.yml``);
- outside Ray (a tool or benchmark run in-process) it goes to :func:`registry`, a
  ``prometheus_client`` registry under the same names with the same ``ray_`` prefix, so that
  dashboards and alerts need one spelling. :func:`start_http_server` exposes it (the
  ``foveation-app`` job of the shipped scrape config); :func:`exposition` renders it (tests).

Gauges inside Ray go through one keeper actor (:data:`KEEPER_REFRESH_S` says why).

Labels stay bounded: runs, classes, routes, statuses and patch scales, never a request id.
A slide job's progress is the one per-job series: set to 1 when the job ends, then dropped by
the keeper an hour later. Queue depth and in-flight requests of the Serve deployments are Ray
Serve's own gauges (``ray_serve_deployment_queued_queries``,
``ray_serve_replica_processing_queries``); the dashboards read them beside these.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "ray_"  # what Ray's metrics agent prepends; the prometheus-client path matches it

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class MetricDef:
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


def _counter(description: str, *tags: str) -> MetricDef:
    return MetricDef("counter", description, tags)


def _gauge(description: str, *tags: str) -> MetricDef:
    return MetricDef("gauge", description, tags)


def _histogram(description: str, boundaries: tuple[float, ...], *tags: str) -> MetricDef:
    return MetricDef("histogram", description, tags, boundaries)


METRICS: dict[str, MetricDef] = {
    # -- data: the reader actors of the training pipeline (data/pipeline.py) ----------------
    "foveation_data_patch_banks_total": _counter(
        "Patch banks (one per sampled location: D patches, x_r and labels) cut from slides"
    ),
    "foveation_data_bank_bytes_total": _counter("Bytes of patch banks handed to training"),
    "foveation_data_storage_bytes_total": _counter(
        "Bytes fetched from object storage by ranged GETs", "scheme"
    ),
    "foveation_data_storage_gets_total": _counter(
        "Ranged GET requests sent to object storage (retries included)", "scheme"
    ),
    "foveation_data_cache_blocks_total": _counter(
        "Blocks of the range cache looked up, by result (hit or miss)", "result"
    ),
    "foveation_data_read_seconds": _histogram(
        "Time to read one slide's patch banks for one epoch", LATENCY_BUCKETS_S
    ),
    "foveation_data_skipped_slides_total": _counter(
        "Slides skipped after a failed read and one retry", "stage"
    ),
    # -- training: Ray Train workers (training/worker.py) ----------------------------------
    "foveation_train_steps_total": _counter("Optimizer steps taken", "run", "rank"),
    "foveation_train_step_seconds": _histogram(
        "Wall time of one training step (forward, backward, optimizer)",
        STEP_BUCKETS_S,
        "run",
        "rank",
    ),
    "foveation_train_samples_per_second": _gauge(
        "Locations trained per second over the last epoch, all workers", "run"
    ),
    "foveation_train_megapixels_per_second": _gauge(
        "Megapixels (output patch area) trained per second over the last epoch", "run"
    ),
    "foveation_train_loss": _gauge("Mean training loss of the last epoch", "run"),
    "foveation_train_learning_rate": _gauge("Learning rate per parameter group", "run", "group"),
    "foveation_train_fov_weight": _gauge(
        "Mean foveation weight given to each patch scale (field of view, px) last epoch",
        "run",
        "fov",
    ),
    "foveation_train_fov_weight_entropy": _gauge(
        "Mean per-location entropy of the foveation weights last epoch (nats; log D: uniform)",
        "run",
    ),
    "foveation_train_fovnet_grad_norm": _gauge(
        "Mean gradient norm of the foveation net per step last epoch (rank 0)", "run"
    ),
    "foveation_train_val_apsm_pixels": _gauge(
        "Mean chosen field of view (APSM, px) on a validation slide after the last epoch, over "
        "all its locations (cue 'all') and by the synthetic cue map (context / texture)",
        "run",
        "cue",
    ),
    "foveation_train_val_miou": _gauge("Validation mIoU of the last epoch", "run"),
    "foveation_train_epoch": _gauge("Epochs completed", "run"),
    "foveation_train_accelerator_memory_bytes": _gauge(
        "Peak memory of a worker: allocated CUDA memory on GPU, RSS on CPU", "run", "rank"
    ),
    "foveation_train_last_step_timestamp_seconds": _gauge(
        "Unix time of the last optimizer step or validation batch (the 'training stalled' alert)",
        "run",
    ),
    "foveation_train_running": _gauge("1 while a training run is in progress, 0 after", "run"),
    # -- evaluation: the driver of jobs.evaluate (evaluation/slides.py) ----------------------------
    "foveation_eval_iou": _gauge("Per-class IoU of an evaluated run", "run", "class"),
    "foveation_eval_miou": _gauge("mIoU over all classes of an evaluated run", "run"),
    "foveation_eval_pixel_accuracy": _gauge("Pixel accuracy of an evaluated run", "run"),
    "foveation_eval_slides_total": _counter("Slides scored by evaluation", "run"),
    # -- serving: the Serve app (serve/) ----------------------------------------------------
    "foveation_serve_requests_total": _counter(
        "HTTP requests answered by the Serve ingress", "route", "status"
    ),
    "foveation_serve_request_seconds": _histogram(
        "Time the Serve ingress spent on a request", LATENCY_BUCKETS_S, "route", "status"
    ),
    "foveation_serve_rejected_total": _counter(
        "Requests refused before any inference (4xx, or 503 when overloaded)", "route", "reason"
    ),
    "foveation_serve_tile_batch_locations": _histogram(
        "Locations (patch banks) per batched segmenter forward in a model replica",
        BATCH_BUCKETS,
    ),
    "foveation_serve_tile_batch_requests": _histogram(
        "Requests whose tiles shared one batched forward", BATCH_BUCKETS
    ),
    "foveation_serve_jobs_total": _counter("Whole-slide jobs that reached a final state", "state"),
    "foveation_serve_jobs_running": _gauge("Whole-slide jobs running in the job runner"),
    "foveation_serve_jobs_queued": _gauge("Whole-slide jobs waiting for a job thread"),
    "foveation_serve_job_progress_ratio": _gauge(
        "Progress of a whole-slide job, 0 to 1 (1 once it ended)", "job"
    ),
}


# ------------------------------------------------------------------------- the two exporters


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()


@functools.cache
def _ray_metric(name: str) -> Any:
    from ray.util import metrics as rm

    d = METRICS[name]
    if d.kind == "counter":
        return rm.Counter(name, d.description, tag_keys=d.tags)
    if d.kind == "gauge":
        return rm.Gauge(name, d.description, tag_keys=d.tags)
    return rm.Histogram(name, d.description, boundaries=list(d.boundaries), tag_keys=d.tags)


@functools.cache
def registry():
    """The ``prometheus_client`` registry of this process's metrics recorded outside Ray."""
    import prometheus_client

    prometheus_client.disable_created_metrics()  # Ray exports no *_created series either
    return prometheus_client.CollectorRegistry()


@functools.cache
def _client_metric(name: str) -> Any:
    import prometheus_client as pc

    d = METRICS[name]
    full = PREFIX + name
    if d.kind == "counter":  # prometheus_client appends _total itself
        return pc.Counter(full.removesuffix("_total"), d.description, d.tags, registry=registry())
    if d.kind == "gauge":
        return pc.Gauge(full, d.description, d.tags, registry=registry())
    return pc.Histogram(full, d.description, d.tags, registry=registry(), buckets=d.boundaries)


_METHOD = {"counter": "inc", "gauge": "set", "histogram": "observe"}
GAUGE_TTL_S = 7 * 24 * 3600.0


def record(name: str, value: float = 1.0, ttl_s: float = GAUGE_TTL_S, **tags: Any) -> None:
    """Count (counter), set (gauge) or observe (histogram) ``value`` on metric ``name``.

    Inside Ray a gauge is set through the gauge keeper actor, which holds it until it is set
    again or for ``ttl_s`` seconds (a week by default): the last loss of a finished run or
    the mIoU of an evaluation stays on the dashboards after the process that set it is gone,
    and the keeper's memory stays bounded by what was set in the last ``ttl_s``.

    Never fails the caller: a metric is worth less than the request or step it describes, so
    a bad name or tag is logged once and dropped."""
    try:
        d = METRICS[name]
        tags = {k: str(v) for k, v in tags.items()}
        if set(tags) != set(d.tags):
            raise ValueError(f"tags {sorted(tags)}; expected {sorted(d.tags)}")
        if d.kind == "counter" and value <= 0:
            return  # Ray's counters refuse 0; nothing happened
        if not _in_ray():
            m = _client_metric(name)
            getattr(m.labels(**tags) if tags else m, _METHOD[d.kind])(value)
        elif d.kind == "gauge":
            _keeper().set.remote(name, float(value), tags, ttl_s)
        else:
            getattr(_ray_metric(name), _METHOD[d.kind])(value, tags=tags or None)
    except Exception as exc:
        _warn_once(name, f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------- the gauge keeper

KEEPER_NAME, KEEPER_NAMESPACE = "foveation-gauges", "foveation"
KEEPER_REFRESH_S = 5.0
"""Why a keeper: Ray's metrics agent drops a gauge series that its process has not set for
two export intervals (2 x 10 s; ray._private.telemetry.open_telemetry_metric_recorder), so a
gauge set once (a run's final loss, an evaluation's IoU, a queue that stopped changing)
vanishes within 20 s, and with it every panel and alert reading it. Counters and histograms
are cumulative and kept. The keeper, one detached actor per cluster, sets every gauge it holds
again every ``KEEPER_REFRESH_S`` seconds."""


def _keeper_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class GaugeKeeper:
        def __init__(self) -> None:
            import threading

            self.values: dict[tuple, tuple[float, float]] = {}  # key -> (value, expiry)
            self.lock = threading.Lock()
            threading.Thread(target=self._refresh_forever, daemon=True).start()

        def set(self, name: str, value: float, tags: dict, ttl_s: float) -> None:
            import time

            key = (name, tuple(sorted(tags.items())))
            with self.lock:  # held while setting: a refresh never writes an older value back
                self.values[key] = (value, time.monotonic() + ttl_s)
                self._set(key, value)

        def _set(self, key: tuple, value: float) -> None:
            name, tags = key
            try:
                _ray_metric(name).set(value, tags=dict(tags) or None)
            except Exception as exc:  # a bad series must not stop the others
                _warn_once(name, f"{type(exc).__name__}: {exc}")

        def _refresh_forever(self) -> None:
            import time

            while True:
                time.sleep(KEEPER_REFRESH_S)
                now = time.monotonic()
                with self.lock:
                    for key in [k for k, (_, end) in self.values.items() if end < now]:
                        del self.values[key]
                    for key, (value, _) in self.values.items():
                        self._set(key, value)

    return GaugeKeeper


_KEEPER: dict[str, Any] = {}


def _keeper():
    """This cluster's gauge keeper (created by the first process that sets a gauge). The
    handle is cached per Ray job: a new job (a test session joining again) looks it up anew."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    if _KEEPER.get("job") != job:
        _KEEPER["handle"] = (
            _keeper_class()
            .options(
                name=KEEPER_NAME,
                namespace=KEEPER_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                # On the head node, as Ray Train's own state actor: a worker node can be
                # scaled away (and a restarted keeper starts empty); and out of the placement
                # group of the Train worker or Tune trial that happens to create it.
                resources={"node:__internal_head__": 0.001},
                scheduling_strategy="DEFAULT",
            )
            .remote()
        )
        _KEEPER["job"] = job
    return _KEEPER["handle"]


@functools.cache
def _warn_once(name: str, error: str) -> None:
    log.warning("metric %s not recorded: %s", name, error)


def exposition() -> str:
    """This process's outside-Ray metrics as Prometheus exposition text."""
    import prometheus_client

    return prometheus_client.generate_latest(registry()).decode()


def start_http_server(port: int, addr: str = "127.0.0.1") -> None:
    """Serve :func:`exposition` at ``http://addr:port/metrics`` from a daemon thread (for a
    long-lived process outside Ray; the scrape config's ``foveation-app`` job)."""
    import prometheus_client

    prometheus_client.start_http_server(port, addr=addr, registry=registry())
