"""The driver side of distributed training: checks, then a Ray Train ``TorchTrainer`` whose
workers run ``worker.train_worker`` on their shards of the Ray Data pipeline.

    <out>/train/            Ray Train's run directory (its checkpoints, kept best K + latest)
    <out>/model/            the best checkpoint by val mIoU, exported without DeepSpeed state:
                            what ``jobs.evaluate`` and the Serve app load
    <out>/history/          the APSM of one validation slide after every epoch (Fig. 4)

Every check that can fail runs before a worker starts: the manifest, the splits, GPUs asked
for, an existing run, a checkpoint of another architecture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from foveation import monitoring
from foveation.checkpoint import (
    META,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from foveation.config import PLACEMENTS, Config, what_it_trains
from foveation.errors import FoveationError
from foveation.io import storage
from foveation.raycluster import Growth
from foveation.training.plan import FAULT_ENV, HistoryTarget, WorkerPlan, fault_steps

RUN_NAME = "train"


class TrainingError(FoveationError, RuntimeError):
    """A training run that cannot start (or finish); the message says why and what to do."""


@dataclass
class FitResult:
    model_uri: str  # the exported best checkpoint
    best_checkpoint_uri: str
    metrics: dict  # the best checkpoint's reported metrics
    history: list[dict]  # every report, in order
    skipped_slides: dict
    reads_by_node: list = field(default_factory=list)  # data.pipeline.NodeReads (streamed)


def _uri_of(out: str, fs_path: str) -> str:
    return "s3://" + fs_path.lstrip("/") if storage.is_remote(out) else fs_path


def architecture(cfg: Config) -> dict:
    """What must match for weights to load: the backbone, head, classes and patch geometry."""
    m = cfg.model
    return {
        "backbone": m.backbone,
        "num_classes": m.num_classes,
        "head_channels": m.head_channels,
        "fovnet_width": m.fovnet_width,
        "depth": cfg.patches.depth,
        "segmenters": m.segmenters,
    }


def _existing(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except storage.StorageError:
        return []


SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train's record of a run's registered checkpoints, in ``<run>/<RUN_NAME>/``."""


def registered_checkpoints(out: str) -> tuple[list[str], str | None]:
    """The registered checkpoints (URIs) of the run in ``out`` and the latest of them, from Ray
    Train's own snapshot: a checkpoint whose files were uploaded but whose report never
    completed (its node died mid-report) is not in it, so it is never resumed from, never
    half-used. ``([], None)`` before the first registration."""
    return _registered(storage.join(out, RUN_NAME))


def _registered(run_uri: str) -> tuple[list[str], str | None]:
    uri = storage.join(run_uri, SNAPSHOT)
    if not storage.exists(uri):
        return [], None
    try:
        snapshot = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise CheckpointError(f"{uri}: not Ray Train's checkpoint snapshot ({exc})") from None
    names = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    latest = snapshot.get("latest_checkpoint_result")
    every = [storage.join(run_uri, n) for n in names]
    return every, storage.join(run_uri, latest["checkpoint_dir_name"]) if latest else None


def _latest_checkpoint(run_uri: str) -> str | None:
    """The latest registered checkpoint in ``run_uri`` (``<out>/train``), or None."""
    return _registered(run_uri)[1]


def preflight(cfg: Config, manifest: str, run_uri: str, resume: bool, overwrite: bool) -> dict:
    """All the checks that need no worker; returns the manifest rows by split."""
    from foveation.data.manifest import read_manifest
    from foveation.errors import DataError
    from foveation.models.foveated import check_config

    check_config(cfg)  # the model-dependent config checks, before any worker starts
    try:
        rows = read_manifest(manifest).to_pylist()
    except DataError as exc:
        raise TrainingError(f"manifest: {exc}") from None
    splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    if not splits["train"]:
        raise TrainingError(
            f"manifest {manifest!r} has no slides in the train split "
            f"(splits: { {k: len(v) for k, v in splits.items()} }); re-run jobs.ingest with "
            "smaller data.ingest.val_fraction / test_fraction"
        )
    if cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        raise TrainingError(f"model.pretrained: {cfg.model.pretrained!r} does not exist")
    latest = _latest_checkpoint(run_uri)
    if latest and not (resume or overwrite):
        raise TrainingError(
            f"{run_uri} already holds a training run (latest checkpoint {latest}); pass "
            "--resume to continue it or --overwrite to start afresh"
        )
    if resume and latest:
        old = read_config(latest)
        if architecture(old) != architecture(cfg):
            raise CheckpointError(
                f"--resume: checkpoint {latest!r} is of another architecture "
                f"{architecture(old)}; the config asks for {architecture(cfg)}"
            )
    return splits


