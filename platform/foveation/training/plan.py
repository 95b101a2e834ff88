"""What the driver (``trainer.fit``) hands every Ray Train worker (``worker.train_worker``): one
typed, frozen plan instead of a dict of string keys, so the two sides cannot drift apart and a
misspelt field fails where the plan is built, not as a silent ``None`` in a worker.

Ray Train passes ``train_loop_config`` to the workers pickled, and its signature asks for a
dict: the plan travels in it under ``PLAN_KEY`` (``loop_config`` / ``from_loop_config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foveation.config import Config

PLAN_KEY = "plan"
FAULT_ENV = "FOVEATION_FAIL_AT_STEP"
"""Fault injection for the tests: "7" or "3,7,11": rank 0 kills itself with SIGKILL at each of
these steps, once each (a marker under ``<out>/faults/`` remembers), so Ray Train must restart
the group and resume from the last checkpoint every time. Read by the driver into the plan's
``fail_at_steps`` (``fault_steps``)."""


@dataclass(frozen=True)
class HistoryTarget:
    """Where rank 0 writes one validation slide's APSM after every epoch (the paper's Fig. 4),
    and the slide: its image and, on a synthetic set, its cue map (so the APSM by cue is a
    training metric too)."""

    dir: str
    image_uri: str
    cue_uri: str | None = None


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs beyond what Ray Train gives it (its rank, device, dataset
    shards and the checkpoint to resume from)."""

    cfg: Config
    steps_per_epoch: int
    clock: Any  # the pipeline's epoch-clock actor (``data.pipeline.epoch_clock``)
    run: str = ""  # the metrics' ``run`` label; empty: the config's name
    progress: str | None = None  # where rank 0 writes each epoch's console line
    history: HistoryTarget | None = None  # where rank 0 writes the per-epoch APSM, or None
    has_val: bool = False  # a validation split exists (streamed: the "val" dataset shard)
    # The training / validation slides' manifest rows for the memory loader (URIs absolute);
    # None: stream this rank's shard of the "train" / "val" dataset.
    train_rows: tuple[dict, ...] | None = None
    val_rows: tuple[dict, ...] | None = None
    fail_at_steps: tuple[int, ...] = ()  # fault injection for the tests (``worker.FAULT_ENV``)
    faults: str | None = None  # where the injected faults leave their markers

    def __post_init__(self) -> None:
        if not isinstance(self.cfg, Config):
            raise TypeError(f"WorkerPlan.cfg: expected a Config, got {type(self.cfg).__name__}")
        if not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1:
            raise ValueError(
                f"WorkerPlan.steps_per_epoch: expected an int >= 1, got {self.steps_per_epoch!r}"
            )
        if self.fail_at_steps and self.faults is None:
            raise ValueError(
                f"WorkerPlan.fail_at_steps {self.fail_at_steps}: needs ``faults``, the directory "
                "where each injected fault leaves its marker"
            )

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's length)."""
        return self.cfg.training.epochs * self.steps_per_epoch

    def loop_config(self) -> dict:
        """Ray Train's ``train_loop_config``: this plan under ``PLAN_KEY``."""
        return {PLAN_KEY: self}


def fault_steps(value: str | None) -> tuple[int, ...]:
    """The steps of ``FAULT_ENV``'s value ("3,7,11"); none for an unset or empty one."""
    if not value or not value.strip():
        return ()
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise ValueError(
            f"{FAULT_ENV}={value!r}: expected step numbers separated by commas, e.g. '3,7'"
        ) from None


def from_loop_config(config: dict) -> WorkerPlan:
    """The plan ``WorkerPlan.loop_config`` packed, with a clear error for anything else."""
    plan = config.get(PLAN_KEY) if isinstance(config, dict) else None
    if not isinstance(plan, WorkerPlan):
        got = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise TypeError(
            f"train_loop_config: expected {{{PLAN_KEY!r}: WorkerPlan}} "
            f"(WorkerPlan.loop_config()), got {got}"
        )
    return plan
