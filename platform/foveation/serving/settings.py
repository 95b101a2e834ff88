"""Settings of the Serve application (``serve/``): one frozen dataclass per concern, validated in
``__post_init__``, loaded from a TOML file and/or a nested dict (the app builder's ``settings``
argument or the ``args`` of ``serve/serve.yaml``).

Secrets are never settings: the bearer token is read from the environment variable named by
``auth.token_env`` inside the replica, so it never appears in a Serve config, the dashboard or
a log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foveation.config import ConfigError, dataclass_from_dict, in_file, read_toml, require

HEATMAPS = ("probabilities", "apsm")


@dataclass(frozen=True)
class LimitsConfig:
    """What a request may cost; beyond it the answer is a 4xx JSON error, never a crash."""

    max_body_bytes: int = 64 << 20
    """Largest request body (an uploaded image), checked while it is read."""
    max_pixels: int = 40_000_000
    """Largest uploaded image, width x height, checked from the header before decoding."""
    max_slide_pixels: int = 20_000_000_000
    """Largest slide (level 0, width x height) a whole-slide job accepts."""
    max_job_body_bytes: int = 16384
    """Largest body of ``POST /v1/jobs`` (a small JSON document), checked while it is read."""
    body_idle_timeout_s: float = 10.0
    """Longest wait for the next chunk of a request body; beyond it the request gets 408 and
    its connection is closed (a slow or stalled client cannot hold the ingress). Not an
    end-to-end limit: a 40 MP upload that keeps arriving takes as long as it takes."""
    replica_wait_s: float = 30.0
    """Longest wait for a deployment's replica to take a request (the model's or the slide-job
    runner's); beyond it 503 ``no_replica`` with ``Retry-After``, never a hang. It bounds the
    wait for a replica, not the work: none is alive while its node is lost, or while the
    cluster's autoscaler adds one. A request a replica took runs as long as it runs. It must
    cover one replica's start (5 to 15 s on CPU): a replica the autoscaler or a lost node's
    replacement brings."""
    max_in_flight: int = 512
    """Requests one ingress replica holds at once (being received, waiting or answered);
    beyond it 503 at once. It bites only below ``serve.ingress.max_ongoing_requests`` (Ray
    never hands the replica more); keep that one high (1024 by default) so that stalled
    clients wait here, not in Ray's queue in front of every other request."""

    def __post_init__(self) -> None:
        w = "serve.limits"
        require(self.max_body_bytes >= 1024, f"{w}.max_body_bytes", "must be >= 1024")
        require(self.max_job_body_bytes >= 256, f"{w}.max_job_body_bytes", "must be >= 256")
        require(self.body_idle_timeout_s > 0, f"{w}.body_idle_timeout_s", "must be > 0")
        require(self.max_in_flight >= 1, f"{w}.max_in_flight", "must be >= 1")
        require(self.replica_wait_s > 0, f"{w}.replica_wait_s", "must be > 0")
        require(self.max_pixels >= 1, f"{w}.max_pixels", "must be >= 1")
        require(self.max_slide_pixels >= 1, f"{w}.max_slide_pixels", "must be >= 1")


@dataclass(frozen=True)
class AuthConfig:
    token_env: str = "FOVEATION_SERVE_TOKEN"
    """Environment variable (of the Ray nodes) holding the bearer token; unset or empty: no
    authentication. /healthz and /docs stay open."""

    token_file: str | None = None
    """A file holding the bearer token (e.g. a mounted Kubernetes secret); read by the ingress
    replica, and used instead of ``token_env`` when set."""

    def __post_init__(self) -> None:
        require(bool(self.token_env), "serve.auth.token_env", "must name a variable")

    def read_token(self) -> str:
        """The token ('' = no authentication). A token file that cannot be read is an error,
        never a silently open server."""
        import os

        if self.token_file:
            try:
                with open(self.token_file) as f:
                    return f.read().strip()
            except OSError as exc:
                raise ConfigError(
                    f"serve.auth.token_file {self.token_file!r}: cannot read it ({exc.strerror})"
                ) from None
        return os.environ.get(self.token_env, "").strip()


