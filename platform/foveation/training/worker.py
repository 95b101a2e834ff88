"""The per-worker training loop that Ray Train runs on every rank (``trainer.fit`` starts it).

Each epoch: rank 0 sets the epoch clock, every rank iterates its shard of the Ray Data pipeline
(DESIGN.md's training batches), one DeepSpeed step per batch; then every rank scores its shard
of the validation locations, the confusion matrices are summed over ranks, and a checkpoint in
DESIGN.md's format is reported (rank 0 writes the weights, config and metadata; every rank its
DeepSpeed shard, which Ray Train merges into one directory). Ray Train keeps the best K by
val mIoU plus the latest; after a worker failure the group restarts and resumes from the latest.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from foveation import monitoring
from foveation.checkpoint import META, write_files
from foveation.config import Config, config_from_dict
from foveation.metrics import ConfusionMatrix
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.models.mixing import MixContext
from foveation.training import distributed
from foveation.training.step import batch_forward

DEEPSPEED_DIR = "deepspeed"
MAX_HISTORY_PIXELS = 64 << 20
"""The per-epoch APSM (Fig. 4) is drawn for validation slides up to this size (a TMA core or
a synthetic slide); bigger ones are skipped."""
FAULT_ENV = "FOVEATION_FAIL_AT_STEP"
"""Fault injection for the tests: rank 0 dies at this step once (only in an attempt that did
not resume), so Ray Train must restart the group and resume from the last checkpoint."""


def autocast(cfg: Config, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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
        with autocast(cfg, device):
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


def _report(engine, cfg: Config, metrics: dict, meta: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="fov-ckpt-") as tmp:
        distributed.save_state(engine, os.path.join(tmp, DEEPSPEED_DIR))
        if rank == 0:  # rank-0 side effect: the weights, config and metadata
            write_files(tmp, engine.module, cfg, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _flat(prefix: str, values: dict | list, names=None) -> dict:
    if isinstance(values, dict):
        return {f"{prefix}_{k}": float(v) for k, v in values.items()}
    return {f"{prefix}_{names[i] if names else i}": float(v) for i, v in enumerate(values)}


def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. ``config``: ``cfg`` (Config as a dict),
    ``steps_per_epoch``, ``clock`` (the pipeline's epoch clock), ``history`` (where rank 0
    writes the per-epoch APSM of one validation slide, or None) and ``fail_at_step``."""
    import ray.train
    import ray.train.torch

    from foveation.data.pipeline import torch_batches

    cfg = config_from_dict(config["cfg"])
    tc = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    steps_per_epoch = int(config["steps_per_epoch"])
    total = tc.epochs * steps_per_epoch
    engine = distributed.init_engine(build_model(cfg), cfg, total, device)

    epoch, step, resumed_from, best, history = 0, 0, None, 0.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            distributed.resume_state(engine, os.path.join(d, DEEPSPEED_DIR))
            with open(os.path.join(d, META)) as f:
                meta = json.load(f)
        epoch, step, best = meta["epoch"], meta["step"], meta.get("best_val_miou", 0.0)
        history = meta.get("history", [])
        resumed_from = step
        skip = meta.get("epoch_batches", 0) if meta.get("partial") else 0
        if rank == 0:
            print(f"resumed from the checkpoint at epoch {epoch}, step {step}", flush=True)
    fail_at = config.get("fail_at_step")
    run = config.get("run") or cfg.name
    if rank == 0:
        _heartbeat(run, time.time())

    train_shard = ray.train.get_dataset_shard("train")
    # Ray Train 2.60 raises KeyError for a dataset it was not given (a set without val slides).
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    skip = 0  # batches of the first epoch already trained before a mid-epoch checkpoint
    rows = tc.batch_size * tc.locations_per_image
    val_miou = best
    while epoch < tc.epochs:
        if rank == 0:
            ray.get(config["clock"].set.remote(epoch))
        distributed.barrier()  # no rank starts the epoch's execution before the clock is set
        t0, losses, wsum, n_rows, pixels = time.perf_counter(), [], 0.0, 0, 0
        for i, batch in enumerate(torch_batches(train_shard, rows)):
            if i < skip:  # resumed mid-epoch: these were trained before the checkpoint
                continue
            if fail_at is not None and step == fail_at and resumed_from is None and rank == 0:
                print(f"injected fault: rank 0 exits at step {step}", flush=True)
                os._exit(17)
            t_step = time.perf_counter()
            loss, _, w, _ = batch_forward(engine, batch, cfg, step, total, device)
            distributed.train_step(engine, loss)
            losses.append(float(loss.detach()))  # syncs with the device: the step is done
            _record_step(run, rank, time.perf_counter() - t_step)
            wsum = wsum + w.detach().sum(0).cpu()
            n_rows += len(w)
            pixels += len(w) * cfg.patches.patch_size**2
            step += 1
            every = cfg.distributed.checkpoint_every_steps
            if every and step % every == 0 and step % steps_per_epoch:
                meta = {
                    "epoch": epoch,
                    "step": step,
                    "best_val_miou": best,
                    "partial": True,
                    "epoch_batches": i + 1,
                    "history": history,
                }
                # Unvalidated weights: a score below any real one, so never kept as the best.
                _report(engine, cfg, {"epoch": epoch, "step": step, "val_miou": -1.0}, meta, rank)
        skip = 0
        seconds = time.perf_counter() - t0
        distributed.broadcast_buffers(engine.module)  # one model on every rank
        val = (
            validate(
                engine.module,
                torch_batches(val_shard, rows),
                cfg,
                device,
                on_batch=lambda: _keep_alive(run, rank),
            )
            if val_shard
            else None
        )
        epoch += 1
        val_miou = val["miou"] if val else 0.0
        best = max(best, val_miou)
        # The same throughput figures on every rank would be noise: sum rows over ranks.
        stats = distributed.all_reduce_sum(
            torch.tensor([float(n_rows), float(pixels), sum(losses), len(losses)])
        )
        metrics = {
            "epoch": epoch,
            "step": step,
            "loss": float(stats[2] / max(1.0, float(stats[3]))),
            "val_miou": val_miou,
            "samples_per_s": float(stats[0]) / seconds,
            "megapixels_per_s": float(stats[1]) / seconds / 1e6,
            "seconds": seconds,
            "world_size": world,
            "peak_memory_mb": peak_memory_mb(device),
            **_flat("lr", distributed.learning_rates(engine)),
            **_flat(
                "weight_mean", (wsum / max(1, n_rows)).tolist(), [str(f) for f in cfg.patches.fovs]
            ),
        }
        if val:
            metrics |= _flat("val_iou", val["iou"]) | {"val_miou_kept": val["miou_kept"]}
            metrics |= {"val_pixel_accuracy": val["pixel_accuracy"]}
        history.append(metrics)
        _record_epoch(run, rank, metrics, device)
        if rank == 0 and config.get("history"):
            _write_apsm(engine.module, cfg, config["history"], epoch, device)
            print(
                f"epoch {epoch}/{tc.epochs} step {step} loss {metrics['loss']:.4f} "
                f"val mIoU {val_miou:.3f} {metrics['samples_per_s']:.1f} locations/s "
                f"mean weight per FoV {[round(x, 3) for x in (wsum / max(1, n_rows)).tolist()]}",
                flush=True,
            )
        meta = {
            "epoch": epoch,
            "step": step,
            "best_val_miou": best,
            "metrics": metrics,
            "resumed_from_step": resumed_from,
            "run": cfg.model.mix.label,
            "history": history,  # every epoch's metrics so far, resumed runs included
        }
        _report(engine, cfg, metrics, meta, rank)


