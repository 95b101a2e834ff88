"""The ``gpu`` suite (a GPU machine only): the paper-size model (HRNetV2-W48, five patches of
1100..4400 px resized to 1100) trained through the DeepSpeed engine of ``jobs.train`` in
bf16 autocast and in fp32, interleaved (fp32, bf16, fp32, bf16, ...; each ratio the median of
the rounds, ``docs/contracts.md#benchmarks``): model-input megapixels per second and peak
accelerator memory. One process, one GPU, a one-rank process group (what a Ray Train worker
runs, without Ray). Batches are training batches cut once from in-memory 4400 px images and
cycled, so the figure is the GPU's, not the reader's.

    python -m jobs.benchmark gpu --config jobs/configs/paper.toml [--quick]
"""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks import Figure, interleaved, median_compared
from foveation.config import DistributedConfig, load_config


def _batches(cfg, n_batches: int, rows: int):
    """Training batches cut from two in-memory images by the one extractor."""
    from foveation.data.batches import BatchExtractor, to_torch
    from foveation.data.toy import generate_image
    from foveation.patches import xr_shape

    images = [generate_image(4400, 2000, seed=i) for i in range(2)]
    extractors = [
        BatchExtractor.from_arrays(cfg, im, lab, f"p{i}") for i, (im, lab) in enumerate(images)
    ]
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        ex = extractors[b % len(extractors)]
        h, w = xr_shape(ex.image.height, ex.image.width, cfg.patches.xr_scale)
        idx = torch.randperm(h * w, generator=gen)[:rows]
        locs = torch.stack([idx // w, idx % w], 1)
        out.append(to_torch(ex.batch(locs.numpy(), f"p{b % len(extractors)}")))
    return out


def _measure(cfg, batches, steps: int, precision: str) -> tuple[float, float, float]:
    """(seconds per step after warm-up, MP/s, peak GiB) of ``steps`` DeepSpeed steps (the one
    place this suite calls ``train_step``)."""
    from foveation.models.foveated import build_model
    from foveation.training import distributed
    from foveation.training.step import train_step

    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision=precision))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    engine = distributed.init_engine(build_model(cfg), cfg, steps, dev)
    gpu_batches = [
        {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches
    ]
    torch.cuda.reset_peak_memory_stats()
    warm = 3
    for step in range(steps):
        if step == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(engine, gpu_batches[step % len(gpu_batches)], cfg, step, steps, dev)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / (steps - warm)
    rows = len(batches[0]["bank"])
    mp = rows * cfg.patches.patch_size**2 / 1e6
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine
    torch.cuda.empty_cache()
    return sec, mp / sec, peak


def run(config: str = "jobs/configs/paper.toml", quick: bool = False) -> list[Figure]:
    if not torch.cuda.is_available():
        raise RuntimeError("the gpu suite needs a CUDA device; none is visible here")
    from foveation.training import distributed

    cfg = load_config(config)
    rows = 8
    cfg = dataclasses.replace(
        cfg,
        training=dataclasses.replace(
            cfg.training, batch_size=1, locations_per_image=rows, device="cuda"
        ),
        distributed=DistributedConfig(use_gpu=True, zero_stage=1),
    )
    distributed.init_single_process_group("nccl")
    batches = _batches(cfg, 4, rows)
    # Per round, a fresh engine per precision; 3 rounds of 60 + 30 steps (was one run of
    # 200 + 30) keep the suite within a few minutes.
    bf16_steps, fp32_steps = (10, 6) if quick else (60, 30)
    got = interleaved(
        {
            "fp32": lambda: _measure(cfg, batches, fp32_steps, "fp32"),
            "bf16": lambda: _measure(cfg, batches, bf16_steps, "bf16"),
        }
    )
    name = torch.cuda.get_device_name()
    note = f"{name}; {rows} locations of {cfg.patches.patch_size} px per step; {bf16_steps} bf16 / {fp32_steps} fp32 steps per round"
    mps = median_compared(
        "gpu: model-input MP/s, bf16 autocast vs fp32 (DeepSpeed ZeRO 1)",
        [mp for _, mp, _ in got["bf16"]],
        [mp for _, mp, _ in got["fp32"]],
        "MP/s",
        "higher",
        None,
        note,
    )
    i = [mp for _, mp, _ in got["bf16"]].index(mps.value)  # the median round
    return [
        mps,
        Figure("gpu: seconds per step, bf16", got["bf16"][i][0], "s", "lower"),
        Figure("gpu: seconds per step, fp32", got["fp32"][i][0], "s", "lower"),
        median_compared(
            "gpu: peak memory, bf16 vs fp32",
            [peak for *_, peak in got["bf16"]],
            [peak for *_, peak in got["fp32"]],
            "GiB",
            "lower",
            None,
        ),
    ]
