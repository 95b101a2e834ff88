"""The per-worker training loop that Ray Train runs on every rank (``trainer.fit`` starts it).

``train_worker`` reads as the run does: resume, then per epoch set the pipeline's epoch clock,
train one epoch (``training.loop.run_epoch``, the loop the single-device trainer runs too, over
this rank's shard of the Ray Data pipeline's training batches, docs/contracts.md#training-batch),
validate (every rank scores its shard of the validation locations; confusion matrices are
summed over ranks), record and report a checkpoint in the project's format
(docs/contracts.md#checkpoint: rank 0 writes the weights, config and metadata; every rank its
DeepSpeed shard, which Ray Train merges into one directory). Ray Train keeps the best K by val
mIoU plus the latest; after a worker failure the group restarts and resumes from the latest,
mid-epoch included.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from foveation.checkpoint import META, write_files
from foveation.config import Config, config_from_dict
from foveation.io import storage
from foveation.metrics import ConfusionMatrix
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.models.mixing import MixContext
from foveation.training import distributed
from foveation.training.loop import EpochStats, in_memory_batches, run_epoch
from foveation.training.recorder import EpochMetrics, Recorder

DEEPSPEED_DIR = "deepspeed"
MAX_HISTORY_PIXELS = 64 << 20
"""The per-epoch APSM (Fig. 4) is drawn for validation slides up to this size (a TMA core or
a synthetic slide); bigger ones are skipped."""
FAULT_ENV = "FOVEATION_FAIL_AT_STEP"
"""Fault injection for the tests: "7" or "3,7,11": rank 0 kills itself with SIGKILL at each of
these steps, once each (a marker under ``<out>/faults/`` remembers), so Ray Train must restart
the group and resume from the last checkpoint every time."""
FAULT_GRACE_S = 5.0
"""The injected fault waits this long before exiting (2.5x the report interval): Ray Train's
controller collects workers' reports every 2 s, so a crash right after a report would lose
that checkpoint by chance, and the test would not know which checkpoint the run resumed
from."""


@torch.no_grad()
def validate(
    model: FoveatedSegmenter,
    batches,
    cfg: Config,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Patch-level scores on the validation locations of this rank, summed over all ranks.
    ``on_batch`` is called after every batch (the worker keeps the run's heartbeat with it: a
    long validation pass is progress, not a stall)."""
    model.eval()
    k = cfg.model.num_classes
    cm = ConfusionMatrix(k, cfg.evaluation.ignore_index)
    wsum, n = torch.zeros(cfg.patches.depth, dtype=torch.float64), 0
    ctx = MixContext(cfg.model.mix, training=False)
    for batch in batches:
        w = model.location_weights(batch["xr"].to(device))
        with distributed.autocast(cfg.training.precision, device):
            logits, _ = model(batch["bank"].to(device), w, ctx)
        cm.update(logits.argmax(1).cpu().numpy(), batch["label"].numpy())
        wsum += w.double().sum(0).cpu()
        n += len(w)
        if on_batch is not None:
            on_batch()
    model.train()
    counts = torch.from_numpy(cm.matrix.astype(np.float64))
    packed = distributed.all_reduce_sum(torch.cat([counts.flatten(), wsum, torch.tensor([n])]))
    cm.matrix = packed[: k * k].reshape(k, k).round().long().numpy()
    total = max(1.0, float(packed[-1]))
    summary = cm.summary(cfg.evaluation.kept_classes, cfg.evaluation.class_names)
    summary["weight_mean"] = (packed[k * k : k * k + cfg.patches.depth] / total).tolist()
    return summary


def peak_memory_mb(device: torch.device) -> float:
    """This rank's peak memory so far: allocated accelerator memory on a GPU, else the process's
    peak resident set (model, optimiser, activations and the data it holds)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Position:
    """Where a run stands: the next epoch and step, the batches of that epoch already trained
    (a mid-epoch checkpoint), the best val mIoU and every finished epoch's metrics."""

    epoch: int = 0
    step: int = 0
    skip: int = 0
    best: float = 0.0
    history: list = field(default_factory=list)
    resumed_from: int | None = None


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


