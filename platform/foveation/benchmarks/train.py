"""The ``train`` suite: the product's training loop (Ray Train, one worker, DeepSpeed, the
real ``worker.train_worker`` with its per-epoch checkpoint) against a plain single-process
PyTorch loop (torch.optim, no Ray Train, no DeepSpeed) on the same model, the same batches and
the same number of steps.

Both read one materialised Ray Data dataset of pipeline batches, so reading slides costs neither
side and the ratio is the training framework's overhead. Both get the same CPU threads (the
worker asks for as many logical CPUs as the baseline's torch threads; Ray sets its thread count
from that). The first epoch of each warms up (DeepSpeed's first step builds its optimiser
state) and is not timed. Figures: samples (locations) and megapixels of model input per second.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import torch

from foveation.benchmarks import Figure, compared
from foveation.config import DistributedConfig, load_config


def plain_loop(cfg, ds, epochs: int) -> list[tuple[int, float]]:
    """(rows, seconds) per epoch of a plain loop over ``ds``."""
    from foveation.data.pipeline import torch_batches
    from foveation.models.foveated import build_model
    from foveation.training.optim import build_optimizer
    from foveation.training.step import batch_forward

    tc = cfg.training
    torch.manual_seed(tc.seed)
    model = build_model(cfg).train()
    rows = tc.batch_size * tc.locations_per_image
    n_batches = ds.count() // rows + bool(ds.count() % rows)
    opt, sched = build_optimizer(model, tc, epochs * n_batches)
    out, step = [], 0
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for batch in torch_batches(ds, rows):
            loss, _, w, _ = batch_forward(model, batch, cfg, step, epochs * n_batches, "cpu")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n += len(w)
            step += 1
        out.append((n, time.perf_counter() - t0))
    return out


def ray_train_loop(
    cfg, ds, epochs: int, threads: int, storage_path: str
) -> list[tuple[int, float]]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from foveation.data.pipeline import epoch_clock
    from foveation.training.worker import train_worker

    tc = cfg.training
    rows = tc.batch_size * tc.locations_per_image
    steps = ds.count() // rows + bool(ds.count() % rows)
    cfg = dataclasses.replace(
        cfg,
        training=dataclasses.replace(tc, epochs=epochs),
        distributed=DistributedConfig(num_workers=1, cpus_per_worker=float(threads)),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "steps_per_epoch": steps,
            "clock": epoch_clock(0),
            "history": None,
        },
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


def run(config: str = "jobs/configs/debug.toml", quick: bool = False) -> list[Figure]:
    from foveation.data.pipeline import Pipeline
    from foveation.raycluster import init_ray

    cfg = load_config(config)
    epochs = 2 if quick else 4
    locs = 32 if quick else cfg.training.locations_per_image
    cfg = dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, locations_per_image=locs)
    )
    threads = torch.get_num_threads()
    init_ray(max(4, threads + 2))
    ds = Pipeline(cfg.data.ingest.dest, "train", cfg).epoch(0).materialize()
    with tempfile.TemporaryDirectory() as tmp:
        ray_epochs = ray_train_loop(cfg, ds, epochs, threads, tmp)
    base_epochs = plain_loop(cfg, ds, epochs)

    def rate(ep):  # rows per second over the epochs after the first
        timed = ep[1:]
        return sum(n for n, _ in timed) / sum(s for _, s in timed)

    mp = cfg.patches.patch_size**2 / 1e6
    r, b = rate(ray_epochs), rate(base_epochs)
    note = f"{ds.count()} locations per epoch, {epochs} epochs (first untimed), {threads} threads"
    return [
        compared(
            "train: locations/s, Ray Train + DeepSpeed (1 worker) vs plain loop",
            r,
            b,
            "locations/s",
            "higher",
            0.9,
            note,
        ),
        compared(
            "train: model-input megapixels/s, Ray Train + DeepSpeed vs plain loop",
            r * mp,
            b * mp,
            "MP/s",
            "higher",
            0.9,
        ),
    ]
