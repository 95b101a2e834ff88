"""The ``monitoring`` suite: what recording the platform's metrics costs on its hot paths.

Every training step records a counter and a histogram (and, at most every 2 s, a gauge
through the gauge keeper); every slide read and every request a few more. The suite times
``monitoring.record`` of each kind inside a Ray task (``ray.util.metrics``, as in Train
workers, reader actors and Serve replicas) and outside Ray (prometheus-client), and one
training step of the config's model on the same task as the baseline: the ratio is the step
rate with the per-step instrumentation against the step rate without it, the median of
interleaved repetitions (a bare step's time, then the instrumentation's, per round;
``docs/contracts.md#benchmarks``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from benchmarks import Figure, interleaved, median_compared

CALLS = 5000


def _per_call_us(fn, calls: int = CALLS) -> float:
    fn()  # created lazily: not timed
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def _training_step(config: str) -> Callable[[], None]:
    """One training step of the config's model on a synthetic batch (the training API's one
    call in this suite): the baseline."""
    import torch

    from foveation.config import load_config
    from foveation.geometry import OUTPUT_STRIDE, XR_CONTEXT
    from foveation.models.foveated import build_model
    from foveation.training.optim import build_optimizer
    from foveation.training.step import batch_forward

    cfg = load_config(config)
    tc, pc = cfg.training, cfg.patches
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt, _ = build_optimizer(model, tc, 100)
    n, P, k = tc.batch_size * tc.locations_per_image, pc.patch_size, 2 * XR_CONTEXT + 1
    batch = {
        "bank": torch.randint(0, 255, (n, pc.depth, 3, P, P), dtype=torch.uint8),
        "xr": torch.randn(n, 3, k, k),
        "label": torch.randint(
            0, cfg.model.num_classes, (n, P // OUTPUT_STRIDE, P // OUTPUT_STRIDE), dtype=torch.uint8
        ),
        "loc": torch.zeros(n, 2, dtype=torch.int32),
    }

    def step():
        loss, *_ = batch_forward(model, batch, cfg, 0, 100, "cpu")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _measure(config: str, quick: bool) -> dict[str, float | list[float]]:
    """Runs where the instrumented code runs: in a Ray worker process."""
    from foveation import monitoring
    from foveation.training.recorder import Recorder

    calls = 500 if quick else CALLS
    out: dict[str, float | list[float]] = {
        "counter": _per_call_us(
            lambda: monitoring.record("foveation_train_steps_total", run="bench", rank=0), calls
        ),
        "histogram": _per_call_us(
            lambda: monitoring.record("foveation_train_step_seconds", 0.1, run="bench", rank=0),
            calls,
        ),
        "gauge": _per_call_us(
            lambda: monitoring.record("foveation_train_loss", 1.0, run="bench"), calls
        ),
    }
    step = _training_step(config)
    recorder = Recorder("bench", 0)
    # Per round: a bare step (the baseline), then the per-step instrumentation.
    rounds = interleaved(
        {
            "step": lambda: _per_call_us(step, 3 if quick else 10),
            "step_record": lambda: _per_call_us(lambda: recorder.step(0.1), calls),
        }
    )
    out.update(rounds)
    return out


def _outside_ray_us(quick: bool) -> float:
    import subprocess
    import sys

    code = (
        "from benchmarks.metrics_overhead import _per_call_us\n"
        "from foveation import monitoring\n"
        f"print(_per_call_us(lambda: monitoring.record('foveation_train_step_seconds', 0.1,"
        f" run='bench', rank=0), {500 if quick else CALLS}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def run(config: str = "jobs/configs/bench.toml", quick: bool = False) -> list[Figure]:
    import ray

    from foveation.raycluster import init_ray

    init_ray()
    m = ray.get(ray.remote(num_cpus=1)(_measure).remote(config, quick))
    steps, records = m["step"], m["step_record"]  # us per call, per round
    bare = [1e6 / s for s in steps]
    rate = [1e6 / (s + r) for s, r in zip(steps, records, strict=True)]
    instrumented = median_compared(
        "train_steps_per_s_instrumented", rate, bare, "steps/s", "higher", 0.99
    )
    i = rate.index(instrumented.value)
    note = f"per-step instrumentation {records[i]:.1f} us against a {steps[i] / 1e3:.1f} ms step"
    return [
        Figure("record_counter_in_ray", m["counter"], "us", "lower", 50.0),
        Figure("record_histogram_in_ray", m["histogram"], "us", "lower", 50.0),
        Figure(
            "record_gauge_in_ray",
            m["gauge"],
            "us",
            "lower",
            1000.0,
            # Gauges are set per epoch, per job state or progress change, and the last-step
            # time at most every 2 s: never per step, read or request.
            note="an actor call to the gauge keeper; off the per-step and per-request paths",
        ),
        Figure("record_histogram_outside_ray", _outside_ray_us(quick), "us", "lower", 50.0),
        dataclasses.replace(instrumented, note=note),
    ]