def epoch_metrics(
    engine, cfg: Config, pos: Position, stats: EpochStats, val: dict | None, device
) -> EpochMetrics:
    """The epoch's figures, summed over ranks where they add up."""
    reduced = distributed.all_reduce_sum(
        torch.tensor([float(stats.rows), float(stats.pixels), stats.loss_sum, stats.steps])
    )
    rows, pixels, loss_sum, steps = (float(x) for x in reduced)
    seconds = max(stats.seconds, 1e-9)
    return EpochMetrics(
        epoch=pos.epoch,
        step=pos.step,
        loss=loss_sum / max(1.0, steps),
        seconds=stats.seconds,
        samples_per_s=rows / seconds,
        megapixels_per_s=pixels / seconds / 1e6,
        world_size=distributed.world_size(),
        peak_memory_mb=peak_memory_mb(device),
        lr=distributed.learning_rates(engine),
        weight_mean=dict(
            zip([str(f) for f in cfg.patches.fovs], stats.weight_mean(), strict=False)
        ),
        weight_entropy=stats.weight_entropy,
        fovnet_grad_norm=stats.fovnet_grad_norm,
        val=val,
    )


def memory_batches(cfg: Config, rows: list[dict], rank: int) -> Callable[[int], Iterator[dict]]:
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
    """This rank's validation batches, cut once from its val slides decoded in memory: the
    locations the streamed val dataset holds (``sample_locations`` at epoch 0, the run's seed),
    without starting Ray Data's reader actors to materialise a few MB. Every ``world``-th slide
    from ``rank`` on, none twice: the scores are summed over ranks."""
    from foveation.data.batches import BatchExtractor
    from foveation.data.samples import load_shard

    mine = rows[rank :: distributed.world_size()]
    samples, failed = load_shard(mine, "val", cfg.data.pipeline.max_error_fraction, refill=False)
    for sid, error in failed.items():
        print(f"skipped unreadable validation slide {sid}: {error}", flush=True)
    extractors = {s.slide_id: BatchExtractor.from_arrays(cfg, s.image, s.label) for s in samples}
    return list(in_memory_batches(extractors, cfg, 0))


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: ``cfg`` (Config as a dict),
    ``steps_per_epoch``, ``clock`` (the pipeline's epoch clock), ``train_rows`` (the training
    slides' manifest rows for the memory loader; None: stream this rank's dataset shard),
    ``val_rows`` (the same for validation; None: this rank's shard of the "val" dataset),
    ``progress`` (where rank 0 writes each epoch's console line), ``history`` (where rank 0
    writes the per-epoch APSM of one validation slide, or None), ``has_val``, ``run`` (the
    metrics label) and ``fail_at_step``."""
    import ray
    import ray.train
    import ray.train.torch

    from foveation.data.pipeline import torch_batches

    cfg = config_from_dict(config["cfg"])
    tc = cfg.training
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    threads = distributed.cpu_threads(
        cfg.distributed.threads_per_worker, ctx.get_local_world_size()
    )
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    steps_per_epoch = int(config["steps_per_epoch"])
    total = tc.epochs * steps_per_epoch
    engine = distributed.init_engine(build_model(cfg), cfg, total, device)
    pos = resume(engine, rank)
    recorder = Recorder(config.get("run") or cfg.name, rank)
    recorder.heartbeat()

    if config.get("train_rows") is not None:  # data.pipeline.loader: memory
        batches_of = memory_batches(cfg, config["train_rows"], rank)
    else:
        train_shard = ray.train.get_dataset_shard("train")

        def batches_of(epoch: int):
            return torch_batches(train_shard, rows)

    rows = tc.batch_size * tc.locations_per_image
    val_batches = None
    if config.get("val_rows") is not None:
        held = memory_val_batches(cfg, config["val_rows"], rank)

        def val_batches():
            return iter(held)

    elif config.get("has_val"):
        # Ray Train 2.60 raises KeyError for a dataset it was not given: only asked when given.
        val_shard = ray.train.get_dataset_shard("val")

        def val_batches():
            return torch_batches(val_shard, rows)

    fail_at = set(config.get("fail_at_steps") or ())
    faults = config.get("faults")

    def before_step(step: int, i: int, _: float) -> None:
        if rank or step not in fail_at or faults is None:
            return
        marker = storage.join(faults, f"step-{step}")
        if storage.exists(marker):  # this fault happened before the restart
            return
        storage.write_bytes(marker, b"killed")
        print(f"injected fault: rank 0 is killed (SIGKILL) at step {step}", flush=True)
        time.sleep(FAULT_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(step: int, i: int, seconds: float) -> None:
        recorder.step(seconds)
        every = cfg.distributed.checkpoint_every_steps
        if every and step % every == 0 and step % steps_per_epoch:
            meta = {
                "epoch": pos.epoch,
                "step": step,
                "best_val_miou": pos.best,
                "partial": True,
                "epoch_batches": i + 1,  # batch indices count the skipped ones too
                "history": pos.history,
            }
            # Unvalidated weights: a score below any real one, so never kept as the best.
            metrics = {"epoch": pos.epoch, "step": step, "val_miou": -1.0}
            report(engine, cfg, metrics, meta, rank)

    while pos.epoch < tc.epochs:
        if rank == 0:
            ray.get(config["clock"].set.remote(pos.epoch))
        distributed.barrier()  # no rank starts the epoch's execution before the clock is set
        stats = run_epoch(
            engine,
            batches_of(pos.epoch),
            cfg,
            pos.step,
            total,
            device,
            pos.skip,
            before_step,
            after_step,
        )
        pos.step += stats.steps
        pos.skip = 0
        distributed.broadcast_buffers(engine.module)  # one model on every rank
        val = None
        if val_batches is not None:
            val = validate(engine.module, val_batches(), cfg, device, recorder.keep_alive)
        pos.epoch += 1
        m = epoch_metrics(engine, cfg, pos, stats, val, device)
        if rank == 0 and config.get("history"):
            m.apsm = _write_apsm(engine.module, cfg, config["history"], pos.epoch, device)
        pos.best = max(pos.best, m.val_miou)
        metrics = m.flat()
        pos.history.append(metrics)
        recorder.epoch(m)
        if rank == 0 and config.get("progress"):
            write_epoch_line(config["progress"], pos.epoch, epoch_line(m, tc.epochs, stats))
        meta = {
            "epoch": pos.epoch,
            "step": pos.step,
            "best_val_miou": pos.best,
            "metrics": metrics,
            "resumed_from_step": pos.resumed_from,
            "run": cfg.model.mix.label,
            "history": pos.history,  # every epoch's metrics so far, resumed runs included
        }
        report(engine, cfg, metrics, meta, rank)


def epoch_line(m: EpochMetrics, epochs: int, stats: EpochStats) -> str:
    """The one console line of an epoch (the driver prints it: ``trainer.EpochLines``)."""
    val = f"val mIoU {m.val_miou:.3f} " if m.val else ""
    apsm = f" APSM { ({k: round(v) for k, v in m.apsm.items()}) }" if m.apsm else ""
    return (
        f"epoch {m.epoch}/{epochs} step {m.step} loss {m.loss:.4f} {val}"
        f"{m.samples_per_s:.1f} locations/s mean weight per FoV "
        f"{[round(x, 3) for x in stats.weight_mean()]} entropy {m.weight_entropy:.3f} "
        f"F grad {m.fovnet_grad_norm:.2e}{apsm}"
    )


def write_epoch_line(progress: str, epoch: int, line: str) -> None:
    """One small file per epoch under ``progress``: storage has no append, and the driver, which
    may run elsewhere, reads them in order."""
    from foveation.io import storage

    storage.write_bytes(storage.join(progress, f"epoch_{epoch:04d}.txt"), line.encode())


@torch.no_grad()
def _write_apsm(
    model: FoveatedSegmenter, cfg: Config, history: dict, epoch: int, device
) -> dict[str, float]:
    """The APSM of one validation slide after this epoch (the paper's Fig. 4), as .npy; returns
    its mean (px), over all x_r cells ("all") and, where the slide has a cue map, by cue."""
    import io

    from foveation.evaluation.slides import CUE_NAMES, apsm_cue_sums
    from foveation.inference.wholeslide import xr_from_source
    from foveation.io import storage
    from foveation.io.images import decode_label
    from foveation.io.slides import open_slide
    from foveation.patches import pad_xr

    source = open_slide(history["image_uri"]).as_source(0)
    if source.height * source.width > MAX_HISTORY_PIXELS:
        return {}  # a whole-slide x_r every epoch would stall the other ranks' next collective
    model.eval()
    w = model.weights(pad_xr(xr_from_source(source, cfg))[None].to(device))
    apsm = model.apsm(w)[0].float().cpu().numpy()
    model.train()
    buf = io.BytesIO()
    np.save(buf, apsm, allow_pickle=False)
    storage.write_bytes(storage.join(history["dir"], f"apsm_epoch_{epoch:03d}.npy"), buf.getvalue())
    means = {"all": float(apsm.mean())}
    if history.get("cue_uri"):
        cue = decode_label(storage.read_bytes(history["cue_uri"]), history["cue_uri"])
        sums, counts = apsm_cue_sums(apsm, cue, cfg.patches.xr_scale)
        means |= {n: float(sums[i] / counts[i]) for i, n in enumerate(CUE_NAMES) if counts[i]}
    return means
