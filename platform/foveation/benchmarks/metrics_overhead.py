"""The ``monitoring`` suite: what recording the platform's metrics costs on its hot paths.

Every training step records a counter and a histogram (and, at most every 2 s, a gauge
through the gauge keeper); every slide read and every request a few more. The suite times
``monitoring.record`` of each kind inside a Ray task (``ray.util.metrics``, as in Train
workers, reader actors and Serve replicas) and outside Ray (prometheus-client), and one
training step of the config's model on the same task as the baseline: the ratio is the step
rate with the per-step instrumentation against the step rate without it.
"""

from __future__ import annotations

import time

from foveation.benchmarks import Figure

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


def _measure(config: str, quick: bool) -> dict[str, float]:
    """Runs where the instrumented code runs: in a Ray worker process."""
    import torch

    from foveation import monitoring
    from foveation.config import load_config
    from foveation.models.foveated import build_model
    from foveation.models.segmenter import OUTPUT_STRIDE
    from foveation.patches import XR_CONTEXT
    from foveation.training.optim import build_optimizer
    from foveation.training.step import batch_forward
    from foveation.training.worker import _record_step

    calls = 500 if quick else CALLS
    out = {
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
        "step_record": _per_call_us(lambda: _record_step("bench", 0, 0.1), calls),
    }
    # One training step of the config's model on a synthetic batch: the baseline.
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

    out["step"] = _per_call_us(step, 3 if quick else 10)
    return out


def _outside_ray_us(quick: bool) -> float:
    import subprocess
    import sys

    code = (
        "from foveation.benchmarks.metrics_overhead import _per_call_us\n"
        "from foveation import monitoring\n"
        f"print(_per_call_us(lambda: monitoring.record('foveation_train_step_seconds', 0.1,"
        f" run='bench', rank=0), {500 if quick else CALLS}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def run(config: str = "jobs/configs/debug.toml", quick: bool = False) -> list[Figure]:
    import ray

    from foveation.raycluster import init_ray

    init_ray()
    m = ray.get(ray.remote(num_cpus=1)(_measure).remote(config, quick))
    step_s, step_record_s = m["step"] / 1e6, m["step_record"] / 1e6
    rate, bare = 1 / (step_s + step_record_s), 1 / step_s
    note = f"per-step instrumentation {m['step_record']:.1f} us against a {m['step'] / 1e3:.1f} ms step"
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
        Figure(
            "train_steps_per_s_instrumented",
            rate,
            "steps/s",
            "higher",
            0.99,
            baseline_value=bare,
            ratio=rate / bare,
            note=note,
        ),
    ]
