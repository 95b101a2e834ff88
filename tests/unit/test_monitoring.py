"""The platform's metric definitions (``foveation.monitoring``): Prometheus naming, and the
prometheus-client exporter of processes outside Ray, read back as exposition text."""

from __future__ import annotations

import subprocess
import sys

from foveation import monitoring


def test_metric_names_follow_prometheus_conventions():
    for name, d in monitoring.METRICS.items():
        assert name.startswith("foveation_") and name == name.lower(), name
        assert (d.kind == "counter") == name.endswith("_total"), name
        if name.endswith("_seconds"):  # a duration is a histogram; a point in time a gauge
            assert d.kind == "histogram" or name.endswith("_timestamp_seconds"), name
        if d.kind == "histogram":
            assert d.boundaries and list(d.boundaries) == sorted(d.boundaries), name
        else:
            assert not d.boundaries, name
        assert len(set(d.tags)) == len(d.tags) and "le" not in d.tags, name
        assert d.description and not d.description.endswith("."), name


def test_every_area_of_the_platform_has_metrics():
    areas = {name.split("_")[1] for name in monitoring.METRICS}
    assert areas == {"data", "train", "eval", "serve"}


# In a fresh interpreter: this test session may already have joined Ray (integration tests run
# first), and outside Ray is the point.
OUTSIDE_RAY = """
import ray, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from foveation import monitoring as m

m.record("foveation_serve_requests_total", route="/v1/segment", status=200)
m.record("foveation_serve_requests_total", 2, route="/v1/segment", status=200)
m.record("foveation_serve_requests_total", 0, route="/v1/jobs", status=202)  # nothing happened
m.record("foveation_serve_request_seconds", 0.02, route="/v1/segment", status=200)
m.record("foveation_eval_iou", 0.5, run="soft", **{"class": "benign"})
m.record("foveation_train_loss", 1.0)                       # a missing tag: dropped, logged
m.record("foveation_train_loss", 1.0, run="a", extra="x")   # an unknown tag: dropped
m.record("no_such_metric")                                  # never raises
m.start_http_server(0 or PORT)
text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics").read().decode()
assert text == m.exposition(), "the HTTP endpoint serves the registry"
samples = {
    (s.name, tuple(sorted(s.labels.items()))): s.value
    for f in text_string_to_metric_families(text) for s in f.samples
}
def get(name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))
assert get("ray_foveation_serve_requests_total", route="/v1/segment", status="200") == 3.0
assert get("ray_foveation_serve_requests_total", route="/v1/jobs", status="202") is None
assert get("ray_foveation_serve_request_seconds_count", route="/v1/segment", status="200") == 1
assert get("ray_foveation_serve_request_seconds_bucket", route="/v1/segment", status="200",
           le="0.025") == 1
assert get("ray_foveation_eval_iou", run="soft", **{"class": "benign"}) == 0.5
assert not any(n.startswith("ray_foveation_train_loss") for n, _ in samples), samples
assert not any(n.endswith("_created") for n, _ in samples)
assert not ray.is_initialized(), "recording must never start Ray"
print("ok")
"""


def test_outside_ray_metrics_are_served_by_prometheus_client(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = OUTSIDE_RAY.replace("PORT", str(port))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    # Each bad record is reported once, naming the metric and what was wrong.
    assert "metric foveation_train_loss not recorded: ValueError: tags []; expected ['run']" in (
        r.stderr
    )
    assert "metric no_such_metric not recorded" in r.stderr