def resumable(run_uri: str, cfg: Config) -> bool:
    """Whether the run in ``run_uri`` was trained from ``cfg`` (its epoch count aside), so
    resuming it continues the same training rather than another one."""
    latest = _latest_checkpoint(run_uri)
    if latest is None:
        return False
    try:
        old = read_config(latest)
    except CheckpointError:
        return False
    same = dataclasses.replace(
        old, training=dataclasses.replace(old.training, epochs=cfg.training.epochs)
    )
    return what_it_trains(same) == what_it_trains(cfg)


class EpochLines:
    """Prints each epoch's line as rank 0 writes it under ``progress`` (``worker.
    write_epoch_line``), from the driver: the console then reads the same whether worker output
    reaches the driver or stays in Ray's log files (``raycluster.init_ray(quiet=True)``), and a
    line never shows twice. Polls storage every ``every_s`` on a daemon thread."""

    def __init__(self, progress: str, log: Callable[[str], None], every_s: float = 2.0):
        self.progress, self.log, self.every_s = progress, log, every_s
        self.seen = {u.rsplit("/", 1)[-1] for u in _existing(progress)}  # a resumed run's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last epoch's line, written just before the run ended

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        try:
            files = storage.list_files(self.progress, ".txt")
        except storage.StorageError:
            return  # nothing written yet
        for uri in files:
            name = uri.rsplit("/", 1)[-1]
            if name.startswith("epoch_") and name not in self.seen:
                self.seen.add(name)
                try:
                    self.log(storage.read_bytes(uri).decode())
                except storage.StorageError:
                    self.seen.discard(name)  # retried at the next poll


def run_resources(cfg: Config, loader: str | None = None) -> dict[str, float]:
    """Logical resources a training run holds: its Ray Train workers and, when its batches
    stream, its reader actors. ``loader``: the loader the run uses ("memory": no readers);
    None: as configured ("auto" may stream, so a Tune trial reserves them)."""
    dc, pc = cfg.distributed, cfg.data.pipeline
    readers = 0 if (loader or pc.loader) == "memory" else pc.reader_actors
    cpu = dc.num_workers * dc.cpus_per_worker + readers * pc.actor_cpus
    return {"CPU": cpu} | ({"GPU": dc.num_workers * dc.gpus_per_worker} if dc.use_gpu else {})


@dataclass(frozen=True)
class Shortfall:
    """A resource the run needs more of than the cluster has now. ``most``: what the cluster's
    autoscaler can grow it to (None: no autoscaler, or one that does not say how far)."""

    name: str
    need: float
    have: float
    most: float | None
    autoscaled: bool = False

    @property
    def fatal(self) -> bool:
        """No autoscaler can close it: the run would wait for ever. Where an autoscaler runs
        but Ray does not say what it can add, the run waits for it (and says so)."""
        if self.most is None:
            return not self.autoscaled
        return self.most < self.need


def shortfalls(needs: dict[str, float], have: dict[str, float], growth: Growth) -> list[Shortfall]:
    """What ``needs`` lacks in ``have``, with what the autoscaler can add (``growth``). An
    autoscaled cluster with GPU workers at ``min_workers = 0`` has no GPU until a run asks:
    that is a wait, not an error."""
    out = []
    for name, need in needs.items():
        now = have.get(name, 0.0)
        if now < need:
            most = growth.maxima
            cap = None if most is None else max(float(most.get(name, 0)), now)
            out.append(Shortfall(name, need, now, cap, growth.autoscaled))
    return out


