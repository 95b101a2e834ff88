"""The ``threads`` suite: what a training worker gains from every core of its machine.

Ray sets a worker's ``OMP_NUM_THREADS`` to ``floor(num_cpus)``, so a Ray Train worker with
``distributed.cpus_per_worker = 1`` trains on one thread even when it has the machine to itself
(the demo on a laptop). ``distributed.threads_per_worker = 0`` gives it every core the process
may run on (``training.distributed.cpu_threads``). This suite times the product's training step
(``step.train_step`` on a ``LocalEngine``, the config's model and batch shape) on one thread,
the baseline, against ``cpu_threads(0, 1)`` threads, in interleaved rounds. The batches are
synthetic arrays of the pipeline's shapes (docs/contracts.md#training-batch), so reading slides
costs neither side.
"""

from __future__ import annotations

import time

import torch

from benchmarks import Figure, interleaved, median_compared
from foveation.config import load_config

WARMUP_STEPS = 5


def synthetic_batch(cfg, n: int) -> dict:
    """A training batch of ``n`` locations with the pipeline's keys, dtypes and shapes for
    ``cfg`` (docs/contracts.md#training-batch), random content from a fixed seed."""
    d, p = cfg.patches.depth, cfg.patches.patch_size
    g = torch.Generator().manual_seed(0)
    return {
        "bank": torch.randint(0, 256, (n, d, 3, p, p), dtype=torch.uint8, generator=g),
        "xr": torch.randn(n, 3, 7, 7, generator=g),
        "label": torch.randint(
            0, cfg.model.num_classes, (n, p // 4, p // 4), dtype=torch.uint8, generator=g
        ),
        "slide_id": ["synthetic"] * n,
    }


def steps_per_s(cfg, threads: int, steps: int) -> float:
    """Training steps per second of ``cfg``'s model on ``threads`` torch threads."""
    from foveation.models.foveated import build_model
    from foveation.training.distributed import LocalEngine
    from foveation.training.step import train_step

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        total = WARMUP_STEPS + steps
        engine = LocalEngine(build_model(cfg), cfg, total, "cpu")
        batch = synthetic_batch(cfg, cfg.training.batch_size * cfg.training.locations_per_image)
        for i in range(WARMUP_STEPS):
            train_step(engine, batch, cfg, i, total, "cpu")
        t = time.perf_counter()
        for i in range(WARMUP_STEPS, total):
            train_step(engine, batch, cfg, i, total, "cpu")
        return steps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)


def run(config: str = "jobs/configs/debug.toml", quick: bool = False) -> list[Figure]:
    from foveation.training.distributed import cpu_threads

    cfg = load_config(config)
    steps = 5 if quick else 30
    cores = cpu_threads(0, 1)
    rates = interleaved(
        {
            "one": lambda: steps_per_s(cfg, 1, steps),
            "every": lambda: steps_per_s(cfg, cores, steps),
        }
    )
    n = cfg.training.batch_size * cfg.training.locations_per_image
    return [
        median_compared(
            f"train step: locations/s on every core ({cores}) vs one thread (Ray's rule)",
            [r * n for r in rates["every"]],
            [r * n for r in rates["one"]],
            "locations/s",
            "higher",
            None,
            f"{config}: {n} locations a step, {steps} timed steps after {WARMUP_STEPS}",
        )
    ]
