"""The ``gpu`` suite (a GPU machine only): the paper-size model (HRNetV2-W48, five patches of
1100..4400 px resized to 1100) trained through the DeepSpeed engine of ``jobs.train`` in
bf16 autocast and in fp32, interleaved (fp32, bf16, fp32, bf16, ...; each ratio the median of
the rounds, ``docs/contracts.md#benchmarks``): model-input megapixels per second and peak
accelerator memory. One process, one GPU, a one-rank process group (what a Ray Train worker
runs, without Ray). Batches are training batches cut once from in-memory 4400 px images and
cycled, so the figure is the GPU's, not the reader's. Before those, the lever ladder
(``lever_ladder``): the training step's speed levers (``training/speed.py``) stacked one at a
time in bf16, then bf16 against fp32 with every lever on both. ``gpu-profile``
(``benchmarks/gpu_profile.py``) traces the step; ``benchmarks/gpu_session.sh`` runs both.

    python -m jobs.benchmark gpu --config jobs/configs/paper.toml [--quick]
"""

from __future__ import annotations

import dataclasses
import gc
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


ROWS = 8
"""Locations per step in the GPU suites (one image's)."""


def paper_setup(config: str, **training) -> tuple:
    """(config, batches) for the GPU suites: ``config`` at ``ROWS`` locations a step (with the
    ``training`` fields given) on one GPU in a one-rank process group (what a Ray Train worker
    runs, without Ray), and training batches cut from in-memory images."""
    from foveation.training import distributed

    cfg = load_config(config)
    cfg = dataclasses.replace(
        cfg,
        training=dataclasses.replace(
            cfg.training, batch_size=1, locations_per_image=ROWS, device="cuda", **training
        ),
        distributed=DistributedConfig(use_gpu=True, zero_stage=1),
    )
    distributed.init_single_process_group("nccl")
    return cfg, _batches(cfg, 4, ROWS)


def gpu_engine(cfg, batches, steps: int) -> tuple:
    """(engine, batches on the GPU): a DeepSpeed engine over a fresh model (seed 0) scheduled
    for ``steps`` steps, as ``jobs.train``'s worker builds it."""
    from foveation.models.foveated import build_model
    from foveation.training import distributed

    dev = torch.device("cuda")
    torch.manual_seed(0)
    engine = distributed.init_engine(build_model(cfg), cfg, steps, dev)
    on_gpu = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    return engine, on_gpu


LEVERS: list[tuple[str, dict]] = [
    ("today", {"cudnn_benchmark": False}),  # as the step ran before the levers
    ("+ channels-last", {"channels_last": True}),
    ("+ cudnn.benchmark", {"cudnn_benchmark": True}),
    ("+ fused Adam", {"adam": "fused"}),
    ("+ torch.compile (inductor)", {"compile": "inductor"}),
]
"""The training step's levers (``training/speed.py``), stacked one at a time in this order; the
first row is the step as it ran before them."""
LEVER_WARMUP, LEVER_STEPS = 10, 30


def _measure(
    cfg, batches, steps: int, precision: str, warm: int = 3, levers: dict | None = None
) -> tuple[float, float, float, float]:
    """(seconds per step after warm-up, MP/s, peak GiB, seconds of the ``warm`` warm-up steps:
    compile time shows there) of ``steps`` DeepSpeed steps with ``levers`` (training fields)
    applied; the one place this suite calls ``train_step``."""
    from foveation.training.step import train_step

    tc = dataclasses.replace(cfg.training, precision=precision, **(levers or {}))
    cfg = dataclasses.replace(cfg, training=tc)
    dev = torch.device("cuda")
    engine, gpu_batches = gpu_engine(cfg, batches, steps)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t_warm = time.perf_counter()
    for step in range(steps):
        if step == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            t_warm = t0 - t_warm
        train_step(engine, gpu_batches[step % len(gpu_batches)], cfg, step, steps, dev)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / (steps - warm)
    rows = len(batches[0]["bank"])
    mp = rows * cfg.patches.patch_size**2 / 1e6
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine
    gc.collect()  # a compiled segmenter's forward refers back to it: freed by the collector
    torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False  # the next measurement sets its own
    return sec, mp / sec, peak, t_warm


