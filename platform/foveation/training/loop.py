"""The one training loop: ``run_epoch`` drives an engine over an iterable of training batches.

Both trainers run it. ``train`` (below) is the single-device trainer over slides held in memory
(the science check, the learning test): its batches come from ``data.batches.BatchExtractor``
over in-memory images, with the locations ``data.batches.sample_locations`` draws, and its
engine is ``distributed.LocalEngine``. The Ray Train worker (``training.worker``) runs the same
``run_epoch`` over its shard of the Ray Data pipeline (the same extractor over slide readers,
the same sampler) with a DeepSpeed engine. So ``jobs.reproduce --trainer single`` and
``--trainer ray`` differ only in where the loop runs and where batches come from.
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
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.training import distributed
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


# -- the single-device trainer ------------------------------------------------------------------
@dataclass
class EpochLog:
    epoch: int
    step: int
    loss: float
    weight_mean: list[float]
    val: dict | None
    seconds: float
    weight_entropy: float = 0.0
    fovnet_grad_norm: float = 0.0


@dataclass
class TrainResult:
    model: FoveatedSegmenter
    epochs: list[EpochLog] = field(default_factory=list)
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
    """Train on one device over in-memory slides, with ``run_epoch`` and a ``LocalEngine``; a
    whole-image validation per epoch when ``val_samples`` are given."""
    from foveation.evaluation.inmemory import evaluate

    tc = cfg.training
    device = resolve_device(tc.device)
    extractors = {
        s.slide_id: BatchExtractor.from_arrays(cfg, s.image, s.label) for s in train_samples
    }
    steps_per_epoch = math.ceil(len(extractors) / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    torch.manual_seed(tc.seed)  # the same initial weights as a Ray Train run of the same seed
    engine = distributed.LocalEngine(build_model(cfg), cfg, total, device)
    result = TrainResult(engine.module)
    step = 0
    for epoch in range(tc.epochs):
        stats = run_epoch(
            engine, in_memory_batches(extractors, cfg, epoch), cfg, step, total, device
        )
        step += stats.steps
        val = None
        if val_samples:
            val = evaluate(engine.module, val_samples, cfg, device=device, keep_outputs=1)
            result.apsm_history.append(val["outputs"][0]["apsm"])
            val = {k: v for k, v in val.items() if k != "outputs"}
            engine.train()
        wm = stats.weight_mean()
        entry = EpochLog(
            epoch,
            step,
            stats.loss,
            wm,
            val,
            stats.seconds,
            stats.weight_entropy,
            stats.fovnet_grad_norm,
        )
        result.epochs.append(entry)
        vtxt = f" val mIoU {val['miou']:.3f}" if val else ""
        log(
            f"epoch {epoch + 1}/{tc.epochs} step {step} loss {entry.loss:.4f}{vtxt} "
            f"mean weight per FoV {[round(x, 3) for x in wm]} entropy "
            f"{entry.weight_entropy:.3f} F grad {entry.fovnet_grad_norm:.2e} ({entry.seconds:.1f}s)"
        )
    engine.eval()
    return result
