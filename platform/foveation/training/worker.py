"""The per-worker training loop that Ray Train runs on every rank (``trainer.fit`` starts it).

``train_worker`` reads as the run does, from the driver's ``plan.WorkerPlan``: set up the
engine, resume, then per epoch set the pipeline's epoch clock, train one epoch
(``training.loop.run_epoch``, the loop the single-device trainer runs too, over this rank's
shard of the Ray Data pipeline's training batches, docs/contracts.md#training-batch), validate
(``training.loop.validate``, the single-device trainer's too: every rank scores its shard of
the validation locations; confusion matrices are summed over ranks), record and report a
checkpoint in the project's format (docs/contracts.md#checkpoint: rank 0 writes the weights,
config and metadata; every rank its DeepSpeed shard, which Ray Train merges into one
directory). Ray Train keeps the best K by val mIoU plus the latest; after a worker failure the
group restarts and resumes from the latest, mid-epoch included.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from foveation.checkpoint import META, write_files
from foveation.config import Config
from foveation.io import storage
from foveation.metrics import apsm_cue_means, apsm_cue_sums
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.training import distributed
from foveation.training.loop import (
    EpochStats,
    epoch_record,
    in_memory_batches,
    run_epoch,
    slide_apsm,
    validate,
    validation_batches,
)
from foveation.training.plan import HistoryTarget, WorkerPlan, from_loop_config
from foveation.training.recorder import Recorder, epoch_line

DEEPSPEED_DIR = "deepspeed"
MAX_HISTORY_PIXELS = 64 << 20
"""The per-epoch APSM (Fig. 4) is drawn for validation slides up to this size (a TMA core or
a synthetic slide); bigger ones are skipped."""
FAULT_GRACE_S = 5.0
"""The injected fault waits this long before exiting (2.5x the report interval): Ray Train's
controller collects workers' reports every 2 s, so a crash right after a report would lose
that checkpoint by chance, and the test would not know which checkpoint the run resumed
from."""


@dataclass
class Position:
    """Where a run stands: the next epoch and step, the batches of that epoch already trained
    (a mid-epoch checkpoint), the best val mIoU, every finished epoch's metrics, and the
    metadata of the checkpoint it resumed from (empty for a fresh run)."""

    epoch: int = 0
    step: int = 0
    skip: int = 0
    best: float = 0.0
    history: list = field(default_factory=list)
    resumed_from: int | None = None
    meta: dict = field(default_factory=dict)


def resume(engine, rank: int) -> Position:
    """The position of the checkpoint Ray Train hands this attempt (after a failure, or with
    ``--resume``), its DeepSpeed state loaded into ``engine``; a fresh position without one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as d:
        distributed.resume_state(engine, os.path.join(d, DEEPSPEED_DIR))
        with open(os.path.join(d, META)) as f:
            meta = json.load(f)
    pos = Position(
        epoch=meta["epoch"],
        step=meta["step"],
        skip=meta.get("epoch_batches", 0) if meta.get("partial") else 0,
        best=meta.get("best_val_miou", 0.0),
        history=meta.get("history", []),
        resumed_from=meta["step"],
        meta=meta,
    )
    if rank == 0:
        part = f", {pos.skip} batches into the epoch" if pos.skip else ""
        print(
            f"resumed from the checkpoint at epoch {pos.epoch}, step {pos.step}{part}", flush=True
        )
    return pos


