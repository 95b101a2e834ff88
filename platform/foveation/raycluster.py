"""Connecting to Ray and fanning work out as tasks: the one place jobs start Ray from.

On a laptop (the embedded default) a local Ray starts in-process with more logical CPUs than
cores (docs/contracts.md#ray-on-2-cores: tasks take fractional CPUs so they never wait on each
other forever); with ``RAY_ADDRESS`` set (``ray job submit`` sets it) the job joins that
cluster instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_LOGICAL_CPUS = 4


# Storage settings the driver has and its tasks need (where the S3 endpoint is, which region,
# no EC2 metadata look-ups): passed to every worker of the job through its runtime_env. Only
# settings: a runtime_env is readable by anyone holding the cluster's token (the job API, the
# state API, the dashboard), so credentials never travel in it (SECRET_ENV).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",  # a profile's name; its keys are in the node's ~/.aws
    "AWS_EC2_METADATA_DISABLED",
    # Not storage, but the same need: a job that turns Ray Data's progress bars off (the demo)
    # turns them off in the Train workers and actors that execute its datasets too.
    "RAY_DATA_DISABLE_PROGRESS_BARS",
)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Credentials a worker reads from its own node: the environment its raylet was started with
(a local Ray started here inherits this process's), an instance role, or files the cluster's
manifests mount. Never forwarded (docs/operations.md#credentials)."""


