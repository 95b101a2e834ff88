"""The platform on a multi-node Ray cluster on this machine (``foveation.localcluster``): a head
with no CPUs and worker nodes at their own loopback addresses and directories, S3 the only
thing shared, the driver's directory out of every node's reach (``tests/guard``). Training is
``python -m jobs.train`` run as a user would, with the cluster's address: no code changes.
Nodes are killed by their own PIDs mid-run and replaced."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import tomli_w
from serve_helpers import finish

from foveation.config import Config, load_config
from foveation.data.ingest import ingest
from foveation.data.synthetic import write_synthetic_set
from foveation.io import storage
from foveation.localcluster import HEAD, state
from foveation.training.trainer import registered_checkpoints

pytestmark = pytest.mark.slow

BUCKET = "multinode"
RUN_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def store(multinode, s3_endpoint, root, tmp_path_factory) -> str:
    """The tiny synthetic set, ingested once into S3 (here, without Ray): the only place the
    cluster's nodes can read it from."""
    cfg = load_config(root / "jobs/configs/tiny.toml")
    raw = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET
    )
    dest = f"s3://{BUCKET}/store"
    ingest(raw, dest, cfg.data.ingest, log=lambda s: None)
    return dest


def _spread_config(root, name: str, epochs: int, loader: str) -> Config:
    cfg = load_config(root / "jobs/configs/tiny.toml")
    cfg = dataclasses.replace(
        cfg,
        name=name,
        training=dataclasses.replace(cfg.training, epochs=epochs),
        data=dataclasses.replace(
            cfg.data, pipeline=dataclasses.replace(cfg.data.pipeline, loader=loader)
        ),
        distributed=dataclasses.replace(
            cfg.distributed,
            num_workers=2,
            cpus_per_worker=1.0,
            placement="spread",
            max_failures=4,
            keep_checkpoints=2,
        ),
    )
    return cfg


def _write(multinode, cfg) -> str:
    path = os.path.join(multinode.driver_dir, f"{cfg.name}.toml")
    with open(path, "w") as f:
        f.write(tomli_w.dumps(cfg.to_dict()))
    return path


@pytest.fixture(scope="module")
def config(multinode, root) -> str:
    """tiny.toml on two workers, one per node (``placement = "spread"``), 3 epochs of 2 steps,
    a checkpoint each epoch, each worker cutting its shard's batches in memory; written in the
    driver's directory (the driver reads it; no worker does)."""
    return _write(multinode, _spread_config(root, "spread", 3, "memory"))


@pytest.fixture(scope="module")
def streamed(multinode, root, store) -> dict:
    """The same on 1 epoch with the batches streamed from S3 by Ray Data's reader actors, out
    of core (slower on 2 cores: its reads compete with the trainers; whether the model learns
    is the memory-loader runs' question, so one epoch is enough here)."""
    config = _write(multinode, _spread_config(root, "streamed", 1, "stream"))
    out = f"s3://{BUCKET}/runs/streamed"
    output = _finish(_train(multinode, config, store, out))
    multinode.assert_no_violations()
    return {"config": config, "out": out, "output": output, "meta": _latest_meta(out)}


def _train(multinode, config: str, store: str, out: str):
    return multinode.driver(
        "jobs.train", "--config", config, "--manifest", store, "--out", out, "--overwrite"
    )


def _finish(proc, timeout: float = RUN_TIMEOUT_S) -> str:
    return finish(proc, timeout)


def _latest_meta(out: str) -> dict | None:
    """The meta.json of the run's latest registered checkpoint, or None before the first."""
    latest = registered_checkpoints(out)[1]
    return json.loads(storage.read_bytes(storage.join(latest, "meta.json"))) if latest else None