def report(engine, cfg: Config, metrics: dict, meta: dict, rank: int) -> None:
    """A checkpoint (every rank's DeepSpeed shard; rank 0 the weights, config and metadata) and
    the metrics, to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="fov-ckpt-") as tmp:
        distributed.save_state(engine, os.path.join(tmp, DEEPSPEED_DIR))
        if rank == 0:  # rank-0 side effect: the weights, config and metadata
            write_files(tmp, engine.module, cfg, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@dataclass
class Worker:
    """One rank's run: what set-up made (the engine, the recorder, the batches) and where the
    run stands. Its step hooks are ``run_epoch``'s: fault injection before a step, metrics and
    mid-epoch checkpoints after it."""

    plan: WorkerPlan
    rank: int
    device: torch.device
    engine: Any  # a DeepSpeed engine (``distributed.init_engine``)
    recorder: Recorder
    hosts: tuple[str, ...] = ()  # every rank's node IP, by rank (``distributed.rank_hosts``)
    local_sizes: tuple[int, ...] = ()
    """Every rank's local world size, by rank (ranks on its node, as Ray Train and DeepSpeed's
    shared-memory paths see it: 1 on each of two nodes)."""
    pos: Position = field(default_factory=Position)
    train_batches: Callable[[int], Iterable[dict]] | None = None  # epoch -> its batches
    val_batches: Callable[[], Iterable[dict]] | None = None  # None: no validation split

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def epochs_left(self) -> bool:
        return self.pos.epoch < self.cfg.training.epochs

    def before_step(self, step: int, i: int, _: float) -> None:
        """Rank 0 kills itself at each of the plan's fault steps, once each."""
        plan = self.plan
        if self.rank or step not in plan.fail_at_steps or plan.faults is None:
            return
        marker = storage.join(plan.faults, f"step-{step}")
        if storage.exists(marker):  # this fault happened before the restart
            return
        storage.write_bytes(marker, b"killed")
        print(f"injected fault: rank 0 is killed (SIGKILL) at step {step}", flush=True)
        time.sleep(FAULT_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int, i: int, seconds: float) -> None:
        """The step's metrics; every ``distributed.checkpoint_every_steps`` a mid-epoch
        checkpoint (none at an epoch's end: the epoch's own report follows)."""
        self.recorder.step(seconds)
        every = self.cfg.distributed.checkpoint_every_steps
        if every and step % every == 0 and step % self.plan.steps_per_epoch:
            pos = self.pos
            meta = {
                "epoch": pos.epoch,
                "step": step,
                "best_val_miou": pos.best,
                "partial": True,
                "epoch_batches": i + 1,  # batch indices count the skipped ones too
                "hosts": list(self.hosts),
                "history": pos.history,
            }
            # Unvalidated weights: a score below any real one, so never kept as the best.
            metrics = {"epoch": pos.epoch, "step": step, "val_miou": -1.0}
            report(self.engine, self.cfg, metrics, meta, self.rank)


def set_up(plan: WorkerPlan) -> Worker:
    """This rank's threads, seed, engine and recorder (the same initial weights on every
    rank)."""
    import ray.train
    import ray.train.torch
    import ray.util

    cfg = plan.cfg
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    threads = distributed.cpu_threads(
        cfg.distributed.threads_per_worker, ctx.get_local_world_size()
    )
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank
    engine = distributed.init_engine(build_model(cfg), cfg, plan.total_steps, device)
    hosts = tuple(distributed.rank_hosts(ray.util.get_node_ip_address()))
    local = tuple(int(n) for n in distributed.gather_all(ctx.get_local_world_size()))
    recorder = Recorder(plan.run or cfg.name, rank)
    return Worker(plan, rank, device, engine, recorder, hosts, local)


def training_batches(plan: WorkerPlan, rank: int) -> Callable[[int], Iterable[dict]]:
    """Epoch -> this rank's training batches: cut in memory from the plan's rows
    (``data.pipeline.loader`` memory), else streamed from this rank's "train" dataset shard."""
    if plan.train_rows is not None:
        return memory_batches(plan.cfg, list(plan.train_rows), rank)
    stream = shard_batches(plan, "train")
    return lambda epoch: stream()