def lever_ladder(cfg, batches, quick: bool) -> list[Figure]:
    """The levers stacked one at a time in bf16 (``LEVER_WARMUP`` untimed and ``LEVER_STEPS``
    timed steps each, the warm-up's seconds reported apart), then fp32 with every lever and
    TF32 allowed for its matmuls and convolutions: each row's MP/s against the first row's, and
    bf16 against fp32 on the same levers."""
    warm, steps = (2, 3) if quick else (LEVER_WARMUP, LEVER_STEPS)
    total = warm + steps
    figures, stacked, base = [], {}, None
    for name, change in LEVERS:
        try:
            sec, mps, peak, t_warm = _measure(cfg, batches, total, "bf16", warm, stacked | change)
        except Exception as exc:  # one failing lever must not lose a GPU session's other rows
            print(f"gpu levers: {name} failed, left out of the stack: {exc!r}", flush=True)
            figures.append(
                Figure(
                    f"gpu levers, bf16: {name}",
                    float("nan"),
                    "MP/s",
                    "higher",
                    note=f"failed: {type(exc).__name__}: {exc}"[:300],
                )
            )
            torch.cuda.empty_cache()
            continue
        stacked = stacked | change
        base = base or mps
        figures.append(
            Figure(
                f"gpu levers, bf16: {name}",
                mps,
                "MP/s",
                "higher",
                baseline_value=base,
                ratio=mps / base,
                note=f"{sec:.3f} s/step, peak {peak:.1f} GiB, first {warm} steps {t_warm:.1f} s",
            )
        )
    ran = [f.value for f in figures if f.value == f.value]  # NaN: a lever that failed
    if not ran:
        return figures
    mps = ran[-1]  # bf16 with every lever that ran
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        sec, fp32, peak, t_warm = _measure(cfg, batches, total, "fp32", warm, stacked)
    except Exception as exc:  # keep the bf16 rows
        print(f"gpu levers: fp32 with every lever failed: {exc!r}", flush=True)
        return figures
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, for what runs next
    figures.append(
        Figure(
            "gpu levers: bf16 vs fp32 (TF32 allowed), every lever on both",
            mps,
            "MP/s",
            "higher",
            target=1.8,
            baseline_value=fp32,
            ratio=mps / fp32,
            note=f"fp32 {sec:.3f} s/step, peak {peak:.1f} GiB, first {warm} steps {t_warm:.1f} s",
        )
    )
    return figures


def run(config: str = "jobs/configs/paper.toml", quick: bool = False) -> list[Figure]:
    if not torch.cuda.is_available():
        raise RuntimeError("the gpu suite needs a CUDA device; none is visible here")
    cfg, batches = paper_setup(config)
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
    note = f"{name}; {ROWS} locations of {cfg.patches.patch_size} px per step; {bf16_steps} bf16 / {fp32_steps} fp32 steps per round"
    mps = median_compared(
        "gpu: model-input MP/s, bf16 autocast vs fp32 (DeepSpeed ZeRO 1)",
        [mp for _, mp, *_ in got["bf16"]],
        [mp for _, mp, *_ in got["fp32"]],
        "MP/s",
        "higher",
        None,
        note,
    )
    i = [mp for _, mp, *_ in got["bf16"]].index(mps.value)  # the median round
    try:
        ladder = lever_ladder(cfg, batches, quick)
    except Exception as exc:  # never lose the figures above
        print(f"gpu levers failed: {exc!r}", flush=True)
        ladder = []
    return [
        *ladder,
        mps,
        Figure("gpu: seconds per step, bf16", got["bf16"][i][0], "s", "lower"),
        Figure("gpu: seconds per step, fp32", got["fp32"][i][0], "s", "lower"),
        median_compared(
            "gpu: peak memory, bf16 vs fp32",
            [peak for _, _, peak, _ in got["bf16"]],
            [peak for _, _, peak, _ in got["fp32"]],
            "GiB",
            "lower",
            None,
        ),
    ]