def check_resources(cfg: Config, loader: str, log: Callable[[str], None] = print) -> None:
    """The run must fit the cluster, now or once its autoscaler has added nodes: a shortfall no
    autoscaler can close is an error before any worker starts; one it can close is said."""
    import ray

    from foveation.raycluster import cluster_growth

    dc, pc = cfg.distributed, cfg.data.pipeline
    for short in shortfalls(run_resources(cfg, loader), ray.cluster_resources(), cluster_growth()):
        if not short.fatal:
            log(
                f"distributed: the run needs {short.need:g} {short.name}; the cluster has "
                f"{short.have:g} now and {_can_add(short)}: waiting for it"
            )
        elif short.name == "GPU":
            raise TrainingError(
                f"distributed.use_gpu: {dc.num_workers} workers x {dc.gpus_per_worker} GPUs need "
                f"{short.need:g} GPUs; the Ray cluster has {short.have:g}"
                f"{_autoscaled(short)}. Set distributed.use_gpu = false to train on CPU"
            )
        else:
            readers = f" plus {pc.reader_actors} reader actors x {pc.actor_cpus} CPUs"
            raise TrainingError(
                f"distributed: {dc.num_workers} workers x {dc.cpus_per_worker} CPUs"
                f"{readers if loader == 'stream' else ''} need {short.need:g} logical "
                f"{short.name}s; the Ray cluster has {short.have:g}{_autoscaled(short)}"
            )


def _can_add(short: Shortfall) -> str:
    if short.most is None:
        return (
            "its autoscaler does not say what it can add (if it cannot, the run waits until "
            "it is stopped)"
        )
    return f"its autoscaler can add up to {short.most:g}"


def check_paths(cfg: Config, manifest: str, out: str, splits: dict) -> None:
    """On a cluster of more than one node (or one an autoscaler can grow), every path a worker
    opens must reach it from any node (``path_problem``); refused before any worker starts."""
    from foveation.raycluster import cluster_growth, cluster_nodes

    problem = path_problem(cfg, manifest, out, splits, cluster_nodes(), cluster_growth().autoscaled)
    if problem:
        raise TrainingError(problem)


def path_problem(
    cfg: Config, manifest: str, out: str, splits: dict, nodes: int, autoscaled: bool
) -> str | None:
    """Why a run on ``nodes`` nodes (``autoscaled``: an autoscaler may add more) cannot use
    these paths, or None. The run's output, the manifest and every slide must be
    object-storage URIs, unless ``distributed.shared_filesystem`` says every node mounts the same
    disk. A local path would be read or written on whichever node a worker landed on: files
    written that no other node sees, slides not found on another machine."""
    if cfg.distributed.shared_filesystem or (nodes == 1 and not autoscaled):
        return None
    local = [("--out", out), ("--manifest", manifest)]
    local += [(f"slide {r['slide_id']}", r["image_uri"]) for rows in splits.values() for r in rows]
    local = [(what, uri) for what, uri in local if uri and not storage.is_remote(uri)]
    if not local:
        return None
    from foveation.raycluster import describe_local_paths

    return describe_local_paths(local, nodes, "distributed.shared_filesystem") + (
        "; put the slides there with jobs.ingest --dest s3://..."
    )


def _autoscaled(short: Shortfall) -> str:
    return "" if short.most is None else f" and its autoscaler can add up to {short.most:g}"


def fit(
    cfg: Config,
    out: str,
    manifest: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    callbacks: list | None = None,
) -> FitResult:
    """Train ``cfg`` on ``manifest`` (default: ``data.ingest.dest``) into ``out`` (path or URI).
    ``callbacks``: Ray Train callbacks (a Tune trial passes Tune's report callback)."""
    # Workers run in their own directories (and on a cluster, on other machines): local paths
    # must be absolute before they leave the driver.
    manifest, out = storage.absolute(manifest or cfg.data.ingest.dest), storage.absolute(out)
    run_uri = storage.join(out, RUN_NAME)
    splits = preflight(cfg, manifest, run_uri, resume, overwrite)

    from foveation.raycluster import init_ray

    init_ray(cfg.distributed.logical_cpus)
    from foveation.data.samples import choose_loader

    check_resources(cfg, choose_loader(cfg, splits["train"], cfg.distributed.num_workers), log)
    check_paths(cfg, manifest, out, splits)
    if overwrite and _latest_checkpoint(run_uri):
        for stale in (run_uri, storage.join(out, "history")):
            storage.delete(stale, missing_ok=True)
        log(f"--overwrite: removed the previous run in {run_uri}")
    data = run_data(cfg, manifest, splits)
    plan = worker_plan(cfg, out, splits, data)
    trainer = torch_trainer(plan, data.datasets, out, callbacks)
    log(start_line(plan, splits, data.loader))
    result = run_trainer(trainer, plan, log)
    skipped = data.train_pipe.check() if data.loader == "stream" else {}
    fitted = export_best(result, cfg, out, log, skipped)
    if data.loader == "stream":
        fitted.reads_by_node = data.train_pipe.reads_by_node()
        log(reads_line(fitted.reads_by_node))
    return fitted