@dataclass(frozen=True)
class JobsConfig:
    """Whole-slide jobs: where their state and results live, which slides they may read."""

    store: str = "runs/serve/jobs"
    """Path or s3:// prefix: ``<store>/<job id>/state.json`` and the job's result files. On a
    cluster of more than one node it must be s3:// (the runner writes it on one node, the
    ingress reads it on another), unless ``shared_filesystem``."""
    shared_filesystem: bool = False
    """Every node mounts the same disk at ``store``: a local store is then allowed on a
    cluster of several nodes."""
    allowed_prefixes: tuple[str, ...] = ("runs/data/",)
    """Slide URIs must lie under one of these (paths resolved, symlinks followed; s3://
    prefixes compared by bucket and key). Anything else is refused with 403."""
    max_concurrent: int = 1
    """Jobs the job runner segments at once; the others wait queued."""
    max_queued: int = 16
    """Jobs waiting to run; a submission beyond it gets 503 (retry later)."""
    run_as: str = "tasks"
    """"tasks": each job's slide is segmented by a Ray task (``task_cpus``, ``task_gpus``)
    wherever the cluster has room, so whole-slide work scales past the runner's one replica
    (``max_concurrent`` at once); "runner": in the runner replica's own threads."""
    task_cpus: float = 0.5
    """CPUs of a slide task (its torch threads); raise it on a cluster (e.g. 4)."""
    task_gpus: float = 0.0
    """GPUs of a slide task (``device`` "cuda" needs > 0)."""
    checkpoint_interval_s: float = 30.0
    """A running job saves the rows it has finished to ``<store>/<job id>/partial/`` this
    often (0: after every band); a job resumed after its replica died continues from there."""
    progress_interval_s: float = 1.0
    """Least time between two writes of a running job's progress to the store."""
    heatmap: str = "probabilities"
    """"probabilities": K-channel class probabilities at 1/s resolution; "apsm": F's average
    patch size map (the x_r grid). Both are written; this one is ``results.heatmap``."""
    presign_s: int = 300
    """``GET /v1/jobs/{id}/results/{name}?redirect=true`` on an S3 store answers 307 to a
    presigned URL valid this long (the download then goes straight to S3, not through the
    ingress)."""
    geojson_max_side: int = 4096
    """Polygons are traced on the label map shrunk (by mode) by the least power of 2 that
    brings its longer side to at most this; coordinates are level-0 pixels."""
    geojson_tile: int = 1024
    """Polygons are traced per tile of this side (on the shrunk map), then merged across tiles
    per class: one valid MultiPolygon per class."""
    geojson_simplify_px: float = 0.0
    """0: exact pixel boundaries (areas equal pixel counts). > 0: simplified with this tolerance
    in shrunk-map pixels (topology kept; each boundary moves by at most this, so an area by at
    most the tolerance times the perimeter: under 1% for regions over ~40 px across at 1 px)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_prefixes", tuple(self.allowed_prefixes))
        w = "serve.jobs"
        require(bool(self.store), f"{w}.store", "must be a path or s3:// prefix")
        require(self.max_concurrent >= 1, f"{w}.max_concurrent", "must be >= 1")
        require(self.max_queued >= 0, f"{w}.max_queued", "must be >= 0")
        require(self.checkpoint_interval_s >= 0, f"{w}.checkpoint_interval_s", "must be >= 0")
        require(self.run_as in ("tasks", "runner"), f"{w}.run_as", "must be 'tasks' or 'runner'")
        require(self.task_cpus > 0, f"{w}.task_cpus", "must be > 0")
        require(self.task_gpus >= 0, f"{w}.task_gpus", "must be >= 0")
        require(self.progress_interval_s >= 0, f"{w}.progress_interval_s", "must be >= 0")
        require(self.heatmap in HEATMAPS, f"{w}.heatmap", f"must be one of {HEATMAPS}")
        require(self.geojson_max_side >= 16, f"{w}.geojson_max_side", "must be >= 16")
        require(1 <= self.presign_s <= 604800, f"{w}.presign_s", "must be in [1, 604800]")
        require(self.geojson_tile >= 16, f"{w}.geojson_tile", "must be >= 16")
        require(self.geojson_simplify_px >= 0, f"{w}.geojson_simplify_px", "must be >= 0")
        for p in self.allowed_prefixes:
            require(
                bool(p) and ".." not in p.split("/"),
                f"{w}.allowed_prefixes",
                f"{p!r}: must be a non-empty path or s3:// prefix without '..'",
            )


@dataclass(frozen=True)
class BatchingConfig:
    """``@serve.batch`` of tile forwards from concurrent requests in a model replica."""

    enabled: bool = True
    max_batch_locations: int = 64
    """Most locations (patch banks) in one segmenter forward."""
    wait_timeout_s: float = 0.005
    """Longest a tile batch waits for more requests' tiles before it runs."""

    def __post_init__(self) -> None:
        w = "serve.batching"
        require(self.max_batch_locations >= 1, f"{w}.max_batch_locations", "must be >= 1")
        require(self.wait_timeout_s >= 0, f"{w}.wait_timeout_s", "must be >= 0")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Serve's ``autoscaling_config`` of the model deployment (field names as Serve's)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 5.0

    def __post_init__(self) -> None:
        w = "serve.autoscaling"
        require(self.min_replicas >= 1, f"{w}.min_replicas", "must be >= 1 (no scale to zero)")
        require(
            self.max_replicas >= self.min_replicas,
            f"{w}.max_replicas",
            f"must be >= min_replicas ({self.min_replicas})",
        )
        require(self.target_ongoing_requests > 0, f"{w}.target_ongoing_requests", "must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            require(getattr(self, name) >= 0, f"{w}.{name}", "must be >= 0")
        for name in ("metrics_interval_s", "look_back_period_s"):
            require(getattr(self, name) > 0, f"{w}.{name}", "must be > 0")

    def to_serve(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }


@dataclass(frozen=True)
class ReplicaConfig:
    """Resources and queue bounds of one deployment's replicas. The built-in defaults fit a
    2-core laptop (model 0.5, ingress 0.25, runner 0.5, as ``serve/serve.toml``): with 1 CPU
    each the ingress could not be scheduled on a fresh 2-CPU Ray and the app never answered."""

    num_cpus: float = 0.5
    """Logical CPUs per replica (fractional on a laptop: docs/contracts.md#ray-on-2-cores)."""
    num_gpus: float = 0.0
    """GPUs per replica on a cluster (fractional shares one GPU)."""
    max_ongoing_requests: int = 4
    """Requests one replica works on at once."""
    max_queued_requests: int = 16
    """Requests waiting for a replica; beyond it callers get 503 at once (-1: no bound)."""
    torch_threads: int | None = None
    """torch intra-op threads in the replica; None: Ray's default (from num_cpus)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica (a node type's label, e.g. ``{"gpu_node": 0.01}``),
    so its replicas land only on nodes that advertise them."""
    max_replicas_per_node: int | None = None
    """At most this many of the deployment's replicas on one node (None: no bound; Serve
    spreads them anyway where it can). 1 keeps the model's replicas on different machines,
    so one node's loss leaves the others serving."""
    max_surge_percent: int | None = None
    """Extra replicas (percent of the target, rounded up) Serve may start during a rolling
    update (a redeploy with another checkpoint or settings): the replacements start, and the
    old replicas keep serving until they run. None: 100 for the model and the ingress, 0 for
    the runner (which must not surge). 0 is Serve's default, which stops the old
    replica first: with one replica every request of the gap waits for the new one to start
    (and an ingress stopped meanwhile kills the requests it held after its graceful timeout:
    4 of 40 answered 500 on the landing machine). It costs one more replica's resources for
    the rollout; on a full GPU node the replacement waits and the old one keeps serving."""

    def __post_init__(self) -> None:
        w = "serve.<deployment>"
        require(self.num_cpus >= 0, f"{w}.num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, f"{w}.num_gpus", "must be >= 0")
        require(self.max_ongoing_requests >= 1, f"{w}.max_ongoing_requests", "must be >= 1")
        require(
            self.max_queued_requests == -1 or self.max_queued_requests >= 1,
            f"{w}.max_queued_requests",
            "must be -1 (no bound) or >= 1",
        )
        require(
            self.torch_threads is None or self.torch_threads >= 1,
            f"{w}.torch_threads",
            "must be >= 1",
        )
        require(
            self.max_replicas_per_node is None or self.max_replicas_per_node >= 1,
            f"{w}.max_replicas_per_node",
            "must be >= 1",
        )
        require(
            self.max_surge_percent is None or 0 <= self.max_surge_percent <= 100,
            f"{w}.max_surge_percent",
            "must be in [0, 100]",
        )
        require(
            isinstance(self.resources, dict)
            and all(
                isinstance(k, str) and isinstance(v, int | float) and v >= 0
                for k, v in self.resources.items()
            ),
            f"{w}.resources",
            f"must be a table of resource names to amounts >= 0, got {self.resources!r}",
        )

    def deployment_options(self, surge_default: int) -> dict[str, Any]:
        """The Serve deployment options these settings give (``.options(**...)``);
        ``surge_default`` stands where ``max_surge_percent`` is None."""
        surge = self.max_surge_percent
        opts: dict[str, Any] = {
            "ray_actor_options": self.actor_options(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "max_surge_percent": surge_default if surge is None else surge,
        }
        if self.max_replicas_per_node is not None:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        return opts

    def actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.resources:
            opts["resources"] = {k: float(v) for k, v in self.resources.items()}
        return opts


@dataclass(frozen=True)
class ServeConfig:
    device: str = "cpu"
    """"cpu", "cuda" or "cuda:N" (give the model deployment ``num_gpus``), or "auto": CUDA
    where the process sees a device, else CPU (``device_here``). "auto" is the setting for an
    autoscaled cluster: a replica placed on a GPU node serves there on its GPU, and one whose
    node advertises a GPU without a working CUDA still serves, on CPU."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    model: ReplicaConfig = field(default_factory=ReplicaConfig)
    """The model deployment (autoscaled; synchronous /v1/segment requests)."""
    ingress: ReplicaConfig = field(
        default_factory=lambda: ReplicaConfig(
            num_cpus=0.25, max_ongoing_requests=1024, max_queued_requests=256
        )
    )
    """The FastAPI ingress (light: decoding, validation, routing). Its requests mostly wait
    (on a client's body, on the model), so it takes many at once; ``limits.max_in_flight``
    bounds them with a JSON 503."""
    runner: ReplicaConfig = field(
        default_factory=lambda: ReplicaConfig(
            num_cpus=0.5, max_ongoing_requests=64, max_queued_requests=64
        )
    )
    """The whole-slide job runner (one replica: it owns the jobs it runs, and a new one resumes
    those left running, so it never surges: two runners would run one job twice)."""

    def __post_init__(self) -> None:
        require(
            not self.runner.max_surge_percent,
            "serve.runner.max_surge_percent",
            "must be 0 (a second runner would resume the jobs the first still runs)",
        )
        require(
            self.device in ("cpu", "auto") or self.device.startswith("cuda"),
            "serve.device",
            f"must be 'cpu', 'auto' or 'cuda[:N]', got {self.device!r}",
        )
        if self.device.startswith("cuda"):
            slide_gpus = (
                self.jobs.task_gpus if self.jobs.run_as == "tasks" else self.runner.num_gpus
            )
            require(
                self.model.num_gpus > 0 and slide_gpus > 0,
                "serve.device",
                "'cuda' needs serve.model.num_gpus > 0, and serve.jobs.task_gpus > 0 (or "
                "serve.runner.num_gpus > 0 with jobs.run_as = 'runner')",
            )


def device_here(settings: ServeConfig) -> str:
    """The torch device this process serves on: ``serve.device``, "auto" resolved here."""
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def serve_config_from_dict(data: dict[str, Any] | None) -> ServeConfig:
    """A validated :class:`ServeConfig` from nested dicts; unknown keys are errors."""
    return dataclass_from_dict(ServeConfig, dict(data or {}), "serve")


def load_serve_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ServeConfig:
    """The ``[serve]`` table of a TOML file (or the whole file if it has none), with
    ``overrides`` merged in table by table. Errors name the field, and the file when there is
    one."""
    if path is None:
        return serve_config_from_dict(overrides)
    doc = read_toml(path, "serve config file")
    try:
        return serve_config_from_dict(_merge(doc.get("serve", doc), overrides or {}))
    except ConfigError as exc:
        raise in_file(exc, path, "serve config file") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
