"""The platform's metric definitions: Prometheus naming, created lazily, never failing the
caller and never starting Ray when recorded outside it."""

from foveation import monitoring


def test_metric_names_follow_prometheus_conventions():
    for name, d in monitoring.METRICS.items():
        assert name.startswith("foveation_") and name == name.lower()
        assert (d.kind == "counter") == name.endswith("_total"), name
        if name.endswith("_seconds"):
            assert d.kind == "histogram"
        if d.kind == "histogram":
            assert list(d.boundaries) == sorted(d.boundaries) and d.boundaries


def test_recording_outside_ray_is_harmless():
    # In a fresh interpreter: this test session may already have joined Ray (integration
    # tests run first), and the point is that recording never starts it.
    import subprocess
    import sys

    code = """
import ray
from foveation import monitoring
monitoring.record("foveation_serve_requests_total", route="/v1/segment", status="200")
monitoring.record("foveation_serve_request_seconds", 0.01, route="/v1/segment")
monitoring.record("no_such_metric")  # never raises
assert not ray.is_initialized()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
