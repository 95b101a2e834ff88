"""Shared fixtures of the integration tests: a real local S3 endpoint (moto's server)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# Ray 2.60 turns token authentication on when a cluster starts; a driver joining it needs
# RAY_AUTH_MODE=token in its environment before Ray is first imported (docs/dependencies.md#ray).
os.environ.setdefault("RAY_AUTH_MODE", "token")

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No instance-metadata lookups for credentials or region: there is no EC2 here.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server running for the whole session, with
    dummy credentials and ``AWS_ENDPOINT_URL`` pointing at it (restored afterwards)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _S3_SERVER.update(server=server, host=host, port=port)
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        _S3_SERVER["server"].stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_S3_SERVER: dict = {}


@pytest.fixture
def s3_outage(s3_endpoint: str):
    """``outage(seconds) -> threading.Event``: the session's S3 endpoint stops (connections
    refused, as a crashed MinIO) and a new server starts on the same port ``seconds`` later,
    with the same in-process state; the event is set once it is back."""
    import threading

    from moto.server import ThreadedMotoServer

    timers = []

    def outage(seconds: float) -> threading.Event:
        back = threading.Event()
        _S3_SERVER["server"].stop()

        def restart() -> None:
            server = ThreadedMotoServer(
                ip_address=_S3_SERVER["host"], port=_S3_SERVER["port"], verbose=False
            )
            server.start()
            _S3_SERVER["server"] = server
            back.set()

        timer = threading.Timer(seconds, restart)
        timer.start()
        timers.append((timer, back))
        return back

    yield outage
    for timer, back in timers:  # never leave the session without its endpoint
        timer.join()
        back.wait(30)


@pytest.fixture
def s3_client(s3_endpoint: str):
    """A plain boto3 client of the test server, to set up and inspect buckets directly."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """``s3://<bucket>``: a fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_endpoint) -> Iterator[str]:
    """One local Ray head node for the whole session (``ray start --head``, as a user's cluster
    would be), with 4 logical CPUs on this 2-core machine (docs/contracts.md#ray-on-2-cores);
    this process joins it. After the S3 endpoint: whichever test first joins the cluster, the
    endpoint's settings reach every worker (a driver's runtime env is fixed when it joins)."""
    import shutil
    import subprocess
    import sys

    import ray

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    port, dash, client = _free_port(), _free_port(), _free_port()
    # `ray start --head` with RAY_AUTH_MODE=token needs a token and never makes one (only a
    # local ray.init() writes ~/.ray/auth_token): on a fresh machine the session brings its
    # own, in the environment every process of the session inherits, not in the home dir.
    if not _token_available():
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env = dict(os.environ)
    # A temp dir of its own (short: Unix socket paths are limited to 107 bytes) and its own
    # client-server port, so that the teardown stops this head only and two test sessions on
    # one machine never stop each other's Ray (`ray stop` kills every local Ray).
    temp_dir = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    start = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        f"--ray-client-server-port={client}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=4",
        "--disable-usage-stats",
    ]
    # The dashboard hosts the job server that `ray job submit` talks to.
    dashboard = [
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
    ]
    done = subprocess.run(
        [*start, *dashboard], env=env, capture_output=True, text=True, timeout=180
    )
    if done.returncode:  # say why: the exit status alone cannot be acted on
        raise RuntimeError(
            f"`ray start --head` exited {done.returncode}:\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
        )
    address = f"127.0.0.1:{port}"
    DASHBOARD["url"] = f"http://127.0.0.1:{dash}"
    DASHBOARD["temp_dir"] = temp_dir
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_head(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


DASHBOARD: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster) -> str:
    """The session head node's dashboard URL (its job server), for ``ray job submit``."""
    return DASHBOARD["url"]


@pytest.fixture(scope="session")
def ray_temp_dir(ray_cluster) -> str:
    """The session head node's --temp-dir: Ray writes its Prometheus service-discovery file
    there (``prom_metrics_service_discovery.json``)."""
    return DASHBOARD["temp_dir"]


