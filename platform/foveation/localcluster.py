"""A multi-node Ray cluster on one machine: the cluster path tried on a laptop before paying
for one (``python -m jobs.cluster``), and the multi-node tests' fixture.

Each node is a real raylet started with ``ray start``, as on a cluster: the head (no CPUs by
default: nothing but drivers and their helpers runs there, as on a real head node) and worker
nodes, each with

- its own loopback address (head ``127.0.0.10``, node k ``127.0.0.(10+k)``): Ray groups Train
  workers into machines by node IP, so two nodes at two addresses are two machines to Ray Train
  and to DeepSpeed (local rank 0 on each, one process group across them). ``127.0.0.1`` itself
  cannot be a node's address: ``ray start`` rewrites it to the machine's routable IP. Every
  address is in 127.0.0.0/8, which the kernel never routes off the machine;
- its own directory (its processes' working directory, its Ray temp dir under it), so a path
  one node writes means nothing to another, as on separate machines;
- its own worker-port range and dashboard-agent port (two raylets on one host must not race
  for the same ports), and a custom resource ``node_<k>`` a task can ask for to land there;
- the environment it was started with: a node's credentials are its own (never sent in a
  job's runtime_env, docs/operations.md#credentials).

Token authentication is on; the cluster has a token of its own (``<root>/auth_token``), which
``driver_env`` hands to a driver. Nodes are stopped by their own PIDs (``kill_node``, ``down``),
never with ``ray stop``, which stops every Ray on the machine. The cluster's description lives
in ``<root>/cluster.json`` (written atomically) so ``jobs.cluster status|add|kill|down`` find it
from another process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from foveation.errors import FoveationError

HEAD = "head"
HEAD_IP = "127.0.0.10"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
WORKER_PORTS = 1000  # each node's own range of worker ports
FIRST_WORKER_PORT = 20000
START_TIMEOUT_S = 180
AUTOSCALING_FILE = "autoscaling.json"
FAKE_HEAD_TYPE = "ray.head.default"
FAKE_HEAD_ID = "f" * 51 + "00000"  # the id Ray's fake provider gives the head
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
AUTOSCALER_ENV = {
    # Ray's fake multi-node provider refuses to run without it (a guard against test-only
    # providers on real clusters).
    "RAY_FAKE_CLUSTER": "1",
    # The autoscaler's loop every second instead of every 5 s.
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    # The autoscaler starts its nodes in-process at "this machine's address", which on Linux is
    # the routable one (not loopback); this makes it 127.0.0.1, so its nodes listen only there
    # as every other node does. It changes nothing else on Linux: only `ray start` of a worker
    # node reads it, and no node is started by `ray start` in the head's environment.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Autoscaler v2 (KubeRay's), which reports its version to the GCS: the platform's resource
    # checks see an autoscaler there (``raycluster.cluster_growth``). It knows the head by the
    # fake provider's fixed id.
    "RAY_enable_autoscaler_v2": "1",
    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID,
}


class ClusterError(FoveationError, RuntimeError):
    """The local cluster could not be started, found or changed; the message says why."""


@dataclass(frozen=True)
class Node:
    """One raylet of the cluster: where it lives and what it declares."""

    name: str  # "head" or "node_<k>", also its custom resource
    index: int  # 0 for the head
    ip: str
    cpus: float
    gpus: float = 0.0
    resources: dict = field(default_factory=dict)

    def dir(self, root: str) -> str:
        return os.path.join(root, self.name)

    def temp_dir(self, root: str) -> str:
        # Short: Ray's Unix socket paths under it are limited to 107 bytes.
        return os.path.join(root, self.name, "r")


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the head's autoscaler adds on demand and removes when idle (Ray's
    fake multi-node provider: each node a real raylet started on this machine, as a cloud
    provider would start a machine). ``gpus`` are declared, not real: a node of this type
    advertises ``GPU: 1`` without CUDA, so what asks for a GPU is scheduled there and must
    still run on its CPU."""

    name: str
    cpus: float
    gpus: float = 0.0
    resources: dict = field(default_factory=dict)
    min_workers: int = 0
    max_workers: int = 1

    def autoscaler_entry(self) -> dict:
        resources = {"CPU": self.cpus, "GPU": self.gpus, self.name: 1.0, **self.resources}
        return {
            "resources": {k: v for k, v in resources.items() if v},
            "node_config": {},
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
        }