_LAST_STEP_EVERY_S = 2.0  # a gauge set goes through an actor call: not one per step
_last_step_kept = [0.0]
HEARTBEAT_TTL_S = 3600.0
"""How long "running" and the last-step time outlive the last step: a run killed without
ending (its driver and workers gone) shows as stalled, then leaves the dashboards."""


def _heartbeat(run: str, now: float) -> None:
    """Rank 0: the run is running and made progress at ``now``, an optimizer step or a
    validation batch (what the stalled alert reads)."""
    _last_step_kept[0] = now
    monitoring.record("foveation_train_running", 1.0, ttl_s=HEARTBEAT_TTL_S, run=run)
    monitoring.record(
        "foveation_train_last_step_timestamp_seconds", now, ttl_s=HEARTBEAT_TTL_S, run=run
    )


def _keep_alive(run: str, rank: int) -> None:
    """Rank 0, after a training step or a validation batch: the heartbeat, at most every
    ``_LAST_STEP_EVERY_S``."""
    now = time.time()
    if rank == 0 and now - _last_step_kept[0] >= _LAST_STEP_EVERY_S:
        _heartbeat(run, now)


def _record_step(run: str, rank: int, seconds: float) -> None:
    monitoring.record("foveation_train_steps_total", 1.0, run=run, rank=rank)
    monitoring.record("foveation_train_step_seconds", seconds, run=run, rank=rank)
    _keep_alive(run, rank)


def _record_epoch(run: str, rank: int, metrics: dict, device: torch.device) -> None:
    """An epoch's figures as gauges: memory from every rank, the rest (already reduced over
    ranks, or the same on every rank) from rank 0 only."""
    monitoring.record(
        "foveation_train_accelerator_memory_bytes",
        metrics["peak_memory_mb"] * 2**20,
        run=run,
        rank=rank,
    )
    if rank != 0:
        return
    for key, name in (
        ("loss", "foveation_train_loss"),
        ("samples_per_s", "foveation_train_samples_per_second"),
        ("megapixels_per_s", "foveation_train_megapixels_per_second"),
        ("val_miou", "foveation_train_val_miou"),
        ("epoch", "foveation_train_epoch"),
    ):
        monitoring.record(name, float(metrics[key]), run=run)
    for key, value in metrics.items():
        if key.startswith("lr_"):
            monitoring.record("foveation_train_learning_rate", value, run=run, group=key[3:])
        elif key.startswith("weight_mean_"):
            monitoring.record("foveation_train_fov_weight", value, run=run, fov=key[12:])


@torch.no_grad()
def _write_apsm(model: FoveatedSegmenter, cfg: Config, history: dict, epoch: int, device) -> None:
    """The APSM of one validation slide after this epoch (the paper's Fig. 4), as .npy."""
    import io

    from foveation import storage
    from foveation.inference.wholeslide import xr_from_source
    from foveation.patches import pad_xr
    from foveation.slides import open_slide

    source = open_slide(history["image_uri"]).as_source(0)
    if source.height * source.width > MAX_HISTORY_PIXELS:
        return  # a whole-slide x_r every epoch would stall the other ranks in the next collective
    model.eval()
    w = model.weights(pad_xr(xr_from_source(source, cfg))[None].to(device))
    apsm = model.apsm(w)[0].float().cpu().numpy()
    model.train()
    buf = io.BytesIO()
    np.save(buf, apsm, allow_pickle=False)
    storage.write_bytes(storage.join(history["dir"], f"apsm_epoch_{epoch:03d}.npy"), buf.getvalue())