def reads_line(reads: list) -> str:
    """Where Ray Data's reader actors ran, node by node (``data.pipeline.NodeReads``)."""
    parts = [
        f"{r.node}: {r.slides} slide reads, {r.locations} locations, {r.locations_per_s:.1f}/s"
        for r in reads
    ]
    return "training reads by node: " + ("; ".join(parts) or "none")


@dataclass(frozen=True)
class RunData:
    """Where a run's batches come from, made on the driver before any worker starts."""

    clock: Any  # the pipeline's epoch clock (``data.pipeline.epoch_clock``)
    train_pipe: Any  # the training split's ``data.pipeline.Pipeline``
    loader: str  # "stream" (Ray Data's reader actors) or "memory" (cut in the workers)
    datasets: dict  # the Ray Data datasets handed to Ray Train, by name
    val_rows: tuple[dict, ...] | None  # the val rows the workers cut in memory, or None


def run_data(cfg: Config, manifest: str, splits: dict) -> RunData:
    """The training pipeline (streamed, or its rows for the workers to cut in memory) and the
    validation set: the same locations every epoch, read once, a few MB, and no reader actors
    to start again for every validation pass. It is cut in the workers when their share fits
    in memory (materialising it with Ray Data costs seconds of actor start-up for a few MB)."""
    from foveation.data.pipeline import Pipeline, epoch_clock
    from foveation.data.samples import choose_loader

    workers = cfg.distributed.num_workers
    clock = epoch_clock(0)
    train_pipe = Pipeline(manifest, "train", cfg)
    loader = choose_loader(cfg, splits["train"], workers)
    datasets = {"train": train_pipe.epoch(clock)} if loader == "stream" else {}
    val_rows = None
    if splits["val"]:
        val_pipe = Pipeline(manifest, "val", cfg)
        if choose_loader(cfg, splits["val"], workers) == "memory":
            val_rows = tuple(val_pipe.rows)
        else:
            datasets["val"] = val_pipe.epoch(0).materialize()
            val_pipe.check()  # unreadable val slides fail here, not as a silently smaller set
    return RunData(clock, train_pipe, loader, datasets, val_rows)


def worker_plan(cfg: Config, out: str, splits: dict, data: RunData) -> WorkerPlan:
    """What every worker is handed: the config, the epoch's steps (the same on every rank:
    shards are of equal length), where to write progress and history, the rows to cut in
    memory, and the test's fault injection (``FAULT_ENV``)."""
    dc, tc = cfg.distributed, cfg.training
    rows = len(splits["train"]) * tc.locations_per_image
    steps_per_epoch = max(
        1, math.ceil(rows / dc.num_workers / (tc.batch_size * tc.locations_per_image))
    )
    try:
        fail_at = fault_steps(os.environ.get(FAULT_ENV))
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    history = storage.join(out, "history")
    return WorkerPlan(
        cfg=cfg,
        steps_per_epoch=steps_per_epoch,
        clock=data.clock,
        run=run_label(out),
        progress=storage.join(history, "epochs"),
        history=_history_target(history, splits["val"][0]) if splits["val"] else None,
        has_val=bool(splits["val"]),
        # The pipeline's rows: their URIs are made absolute once, there, for workers elsewhere.
        train_rows=tuple(data.train_pipe.rows) if data.loader == "memory" else None,
        val_rows=data.val_rows,
        fail_at_steps=fail_at,
        faults=storage.join(out, "faults") if fail_at else None,
    )


