"""The benchmark harness: ``python -m jobs.benchmark SUITE [--json FILE]``.

A suite is a function returning :class:`Figure` s. Each figure has the fields
``docs/contracts.md#benchmarks`` pins (``name``, ``value``, ``unit``, ``direction``, ``target``,
``met`` and, when a baseline was measured in the same run on the same inputs,
``baseline_value``, ``ratio`` and ``spread``); ``target`` bounds ``ratio`` when there is one,
else ``value``.

A ratio is only as good as the load the machine had while each side ran, so every figure with a
same-run baseline comes from :data:`REPEATS` (at least 3, odd) interleaved repetitions,
baseline, candidate, baseline, candidate, ... (:func:`interleaved`), and reports the repetition
whose ratio is the median (:func:`median_compared`): ``value``, ``baseline_value`` and ``ratio``
are that repetition's, ``met`` is judged on the median ratio and ``spread`` holds the smallest
and largest ratio of all repetitions.

This package is not part of the installed library (it imports the Serve app); it is on the
path with the repository root, like ``jobs`` and ``serve``.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: children and the demo find ``platform`` and ``jobs`` from any cwd."""

REPEATS = 3
"""Interleaved repetitions behind every figure with a same-run baseline (odd, at least 3)."""


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    direction: str  # "higher" or "lower" is better
    target: float | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    note: str = ""
    spread: dict[str, float] | None = None  # {"min", "max"} of the ratio over the repetitions
    repetitions: int | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"Figure {self.name}: direction must be 'higher' or 'lower'")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        x = self.ratio if self.ratio is not None else self.value
        return x >= self.target if self.direction == "higher" else x <= self.target

    def to_dict(self) -> dict:
        pinned = (
            "name",
            "value",
            "unit",
            "direction",
            "target",
        )  # always present, target may be null
        d = {k: v for k, v in asdict(self).items() if k in pinned or (v is not None and v != "")}
        d["met"] = self.met
        return d


