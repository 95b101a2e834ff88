"""The Serve app for real: the session's Ray head, Serve on a free port, real HTTP (httpx),
the checkpoint and a slide in the local S3 endpoint. /v1/segment against in-process
inference, every bad input the contract names, then a good request, a whole-slide job (OME-TIFF,
GeoJSON), cancelling, and a job that survives the job runner's replica being killed."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time

import httpx
import numpy as np
import pytest
from serve_helpers import (
    png_bytes,
    png_zero_size,
    segment_load,
    tiff_declaring,
    tissue,
    wait_for,
    wait_for_job,
    write_checkpoint,
    write_slide,
)

from foveation.io import storage
from foveation.raycluster import init_ray

pytestmark = pytest.mark.slow

TOKEN = "test-token-7f3a"
APP = "fov"


@pytest.fixture(scope="module")
def served(ray_cluster, s3_endpoint, serve_port, root, tmp_path_factory):
    import boto3
    from ray import serve

    from serve.app import AppArgs, build_app

    init_ray(address=ray_cluster)  # forwards the S3 endpoint and credentials to the workers
    tmp = tmp_path_factory.mktemp("serve")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket="serving"
    )
    ckpt = write_checkpoint("s3://serving/models/tiny", root)
    slides = tmp / "slides"
    slides.mkdir()
    small = tissue(320, 416, seed=1)
    write_slide(small, str(slides / "small.tif"))
    storage.upload_file(slides / "small.tif", "s3://serving/slides/small.tif")
    big = tissue(1536, 1536, seed=2)
    write_slide(big, str(slides / "big.tif"))
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    settings = {
        "limits": {"max_body_bytes": 1 << 20, "max_pixels": 2_000_000, "body_idle_timeout_s": 15},
        "auth": {"token_file": str(token_file)},
        "jobs": {
            "store": "s3://serving/jobs",
            "allowed_prefixes": [str(slides), "s3://serving/slides/"],
            "progress_interval_s": 0.2,
            "geojson_max_side": 4096,
            "max_queued": 1,
            "checkpoint_interval_s": 0,
        },
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model": {"num_cpus": 0.5, "max_ongoing_requests": 4, "max_queued_requests": 16},
        "runner": {"num_cpus": 0.5},
    }
    port = serve_port  # the session's Serve
    serve.run(build_app(AppArgs(checkpoint=ckpt, settings=settings)), name=APP, route_prefix="/")
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    try:
        yield {
            "client": client,
            "settings": settings,
            "checkpoint": ckpt,
            "slides": slides,
            "small": small,
            "big": big,
            "port": port,
        }
    finally:
        client.close()
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(served):
    """The same checkpoint, loaded in this process."""
    from foveation.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(served["checkpoint"])
    return model, cfg


def in_process_mask(reference, img):
    from foveation.serving.runtime import segment_image

    model, cfg = reference
    return segment_image(model, cfg, img).mask


def decode_mask(content: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(content)))


def test_health_docs_and_openapi(served):
    c = served["client"]
    r = httpx.get(f"http://127.0.0.1:{served['port']}/healthz", timeout=30)  # no token needed
    assert r.status_code == 200, r.text
    assert r.json()["model"]["class_names"] == ["benign", "grade3", "grade4", "grade5"]
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/jobs", "/v1/jobs/{job_id}", "/healthz"} <= set(paths)


def test_segment_returns_the_in_process_mask(served, reference):
    c, img = served["client"], tissue(200, 264, seed=3)
    want = in_process_mask(reference, img)
    assert len(np.unique(want)) >= 2, "test image should give several classes"

    r = c.post("/v1/segment", content=png_bytes(img), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    got = decode_mask(r.content)
    assert got.shape == want.shape
    assert (got == want).mean() >= 0.9999, f"{(got != want).sum()} pixels differ"
    fractions = json.loads(r.headers["x-class-fractions"])
    assert abs(fractions["grade3"] - (want == 1).mean()) < 1e-3

    # the same image as a multipart upload, JSON answer with the APSM
    files = {"image": ("x.png", png_bytes(img), "image/png")}
    r = c.post("/v1/segment", params={"format": "json", "apsm": "true"}, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["width"] == 264 and body["height"] == 200
    for k, name in enumerate(body["class_names"]):
        assert abs(body["class_fractions"][name] - (want == k).mean()) < 1e-3
    apsm = np.asarray(body["apsm"]["values"])
    s = body["apsm"]["xr_scale"]
    assert apsm.shape == (-(-200 // s), -(-264 // s))  # the x_r grid: ceil
    fovs = reference[1].patches.fovs
    assert fovs[0] - 0.01 <= apsm.min() and apsm.max() <= fovs[-1] + 0.01


def _error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["message"] and err["status"] == status
    if code:
        assert err["code"] == code, err
    return err


def test_every_bad_input_is_a_clear_4xx_and_the_server_stays_healthy(served):
    c, slides = served["client"], served["slides"]
    good = png_bytes(tissue(64, 64))
    png = {"Content-Type": "image/png"}
    _error_of(
        c.post("/v1/segment", content=b"not an image at all", headers=png), 400, "not_an_image"
    )
    _error_of(c.post("/v1/segment", content=good[: len(good) // 2], headers=png), 400)
    _error_of(c.post("/v1/segment", content=png_zero_size(), headers=png), 400)
    err = _error_of(
        c.post(
            "/v1/segment",
            content=tiff_declaring(100_000, 100_000),
            headers={"Content-Type": "image/tiff"},
        ),
        413,
        "too_many_pixels",
    )
    assert "pixels" in err["message"]
    _error_of(
        c.post("/v1/segment", content=good, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    _error_of(c.post("/v1/segment", content=b"", headers=png), 400, "empty_body")
    _error_of(c.post("/v1/segment", content=b"\0" * (2 << 20), headers=png), 413, "body_too_large")
    _error_of(c.post("/v1/segment", files={"other": ("x.png", good, "image/png")}), 422)
    _error_of(c.post("/v1/segment", params={"format": "xml"}, content=good, headers=png), 422)
    for auth in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        _error_of(c.post("/v1/segment", content=good, headers=png | auth), 401, "unauthorized")
        _error_of(c.get(f"/v1/jobs/{'0' * 32}", headers=auth), 401)
    # jobs: missing field, bad and disallowed URIs, a missing slide, unknown ids
    _error_of(c.post("/v1/jobs", json={}), 422, "invalid_request")
    _error_of(
        c.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422
    )
    for uri, status in (
        ("file:///etc/passwd", 403),
        ("/etc/passwd", 403),
        (f"{slides}/../../../etc/passwd", 403),
        ("s3://another-bucket/slides/x.tif", 403),
        ("s3://serving/slides/../jobs/x", 422),
        ("http://example.com/x.tif", 422),
    ):
        _error_of(c.post("/v1/jobs", json={"slide_uri": uri}), status)
    _error_of(
        c.post("/v1/jobs", json={"slide_uri": f"{slides}/missing.tif"}), 404, "slide_not_found"
    )
    (slides / "junk.tif").write_bytes(b"this is no tiff")
    _error_of(c.post("/v1/jobs", json={"slide_uri": f"{slides}/junk.tif"}), 422, "unreadable_slide")
    _error_of(c.get(f"/v1/jobs/{'ab' * 16}"), 404, "unknown_job")
    _error_of(c.get("/v1/jobs/not-a-job"), 404, "unknown_job")
    _error_of(c.delete(f"/v1/jobs/{'cd' * 16}"), 404, "unknown_job")
    _error_of(c.get("/v1/nothing-here"), 404)

    # ... and the server still answers a good request
    assert c.get("/healthz").status_code == 200
    r = c.post("/v1/segment", content=good, headers=png)
    assert r.status_code == 200 and decode_mask(r.content).shape == (64, 64)


def _raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head.encode() + b"\r\n" + body)
    return s


def _read_all(s: socket.socket, deadline: float) -> bytes:
    """What the server sends until it closes the connection (or the deadline passes)."""
    chunks = []
    while True:  # at least one read, however late
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except TimeoutError:
            if time.monotonic() >= deadline:
                break
            continue
        except OSError:  # reset by the server: closed
            return b"".join(chunks) + b"<closed>"
        if not data:
            return b"".join(chunks) + b"<closed>"
        chunks.append(data)
    return b"".join(chunks)


def test_stalled_and_oversized_clients_cannot_starve_the_server(served):
    """200 clients send the headers and 110 bytes of a 1 MB upload (with the token), then
    nothing; 50 more send no token, and 20 hang up mid-body. Meanwhile /healthz and a 1 MP
    /v1/segment answer within 2x their unloaded latency (medians, measured here); the stalled
    ones get a JSON 408 and their connections are closed within the idle timeout (15 s here:
    the loaded measurement alone takes about 10 s on a slow 2-core CI machine),
    the tokenless ones a 401 before their body is read."""
    import io
    import statistics

    from PIL import Image

    c, port = served["client"], served["port"]
    buf = io.BytesIO()
    Image.fromarray(tissue(1000, 1000, seed=3)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()

    def median_s(fn, n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            r = fn()
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        return statistics.median(times)

    def health():
        return c.get("/healthz")

    def segment():
        return c.post("/v1/segment", content=jpeg, headers={"Content-Type": "image/jpeg"})

    segment()  # warm
    health0, segment0 = median_s(health, 7), median_s(segment, 3)

    def head(auth: bool, path: str = "/v1/segment") -> str:
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: image/png",
            "Content-Length: 1000000",
        ]
        if auth:
            lines.append(f"Authorization: Bearer {TOKEN}")
        return "\r\n".join(lines) + "\r\n"

    t_stall = time.monotonic()
    stalled = [_raw_request(port, head(True), b"\x89PNG" + b"\0" * 106) for _ in range(200)]
    tokenless = [_raw_request(port, head(False, "/v1/jobs"), b"{" * 110) for _ in range(50)]
    # 20 clients that hang up half-way, once their requests are in: 499s, not 500s
    hangups = [_raw_request(port, head(True), b"\0" * 110) for _ in range(20)]
    try:
        time.sleep(0.5)
        for s in hangups:
            s.close()
        health1, segment1 = median_s(health, 7), median_s(segment, 3)
        loaded = time.monotonic() - t_stall
        # 2x the unloaded median, and 100 ms of slack on /healthz: on 2 cores a 15 ms answer
        # took 70 ms once while 270 sockets were being accepted, which is scheduling, not
        # starvation (that shows as 10-30 s timeouts); the 1 MP segment's 2x has no slack.
        assert health1 <= 2 * health0 + 0.1, (health0, health1)
        assert segment1 <= 2 * segment0, (segment0, segment1)
        assert loaded < 15, f"measuring took {loaded:.1f} s: past the idle timeout, not a test"
        refused = [_read_all(s, time.monotonic() + 2) for s in tokenless]
        assert all(a.startswith(b"HTTP/1.1 401") for a in refused), refused[0][:300]
        assert all(a.endswith(b"<closed>") for a in refused), refused[0][-300:]
        deadline = t_stall + 15 + 4  # the idle timeout, and 4 s for 200 answers on 2 cores
        answers = [_read_all(s, deadline) for s in stalled]
    finally:
        for s in stalled + tokenless:
            s.close()
    closed = sum(a.endswith(b"<closed>") for a in answers)
    timeouts = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
    assert closed == 200 and timeouts == 200, (closed, timeouts, answers[0][:300])
    body = json.loads(answers[0].split(b"\r\n\r\n", 1)[1].removesuffix(b"<closed>"))
    assert body["error"]["code"] == "body_timeout" and body["error"]["request_id"] != "-"
    print(
        f"healthz {health0 * 1e3:.1f} -> {health1 * 1e3:.1f} ms, 1 MP segment "
        f"{segment0:.2f} -> {segment1:.2f} s with 200 stalled connections"
    )
    assert c.get("/healthz").status_code == 200


def test_the_token_is_checked_before_the_body_is_read(served):
    """A /v1/jobs body without a token is never read (401 at once, even for 50 MB of it or
    for malformed JSON), and a job body has a small limit of its own."""
    c, port = served["client"], served["port"]
    head = (
        "\r\n".join(
            [
                "POST /v1/jobs HTTP/1.1",
                f"Host: 127.0.0.1:{port}",
                "Content-Type: application/json",
                "Content-Length: 50000000",
            ]
        )
        + "\r\n"
    )
    s = _raw_request(port, head, b"{not json")
    t = time.monotonic()
    got = _read_all(s, t + 10)
    s.close()
    assert got.startswith(b"HTTP/1.1 401") and time.monotonic() - t < 5, got[:300]
    r = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", content=b"{not json", timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["x-request-id"] == r.json()["error"]["request_id"]
    err = _error_of(c.post("/v1/jobs", content=b" " * 20000), 413, "body_too_large")
    assert "16384" in err["message"]


def test_whole_slide_job_from_s3(served, reference):
    import pyvips

    c = served["client"]
    r = c.post("/v1/jobs", json={"slide_uri": "s3://serving/slides/small.tif"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and r.headers["location"].endswith(job["id"])
    done = wait_for_job(c, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1
    res = done["results"]
    assert set(res) >= {"labels", "heatmap", "probabilities", "apsm", "geojson"}
    assert all(u.startswith("s3://serving/jobs/") for u in res.values())

    # the label map: an OME-TIFF that opens at every level, equal to in-process inference
    local = str(served["slides"].parent / "labels.ome.tif")
    storage.download_file(res["labels"], local)
    top = pyvips.Image.new_from_file(local)
    assert "<OME" in top.get("image-description")
    n = top.get("n-subifds")
    assert n >= 1
    sizes = [(top.width, top.height)]
    for k in range(n):
        lv = pyvips.Image.new_from_file(local, subifd=k)
        sizes.append((lv.width, lv.height))
        assert lv.max() <= 3
    assert all(b[0] == (a[0] + 1) // 2 or b[0] == a[0] // 2 for a, b in itertools.pairwise(sizes))
    mask = top.numpy()
    want = in_process_mask(reference, served["small"])
    assert mask.shape == want.shape
    assert (mask == want).mean() >= 0.9999

    # the GeoJSON: QuPath's form, one valid MultiPolygon per class (merged across tiles),
    # per-class polygon areas match the mask's pixel counts
    from shapely.geometry import shape

    coll = json.loads(storage.read_bytes(res["geojson"]))
    assert coll["type"] == "FeatureCollection" and coll["features"]
    names_seen = [f["properties"]["classification"]["name"] for f in coll["features"]]
    assert len(names_seen) == len(set(names_seen))
    for f in coll["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert f["geometry"]["type"] == "MultiPolygon"
        assert shape(f["geometry"]).is_valid, f["properties"]["classification"]["name"]
    areas = {
        f["properties"]["classification"]["name"]: shape(f["geometry"]).area
        for f in coll["features"]
    }
    names = reference[1].evaluation.class_names
    for k, name in enumerate(names):
        assert abs(areas.get(name, 0) - (mask == k).sum()) <= 0.005 * mask.size, name
    fr = done["summary"]["class_fractions"]
    assert abs(fr["grade3"] - (mask == 1).mean()) < 1e-6

    heat_local = str(served["slides"].parent / "heat.ome.tif")
    storage.download_file(res["probabilities"], heat_local)
    heat = pyvips.Image.new_from_file(heat_local, n=-1)
    assert heat.get("page-height") * 4 == heat.height

    # every result over HTTP, behind the token, byte for byte what the store holds
    assert set(done["downloads"]) == set(res)
    for name, route in done["downloads"].items():
        got = c.get(route)
        assert got.status_code == 200, (name, got.text[:300])
        assert got.content == storage.read_bytes(res[name]), name
        want_type = "application/geo+json" if name == "geojson" else "image/tiff"
        assert got.headers["content-type"] == want_type, name
    # or, asked for, a 307 to a presigned URL: the download goes to S3 without the token
    moved = c.get(done["downloads"]["geojson"], params={"redirect": "true"})
    assert moved.status_code == 307, moved.text[:300]
    signed = httpx.get(moved.headers["location"])
    assert signed.status_code == 200 and signed.content == storage.read_bytes(res["geojson"])
    missing = _error_of(c.get(f"/v1/jobs/{job['id']}/results/nothing"), 404, "unknown_result")
    assert "labels" in missing["message"]
    _error_of(httpx.get(f"{c.base_url}{done['downloads']['labels']}"), 401, "unauthorized")


def test_cancel_a_running_and_a_queued_job(served):
    c, big = served["client"], str(served["slides"] / "big.tif")
    first = c.post("/v1/jobs", json={"slide_uri": big}).json()
    second = c.post("/v1/jobs", json={"slide_uri": big}).json()  # queued behind the first
    wait_for(
        lambda: c.get(f"/v1/jobs/{first['id']}").json()["state"] == "running", 60, 0.1, "running"
    )
    # one job waits already (serve.jobs.max_queued = 1): a third is refused, not queued
    err = _error_of(c.post("/v1/jobs", json={"slide_uri": big}), 503, "jobs_full")
    assert "max_queued" in err["message"]
    r = c.delete(f"/v1/jobs/{second['id']}")
    assert r.status_code == 202 and r.json()["state"] == "cancelled", r.text
    r = c.delete(f"/v1/jobs/{first['id']}")
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    assert wait_for_job(c, first["id"])["state"] == "cancelled"
    assert c.get(f"/v1/jobs/{second['id']}").json()["state"] == "cancelled"
    err = _error_of(c.delete(f"/v1/jobs/{second['id']}"), 409, "job_finished")
    assert "cancelled" in err["message"]


def test_a_job_survives_a_restart_of_the_job_runner(served):
    from ray import serve

    c = served["client"]
    big = str(served["slides"] / "big.tif")
    job = c.post("/v1/jobs", json={"slide_uri": big}).json()
    runner = serve.get_deployment_handle("SlideJobRunner", app_name=APP)
    pid = runner.pid.remote().result(timeout_s=30)
    # progress is 0.95 x the rows done: kill the replica at 60% of the rows
    wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["progress"] >= 0.57, 90, 0.05, "60%")
    os.kill(pid, signal.SIGKILL)  # the replica dies mid-job; Serve starts a new one
    done = wait_for_job(c, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2, done
    assert runner.pid.remote().result(timeout_s=60) != pid
    # it continued from the rows saved in the store, not from the start
    again = wait_for_job(c, c.post("/v1/jobs", json={"slide_uri": big}).json()["id"])
    resumed, whole = done["summary"], again["summary"]
    # the slide ran as a Ray task, not in the runner replica that was killed
    assert resumed["worker"]["pid"] != pid, resumed["worker"]
    assert resumed["resumed_from_row"] >= 0.5 * whole["height"], (resumed, whole)
    assert resumed["locations"] < 0.5 * whole["locations"], (resumed, whole)
    assert resumed["class_fractions"] == whole["class_fractions"]


def test_a_model_replica_killed_under_load_loses_no_request(served):
    """8 clients send requests while the model replica is killed (SIGKILL) and Serve starts
    another: every request gets 200 or 503 (retry), none hangs, none gets a 500."""
    from ray import serve

    model = serve.get_deployment_handle("ModelServer", app_name=APP)
    pid = model.pid.remote().result(timeout_s=30)
    with segment_load(served["port"], TOKEN) as outcomes:
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        killed_at = len(outcomes)
        wait_for(lambda: model.pid.remote().result(timeout_s=60) != pid, 120, 1, "a new replica")
        wait_for(lambda: outcomes[killed_at:].count("200") >= 8, 60, 0.5, "answers again")
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    served_or_retry = counts.get("200", 0) + counts.get("503", 0)
    assert "500" not in counts and served_or_retry >= 0.99 * len(outcomes), counts
    print(f"replica killed under 8 clients: {counts}")


def test_deploying_a_new_checkpoint_under_load_fails_no_request(served, root):
    """`serve deploy` of another checkpoint (here serve.run of the same app with it) while 8
    clients send requests: the rolling update surges (``max_surge_percent``), so the old model
    and ingress replicas serve until their replacements run, and every request gets a 200."""
    import torch
    from ray import serve

    from foveation.checkpoint import save_checkpoint
    from foveation.config import load_config
    from foveation.models.foveated import build_model
    from serve.app import AppArgs, build_app

    cfg = load_config(root / "jobs/configs/tiny.toml")
    torch.manual_seed(7)
    new = save_checkpoint("s3://serving/models/tiny-v2", build_model(cfg), cfg, {"step": 1})
    with segment_load(served["port"], TOKEN) as outcomes:
        time.sleep(1)
        serve.run(
            build_app(AppArgs(checkpoint=new, settings=served["settings"])),
            name=APP,
            route_prefix="/",
        )
        model = serve.get_deployment_handle("ModelServer", app_name=APP)
        wait_for(
            lambda: model.info.remote().result(timeout_s=30)["checkpoint"] == new,
            120,
            1,
            "the new checkpoint served",
        )
        time.sleep(1)
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert counts.get("200", 0) == len(outcomes) and len(outcomes) >= 16, counts
    print(f"rolling update under 8 clients: {counts}")


def test_the_token_never_reaches_a_log(served):
    """Requests with the right and a wrong token were made above; no log file of the
    session's Ray (driver, controller, proxy, replicas) holds either."""
    import pathlib

    import ray

    c = served["client"]
    c.get("/healthz")
    c.get(f"/v1/jobs/{'0' * 32}", headers={"Authorization": "Bearer wrong-secret-in-header"})
    session = pathlib.Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert any("Ingress" in p.name or "serve" in str(p) for p in files)
    for p in files:
        data = p.read_bytes()
        assert TOKEN.encode() not in data, p
        assert b"wrong-secret-in-header" not in data, p


