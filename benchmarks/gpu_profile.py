"""The ``gpu-profile`` suite (a GPU machine only): a ``torch.profiler`` trace of paper-size
training steps, as the ``gpu`` suite runs them (DeepSpeed engine, bf16 autocast, the config's
levers), to show where a step's time goes before any lever is pulled: the top kernels by GPU
time, and the gaps between kernels (the GPU idle while the host launches, syncs or copies).

    python -m jobs.benchmark gpu-profile --config jobs/configs/paper.toml [--quick]

The Chrome trace is written gzipped to ``$OUT/gpu-profile-trace.json.gz`` (or ``runs/``): open
it in Perfetto or ``chrome://tracing``.
"""

from __future__ import annotations

import gzip
import json
import os

import torch

from benchmarks import Figure

WARMUP, PROFILED = 5, 20


def kernel_gaps(kernels: list[dict], top: int = 10) -> dict:
    """Busy time, span and idle gaps (µs) of GPU kernels, each ``{"ts", "dur"}`` in µs as a
    Chrome trace gives them (overlapping kernels, as on several streams, count once): ``busy``,
    ``span`` (first start to last end), ``idle`` = span - busy, ``gaps`` (the ``top`` largest,
    each ``(start, length)``) and ``count``."""
    spans = sorted((float(k["ts"]), float(k["ts"]) + float(k["dur"])) for k in kernels)
    if not spans:
        return {"busy": 0.0, "span": 0.0, "idle": 0.0, "gaps": [], "count": 0}
    busy, gaps = 0.0, []
    cur_start, cur_end = spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((cur_end, start - cur_end))
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = max(e for _, e in spans) - spans[0][0]
    gaps.sort(key=lambda g: -g[1])
    return {
        "busy": busy,
        "span": span,
        "idle": span - busy,
        "gaps": gaps[:top],
        "count": len(spans),
    }


def _trace_events(path: str) -> list[dict]:
    """The Chrome trace's events, gzipped or not (torch's CUPTI exporter may write either);
    none, said, if it cannot be read (the kernel table above is printed either way)."""
    for opener in (gzip.open, open):
        try:
            with opener(path, "rt") as f:
                return json.load(f)["traceEvents"]
        except (OSError, ValueError, KeyError):
            continue
    print(f"could not read the trace {path} back: no gap figures", flush=True)
    return []


def run(config: str = "jobs/configs/paper.toml", quick: bool = False) -> list[Figure]:
    if not torch.cuda.is_available():
        raise RuntimeError("the gpu-profile suite needs a CUDA device; none is visible here")
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu import ROWS, gpu_engine, paper_setup
    from foveation.training.step import train_step

    cfg, batches = paper_setup(config, precision="bf16")
    dev = torch.device("cuda")
    warm, steps = (2, 3) if quick else (WARMUP, PROFILED)
    engine, gpu = gpu_engine(cfg, batches, warm + steps)
    for step in range(warm):
        train_step(engine, gpu[step % len(gpu)], cfg, step, warm + steps, dev)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(warm, warm + steps):
            train_step(engine, gpu[step % len(gpu)], cfg, step, warm + steps, dev)
        torch.cuda.synchronize()
    out = os.environ.get("OUT") or "runs"
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(out, "gpu-profile-trace.json.gz")  # tens of MB as plain JSON
    prof.export_chrome_trace(trace)  # gzipped by its suffix
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    kernels = [e for e in _trace_events(trace) if e.get("cat") == "kernel" and "dur" in e]
    g = kernel_gaps(kernels)
    print("largest gaps between kernels (µs):", [round(length) for _, length in g["gaps"]])
    note = f"{torch.cuda.get_device_name()}; {steps} bf16 steps of {ROWS} locations; trace {trace}"
    busy = g["busy"] / g["span"] if g["span"] else 0.0
    return [
        Figure(
            "gpu profile: GPU busy fraction (kernels over the traced span)",
            busy,
            "",
            "higher",
            note=note,
        ),
        Figure("gpu profile: kernels per step", g["count"] / steps, "kernels", "lower"),
        Figure("gpu profile: mean kernel time", g["busy"] / max(1, g["count"]), "µs", "higher"),
        Figure("gpu profile: idle time per step", g["idle"] / steps / 1e3, "ms", "lower"),
    ]
