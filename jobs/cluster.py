"""A multi-node Ray cluster on this machine, to try the cluster path on a laptop before paying for
one: a head with no CPUs and worker nodes, each a real raylet at its own 127.0.0.x address, in
its own directory, with token authentication (``foveation.localcluster``).

python -m jobs.cluster up [--nodes 2] [--cpus 2] [--gpu-nodes 0] [--root DIR]
python -m jobs.cluster status | add [--cpus 2] | kill NODE | down   [--root DIR]

``up`` prints the two variables a driver or ``ray job submit`` needs; the platform's jobs then
run unchanged on the cluster (with s3:// URIs: each node has its own disk). ``--gpu-nodes N``
also starts Ray's autoscaler with a node type ``gpu`` (``--cpus`` CPUs and one declared GPU,
no CUDA): it adds up to N of them when work asks for a GPU and removes each after
``--idle-s`` idle, as a cloud autoscaler would (a Serve app with ``serve.device = "auto"``
and ``serve.model.num_gpus = 1`` scales onto them and serves there on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

from foveation.localcluster import HEAD, LocalCluster, NodeType, live_nodes, wait_for_nodes
from jobs._cli import job

DEFAULT_ROOT = f"/tmp/foveation-cluster-{os.getuid()}"


def _print_access(cluster: LocalCluster) -> None:
    print(
        f"cluster at {cluster.address}, dashboard and job server {cluster.dashboard}\n"
        "to join it (a driver, or `ray job submit --address "
        f"{cluster.dashboard}`):\n"
        f"  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token "
        f'RAY_AUTH_TOKEN="$(cat {cluster.root}/auth_token)"'
    )


def _up(args: argparse.Namespace) -> int:
    cluster = LocalCluster.create(args.root)
    cluster.idle_timeout_s = args.idle_s
    gpu = NodeType("gpu", cpus=args.cpus, gpus=1, max_workers=args.gpu_nodes)
    try:
        cluster.start_head(cpus=0, node_types=[gpu] if args.gpu_nodes else None)
        if args.gpu_nodes:
            print(
                f"autoscaler on: up to {args.gpu_nodes} gpu nodes, each removed {args.idle_s:g} s idle"
            )
        for _ in range(args.nodes):
            node = cluster.add_node(cpus=args.cpus)
            print(f"started {node.name} at {node.ip} ({node.cpus:g} CPUs)")
        wait_for_nodes(cluster, alive=args.nodes + 1)
    except BaseException:
        cluster.down()  # never a half-started cluster left running
        raise
    _print_access(cluster)
    return 0


def _status(args: argparse.Namespace) -> int:
    cluster = LocalCluster.load(args.root)
    for node, processes in cluster.status():
        state = f"{processes} processes" if processes else "LOST (no process left)"
        print(f"{node.name:8} {node.ip:12} {node.cpus:g} CPUs {node.gpus:g} GPUs  {state}")
    if cluster.node_types:
        added = live_nodes(cluster) - sum(1 for _, processes in cluster.status() if processes)
        kinds = ", ".join(f"{t.name} (at most {t.max_workers})" for t in cluster.node_types)
        print(f"autoscaled: {added} nodes now, of the types {kinds}")
    _print_access(cluster)
    return 0


def _add(args: argparse.Namespace) -> int:
    cluster = LocalCluster.load(args.root)
    node = cluster.add_node(cpus=args.cpus)
    print(f"started {node.name} at {node.ip} ({node.cpus:g} CPUs)")
    return 0


def _kill(args: argparse.Namespace) -> int:
    cluster = LocalCluster.load(args.root)
    n = cluster.kill_node(args.node)
    print(f"killed {args.node} ({n} processes, SIGKILL: as a machine dies)")
    return 0


def _down(args: argparse.Namespace) -> int:
    cluster = LocalCluster.load(args.root)
    names = sorted(cluster.nodes, key=lambda n: n == HEAD)
    cluster.down()
    print(f"stopped {', '.join(names) or 'nothing'} under {cluster.root}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=DEFAULT_ROOT, help="the cluster's directory (%(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and --nodes worker nodes")
    up.add_argument("--nodes", type=int, default=2, help="worker nodes (%(default)s)")
    up.add_argument("--cpus", type=float, default=2, help="logical CPUs per node (%(default)s)")
    up.add_argument(
        "--gpu-nodes",
        type=int,
        default=0,
        help="most autoscaled nodes of one declared GPU (%(default)s: no autoscaler)",
    )
    up.add_argument(
        "--idle-s", type=float, default=30, help="idle seconds before one goes (%(default)s)"
    )
    up.set_defaults(run=_up)
    sub.add_parser("status", help="the nodes and whether each is alive").set_defaults(run=_status)
    add = sub.add_parser("add", help="one more worker node (a machine joining)")
    add.add_argument("--cpus", type=float, default=2, help="logical CPUs (%(default)s)")
    add.set_defaults(run=_add)
    kill = sub.add_parser("kill", help="kill one node by its own PIDs (a machine lost)")
    kill.add_argument("node", help="a node's name, as `status` prints it (node_1, ...)")
    kill.set_defaults(run=_kill)
    sub.add_parser("down", help="stop every node, by their own PIDs").set_defaults(run=_down)
    return p


@job
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "nodes", 1) < 1:
        raise SystemExit("error: --nodes: expected at least 1 worker node")
    if getattr(args, "gpu_nodes", 0) < 0 or getattr(args, "idle_s", 1) <= 0:
        raise SystemExit("error: --gpu-nodes: expected >= 0; --idle-s: expected > 0")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
