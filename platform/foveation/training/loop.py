"""The one training loop: ``run_epoch`` drives an engine over an iterable of training batches.

Both trainers run it. ``train`` (below) is the single-device trainer over slides held in memory
(the science check, the learning test): its batches come from ``data.batches.BatchExtractor``
over in-memory images, with the locations ``data.batches.sample_locations`` draws, and its
engine is ``distributed.LocalEngine``. The Ray Train worker (``training.worker``) runs the same
``run_epoch`` over its shard of the Ray Data pipeline (the same extractor over slide readers,
the same sampler) with a DeepSpeed engine. So ``jobs.reproduce --trainer single`` and
``--trainer ray`` differ only in where the loop runs and where batches come from.

Both validate the same way too, with ``validate``: patch-level scores on fixed validation
locations (``validation_batches``: epoch 0's, the run's seed), the figure that picks a Ray
run's best checkpoint. Whole-slide scores are evaluation's (``foveation.evaluation``), after
training. And both keep one record per epoch (``recorder.EpochMetrics``, ``epoch_record``) and
print it as one line (``recorder.epoch_line``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from foveation.config import Config
from foveation.data.batches import BatchExtractor, concat, sample_locations, to_torch
from foveation.data.samples import Sample
from foveation.metrics import ConfusionMatrix
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.models.mixing import MixContext
from foveation.training import distributed
from foveation.training.recorder import EpochMetrics, epoch_line
from foveation.training.step import train_step, weight_entropy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"training.device is {name!r} but no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)


@dataclass
class EpochStats:
    """What one epoch of ``run_epoch`` did on this rank (sums, so ranks can be added)."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)  # each step's loss, in order
    rows: int = 0  # locations trained
    pixels: int = 0  # segmenter-input pixels
    weight_sum: torch.Tensor | None = None  # F's weights summed over rows, [D]
    entropy_sum: float = 0.0  # F's per-location weight entropy (nats) summed over rows
    fovnet_grad_norms: list[float] = field(default_factory=list)  # F's gradient norm per step
    seconds: float = 0.0

    @property
    def loss_sum(self) -> float:
        return sum(self.losses)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.steps)

    def weight_mean(self) -> list[float]:
        if self.weight_sum is None:
            return []
        return (self.weight_sum / max(1, self.rows)).tolist()

    @property
    def weight_entropy(self) -> float:
        return self.entropy_sum / max(1, self.rows)

    @property
    def fovnet_grad_norm(self) -> float:
        return sum(self.fovnet_grad_norms) / max(1, len(self.fovnet_grad_norms))


