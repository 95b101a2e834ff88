"""Every Prometheus metric of the platform, defined once here and created lazily on first use
(nothing happens at import).

Code inside Ray (tasks, actors, Train workers, Serve replicas) records through
``ray.util.metrics``; Ray's metrics agent exports the series with a ``ray_`` prefix (so
``foveation_serve_requests_total`` is scraped as ``ray_foveation_serve_requests_total``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class MetricDef:
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, MetricDef] = {
    "foveation_serve_requests_total": MetricDef(
        "counter", "HTTP requests answered by the Serve ingress", ("route", "status")
    ),
    "foveation_serve_request_seconds": MetricDef(
        "histogram",
        "Time the Serve ingress spent on a request",
        ("route",),
        tuple(LATENCY_BUCKETS_S),
    ),
    "foveation_serve_tile_batch_locations": MetricDef(
        "histogram",
        "Locations (patch banks) per batched segmenter forward in a model replica",
        (),
        tuple(BATCH_BUCKETS),
    ),
    "foveation_serve_tile_batch_requests": MetricDef(
        "histogram", "Requests whose tiles shared one batched forward", (), tuple(BATCH_BUCKETS)
    ),
    "foveation_serve_jobs_total": MetricDef(
        "counter", "Whole-slide jobs that reached a final state", ("state",)
    ),
    "foveation_serve_jobs_running": MetricDef(
        "gauge", "Whole-slide jobs running in the job runner", ()
    ),
}


@functools.cache
def metric(name: str) -> Any:
    """The ``ray.util.metrics`` object of ``name`` (created on first use, then cached)."""
    from ray.util import metrics as rm

    d = METRICS[name]
    if d.kind == "counter":
        return rm.Counter(name, d.description, tag_keys=d.tags)
    if d.kind == "gauge":
        return rm.Gauge(name, d.description, tag_keys=d.tags)
    return rm.Histogram(name, d.description, boundaries=list(d.boundaries), tag_keys=d.tags)


def record(name: str, value: float = 1.0, **tags: str) -> None:
    """Count, set or observe ``value`` on metric ``name``; never fails the caller."""
    try:
        m = metric(name)
        kind = METRICS[name].kind
        if kind == "counter":
            m.inc(value, tags=tags or None)
        elif kind == "gauge":
            m.set(value, tags=tags or None)
        else:
            m.observe(value, tags=tags or None)
    except Exception:  # metrics must never break serving (e.g. outside Ray)
        pass