_CHILD_PRELUDE = r"""
import json as _json


def report(**fields):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child forked from a large
    # parent would report the parent's peak (17.5 GB once, after the parent made a 4096 px slide).
    with open("/proc/self/status") as f:
        peak = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
    print(_json.dumps(fields | {"peak_mb": peak}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python (``platform`` and the repository root on its path) with
    ``args`` as ``sys.argv[1:]``; ``code`` ends by calling ``report(**fields)``, and the fields
    come back with ``peak_mb``, the child's own peak resident memory."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _CHILD_PRELUDE + code, *args],
        capture_output=True,
        text=True,
        env=_child_env(),
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child_env() -> dict[str, str]:
    import os

    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]))


DEMO_CONFIG, QUICK_CONFIG = "jobs/configs/debug.toml", "jobs/configs/tiny.toml"


def demo_model(env: str, quick: bool = False) -> str:
    """The checkpoint a suite predicts with: ``$env`` where set (it must exist); else the demo's
    model (``runs/debug/runs/soft/model``), which is trained first where it is missing, by
    ``jobs.demo`` in a child process (its data generated and ingested as the demo does), so the
    suite starts on a fresh checkout and its own process is as it was. ``quick`` takes the
    demo's model where it is there, else trains the tiny config's (a minute, not the demo's
    six: a smoke run's figures mean nothing anyway)."""
    import os
    import subprocess
    import sys

    from foveation.config import load_config

    uri = os.environ.get(env)
    if uri:
        if not uri.startswith("s3://") and not os.path.exists(uri):
            raise SystemExit(f"no model at {uri} (${env}); unset it to use the demo's")
        return uri
    paths = {}
    for config in (DEMO_CONFIG, QUICK_CONFIG) if quick else (DEMO_CONFIG,):
        cfg = load_config(ROOT / config)
        paths[config] = f"runs/{cfg.name}/runs/{cfg.model.mix.label}/model"  # jobs.demo's
        if os.path.exists(paths[config]):
            return paths[config]
    print(f"no model at {paths[config]}: training it (python -m jobs.demo --config {config})")
    cmd = [sys.executable, "-m", "jobs.demo", "--config", str(ROOT / config)]
    if subprocess.run(cmd, env=_child_env()).returncode != 0:
        raise SystemExit(f"the demo's training for {paths[config]} failed (its output above)")
    return paths[config]


def ratio_of(value: float, baseline: float, direction: str) -> float:
    """How many times better than the baseline, in the figure's direction."""
    return value / baseline if direction == "higher" else baseline / value


def interleaved(sides: Mapping[str, Callable[[], T]], repeats: int = REPEATS) -> dict[str, list[T]]:
    """Call every side once per round, in the mapping's order (the baseline first), for
    ``repeats`` rounds: baseline, candidate, baseline, candidate, ... so that a drift in the
    machine's load reaches both. Returns each side's results, one per round."""
    if repeats < 3 or repeats % 2 == 0:
        raise ValueError(f"repeats must be odd and at least 3, not {repeats}")
    out: dict[str, list[T]] = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            out[k].append(fn())
    return out


def median_compared(
    name: str,
    values: Sequence[float],
    baselines: Sequence[float],
    unit: str,
    direction: str,
    target: float | None,
    note: str = "",
) -> Figure:
    """A figure with a same-run baseline from interleaved repetitions (``values[i]`` and
    ``baselines[i]`` measured in the same round): the round whose ratio is the median gives
    ``value``, ``baseline_value`` and ``ratio`` (so ``met`` is judged on the median ratio);
    ``spread`` is the smallest and largest ratio."""
    if len(values) != len(baselines):
        raise ValueError(f"Figure {name}: {len(values)} values, {len(baselines)} baselines")
    if len(values) < 3 or len(values) % 2 == 0:
        raise ValueError(f"Figure {name}: needs an odd number (>= 3) of repetitions")
    ratios = [ratio_of(v, b, direction) for v, b in zip(values, baselines, strict=True)]
    mid = ratios.index(statistics.median(ratios))
    return Figure(
        name,
        values[mid],
        unit,
        direction,
        target,
        baselines[mid],
        ratios[mid],
        note,
        {"min": min(ratios), "max": max(ratios)},
        len(ratios),
    )


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


SUITES: dict[str, str] = {
    "patches": "benchmarks.patches:run",
    "ingest": "benchmarks.ingest:run",
    "io": "benchmarks.io:run",
    "train": "benchmarks.train:run",
    "gpu": "benchmarks.gpu:run",
    "gpu-profile": "benchmarks.gpu_profile:run",
    "serve": "benchmarks.serve:run",
    "monitoring": "benchmarks.metrics_overhead:run",
    "seams": "benchmarks.seams:run",
    "geojson": "benchmarks.geojson_area:run",
    "wsi": "benchmarks.wsi:run",
    "predict": "benchmarks.predict:run",
    "threads": "benchmarks.threads:run",
}


def get_suite(name: str) -> Callable[..., list[Figure]]:
    if name not in SUITES:
        raise KeyError(f"unknown benchmark suite {name!r}; known: {sorted(SUITES)}")
    mod, fn = SUITES[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "unit", "baseline", "ratio", "spread", "target", "met")]
    for f in figures:
        rows.append(
            (
                f.name,
                f"{f.value:.4g}",
                f.unit,
                "" if f.baseline_value is None else f"{f.baseline_value:.4g}",
                "" if f.ratio is None else f"{f.ratio:.3g}x",
                ""
                if f.spread is None
                else f"{f.spread['min']:.3g}..{f.spread['max']:.3g} (n={f.repetitions})",
                ""
                if f.target is None
                else f"{'>=' if f.direction == 'higher' else '<='} {f.target:g}",
                {True: "yes", False: "NO", None: ""}[f.met],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
