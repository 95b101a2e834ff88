"""What a training run records, and under which names: the one owner of the training metric
names (``monitoring.py`` defines the Prometheus metrics; this maps a run's figures onto them
and onto the flat keys Ray Train reports, Tune ranks and ``meta.json`` keeps).

An epoch's figures are kept structured (``EpochMetrics``: learning rates by parameter group,
F's mean weight by FoV, validation IoU by class) and flattened once, by ``flat``, for reports;
nothing parses names back. Both trainers keep this record (``loop.epoch_record``) and print it
as the one line ``epoch_line`` writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from foveation import monitoring

HEARTBEAT_EVERY_S = 2.0  # a gauge set goes through an actor call: not one per step
HEARTBEAT_TTL_S = 3600.0
"""How long "running" and the last-step time outlive the last step: a run killed without
ending (its driver and workers gone) shows as stalled, then leaves the dashboards."""


@dataclass
class EpochMetrics:
    """One epoch's figures, reduced over ranks where they add up."""

    epoch: int
    step: int
    loss: float
    seconds: float
    samples_per_s: float
    megapixels_per_s: float
    world_size: int
    peak_memory_mb: float
    nodes: int = 1  # machines the ranks ran on, as Ray Train grouped them (by node IP)
    lr: dict[str, float] = field(default_factory=dict)  # by parameter group
    weight_mean: dict[str, float] = field(default_factory=dict)  # F's mean weight by FoV (px)
    weight_entropy: float = 0.0  # mean per-location entropy of F's weights (nats)
    fovnet_grad_norm: float = 0.0  # mean norm of F's gradient per step (this rank)
    apsm: dict[str, float] = field(default_factory=dict)  # a val slide's mean APSM (px), by cue
    val: dict | None = None  # ConfusionMatrix.summary of the validation locations

    @property
    def val_miou(self) -> float:
        return float(self.val["miou"]) if self.val else 0.0

    def flat(self) -> dict[str, float]:
        """The flat form Ray Train reports, Tune ranks (``val_miou``) and ``meta.json`` keeps."""
        out = {
            "epoch": self.epoch,
            "step": self.step,
            "loss": self.loss,
            "val_miou": self.val_miou,
            "samples_per_s": self.samples_per_s,
            "megapixels_per_s": self.megapixels_per_s,
            "seconds": self.seconds,
            "world_size": self.world_size,
            "nodes": self.nodes,
            "peak_memory_mb": self.peak_memory_mb,
        }
        out |= {f"lr_{k}": float(v) for k, v in self.lr.items()}
        out |= {f"weight_mean_{k}": float(v) for k, v in self.weight_mean.items()}
        out |= {"weight_entropy": self.weight_entropy, "fovnet_grad_norm": self.fovnet_grad_norm}
        out |= {f"apsm_{k}": float(v) for k, v in self.apsm.items()}
        if self.val:
            out |= {f"val_iou_{k}": float(v) for k, v in self.val["iou"].items()}
            out |= {
                "val_miou_kept": float(self.val["miou_kept"]),
                "val_pixel_accuracy": float(self.val["pixel_accuracy"]),
            }
        return out


def epoch_line(m: EpochMetrics, epochs: int) -> str:
    """The one console line of an epoch, whichever trainer ran it (the Ray driver prints the
    workers' from storage: ``trainer.EpochLines``)."""
    val = f"val mIoU {m.val_miou:.3f} " if m.val else ""
    apsm = f" APSM { ({k: round(v) for k, v in m.apsm.items()}) }" if m.apsm else ""
    return (
        f"epoch {m.epoch}/{epochs} step {m.step} loss {m.loss:.4f} {val}"
        f"{m.samples_per_s:.1f} locations/s mean weight per FoV "
        f"{[round(x, 3) for x in m.weight_mean.values()]} entropy {m.weight_entropy:.3f} "
        f"F grad {m.fovnet_grad_norm:.2e}{apsm}"
    )


class Recorder:
    """A rank's training metrics: steps and memory from every rank; the heartbeat and the
    epoch's reduced figures from rank 0 only (the same figure from every rank would be noise)."""

    def __init__(self, run: str, rank: int) -> None:
        self.run, self.rank = run, rank
        self._last_beat = 0.0

    def heartbeat(self, now: float | None = None) -> None:
        """Rank 0: the run is running and made progress now, an optimizer step or a
        validation batch (what the training-stalled alert reads)."""
        if self.rank != 0:
            return
        now = time.time() if now is None else now
        self._last_beat = now
        monitoring.record("foveation_train_running", 1.0, ttl_s=HEARTBEAT_TTL_S, run=self.run)
        monitoring.record(
            "foveation_train_last_step_timestamp_seconds",
            now,
            ttl_s=HEARTBEAT_TTL_S,
            run=self.run,
        )

    def keep_alive(self) -> None:
        """After a training step or a validation batch: the heartbeat, at most every
        ``HEARTBEAT_EVERY_S``."""
        now = time.time()
        if self.rank == 0 and now - self._last_beat >= HEARTBEAT_EVERY_S:
            self.heartbeat(now)

    def step(self, seconds: float) -> None:
        monitoring.record("foveation_train_steps_total", 1.0, run=self.run, rank=self.rank)
        monitoring.record("foveation_train_step_seconds", seconds, run=self.run, rank=self.rank)
        self.keep_alive()

    def epoch(self, m: EpochMetrics) -> None:
        monitoring.record(
            "foveation_train_accelerator_memory_bytes",
            m.peak_memory_mb * 2**20,
            run=self.run,
            rank=self.rank,
        )
        if self.rank != 0:
            return
        for name, value in (
            ("foveation_train_loss", m.loss),
            ("foveation_train_samples_per_second", m.samples_per_s),
            ("foveation_train_megapixels_per_second", m.megapixels_per_s),
            ("foveation_train_val_miou", m.val_miou),
            ("foveation_train_epoch", m.epoch),
            ("foveation_train_fov_weight_entropy", m.weight_entropy),
            ("foveation_train_fovnet_grad_norm", m.fovnet_grad_norm),
        ):
            monitoring.record(name, float(value), run=self.run)
        for group, lr in m.lr.items():
            monitoring.record("foveation_train_learning_rate", lr, run=self.run, group=group)
        for fov, w in m.weight_mean.items():
            monitoring.record("foveation_train_fov_weight", w, run=self.run, fov=fov)
        for cue, px in m.apsm.items():
            monitoring.record("foveation_train_val_apsm_pixels", px, run=self.run, cue=cue)