@pytest.fixture(scope="session")
def serve_port(ray_cluster, s3_endpoint) -> Iterator[int]:
    """Ray Serve, started once for the session on the head node, its HTTP proxy on a free
    port: each module runs its app under a name of its own and deletes it when done, instead
    of starting and shutting down Serve itself (seconds each on 2 cores)."""
    from ray import serve

    from foveation.raycluster import init_ray

    init_ray(address=ray_cluster)  # after the S3 endpoint: its settings reach the replicas
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def _stop_head(temp_dir: str, port: int) -> None:
    """Kill the processes of the head node started with ``temp_dir`` and ``port``, with their
    children (the workers hang under the raylet), and no other Ray on the machine."""
    import psutil

    marks = (temp_dir, f":{port} ")
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or []) + " "
        if any(mark in cmdline for mark in marks):
            roots.append(proc)
    procs = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in root.children(recursive=True)})
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    # Ray's processes exit within a second of SIGTERM or not at all: waiting longer only
    # stretched every session's end by the full wait.
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _token_available() -> bool:
    """Whether Ray finds a token as it looks for one: the variable, the file it names, or
    ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multinode(s3_endpoint, root) -> Iterator[MultiNode]:
    """A multi-node Ray cluster on this machine for one test module (``foveation.localcluster``):
    a head with no CPUs and two worker nodes of 2 logical CPUs, each at its own loopback
    address, in its own directory, with its own ports; token auth on; only S3 (the session's
    moto server) shared. The driver gets a directory of its own, and every node's Ray processes
    refuse to touch it (``tests/guard/sitecustomize.py``): a local path handed from the driver
    to a worker fails here as it would on separate machines. Killed nodes are found by the
    health check in about 3 s instead of Ray's 15 (its GCS reads these from its environment)."""
    from foveation.localcluster import LocalCluster, wait_for_nodes

    cluster = LocalCluster.create(tempfile.mkdtemp(prefix="fovc-", dir="/tmp"))
    mn = MultiNode(cluster, root)
    os.makedirs(mn.driver_dir)
    cluster.start_head(cpus=0, env=mn.node_env())
    for _ in range(2):
        mn.add_node()
    wait_for_nodes(cluster, 3)
    try:
        yield mn
    finally:
        cluster.down()
        import shutil

        shutil.rmtree(cluster.root, ignore_errors=True)


GPU_TYPE = "gpu"
"""The autoscaled cluster's worker node type: 1 CPU and 1 declared GPU (no CUDA here)."""


@pytest.fixture(scope="module")
def autoscaled(s3_endpoint, root) -> Iterator[MultiNode]:
    """A local cluster grown and shrunk by Ray's autoscaler (its fake multi-node provider, the
    one ``ray.cluster_utils.AutoscalingCluster`` drives; that class is not used because its
    ``start`` runs ``ray stop --force``, which would stop every Ray on the machine): a head of
    1 CPU (the Serve controller, proxy, ingress and runner) and up to two nodes of type
    ``gpu`` (1 CPU, ``GPU: 1`` declared, no CUDA), one kept at all times; an idle one is removed
    after 10 s. Same guard, token and S3 as ``multinode``."""
    from foveation.localcluster import LocalCluster, NodeType, wait_for_nodes

    cluster = LocalCluster.create(tempfile.mkdtemp(prefix="fova-", dir="/tmp"))
    cluster.idle_timeout_s = 10
    mn = MultiNode(cluster, root)
    os.makedirs(mn.driver_dir)
    gpu = NodeType(GPU_TYPE, cpus=1, gpus=1, min_workers=1, max_workers=2)
    try:
        cluster.start_head(cpus=1, env=mn.node_env(), node_types=[gpu])
        wait_for_nodes(cluster, 2, timeout_s=120)  # the head and the kept gpu node
        yield mn
    finally:
        cluster.down()
        import shutil

        shutil.rmtree(cluster.root, ignore_errors=True)


@dataclasses.dataclass
class MultiNode:
    """The module's local cluster, the driver's directory and the guard's record."""

    cluster: Any
    root: Any  # the repository

    @property
    def driver_dir(self) -> str:
        return os.path.join(self.cluster.root, "driver")

    @property
    def violations(self) -> str:
        return os.path.join(self.cluster.root, "violations.log")

    def node_env(self) -> dict[str, str]:
        """What every node's processes get on top of this one's (which holds the S3
        credentials: a node's own, never a job's runtime_env)."""
        code = f"{self.root}/platform:{self.root}"
        return {
            "PYTHONPATH": f"{self.root}/tests/guard:{code}",
            "FOVEATION_FORBIDDEN_DIR": self.driver_dir,
            "FOVEATION_VIOLATIONS": self.violations,
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_timeout_ms": "1000",
        }

    def add_node(self):
        return self.cluster.add_node(cpus=2, env=self.node_env())

    def driver(self, *args: str) -> subprocess.Popen:
        """``python -m <args>`` as a driver of the cluster, run in the driver's directory."""
        return self.python("-m", *args)

    def python(self, *args: str) -> subprocess.Popen:
        """This interpreter with ``args``, joining the cluster, in the driver's directory."""
        env = self.cluster.driver_env()
        env["PYTHONPATH"] = f"{self.root}/platform:{self.root}"
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=self.driver_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def node_of_ip(self, ip: str) -> str:
        return next(n.name for n in self.cluster.nodes.values() if n.ip == ip)

    def assert_no_violations(self) -> None:
        if os.path.exists(self.violations):
            with open(self.violations) as f:
                record = f.read()
            raise AssertionError(f"workers opened paths under the driver's directory:\n{record}")