def _wait_for_epoch(out: str, epoch: int, proc, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = _latest_meta(out)
        if meta and meta["epoch"] >= epoch and not meta.get("partial"):
            return meta
        assert proc.poll() is None, (
            f"the run ended before epoch {epoch}: " + proc.stdout.read()[-4000:]
        )
        time.sleep(0.5)
    raise AssertionError(f"no registered checkpoint of epoch {epoch} in {timeout} s")


@pytest.fixture(scope="module")
def unkilled(multinode, config, store) -> dict:
    out = f"s3://{BUCKET}/runs/unkilled"
    t0 = time.monotonic()
    output = _finish(_train(multinode, config, store, out))
    multinode.assert_no_violations()
    return {
        "out": out,
        "meta": _latest_meta(out),
        "output": output,
        "seconds": time.monotonic() - t0,
    }


def test_the_guard_refuses_a_worker_that_opens_a_path_under_the_drivers_directory(multinode):
    """The guard itself: without it the other tests could not fail on a local path."""
    probe = os.path.join(multinode.driver_dir, "probe.txt")
    with open(probe, "w") as f:
        f.write("the driver's own file")
    code = (
        "import ray\n"
        "@ray.remote(num_cpus=0.1, resources={'node_1': 0.01})\n"
        "def peek(path):\n"
        "    try:\n"
        "        open(path).read()\n"
        "        return 'read'\n"
        "    except PermissionError as e:\n"
        "        return f'refused: {e}'\n"
        f"print(ray.get(peek.remote({probe!r})))\n"
    )
    proc = multinode.python("-c", code)
    output, _ = proc.communicate(timeout=120)
    assert "refused:" in output, output[-3000:]
    with open(multinode.violations) as f:
        assert probe in f.read()
    os.remove(multinode.violations)  # the other tests start from a clean record


def test_a_local_output_path_is_refused_on_a_cluster_of_several_nodes(multinode, config, store):
    proc = multinode.driver(
        "jobs.train", "--config", config, "--manifest", store, "--out", "runs/x"
    )
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output[-3000:]
    assert "error: --out:" in output and "s3://" in output and "3 nodes" in output, output[-3000:]


def test_a_local_serve_job_store_is_refused_on_a_cluster_of_several_nodes(multinode):
    """Serve's job store is written by the runner on one node and read by the ingress on
    another: on several nodes a local one is refused when the app is built."""
    code = (
        "import ray\n"
        "ray.init()\n"
        "from serve.app import AppArgs, build_app\n"
        "try:\n"
        "    build_app(AppArgs(checkpoint='s3://multinode/none'))\n"
        "    print('built')\n"
        "except Exception as e:\n"
        "    print(f'refused: {type(e).__name__}: {e}')\n"
        "build_app(AppArgs(checkpoint='s3://multinode/none', "
        "settings={'jobs': {'store': 's3://multinode/serve/jobs'}}))\n"
        "print('built with s3')\n"
    )
    output, _ = multinode.python("-c", code).communicate(timeout=120)
    assert "refused: ConfigError: serve.jobs.store: 'runs/serve/jobs' is a local path" in output
    assert "3 nodes" in output and "serve.jobs.shared_filesystem" in output, output[-3000:]
    assert "built with s3" in output, output[-3000:]


def test_two_workers_on_two_nodes_train_across_machines(unkilled):
    meta = unkilled["meta"]
    assert meta["epoch"] == 3
    hosts = meta["hosts"]
    # Two ranks at two node IPs: Ray Train (and so DeepSpeed's process group) sees two machines,
    # local rank 0 on each; neither rank on the head, which has no CPUs.
    # The IPs were gathered through the process group (gloo over TCP): it spans both nodes.
    assert len(hosts) == 2 and len(set(hosts)) == 2, hosts
    assert all(h.startswith("127.0.0.1") and h != "127.0.0.10" for h in hosts), hosts
    assert meta["local_world_sizes"] == [1, 1], meta  # no shared-memory path assumed
    assert all(h["nodes"] == 2 and h["world_size"] == 2 for h in meta["history"])
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0], losses
    print(f"unkilled run on {hosts}: {unkilled['seconds']:.0f} s, val mIoU "
          f"{meta['history'][-1]['val_miou']:.4f}")  # fmt: skip


