"""The Serve app on a cluster that Ray's autoscaler grows and shrinks (the ``autoscaled``
fixture: nodes of type ``gpu`` with a declared GPU and no CUDA). Load makes Serve ask for a
second model replica; the replica asks for a GPU no node has free; the autoscaler starts a
node for it. Idle, Serve drops the replica and the autoscaler the node. The replicas run with
``serve.device = "auto"``: on a GPU node without CUDA they serve on CPU."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from foveation.localcluster import state

pytestmark = pytest.mark.slow

BUCKET = "autoscaled"
APP = "as"


def _serve_replicas(cluster, deployment: str) -> list[dict]:
    """The replicas of ``deployment`` of the app as Serve's REST API lists them (state,
    node), over HTTP with the cluster's token."""
    request = urllib.request.Request(
        f"{cluster.dashboard}/api/serve/applications/",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        apps = json.load(response).get("applications", {})
    deployments = apps.get(APP, {}).get("deployments", {})
    return deployments.get(deployment, {}).get("replicas", [])


def _running(cluster) -> list[str]:
    """The node IDs of the model's RUNNING replicas."""
    return [
        r["node_id"] for r in _serve_replicas(cluster, "ModelServer") if r["state"] == "RUNNING"
    ]


def _gpu_nodes(cluster) -> list[str]:
    """The node IDs of the live nodes that advertise a GPU (the autoscaler's)."""
    nodes = state(cluster, "nodes", state="ALIVE")
    return [n["node_id"] for n in nodes if n.get("resources_total", {}).get("GPU")]


@pytest.fixture(scope="module")
def served(autoscaled, s3_endpoint, root) -> dict:
    """The app deployed by a driver that exits: model replicas of 1 GPU each (1 to 2,
    Serve-autoscaled on 1 request in flight per replica), the HTTP proxy and the ingress on
    the head, the checkpoint and the job store in S3."""
    import boto3
    from serve_helpers import deploy_across, free_port, write_checkpoint

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )
    checkpoint = write_checkpoint(f"s3://{BUCKET}/model", root)
    port = free_port()
    settings = {
        "device": "auto",
        "jobs": {"store": f"s3://{BUCKET}/serve/jobs"},
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            "look_back_period_s": 3,
        },
        "model": {"num_cpus": 0.5, "num_gpus": 1},
    }
    deploy_across(autoscaled, checkpoint, settings, APP, port)
    return {"port": port}


def test_load_adds_a_gpu_node_and_a_replica_and_idle_takes_both_back(autoscaled, served):
    """Four clients: Serve wants two replicas, the second waits for a GPU, the autoscaler
    adds a gpu node and the replica serves there. No request fails on the way (200, or 503
    with Retry-After while no replica takes it). Idle: one replica and one gpu node again."""
    import httpx
    from serve_helpers import segment_load, wait_for

    cluster = autoscaled.cluster
    port = served["port"]
    (first,) = _running(cluster)
    assert _gpu_nodes(cluster) == [first]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        health = c.get("/healthz")
        assert health.status_code == 200, health.text
        # A replica that holds a GPU on a node without CUDA serves, on CPU.
        assert health.json()["model"]["device"] == "cpu", health.json()
    with segment_load(port, clients=4) as outcomes:
        t0 = time.monotonic()
        wait_for(lambda: len(_gpu_nodes(cluster)) == 2, 120, 0.5, "a second gpu node")
        node_s = time.monotonic() - t0
        wait_for(lambda: len(_running(cluster)) == 2, 180, 0.5, "a second model replica")
        replica_s = time.monotonic() - t0
        added = set(_running(cluster)) - {first}
        assert added and added <= set(_gpu_nodes(cluster)), (added, _gpu_nodes(cluster))
        at_two = len(outcomes)
        wait_for(lambda: outcomes[at_two:].count("200") >= 8, 60, 0.5, "answers at two")
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert set(counts) <= {"200", "503"} and counts.get("200", 0) >= 8, counts
    t1 = time.monotonic()
    wait_for(lambda: len(_running(cluster)) == 1, 120, 0.5, "one model replica again")
    replica_down_s = time.monotonic() - t1
    wait_for(lambda: len(_gpu_nodes(cluster)) == 1, 180, 0.5, "one gpu node again")
    node_down_s = time.monotonic() - t1
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        assert c.get("/healthz").status_code == 200
    autoscaled.assert_no_violations()
    print(
        f"4 clients: second gpu node alive {node_s:.1f} s after the load began, second "
        f"replica serving at {replica_s:.1f} s; requests {counts}; idle: one replica after "
        f"{replica_down_s:.1f} s, one gpu node after {node_down_s:.1f} s"
    )


def test_a_run_asking_for_more_gpus_than_the_cluster_has_waits_for_its_autoscaler(autoscaled):
    """Two GPU workers on a cluster with one GPU now: Ray 2.60 does not publish what the
    autoscaler can add, but the check sees the autoscaler and waits instead of refusing."""
    code = (
        "import dataclasses\n"
        "from foveation.config import DistributedConfig, load_config\n"
        "from foveation.raycluster import cluster_growth, init_ray\n"
        "from foveation.training.trainer import check_resources\n"
        "init_ray()\n"
        "print('growth', cluster_growth())\n"
        f"cfg = load_config({str(autoscaled.root / 'jobs/configs/tiny.toml')!r})\n"
        "dc = DistributedConfig(use_gpu=True, num_workers=2, gpus_per_worker=1)\n"
        "check_resources(dataclasses.replace(cfg, distributed=dc), 'memory')\n"
        "print('checked')\n"
    )
    proc = autoscaled.python("-c", code)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "checked" in output, output[-3000:]
    assert "Growth(autoscaled=True, maxima=None)" in output, output[-3000:]
    assert "needs 2 GPU; the cluster has 1 now" in output and "waiting" in output, output