class GradNorm:
    """The gradient norm of a module's parameters in each backward, read through tensor hooks
    (so it works whatever the engine does with ``.grad`` afterwards, ZeRO included)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._sq: torch.Tensor | float = 0.0
        self._handles = [p.register_hook(self._add) for p in module.parameters() if p.requires_grad]

    def _add(self, g: torch.Tensor) -> None:
        self._sq = self._sq + g.detach().float().pow(2).sum()  # stays on the device: no sync

    def take(self) -> float:
        out, self._sq = float(self._sq) ** 0.5, 0.0
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


StepHook = Callable[[int, int, float], None]
"""Called before each step with (step, batch index in the epoch, 0.0) and after it with
(step + 1, batch index, the step's seconds); the worker injects faults, records metrics and
writes mid-epoch checkpoints through it."""


def run_epoch(
    engine,
    batches: Iterable[dict],
    cfg: Config,
    start_step: int,
    total_steps: int,
    device,
    skip: int = 0,
    before_step: StepHook | None = None,
    after_step: StepHook | None = None,
) -> EpochStats:
    """One epoch: one optimizer step per batch, skipping the first ``skip`` batches (trained
    before a mid-epoch checkpoint this run resumed from)."""
    stats = EpochStats()
    step = start_step
    t0 = time.perf_counter()
    P = cfg.patches.patch_size
    probe = GradNorm(engine.module.fovnet)
    try:
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if before_step is not None:
                before_step(step, i, 0.0)
            t_step = time.perf_counter()
            res = train_step(engine, batch, cfg, step, total_steps, device)
            stats.losses.append(float(res.loss))  # syncs with the device: the step is done
            stats.fovnet_grad_norms.append(probe.take())
            n = len(res.w)
            ws = res.w.sum(0).float().cpu()
            stats.weight_sum = ws if stats.weight_sum is None else stats.weight_sum + ws
            stats.entropy_sum += float(weight_entropy(res.w).sum())
            stats.rows += n
            stats.pixels += n * P * P
            stats.steps += 1
            step += 1
            if after_step is not None:
                after_step(step, i, time.perf_counter() - t_step)
    finally:
        probe.close()
    stats.seconds = time.perf_counter() - t0
    return stats


# -- validation and the epoch's record: both trainers' -----------------------------------------
@torch.no_grad()
def validate(
    model: FoveatedSegmenter,
    batches: Iterable[dict],
    cfg: Config,
    device: torch.device | str,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """Patch-level scores (``ConfusionMatrix.summary`` plus F's mean weight per FoV) of the
    validation batches, summed over ranks inside a process group: both trainers' per-epoch
    validation, and the score that picks a Ray run's best checkpoint. ``on_batch`` is called
    after every batch (the worker keeps the run's heartbeat with it: a long validation pass is
    progress, not a stall)."""
    device = torch.device(device)
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


def validation_batches(cfg: Config, samples: list[Sample]) -> list[dict]:
    """The validation batches of slides held in memory, cut once: epoch 0's locations of the
    run's seed (what the streamed "val" dataset holds), the same every epoch, so epochs are
    compared on one set."""
    extractors = {s.slide_id: BatchExtractor.from_arrays(cfg, s.image, s.label) for s in samples}
    return list(in_memory_batches(extractors, cfg, 0))


@torch.no_grad()
def slide_apsm(model: FoveatedSegmenter, source, cfg: Config, device) -> np.ndarray:
    """The APSM [h, w] (px) of one whole slide (a ``RegionSource``) from its x_r: the FoV F
    chooses at every x_r cell (the paper's Fig. 4, drawn once per epoch)."""
    from foveation.inference.wholeslide import xr_from_source
    from foveation.patches import pad_xr

    model.eval()
    w = model.weights(pad_xr(xr_from_source(source, cfg))[None].to(device))
    apsm = model.apsm(w)[0].float().cpu().numpy()
    model.train()
    return apsm


def peak_memory_mb(device: torch.device | str) -> float:
    """This rank's peak memory so far: allocated accelerator memory on a GPU, else the process's
    peak resident set (model, optimiser, activations and the data it holds)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def epoch_record(
    engine,
    cfg: Config,
    epoch: int,
    step: int,
    stats: EpochStats,
    val: dict | None,
    device,
    over_ranks: bool = True,
) -> EpochMetrics:
    """The epoch's record (``epoch`` epochs done, at ``step``); both trainers keep this one.
    ``over_ranks`` (the Ray worker): the figures that add up are summed over ranks (through a
    float32 tensor, as the worker always has); the single-device trainer's stay exact."""
    totals = [float(stats.rows), float(stats.pixels), stats.loss_sum, stats.steps]
    if over_ranks:
        totals = [float(x) for x in distributed.all_reduce_sum(torch.tensor(totals))]
    rows, pixels, loss_sum, steps = totals
    seconds = max(stats.seconds, 1e-9)
    return EpochMetrics(
        epoch=epoch,
        step=step,
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


# -- the single-device trainer ------------------------------------------------------------------
@dataclass
class TrainResult:
    model: FoveatedSegmenter
    epochs: list[EpochMetrics] = field(default_factory=list)  # one record per epoch
    apsm_history: list = field(default_factory=list)  # APSM of the first val image per epoch


def in_memory_batches(
    extractors: dict[str, BatchExtractor], cfg: Config, epoch: int
) -> Iterator[dict]:
    """One epoch of training batches over slides held in memory: the slides in a seeded order,
    ``batch_size`` slides a batch, each with this epoch's locations from ``sample_locations``
    (what each pipeline reader actor draws for a slide). Each slide's cut is recorded in the
    data metrics, as a reader actor's read is."""
    from foveation.data.readmetrics import record_banks

    tc = cfg.training
    ids = list(extractors)
    order = np.random.default_rng([tc.seed, epoch]).permutation(len(ids)).tolist()
    for b in range(0, len(order), tc.batch_size):
        parts = []
        for k in order[b : b + tc.batch_size]:
            sid = ids[k]
            ex = extractors[sid]
            t0 = time.perf_counter()
            locs = sample_locations(ex.image, cfg, tc.seed, epoch, sid, ex.label)
            if len(locs):
                parts.append(ex.batch(locs, sid))
                record_banks(time.perf_counter() - t0, parts[-1])
        if parts:
            yield to_torch(concat(parts))


def train(
    cfg: Config,
    train_samples: list[Sample],
    val_samples: list[Sample] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on one device over in-memory slides, with ``run_epoch`` and a ``LocalEngine``; per
    epoch, when ``val_samples`` are given, the Ray worker's validation (``validate``) and the
    APSM of the first of them."""
    from foveation.inference import ArraySource

    tc = cfg.training
    device = resolve_device(tc.device)
    extractors = {
        s.slide_id: BatchExtractor.from_arrays(cfg, s.image, s.label) for s in train_samples
    }
    steps_per_epoch = math.ceil(len(extractors) / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    torch.manual_seed(tc.seed)  # the same initial weights as a Ray Train run of the same seed
    engine = distributed.LocalEngine(build_model(cfg), cfg, total, device)
    held = validation_batches(cfg, val_samples) if val_samples else None
    result = TrainResult(engine.module)
    step = 0
    for epoch in range(tc.epochs):
        stats = run_epoch(
            engine, in_memory_batches(extractors, cfg, epoch), cfg, step, total, device
        )
        step += stats.steps
        val = validate(engine.module, held, cfg, device) if held is not None else None
        m = epoch_record(engine, cfg, epoch + 1, step, stats, val, device, over_ranks=False)
        if val_samples:
            source = ArraySource(val_samples[0].image, val_samples[0].slide_id)
            result.apsm_history.append(slide_apsm(engine.module, source, cfg, device))
        result.epochs.append(m)
        log(epoch_line(m, tc.epochs))
    engine.eval()
    return result