def validation_data(plan: WorkerPlan, rank: int) -> Callable[[], Iterable[dict]] | None:
    """This rank's validation batches, the same every epoch: cut once in memory from the plan's
    rows, else this rank's shard of the "val" dataset; None without a validation split."""
    if plan.val_rows is not None:
        held = memory_val_batches(plan.cfg, list(plan.val_rows), rank)
        return lambda: iter(held)
    if not plan.has_val:  # Ray Train 2.60 raises KeyError for a dataset it was not given
        return None
    return shard_batches(plan, "val")


def shard_batches(plan: WorkerPlan, name: str) -> Callable[[], Iterable[dict]]:
    """A fresh pass over this rank's shard of the Ray Train dataset ``name``, in training
    batches of ``batch_size`` images' locations, at every call."""
    import ray.train

    from foveation.data.pipeline import torch_batches

    shard = ray.train.get_dataset_shard(name)
    rows = plan.cfg.training.batch_size * plan.cfg.training.locations_per_image
    return lambda: torch_batches(shard, rows)


def train_epoch(w: Worker) -> EpochStats:
    """One epoch of training from where the run stands: rank 0 sets the pipeline's epoch clock
    first (no rank starts the epoch's execution before), and after it every rank holds one
    model (buffers broadcast)."""
    import ray

    pos = w.pos
    if w.rank == 0:
        ray.get(w.plan.clock.set.remote(pos.epoch))
    distributed.barrier()  # no rank starts the epoch's execution before the clock is set
    stats = run_epoch(
        w.engine,
        w.train_batches(pos.epoch),
        w.cfg,
        pos.step,
        w.plan.total_steps,
        w.device,
        pos.skip,
        w.before_step,
        w.after_step,
    )
    pos.step += stats.steps
    pos.skip = 0
    distributed.broadcast_buffers(w.engine.module)  # one model on every rank
    return stats


def validate_epoch(w: Worker) -> dict | None:
    """The epoch's validation scores (``loop.validate``), None without a validation split; its
    batches keep the run's heartbeat."""
    if w.val_batches is None:
        return None
    return validate(w.engine.module, w.val_batches(), w.cfg, w.device, w.recorder.keep_alive)


def finish_epoch(w: Worker, stats: EpochStats, val: dict | None) -> None:
    """The epoch's record (rank 0 adds the APSM of one validation slide and writes the epoch's
    line), its metrics, and its checkpoint reported to Ray Train."""
    plan, pos = w.plan, w.pos
    pos.epoch += 1
    m = epoch_record(w.engine, w.cfg, pos.epoch, pos.step, stats, val, w.device)
    m.nodes = len(set(w.hosts))
    if w.rank == 0 and plan.history:
        m.apsm = write_apsm(w.engine.module, w.cfg, plan.history, pos.epoch, w.device)
    pos.best = max(pos.best, m.val_miou)
    metrics = m.flat()
    pos.history.append(metrics)
    w.recorder.epoch(m)
    if w.rank == 0 and plan.progress:
        write_epoch_line(plan.progress, pos.epoch, epoch_line(m, w.cfg.training.epochs))
    meta = {
        "epoch": pos.epoch,
        "step": pos.step,
        "best_val_miou": pos.best,
        "metrics": metrics,
        "resumed_from_step": pos.resumed_from,
        "run": w.cfg.model.mix.label,
        "hosts": list(w.hosts),  # which node each rank ran on, by rank (this attempt's)
        "local_world_sizes": list(w.local_sizes),
        "history": pos.history,  # every epoch's metrics so far, resumed runs included
    }
    report(w.engine, w.cfg, metrics, meta, w.rank)


