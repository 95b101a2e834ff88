"""The ``gpu`` suite (a GPU machine only): the paper-size model (HRNetV2-W48, five patches of
1100..4400 px resized to 1100) trained through the DeepSpeed engine of ``jobs.train`` for a
few hundred steps in bf16 autocast, then fp32 for comparison: model-input megapixels per
second and peak accelerator memory. One process, one GPU, a one-rank process group (what a
Ray Train worker runs, without Ray). Batches are DESIGN.md training batches cut once from
in-memory 4400 px images and cycled, so the figure is the GPU's, not the reader's.

    python -m jobs.benchmark gpu --config jobs/configs/paper.toml [--quick]
"""

from __future__ import annotations

import dataclasses
import time

import torch

from foveation.benchmarks import Figure, compared
from foveation.config import DistributedConfig, load_config


def _batches(cfg, n_batches: int, rows: int):
    from foveation.data.toy import generate_image
    from foveation.patches import XR_CONTEXT
    from foveation.training.step import prepare_image

    images = [generate_image(4400, 2000, seed=i) for i in range(2)]
    prepared = [prepare_image(f"p{i}", im, lab, cfg) for i, (im, lab) in enumerate(images)]
    gen = torch.Generator().manual_seed(0)
    k = XR_CONTEXT
    out = []
    for b in range(n_batches):
        p = prepared[b % len(prepared)]
        h, w = p.xr_size
        idx = torch.randperm(h * w, generator=gen)[:rows]
        locs = torch.stack([idx // w, idx % w], 1)
        xr = torch.stack([p.xr[:, i : i + 2 * k + 1, j : j + 2 * k + 1] for i, j in locs.tolist()])
        out.append(
            {
                "bank": p.extractor.bank(locs).to(torch.uint8),
                "xr": xr,
                "label": p.extractor.labels(locs).to(torch.uint8),
                "slide_id": [p.slide_id] * rows,
            }
        )
    return out


def _measure(cfg, batches, steps: int, precision: str) -> tuple[float, float, float]:
    """(seconds per step after warm-up, MP/s, peak GiB) of ``steps`` DeepSpeed steps."""
    from foveation.models.foveated import build_model
    from foveation.training import distributed
    from foveation.training.step import batch_forward

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
        loss, *_ = batch_forward(
            engine, gpu_batches[step % len(gpu_batches)], cfg, step, steps, dev
        )
        distributed.train_step(engine, loss)
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
    bf16_steps, fp32_steps = (10, 6) if quick else (200, 30)
    s_bf, mp_bf, peak_bf = _measure(cfg, batches, bf16_steps, "bf16")
    s_fp, mp_fp, peak_fp = _measure(cfg, batches, fp32_steps, "fp32")
    name = torch.cuda.get_device_name()
    note = f"{name}; {rows} locations of {cfg.patches.patch_size} px per step; {bf16_steps} bf16 / {fp32_steps} fp32 steps"
    return [
        compared(
            "gpu: model-input MP/s, bf16 autocast vs fp32 (DeepSpeed ZeRO 1)",
            mp_bf,
            mp_fp,
            "MP/s",
            "higher",
            None,
            note,
        ),
        Figure("gpu: seconds per step, bf16", s_bf, "s", "lower"),
        Figure("gpu: seconds per step, fp32", s_fp, "s", "lower"),
        compared("gpu: peak memory, bf16 vs fp32", peak_bf, peak_fp, "GiB", "lower", None),
    ]