def test_metrics_reach_rays_prometheus_endpoint(served):
    """The ingress's and the model replica's metrics are exported by Ray's metrics agent
    (Prometheus text, ray_ prefix), after the requests of the tests above."""
    import ray

    c = served["client"]
    body = png_bytes(tissue(64, 64))
    c.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
    # One client that hangs up mid-body, on an idle server, once its request has had a second
    # to reach the ingress: a 499. (The stalled-clients test's hang-ups may be dropped by the
    # proxy before they reach the app when 270 connections queue on 2 cores.)
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1:{served['port']}\r\n"
        f"Content-Type: image/png\r\nContent-Length: 100000\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
    )
    hangup = _raw_request(served["port"], head, b"\x89PNG" + b"\0" * 106)
    time.sleep(1.0)
    hangup.close()
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = (
        "ray_foveation_serve_requests_total",
        "ray_foveation_serve_request_seconds_bucket",
        "ray_foveation_serve_tile_batch_locations_bucket",
        "ray_foveation_serve_jobs_total",
    )

    def exported():  # the 499 of the hang-up too (the agent exports every few s)
        text = httpx.get(url, timeout=10).text
        return all(name in text for name in wanted) and 'status="499"' in text and text

    text = wait_for(exported, 60, 2, f"{wanted} at {url}")
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_foveation_serve_requests_total")]
    line = next(ln for ln in lines if 'route="/v1/segment"' in ln and 'status="200"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 1
    # a client that hung up mid-body is a 499, never a 500 (nothing above should be a 500)
    assert any('status="499"' in ln for ln in lines), lines
    errors = [ln for ln in lines if 'status="500"' in ln]
    assert not errors, errors


def test_a_route_whose_deployment_has_no_replica_answers_503_in_bounded_time(served):
    """The slide-job runner with no live replica (here: it asks for a resource no node has, as
    when its node is lost and no other can host it): ``POST /v1/jobs`` answers 503
    ``no_replica`` with ``Retry-After`` within ``limits.replica_wait_s``, never hangs; the
    model's routes on the same ingress still answer."""
    import copy

    from ray import serve
    from ray.serve.api import _run  # serve.run without waiting for the app to be RUNNING

    from serve.app import AppArgs, build_app

    settings = copy.deepcopy(served["settings"])
    settings["limits"]["replica_wait_s"] = 3
    settings["runner"] = {"num_cpus": 0.5, "resources": {"foveation_no_such_node": 1}}
    _run(
        build_app(AppArgs(checkpoint=served["checkpoint"], settings=settings)),
        name="norunner",
        route_prefix="/norunner",
        _blocking=False,
    )
    c = served["client"]
    try:
        deadline = time.monotonic() + 180
        while c.get("/norunner/healthz").status_code != 200:  # the ingress and model are up
            assert time.monotonic() < deadline, "the app's ingress never answered"
            time.sleep(1)
        t0 = time.monotonic()
        r = c.post("/norunner/v1/jobs", json={"slide_uri": "s3://serving/slides/small.tif"})
        took = time.monotonic() - t0
        err = _error_of(r, 503, "no_replica")
        assert r.headers["Retry-After"] == "3" and "retry" in err["message"]
        assert 3 <= took < 3 + 5, took  # the bound, not a hang (35 s and more before)
        assert c.get("/norunner/healthz").status_code == 200
    finally:
        serve.delete("norunner")
