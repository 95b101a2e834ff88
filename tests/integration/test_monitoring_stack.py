"""The monitoring stack for real: a Prometheus (Debian's package) started with the shipped
``infra/prometheus`` config scrapes the session's local Ray (through the service-discovery
file Ray's dashboard writes) while a workload exercises every dashboard: a short training
from S3 with one unreadable slide, an evaluation, image requests (one refused) and one slide
job on the Serve app, plus a process outside Ray on the ``foveation-app`` job. Then every
panel query of every shipped dashboard runs through Prometheus's HTTP API and must return at
least one series, and the shipped alert rules must evaluate without errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port, png_bytes, tissue, wait_for, wait_for_job, write_slide

from foveation.config import load_config
from foveation.io import storage
from foveation.raycluster import init_ray

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
# What Grafana substitutes in panel queries, for a query run straight against Prometheus.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "10s", "$run": ".+"}


def dashboards() -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text())
        for p in sorted((ROOT / "infra/grafana/dashboards").glob("*.json"))
    }


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables substituted) of every panel."""
    out = []
    for name, d in dashboards().items():
        for p in d["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"{name}/{p['title']}: unknown variable in {expr}"
                out.append((name, p["title"], expr))
    return out


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, ray_temp_dir, tmp_path_factory):
    """Prometheus with the shipped config; only the service-discovery path is changed, to the
    one this session's head node (started with its own --temp-dir) writes."""
    conf = tmp_path_factory.mktemp("prometheus") / "infra"
    shutil.copytree(ROOT / "infra/prometheus", conf)
    text = (conf / "prometheus.yml").read_text()
    assert text.count(SD_FILE) == 1, "the shipped config should read Ray's default SD file"
    (conf / "prometheus.yml").write_text(
        text.replace(SD_FILE, os.path.join(ray_temp_dir, "prom_metrics_service_discovery.json"))
    )
    app_port = free_port()
    (conf / "targets/app.json").write_text(
        json.dumps([{"targets": [f"127.0.0.1:{app_port}"], "labels": {"service": "test"}}])
    )
    port = free_port()
    log = open(conf.parent / "prometheus.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={conf / 'prometheus.yml'}",
            f"--storage.tsdb.path={conf.parent / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 60, 0.5, "Prometheus ready")
        yield {"url": url, "app_port": app_port, "log": conf.parent / "prometheus.log"}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def workload(prometheus, ray_cluster, s3_endpoint, serve_port, root, tmp_path_factory):
    """Everything the dashboards show, small: returns the names it used in labels."""
    import boto3

    from foveation.data.ingest import ingest
    from foveation.data.manifest import read_manifest
    from foveation.data.synthetic import write_synthetic_set
    from foveation.evaluation.slides import evaluate_runs
    from foveation.training.trainer import fit

    init_ray(address=ray_cluster)
    # A process outside Ray, on the scrape config's foveation-app job.
    outside = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from foveation import monitoring\n"
            f"monitoring.start_http_server({prometheus['app_port']})\n"
            "monitoring.record('foveation_eval_slides_total', 1, run='outside-ray')\n"
            "time.sleep(600)\n",
        ],
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}"},
    )
    try:
        cfg = load_config(root / "jobs/configs/tiny.toml")
        # One unreadable slide of four is tolerated (and shows on the data dashboard).
        # Streamed: the data panels read the reader actors' metrics, and the skipped slide is
        # the pipeline's to report.
        pipeline = dataclasses.replace(cfg.data.pipeline, max_error_fraction=0.5, loader="stream")
        # The metrics only need every stage to run: tiny's 6 slides at 256 px (a quarter of
        # the pixels to generate, ingest and evaluate), one epoch of 4 locations per slide.
        synthetic = dataclasses.replace(cfg.data.synthetic, size=256)
        cfg = dataclasses.replace(
            cfg,
            training=dataclasses.replace(cfg.training, epochs=1, locations_per_image=4),
            data=dataclasses.replace(cfg.data, pipeline=pipeline, synthetic=synthetic),
        )
        raw = str(tmp_path_factory.mktemp("raw"))
        write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
            Bucket="monitoring"
        )
        store = "s3://monitoring/store"
        ingest(raw, store, cfg.data.ingest, log=lambda s: None)
        rows = read_manifest(store).to_pylist()
        bad = next(r for r in rows if r["split"] == "train")
        storage.write_bytes(bad["image_uri"], b"not a tiff")

        res = fit(cfg, "s3://monitoring/runs/mon-train", store, log=lambda s: None)
        assert bad["slide_id"] in res.skipped_slides
        evaluate_runs({"mon-eval": res.model_uri}, store, "test", log=lambda s: None)
        _serve(res.model_uri, tmp_path_factory.mktemp("serve"), serve_port)
        yield {"run": "mon-train", "eval": "mon-eval"}
    finally:
        outside.terminate()
        outside.wait(10)
        from ray import serve

        if "mon" in serve.status().applications:
            serve.delete("mon")