def torch_trainer(plan: WorkerPlan, datasets: dict, out: str, callbacks: list | None):
    """Ray Train's ``TorchTrainer`` for ``plan``: its workers, datasets, storage under
    ``out``, failure budget and the checkpoints it keeps (the best K by val mIoU + the
    latest)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from foveation.training.worker import train_worker

    dc = plan.cfg.distributed
    fs, path = storage.resolve(out)
    resources = {"CPU": dc.cpus_per_worker} | ({"GPU": dc.gpus_per_worker} if dc.use_gpu else {})
    return TorchTrainer(
        train_worker,
        train_loop_config=plan.loop_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=dc.num_workers,
            use_gpu=dc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=PLACEMENTS[dc.placement],
        ),
        torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo"),
        datasets=datasets,
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=path,
            storage_filesystem=fs if storage.is_remote(out) else None,
            failure_config=ray.train.FailureConfig(max_failures=dc.max_failures),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=dc.keep_checkpoints,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
        ),
    )


def start_line(plan: WorkerPlan, splits: dict, loader: str) -> str:
    """The console line that says what is about to train, and how."""
    cfg = plan.cfg
    dc, tc = cfg.distributed, cfg.training
    return (
        f"training {cfg.name!r} ({cfg.model.mix.label}): {len(splits['train'])} train / "
        f"{len(splits['val'])} val slides, {dc.num_workers} worker(s), {tc.epochs} epochs of "
        f"{plan.steps_per_epoch} steps, precision {tc.precision}, ZeRO {dc.zero_stage}, "
        f"batches {'streamed by Ray Data' if loader == 'stream' else 'cut in memory'}"
    )


def run_trainer(trainer, plan: WorkerPlan, log: Callable[[str], None]):
    """``trainer.fit()``, the workers' epoch lines printed as they come; Ray's wrapped worker
    error becomes a ``TrainingError`` with its message. However it ends, the run is no longer
    "running" (the training-stalled alert reads this)."""
    try:
        with EpochLines(plan.progress, log):
            return trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; keep its message, drop the chain
        raise TrainingError(f"training {plan.cfg.name!r} failed: {exc}") from exc
    finally:
        monitoring.record("foveation_train_running", 0.0, run=plan.run)


def export_best(result, cfg: Config, out: str, log: Callable[[str], None], skipped: dict):
    """The best checkpoint Ray Train kept (by val mIoU; ties: the earlier epoch-end one),
    exported without its DeepSpeed state to ``<out>/model``."""
    best = list(result.best_checkpoints or [])
    if not best:
        raise TrainingError(f"training {cfg.name!r} finished without a checkpoint")
    ckpt, metrics = max(best, key=lambda cm: (cm[1].get("val_miou", 0.0), -cm[1].get("step", 0)))
    best_uri = _uri_of(out, ckpt.path)
    model, _, meta = load_checkpoint(best_uri)
    model_uri = save_checkpoint(storage.join(out, "model"), model, cfg, meta | {"source": best_uri})
    log(f"best checkpoint {best_uri} (val mIoU {metrics.get('val_miou', 0.0):.3f}) -> {model_uri}")
    return FitResult(model_uri, best_uri, dict(metrics), history_of(result, out), skipped)


def _history_target(directory: str, row: dict) -> HistoryTarget:
    """Where rank 0 writes one validation slide's APSM every epoch, and the slide (with its cue
    map on a synthetic set, so the APSM by cue is a training metric too)."""
    cue = row.get("cue_uri")
    return HistoryTarget(
        dir=directory,
        image_uri=storage.absolute(row["image_uri"]),
        cue_uri=storage.absolute(cue) if cue else None,
    )


def run_label(out: str) -> str:
    """The ``run`` label of a training run's metrics: the last part of its output URI."""
    return out.rstrip("/").rsplit("/", 1)[-1] or out


def history_of(result, out: str) -> list[dict]:
    """Every epoch's metrics, from the latest checkpoint's meta.json (Ray Train's own
    dataframe holds only the checkpoints it kept)."""
    latest = result.checkpoint
    if latest is None:
        return []
    meta = json.loads(storage.read_bytes(storage.join(_uri_of(out, latest.path), META)))
    return meta.get("history", [])