@dataclass
class LocalCluster:
    """The cluster under ``root``: its head's ports and its nodes (``create`` or ``load``)."""

    root: str
    port: int
    dashboard_port: int
    client_port: int
    nodes: dict[str, Node] = field(default_factory=dict)
    next_index: int = 1
    node_types: list[NodeType] = field(default_factory=list)
    """What the head's autoscaler may add (empty: a fixed cluster, nodes added by hand)."""
    idle_timeout_s: float = 10.0
    """How long an autoscaled node stays idle before the autoscaler removes it."""

    @classmethod
    def create(cls, root: str) -> LocalCluster:
        root = os.path.abspath(root)
        if os.path.exists(os.path.join(root, STATE_FILE)):
            raise ClusterError(
                f"{root}: a local cluster is already described there ({STATE_FILE}); run "
                "`python -m jobs.cluster down` first, or pick another --root"
            )
        if len(root) > 40:
            raise ClusterError(
                f"{root}: expected a directory path of at most 40 characters (Ray's Unix "
                "socket paths under each node's temp dir are limited to 107 bytes)"
            )
        os.makedirs(root, exist_ok=True)
        token = os.path.join(root, TOKEN_FILE)
        with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        return cls(root, free_port(), free_port(), free_port())

    @classmethod
    def load(cls, root: str) -> LocalCluster:
        path = os.path.join(os.path.abspath(root), STATE_FILE)
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            raise ClusterError(
                f"{path}: no local cluster there; start one with `python -m jobs.cluster up`"
            ) from None
        nodes = {n["name"]: Node(**n) for n in state.pop("nodes")}
        types = [NodeType(**t) for t in state.pop("node_types", [])]
        return cls(**state, nodes=nodes, node_types=types)

    @property
    def address(self) -> str:
        """The GCS address a driver joins (``RAY_ADDRESS``)."""
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's URL: the job server ``ray job submit --address`` talks to."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        with open(os.path.join(self.root, TOKEN_FILE)) as f:
            return f.read().strip()

    def driver_env(self, base: dict | None = None) -> dict[str, str]:
        """An environment for a driver (``python -m jobs.train``) or ``ray job submit`` that
        joins this cluster: its address and token."""
        env = dict(os.environ if base is None else base)
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def save(self) -> None:
        state = dataclasses.asdict(self)
        state["nodes"] = [dataclasses.asdict(n) for n in self.nodes.values()]
        state["node_types"] = [dataclasses.asdict(t) for t in self.node_types]
        path = os.path.join(self.root, STATE_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, path)  # never a half-written description

    def start_head(
        self, cpus: float = 0, env: dict | None = None, node_types: list[NodeType] | None = None
    ) -> Node:
        """The head node with its dashboard (the job server) on 127.0.0.1; with ``node_types``,
        also Ray's autoscaler, which adds nodes of those types when work waits for their
        resources and removes them after ``idle_timeout_s`` idle."""
        node = Node(HEAD, 0, HEAD_IP, cpus)
        args = [
            "--head",
            f"--port={self.port}",
            f"--ray-client-server-port={self.client_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
        ]
        if node_types:
            self.node_types = list(node_types)
            args.append(f"--autoscaling-config={self._write_autoscaling_config(cpus)}")
            env = {**(env or {}), **AUTOSCALER_ENV}
        return self._start(node, args, env)

    def _write_autoscaling_config(self, head_cpus: float) -> str:
        """The autoscaler's cluster config (Ray's fake multi-node provider) for the node types:
        its nodes join this head's GCS."""
        types = {t.name: t.autoscaler_entry() for t in self.node_types}
        types[FAKE_HEAD_TYPE] = {
            "resources": {"CPU": head_cpus, HEAD: 1.0},
            "node_config": {},
            "max_workers": 0,
        }
        config = {
            "cluster_name": os.path.basename(self.root),
            "max_workers": sum(t.max_workers for t in self.node_types),
            "provider": {
                # Ray's fake provider by its module: as "fake_multinode" the autoscaler would
                # read defaults from an example file the wheel does not ship.
                "type": "external",
                "module": FAKE_PROVIDER,
                "gcs_address": self.address,
                "head_node_id": FAKE_HEAD_ID,
                "launch_multiple": True,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": types,
            "head_node_type": FAKE_HEAD_TYPE,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        path = os.path.join(self.root, AUTOSCALING_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, path)
        return path

    def add_node(
        self,
        cpus: float = 2,
        gpus: float = 0,
        resources: dict | None = None,
        env: dict | None = None,
    ) -> Node:
        """A worker node joining the head; ``env``: variables its processes have on top of
        this process's (a node's own credentials, for one)."""
        if HEAD not in self.nodes:
            raise ClusterError(f"{self.root}: the head node is not started")
        k = self.next_index
        self.next_index += 1
        name = f"node_{k}"
        node = Node(name, k, f"127.0.0.{10 + k}", cpus, gpus, {name: 1.0, **(resources or {})})
        return self._start(node, [f"--address={self.address}"], env)

    def _start(self, node: Node, args: list[str], env: dict | None) -> Node:
        os.makedirs(node.temp_dir(self.root), exist_ok=True)
        low = FIRST_WORKER_PORT + node.index * WORKER_PORTS
        cmd = [
            ray_executable(),
            "start",
            *args,
            f"--node-ip-address={node.ip}",
            f"--temp-dir={node.temp_dir(self.root)}",
            f"--num-cpus={node.cpus:g}",
            f"--num-gpus={node.gpus:g}",
            f"--resources={json.dumps(node.resources)}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + WORKER_PORTS - 1}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        node_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        node_env.update(env or {})
        node_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        done = subprocess.run(
            cmd,
            cwd=node.dir(self.root),
            env=node_env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
        if done.returncode:
            raise ClusterError(
                f"`ray start` of {node.name} ({node.ip}) exited {done.returncode}:\n"
                f"{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
            )
        self.nodes[node.name] = node
        self.save()
        return node

    def pids(self, name: str) -> list[int]:
        """The live processes of node ``name``: every process naming its temp dir (the
        raylet, GCS, agents, workers), the head's client server, and their children."""
        node = self.nodes[name]
        marks = [node.temp_dir(self.root) + "/"]
        if name == HEAD:
            marks.append(f"--port={self.client_port}")
        return _processes_marked(marks)

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Kill node ``name`` as a machine dies (SIGKILL, no clean-up): its own PIDs only.
        Returns how many processes were signalled."""
        if name not in self.nodes:
            raise ClusterError(f"{name}: no such node (the cluster has {sorted(self.nodes)})")
        pids = self.pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        del self.nodes[name]
        self.save()
        return len(pids)

    def down(self) -> None:
        """Stop every node (workers first, then the head) and remove the description."""
        import psutil

        pids = [p for name in self.nodes for p in self.pids(name)]
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.terminate()
                procs.append(proc)
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.nodes.clear()
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.root, STATE_FILE))

    def status(self) -> list[tuple[Node, int]]:
        """Every node described, with how many of its processes are alive (0: lost)."""
        return [(node, len(self.pids(name))) for name, node in self.nodes.items()]


def _processes_marked(marks: list[str]) -> list[int]:
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks):
            roots.append(proc)
    found = {p.pid for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.update(c.pid for c in root.children(recursive=True))
    found.discard(os.getpid())
    return sorted(found)


def wait_for_nodes(cluster: LocalCluster, alive: int, timeout_s: float = 60) -> None:
    """Wait until the head's GCS counts ``alive`` live nodes (a killed one is counted dead
    only after its heartbeats stop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = live_nodes(cluster)
        if count == alive:
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{cluster.address}: {count} live nodes after {timeout_s:g} s, expected {alive}"
            )
        time.sleep(1)


def live_nodes(cluster: LocalCluster) -> int:
    """Live nodes as the head's state API lists them (no driver needed)."""
    return len(state(cluster, "nodes", state="ALIVE"))


def state(cluster: LocalCluster, kind: str, **equal: str) -> list[dict]:
    """Ray's state API (``/api/v0/<kind>``: nodes, actors, tasks...) of the cluster, over HTTP
    with its token, filtered by ``field=value``: no driver joins the cluster for it."""
    import urllib.parse
    import urllib.request

    query = [("limit", "10000")]
    for key, value in equal.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    url = f"{cluster.dashboard}/api/v0/{kind}?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]["result"]["result"]


def ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment."""
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