def _serve(checkpoint: str, tmp: Path, port: int) -> None:
    """The Serve app on the trained checkpoint, on the session's Serve at ``port``: image
    requests, a refused one, a slide job."""
    from ray import serve

    from serve.app import AppArgs, build_app

    slides = tmp / "slides"
    slides.mkdir()
    write_slide(tissue(256, 320, seed=3), str(slides / "one.tif"))
    token = "monitoring-token"
    (tmp / "token").write_text(token)
    settings = {
        "auth": {"token_file": str(tmp / "token")},
        "jobs": {
            "store": str(tmp / "jobs"),
            "allowed_prefixes": [str(slides)],
            "progress_interval_s": 0.1,
        },
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "model": {"num_cpus": 0.5},
        "runner": {"num_cpus": 0.5},
    }
    serve.run(build_app(AppArgs(checkpoint=checkpoint, settings=settings)), name="mon")
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    ) as c:
        body = png_bytes(tissue(96, 96, seed=4))
        for _ in range(3):
            r = c.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
        refused = c.post(
            "/v1/segment", content=b"not an image", headers={"Content-Type": "image/png"}
        )
        assert 400 <= refused.status_code < 500, refused.text
        r = c.post("/v1/jobs", json={"slide_uri": str(slides / "one.tif")})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        assert wait_for_job(c, job, 120)["state"] == "succeeded"


def test_every_dashboard_panel_returns_series(prometheus, workload):
    url = prometheus["url"]
    queries = panel_queries()
    assert len(queries) >= 30 and {q[0] for q in queries} == {
        "data",
        "training",
        "evaluation",
        "serving",
    }

    def empty_panels():
        missing = [(d, title, e) for d, title, e in queries if not query(url, e)]
        return missing or None

    # Ray exports every 10 s and the shipped config scrapes every 10 s: two intervals are
    # usually enough; allow a few more on a loaded 2-core machine.
    missing: list | None = None
    end = time.monotonic() + 90
    while time.monotonic() < end:
        missing = empty_panels()
        if not missing:
            break
        time.sleep(5)
    assert not missing, "panels without any series:\n" + "\n".join(
        f"  {d} / {t}: {e}" for d, t, e in missing
    )
    # The workload's own labels reached Prometheus (not only earlier tests' series).
    assert query(url, f'ray_foveation_train_loss{{run="{workload["run"]}"}}')
    assert len(query(url, f'ray_foveation_eval_iou{{run="{workload["eval"]}"}}')) == 4
    assert query(url, 'ray_foveation_data_skipped_slides_total{stage="read"}')
    # Both scrape jobs found their targets.
    up = {r["metric"]["job"]: r["value"][1] for r in query(url, "max by (job) (up)")}
    assert up == {"ray": "1", "foveation-app": "1"}, up
    assert query(url, 'ray_foveation_eval_slides_total{run="outside-ray",job="foveation-app"}')


def test_the_alert_rules_load_and_evaluate_cleanly(prometheus, workload):
    url = prometheus["url"]

    def rules():
        groups = httpx.get(f"{url}/api/v1/rules", timeout=30).json()["data"]["groups"]
        rs = [r for g in groups for r in g["rules"]]
        return rs if rs and all(r.get("lastEvaluation", "").startswith("2") for r in rs) else None

    rs = wait_for(rules, 60, 2, "a rule evaluation")
    names = {r["name"] for r in rs}
    assert {
        "FoveationServeErrorRate",
        "FoveationServeLatencyP99High",
        "FoveationServeNoHealthyReplica",
        "FoveationTrainingStalled",
    } <= names
    assert all(r["health"] == "ok" for r in rs), [(r["name"], r.get("lastError")) for r in rs]
    # The workload skipped a slide on purpose: that alert is pending or firing, the healthy
    # serving app pages nothing.
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    active = {a["labels"]["alertname"] for a in alerts}
    assert "FoveationDataSlidesSkipped" in active
    assert "FoveationServeNoHealthyReplica" not in active