def report_again(w: Worker) -> None:
    """A run resumed with no epoch left (a Tune trial restarted after its last report but
    before Tune recorded it finished; ``--resume`` of a finished run) reports its checkpoint's
    metrics again, with that checkpoint (the weights and state just loaded, the same
    metadata): a run that reported nothing would fail Tune's check for the metric it ranks."""
    pos = w.pos
    metrics = pos.meta.get("metrics") or {"epoch": pos.epoch, "step": pos.step, "val_miou": -1.0}
    if w.rank == 0:
        print(f"no epoch left after epoch {pos.epoch}: reporting its checkpoint again", flush=True)
    report(w.engine, w.cfg, metrics, pos.meta, w.rank)


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` is ``WorkerPlan.loop_config()``."""
    w = set_up(from_loop_config(config))
    w.pos = resume(w.engine, w.rank)
    w.recorder.heartbeat()
    if not w.epochs_left:
        report_again(w)
        return
    w.train_batches = training_batches(w.plan, w.rank)
    w.val_batches = validation_data(w.plan, w.rank)
    while w.epochs_left:
        stats = train_epoch(w)
        val = validate_epoch(w)
        finish_epoch(w, stats, val)


def memory_batches(cfg: Config, rows: list[dict], rank: int) -> Callable[[int], Iterable[dict]]:
    """Epoch -> training batches of this rank's shard of ``rows``, decoded once (the memory
    loader): the extractor and locations of the streamed pipeline, without its reader actors."""
    from foveation.data.batches import BatchExtractor
    from foveation.data.samples import load_shard, shard

    extractors = {}
    samples, failed = load_shard(
        shard(rows, rank, distributed.world_size()), "train", cfg.data.pipeline.max_error_fraction
    )
    for sid, error in failed.items():
        print(f"skipped unreadable training slide {sid}: {error}", flush=True)
    for s in samples:
        key = s.slide_id if s.slide_id not in extractors else f"{s.slide_id}#{len(extractors)}"
        extractors[key] = BatchExtractor.from_arrays(cfg, s.image, s.label)
    return lambda epoch: in_memory_batches(extractors, cfg, epoch)


def memory_val_batches(cfg: Config, rows: list[dict], rank: int) -> list[dict]:
    """This rank's validation batches, cut once from its val slides decoded in memory
    (``loop.validation_batches``, the single-device trainer's): the locations the streamed val
    dataset holds (``sample_locations`` at epoch 0, the run's seed), without starting Ray
    Data's reader actors to materialise a few MB. Every ``world``-th slide from ``rank`` on,
    none twice: the scores are summed over ranks."""
    from foveation.data.samples import load_shard

    mine = rows[rank :: distributed.world_size()]
    samples, failed = load_shard(mine, "val", cfg.data.pipeline.max_error_fraction, refill=False)
    for sid, error in failed.items():
        print(f"skipped unreadable validation slide {sid}: {error}", flush=True)
    return validation_batches(cfg, samples)


def write_epoch_line(progress: str, epoch: int, line: str) -> None:
    """One small file per epoch under ``progress``: storage has no append, and the driver, which
    may run elsewhere, reads them in order."""
    storage.write_bytes(storage.join(progress, f"epoch_{epoch:04d}.txt"), line.encode())


def write_apsm(
    model: FoveatedSegmenter, cfg: Config, history: HistoryTarget, epoch: int, device
) -> dict[str, float]:
    """The APSM of one validation slide after this epoch (the paper's Fig. 4), as .npy; returns
    its mean (px), over all x_r cells ("all") and, where the slide has a cue map, by cue."""
    import io

    from foveation.io.images import decode_label
    from foveation.io.slides import open_slide

    source = open_slide(history.image_uri).as_source(0)
    if source.height * source.width > MAX_HISTORY_PIXELS:
        return {}  # a whole-slide x_r every epoch would stall the other ranks' next collective
    apsm = slide_apsm(model, source, cfg, device)
    buf = io.BytesIO()
    np.save(buf, apsm, allow_pickle=False)
    storage.write_bytes(storage.join(history.dir, f"apsm_epoch_{epoch:03d}.npy"), buf.getvalue())
    means = {"all": float(apsm.mean())}
    if history.cue_uri:
        cue = decode_label(storage.read_bytes(history.cue_uri), history.cue_uri)
        means |= apsm_cue_means(*apsm_cue_sums(apsm, cue, cfg.patches.xr_scale))
    return means
