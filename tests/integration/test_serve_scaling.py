"""Overload and autoscaling of the Serve app for real (the session's Ray head, real HTTP):
a burst beyond the model deployment's queue bound gets fast JSON 503s, never timeouts, and
the server stays healthy; sustained load scales the model deployment from 1 to at least 2
replicas and it scales back down after the load stops (short delays in this test's config)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import png_bytes, tissue, wait_for, write_checkpoint

from foveation.raycluster import init_ray

pytestmark = pytest.mark.slow

APP = "fovscale"


@pytest.fixture(scope="module")
def served(ray_cluster, serve_port, root, tmp_path_factory):
    from ray import serve

    from serve.app import AppArgs, build_app

    init_ray(address=ray_cluster)
    tmp = tmp_path_factory.mktemp("serve-scaling")
    ckpt = write_checkpoint(str(tmp / "model"), root)
    settings = {
        "jobs": {"store": str(tmp / "jobs"), "allowed_prefixes": [str(tmp)]},
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
        "model": {"num_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 2},
        "runner": {"num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 100, "max_queued_requests": 200},
    }
    serve.run(build_app(AppArgs(checkpoint=ckpt, settings=settings)), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{serve_port}"  # the session's Serve
    finally:
        serve.delete(APP)


def running_replicas() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments["ModelServer"]
    return dep.replica_states.get("RUNNING", 0)


def post_image(client: httpx.Client, body: bytes) -> tuple[int, float, httpx.Response]:
    t = time.perf_counter()
    r = client.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
    return r.status_code, time.perf_counter() - t, r


def test_overload_answers_503_quickly_not_timeouts(served):
    body = png_bytes(tissue(192, 192))
    with httpx.Client(base_url=served, timeout=120) as c:
        assert c.post("/v1/segment", content=body, headers={"Content-Type": "image/png"}).is_success
    n = 24
    with (
        ThreadPoolExecutor(n) as pool,
        httpx.Client(base_url=served, timeout=120, limits=httpx.Limits(max_connections=n)) as c,
    ):
        results = list(pool.map(lambda _: post_image(c, body), range(n)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for code, seconds, r in results:
        if code == 503:
            assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
            assert seconds < 10, f"a 503 took {seconds:.1f} s"
    with httpx.Client(base_url=served, timeout=60) as c:
        assert c.get("/healthz").status_code == 200


def test_replicas_scale_up_under_load_and_back_down(served):
    body = png_bytes(tissue(128, 128))
    assert wait_for(lambda: running_replicas() == 1, 90, 1, "one replica at rest")
    stop = threading.Event()
    counts = {"ok": 0, "busy": 0}

    def load():
        with httpx.Client(base_url=served, timeout=120) as c:
            while not stop.is_set():
                code, _, _ = post_image(c, body)
                counts["ok" if code == 200 else "busy"] += 1
                if code != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        peak = wait_for(lambda: running_replicas() >= 2 and running_replicas(), 150, 0.5, "2+")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert peak >= 2 and counts["ok"] > 0, counts
    wait_for(lambda: running_replicas() == 1, 120, 1, "scale back down to 1")