def test_the_streamed_batches_are_read_on_the_worker_nodes(streamed):
    """Ray Data's reader actors ran on worker nodes (never the CPU-less head), and the run says
    what each node read."""
    meta = streamed["meta"]
    assert meta["epoch"] == 1 and len(set(meta["hosts"])) == 2
    assert all(h["loss"] > 0 for h in meta["history"]), meta["history"]
    (line,) = [x for x in streamed["output"].splitlines() if "training reads by node:" in x]
    nodes = re.findall(r"(127\.0\.0\.\d+): (\d+) slide reads, (\d+) locations", line)
    assert nodes and all(ip != "127.0.0.10" for ip, _, _ in nodes), line
    # 1 epoch of the 4 training slides (16 locations each), every read counted once.
    assert sum(int(s) for _, s, _ in nodes) == 4, line
    assert sum(int(n) for _, _, n in nodes) == 4 * 16, line
    print(line)


def test_checkpoints_and_the_model_are_in_s3_and_a_cluster_evaluation_reads_them(
    multinode, store, streamed
):
    out, config = streamed["out"], streamed["config"]
    files = storage.list_files(storage.join(out, "train"))
    assert any(f.endswith("/model.safetensors") for f in files)
    assert any("/deepspeed/" in f for f in files), "no DeepSpeed state for --resume"
    every, _ = registered_checkpoints(out)
    assert 1 <= len(every) <= 3, every  # keep_checkpoints = 2, plus the best by val mIoU
    report = f"{out}/report"
    proc = multinode.driver(
        "jobs.evaluate", "--config", config, "--manifest", store,
        "--run", f"soft={out}/model", "--out", report,
    )  # fmt: skip
    output = _finish(proc)
    multinode.assert_no_violations()
    text = storage.read_bytes(storage.join(report, "report.md")).decode()
    assert "| soft |" in text and "| average expert |" in text, output[-3000:]