def init_ray(
    logical_cpus: int = DEFAULT_LOGICAL_CPUS,
    address: str | None = None,
    dashboard: bool = False,
    quiet: bool = False,
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray; idempotent.

    ``dashboard``: start the local Ray with its dashboard, whose state API Ray Train needs to
    free the placement group of a run whose driver was killed (a Tune trial that ASHA stops);
    a cluster started with ``ray start`` has it already. ``quiet`` (the demo): the output of
    Ray's workers and actors (DeepSpeed's banners, Ray Train's checkpoint notices, the
    controller's warnings) stays in Ray's log files (``ray_logs_dir()``) instead of reaching
    this console; the platform's own progress lines come from the driver anyway."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster started with `ray start` has token auth on (Ray 2.60); joining needs this
        # set before Ray is first imported. Users may still set RAY_AUTH_MODE themselves.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime_env = {"env_vars": env} if env else None
    if quiet:
        _quiet_loggers()
    if address:
        ray.init(
            address=address,
            runtime_env=runtime_env,
            log_to_driver=not quiet,
            logging_level=logging.ERROR if quiet else logging.INFO,
        )
    else:
        ray.init(
            address="local",  # a new local instance, never a stray `ray start` one found by chance
            num_cpus=logical_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=not quiet,
            logging_level=logging.ERROR if quiet else logging.INFO,
        )
    if quiet:  # Ray Data sets its logger's level when imported: import it, then quieten it
        import ray.data

        _quiet_loggers()


def _quiet_loggers() -> None:
    """The driver's own Ray notices (token auth, execution plans) to errors only."""
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_nodes() -> int:
    """Live nodes of the Ray cluster this process has joined (1 on a laptop's local Ray)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


@dataclass(frozen=True)
class Growth:
    """What the cluster's autoscaler can add to it, as far as Ray says."""

    autoscaled: bool = False
    """An autoscaler with node types runs: resources missing now may come."""
    maxima: dict[str, float] | None = None
    """The most of each resource its node types give, where Ray publishes them (None: it
    does not; Ray 2.60 publishes them only where the platform reports the cluster's config,
    not on `ray up` or KubeRay clusters)."""


def cluster_growth() -> Growth:
    """What the autoscaler of the cluster this process has joined can add. A laptop's local
    Ray (started by this process) has none; a joined cluster has one when Ray publishes its
    node types' maxima, when its autoscaler is v2 (KubeRay's; a v2 started by hand without a
    config counts too: then a shortfall waits, said, instead of failing), or when v1's status
    names node types of a cluster config (a cluster without one names each ``node_<id>``)."""
    import ray

    try:  # Ray Train v2 reads the same (a private API: a missing one means "do not know")
        from ray._private.state import state

        maxima = state.get_max_resources_from_cluster_config()
    except Exception:
        maxima = None
    if maxima is not None:
        return Growth(True, maxima)
    node = ray._private.worker._global_node
    if node is not None and getattr(node, "ray_init_cluster", False):
        return Growth()  # a local Ray this process started: nothing adds nodes to it
    return Growth(_autoscaler_v2() or v1_names_node_types(_v1_status()))


def _autoscaler_v2() -> bool:
    """Whether the cluster runs Ray's autoscaler v2 (the GCS's flag): KubeRay's, which
    reports no node types Ray exposes, so its presence is what says the cluster may grow."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:
        return False


def _v1_status() -> dict | None:
    try:
        import json

        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        return json.loads(raw) if raw else None
    except Exception:
        return None


def v1_names_node_types(status: dict | None) -> bool:
    """Whether the v1 autoscaler's status (the GCS's ``__autoscaling_status``) names node
    types of a cluster config: its read-only provider (no config: `ray start` by hand) names
    each node ``node_<node id>``; a launcher or KubeRay config names them ("ray.head.default",
    "gpu")."""
    report = (status or {}).get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    types |= set(report.get("pending_launches") or {})
    types |= {entry[1] for entry in report.get("pending_nodes") or [] if len(entry) > 1}
    return any(not str(t).startswith("node_") for t in types)


def local_paths_problem(paths: list[tuple[str, str]], shared: str) -> str | None:
    """Why ``paths`` (``(what, uri)``) cannot be handed to processes on other nodes of the
    cluster this process has joined, or None: on one node without an autoscaler anything goes;
    on more (or where an autoscaler can add one) each must be an object-storage URI, unless the
    ``shared`` setting (named in the message) says every node mounts the same disk."""
    from foveation.io import storage

    local = [(what, uri) for what, uri in paths if uri and not storage.is_remote(uri)]
    if not local:
        return None
    nodes = cluster_nodes()
    if nodes == 1 and not cluster_growth().autoscaled:
        return None
    return describe_local_paths(local, nodes, shared)


def describe_local_paths(local: list[tuple[str, str]], nodes: int, shared: str) -> str:
    """The refusal of local paths (``(what, uri)``, the first named) on ``nodes`` nodes."""
    what, uri = local[0]
    grows = "" if nodes > 1 else " (its autoscaler can add more)"
    return (
        f"{what}: {uri!r} is a local path, and the Ray cluster has {nodes} nodes{grows}: "
        "processes on other nodes cannot see this machine's disk. Expected an object-storage "
        f"URI (s3://bucket/...), or {shared} = true if every node mounts this path"
        + (f" ({len(local) - 1} more local paths)" if len(local) > 1 else "")
    )


def on_this_node() -> dict:
    """Ray options that keep an actor on the node of the process creating it (the driver): a
    driver-side helper (the pipeline's epoch clock, its error log) must not sit on a worker
    node whose loss would kill it and fail the run; the driver's own node dying ends the run
    anyway. Ray Train places its controller the same way."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def ray_logs_dir() -> str | None:
    """Where this Ray session writes its logs (every worker's stdout and stderr), if known."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # a private API: a hint for the user, never a failure
        return None


def ray_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    num_cpus: float = 0.5,
    desc: str = "tasks",
    max_retries: int = 2,
    on_error: Callable[[Any, Exception], Any] | None = None,
) -> Iterator[Any]:
    """Run ``fn`` on every item as a Ray task; yield results as they finish, with a progress bar.

    ``max_retries`` covers crashed workers (system failures); ``fn`` itself should turn bad
    input into a result rather than raise; what still fails goes to ``on_error(item, exc)``,
    whose result is yielded instead (without it, the error is raised)."""
    import ray
    from tqdm import tqdm

    init_ray()
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    item_of = {}
    for it in items:
        item_of[task.remote(it)] = it
    pending = list(item_of)
    with tqdm(total=len(pending), desc=desc, file=sys.stderr, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                bar.update(1)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # a worker that died (OOM, a crash in native code)
                    if on_error is None:
                        raise
                    result = on_error(item_of[ref], exc)
                yield result
