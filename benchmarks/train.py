"""The ``train`` suite: the product's training loop (Ray Train, one worker, DeepSpeed, the
real ``worker.train_worker`` with its per-epoch checkpoint) against a plain single-process
PyTorch loop (torch.optim, no Ray Train, no DeepSpeed) on the same model, the same batches and
the same number of steps.

Both read one materialised Ray Data dataset of pipeline batches, so reading slides costs neither
side and the ratio is the training framework's overhead. A third figure streams the epoch from
the slides through the Ray Data pipeline, as ``jobs.train`` does, against the same Ray Train
run on the materialised batches: what reading slides while training costs. Both get the same CPU threads (the
worker asks for as many logical CPUs as the baseline's torch threads; Ray sets its thread count
from that). The first epoch of each warms up (DeepSpeed's first step builds its optimiser
state) and is not timed. Figures: samples (locations) and megapixels of model input per second,
each the median of interleaved repetitions of the two loops (``docs/contracts.md#benchmarks``).
The slides are the config's set (``data.ingest``), generated and ingested first where missing,
as ``jobs.demo`` does (``prepare.ensure_store``).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile

import torch

from benchmarks import Figure, interleaved, median_compared
from foveation.config import DistributedConfig, load_config


def plain_loop(cfg, ds, epochs: int) -> list[tuple[int, float]]:
    """(rows, seconds) per epoch of the single-device trainer's loop (``loop.run_epoch`` with a
    ``LocalEngine``: torch.optim, no Ray Train, no DeepSpeed) over ``ds``."""
    from foveation.data.pipeline import torch_batches
    from foveation.models.foveated import build_model
    from foveation.training.distributed import LocalEngine
    from foveation.training.loop import run_epoch

    tc = cfg.training
    torch.manual_seed(tc.seed)
    rows = tc.batch_size * tc.locations_per_image
    n_batches = ds.count() // rows + bool(ds.count() % rows)
    engine = LocalEngine(build_model(cfg), cfg, epochs * n_batches, "cpu")
    out, step = [], 0
    for _ in range(epochs):
        stats = run_epoch(engine, torch_batches(ds, rows), cfg, step, epochs * n_batches, "cpu")
        step += stats.steps
        out.append((stats.rows, stats.seconds))
    return out


def ray_train_loop(
    cfg, ds, epochs: int, threads: int, storage_path: str, steps: int | None = None, clock=None
) -> list[tuple[int, float]]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from foveation.data.pipeline import epoch_clock
    from foveation.training.plan import WorkerPlan
    from foveation.training.worker import train_worker

    tc = cfg.training
    rows = tc.batch_size * tc.locations_per_image
    if steps is None:
        steps = ds.count() // rows + bool(ds.count() % rows)
    cfg = dataclasses.replace(
        cfg,
        training=dataclasses.replace(tc, epochs=epochs),
        distributed=DistributedConfig(num_workers=1, cpus_per_worker=float(threads)),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=WorkerPlan(cfg, steps, clock or epoch_clock(0)).loop_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": float(threads)}
        ),
        torch_config=TorchConfig(backend="gloo"),
        datasets={"train": ds},
        run_config=ray.train.RunConfig(name="bench", storage_path=storage_path),
    )
    from foveation.training.trainer import history_of

    hist = history_of(trainer.fit(), storage_path)
    return [(round(h["samples_per_s"] * h["seconds"]), h["seconds"]) for h in hist]


def run(config: str = "jobs/configs/bench.toml", quick: bool = False) -> list[Figure]:
    from foveation.data.pipeline import Pipeline
    from foveation.data.prepare import ensure_store
    from foveation.raycluster import init_ray

    cfg = load_config(config)
    epochs = 2 if quick else 3  # 3 (was 4): each loop now runs in every one of the rounds
    locs = 32 if quick else cfg.training.locations_per_image
    cfg = dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, locations_per_image=locs)
    )
    threads = torch.get_num_threads()
    init_ray(max(4, threads + 2))
    # The config's data set, made as the demo makes it (generated into an empty source, then
    # ingested; a second run finds both): the suite starts on a fresh checkout too.
    store = ensure_store(cfg, log=lambda s: print(f"train: {s}", flush=True))
    pipe = Pipeline(store, "train", cfg)
    ds = pipe.epoch(0).materialize()
    rows = cfg.training.batch_size * locs
    steps = ds.count() // rows + bool(ds.count() % rows)

    def streamed(path: str):  # the pipeline read from slides as the epoch runs, as users train
        from foveation.data.pipeline import epoch_clock

        clock = epoch_clock(0)
        return ray_train_loop(cfg, pipe.epoch(clock), epochs, threads, path, steps, clock)

    def rate(ep):  # rows per second over the epochs after the first
        timed = ep[1:]
        return sum(n for n, _ in timed) / sum(s for _, s in timed)

    with tempfile.TemporaryDirectory() as tmp:
        runs = itertools.count()
        rates = interleaved(
            {
                "plain": lambda: rate(plain_loop(cfg, ds, epochs)),
                "ray": lambda: rate(
                    ray_train_loop(cfg, ds, epochs, threads, f"{tmp}/{next(runs)}")
                ),
                "streamed": lambda: rate(streamed(f"{tmp}/{next(runs)}")),
            }
        )

    mp = cfg.patches.patch_size**2 / 1e6
    note = f"{ds.count()} locations per epoch, {epochs} epochs (first untimed), {threads} threads"
    return [
        median_compared(
            "train: locations/s, Ray Train + DeepSpeed (1 worker) vs plain loop",
            rates["ray"],
            rates["plain"],
            "locations/s",
            "higher",
            0.9,
            note,
        ),
        median_compared(
            "train: model-input megapixels/s, Ray Train + DeepSpeed vs plain loop",
            [r * mp for r in rates["ray"]],
            [b * mp for b in rates["plain"]],
            "MP/s",
            "higher",
            0.9,
        ),
        median_compared(
            "train: locations/s, an epoch streamed from slides by the Ray Data pipeline vs the "
            "same steps on batches already in memory (Ray Train + DeepSpeed both)",
            rates["streamed"],
            rates["ray"],
            "locations/s",
            "higher",
            1 / 1.1,  # the epoch may take at most 1.1x as long when it reads the slides itself
            note,
        ),
    ]