def test_jobs_cluster_status_describes_the_cluster(multinode, root):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cluster", "--root", multinode.cluster.root, "status"],
        cwd=root, env={**os.environ, "PYTHONPATH": f"{root}/platform:{root}"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, node in multinode.cluster.nodes.items():
        assert re.search(rf"^{name} +{re.escape(node.ip)} .* \d+ processes$", done.stdout, re.M)
    assert f"RAY_ADDRESS={multinode.cluster.address}" in done.stdout


def test_losing_the_node_of_either_rank_resumes_from_a_checkpoint_like_an_unkilled_run(
    multinode, config, store, unkilled
):
    """Kill the node of rank 1 after epoch 1's checkpoint, then the node of rank 0 after epoch
    2's, each by its own PIDs, a replacement node joining after each. Recovery: seconds from
    the kill to the next registered checkpoint (the restart plus one epoch)."""
    out = f"s3://{BUCKET}/runs/killed"
    proc = _train(multinode, config, store, out)
    kills = []
    meta = _wait_for_epoch(out, 1, proc)
    for epoch, rank in ((1, 1), (2, 0)):
        # The driver-side helpers (the pipeline's epoch clock and read log) sit on the driver's
        # node, the head: no worker node's loss takes them along.
        _assert_helpers_on_head(multinode)
        victim = multinode.node_of_ip(meta["hosts"][rank])
        t0 = time.monotonic()
        assert multinode.cluster.kill_node(victim) > 0
        multinode.add_node()  # the replacement machine joins
        meta_after = _wait_for_epoch(out, epoch + 1, proc)
        kills.append((epoch, rank, victim, meta["step"], time.monotonic() - t0))
        meta = meta_after
    _finish(proc)
    multinode.assert_no_violations()
    final = _latest_meta(out)
    assert final["epoch"] == 3
    # It resumed from the checkpoint registered before the last kill, not from step 0.
    assert final["resumed_from_step"] == kills[-1][3] > 0, (final["resumed_from_step"], kills)
    killed_miou = final["history"][-1]["val_miou"]
    unkilled_miou = unkilled["meta"]["history"][-1]["val_miou"]
    assert abs(killed_miou - unkilled_miou) <= 0.02, (killed_miou, unkilled_miou)
    # Two ranks after every restart ("spread" is best effort: the restarted group may pack onto
    # the nodes left before the replacement joins).
    assert all(h["world_size"] == 2 for h in final["history"]), final["history"]
    epoch_s = [h["seconds"] for h in unkilled["meta"]["history"]]
    print(
        f"killed {[(k[1], k[2]) for k in kills]} (rank, node): recovery "
        f"{', '.join(f'{k[4]:.1f}' for k in kills)} s to the next checkpoint (an unkilled epoch: "
        f"{min(epoch_s):.1f}-{max(epoch_s):.1f} s); val mIoU {killed_miou:.4f} vs unkilled "
        f"{unkilled_miou:.4f}; final ranks on {final['hosts']}"
    )


def _alive_actors(multinode) -> list[tuple[str, str]]:
    """(class name, node IP) of every ALIVE actor of the cluster (Ray's state API)."""
    nodes = {n["node_id"]: n["node_ip"] for n in state(multinode.cluster, "nodes")}
    actors = state(multinode.cluster, "actors", state="ALIVE")
    return [(a["class_name"], nodes[a["node_id"]]) for a in actors]


def _assert_helpers_on_head(multinode) -> None:
    head = multinode.cluster.nodes[HEAD]
    actors = _alive_actors(multinode)
    names = sorted({name for name, _ in actors})
    helpers = [(n, ip) for n, ip in actors if n.split(".")[-1] in ("EpochClock", "_ReadLog")]
    assert {n.split(".")[-1] for n, _ in helpers} == {"EpochClock", "_ReadLog"}, names
    assert {ip for _, ip in helpers} == {head.ip}, helpers


def _sweep_config(root) -> Config:
    """Two trials of tiny.toml (two patch sets), both at once, 4 epochs each (an epoch is 1-2 s:
    the kill after the first must land before the trial ends) with a checkpoint per epoch, one
    Train worker each; a lost trial driver or worker is restarted."""
    from foveation.config import DistributedConfig, TuneConfig

    cfg = load_config(root / "jobs/configs/tiny.toml")
    return dataclasses.replace(
        cfg,
        name="sweep",
        training=dataclasses.replace(cfg.training, epochs=4),
        distributed=DistributedConfig(
            num_workers=1, cpus_per_worker=0.5, keep_checkpoints=1, max_failures=2
        ),
        data=dataclasses.replace(
            cfg.data, pipeline=dataclasses.replace(cfg.data.pipeline, loader="memory")
        ),
        tune=TuneConfig(fov_sets=((1, 2, 4), (1, 4)), scheduler="fifo", max_concurrent_trials=2),
    )


def _trial_metas(out: str) -> dict[str, dict]:
    """Each trial's latest registered checkpoint's meta.json, by trial id."""
    if not storage.exists(f"{out}/trials"):
        return {}
    ids = {f.split("/trials/")[1].split("/")[0] for f in storage.list_files(f"{out}/trials")}
    metas = {t: _latest_meta(f"{out}/trials/{t}") for t in ids if not t.startswith(".")}
    return {t: m for t, m in metas.items() if m}


def test_a_sweep_across_nodes_loses_a_node_and_every_trial_finishes_from_its_checkpoint(
    multinode, root, store
):
    """``python -m jobs.tune`` with the cluster's address: once a trial has registered its
    first epoch, the node of its Train worker is killed by its PIDs and a replacement joins.
    No trial fails for good: the one hit resumes from that checkpoint (on another node)."""
    import pyarrow.parquet as pq

    config = _write(multinode, _sweep_config(root))
    out = f"s3://{BUCKET}/sweep"
    proc = multinode.driver("jobs.tune", "--config", config, "--manifest", store, "--out", out)
    deadline = time.monotonic() + 300
    while not (metas := _trial_metas(out)):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no trial registered a checkpoint in 300 s"
        time.sleep(0.5)
    trial, meta = next(iter(metas.items()))
    seen = {h for m in metas.values() for h in m["hosts"]}
    victim = multinode.node_of_ip(meta["hosts"][0])
    t0 = time.monotonic()
    assert multinode.cluster.kill_node(victim) > 0
    meta = _latest_meta(f"{out}/trials/{trial}")  # what was registered when the node died
    multinode.add_node()
    output = _finish(proc)
    sweep_s = time.monotonic() - t0
    multinode.assert_no_violations()
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/results.parquet"))).to_pylist()
    assert [r["status"] for r in table] == ["finished", "finished"], (table, output[-3000:])
    final = _trial_metas(out)
    assert final[trial]["epoch"] == 4 and meta["epoch"] < 4, (final[trial], meta)
    # The trial hit resumed from its registered checkpoint, not from step 0.
    assert final[trial]["resumed_from_step"] == meta["step"] > 0, (final[trial], meta)
    seen |= {h for m in final.values() for h in m["hosts"]}
    assert len(seen) >= 2, seen  # the trials ran on more than one node
    print(
        f"sweep across nodes: trial {trial} rank 0 on {meta['hosts'][0]} ({victim}) killed "
        f"after epoch {meta['epoch']}; resumed from step {final[trial]['resumed_from_step']} on "
        f"{final[trial]['hosts']}; trials ran on {sorted(seen)}; the sweep ended "
        f"{sweep_s:.1f} s after the kill"
    )


SERVE_APP = "mn"


@pytest.fixture(scope="module")
def served_across(multinode, unkilled, store):
    """The Serve app on the cluster, deployed by a driver that then exits (as ``serve deploy``
    does): two model replicas on two nodes (``max_replicas_per_node = 1``), the job store and
    the slides in S3, the HTTP proxy on the head only (every node shares 127.0.0.1 here)."""
    from serve_helpers import deploy_across, free_port, tissue, write_slide

    port = free_port()
    slide = os.path.join(multinode.cluster.root, "slide.tif")
    write_slide(tissue(256, 320, seed=3), slide)
    with open(slide, "rb") as f:
        storage.write_bytes(f"s3://{BUCKET}/slides/one.tif", f.read())
    settings = {
        "jobs": {
            "store": f"s3://{BUCKET}/serve/jobs",
            "allowed_prefixes": [f"s3://{BUCKET}/slides/"],
            "progress_interval_s": 0.2,
        },
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "model": {"num_cpus": 0.5, "max_replicas_per_node": 1},
    }
    deploy_across(multinode, unkilled["out"] + "/model", settings, SERVE_APP, port)
    return {"port": port}


def _replica_nodes(multinode, deployment: str) -> list[str]:
    """The IPs of the ALIVE replicas of ``deployment`` of the app (one entry per replica)."""
    name = f"ServeReplica:{SERVE_APP}:{deployment}"
    return sorted(ip for n, ip in _alive_actors(multinode) if n == name)


def test_serve_across_nodes_runs_a_slide_job_through_s3_and_loses_no_request_with_a_node(
    multinode, served_across
):
    """A slide job (its runner on one node, the ingress reading its state from S3), then 8
    clients while the node of one model replica (not the ingress's) is killed by its PIDs
    and a replacement joins: no 500, at least 99% 200 or 503, none hangs."""
    import httpx
    from serve_helpers import segment_load, wait_for, wait_for_job

    port = served_across["port"]
    models = _replica_nodes(multinode, "ModelServer")
    assert len(models) == 2 and len(set(models)) == 2, models
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        r = c.post("/v1/jobs", json={"slide_uri": f"s3://{BUCKET}/slides/one.tif"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        assert wait_for_job(c, job, 180)["state"] == "succeeded"
    assert storage.list_files(f"s3://{BUCKET}/serve/jobs/{job}")
    (ingress,) = _replica_nodes(multinode, "Ingress")
    victim_ip = next(ip for ip in models if ip != ingress)
    victim = multinode.node_of_ip(victim_ip)
    with segment_load(port) as outcomes:
        wait_for(lambda: outcomes.count("200") >= 8, 60, 0.5, "answers before the kill")
        t0 = time.monotonic()
        assert multinode.cluster.kill_node(victim) > 0
        killed_at = len(outcomes)
        multinode.add_node()

        def replaced() -> bool:  # the lost replica seen dead and another one running
            now = _replica_nodes(multinode, "ModelServer")
            return len(now) == 2 and victim_ip not in now

        wait_for(replaced, 180, 1, "a replacement model replica")
        back_s = time.monotonic() - t0
        wait_for(lambda: outcomes[killed_at:].count("200") >= 8, 60, 0.5, "answers after")
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    served_or_retry = counts.get("200", 0) + counts.get("503", 0)
    assert "500" not in counts and served_or_retry >= 0.99 * len(outcomes), counts
    print(
        f"model replicas on {models}, ingress on {ingress}; killed {victim} ({victim_ip}) "
        f"under 8 clients: {counts}; two replicas again {back_s:.1f} s after the kill"
    )
