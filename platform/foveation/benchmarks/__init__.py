"""The benchmark harness: ``python -m jobs.benchmark SUITE [--json FILE]``.

A suite is a function returning :class:`Figure` s. Each figure has the fields DESIGN.md pins
(``name``, ``value``, ``unit``, ``direction``, ``target``, and, when a baseline was measured in
the same run on the same inputs, ``baseline_value`` and ``ratio``); ``target`` bounds ``ratio``
when there is one, else ``value``. Later issues add suites to ``SUITES``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


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


def compared(
    name: str,
    value: float,
    baseline: float,
    unit: str,
    direction: str,
    target: float | None,
    note: str = "",
) -> Figure:
    """A figure with a same-run baseline; ratio is "times better" in the figure's direction."""
    ratio = value / baseline if direction == "higher" else baseline / value
    return Figure(name, value, unit, direction, target, baseline, ratio, note)


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


SUITES: dict[str, str] = {
    "patches": "foveation.benchmarks.patches:run",
    "ingest": "foveation.benchmarks.ingest:run",
    "io": "foveation.benchmarks.io:run",
    "train": "foveation.benchmarks.train:run",
    "gpu": "foveation.benchmarks.gpu:run",
    "serve": "foveation.benchmarks.serve:run",
    "monitoring": "foveation.benchmarks.metrics_overhead:run",
}


def get_suite(name: str) -> Callable[..., list[Figure]]:
    if name not in SUITES:
        raise KeyError(f"unknown benchmark suite {name!r}; known: {sorted(SUITES)}")
    mod, fn = SUITES[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "unit", "baseline", "ratio", "target", "met")]
    for f in figures:
        rows.append(
            (
                f.name,
                f"{f.value:.4g}",
                f.unit,
                "" if f.baseline_value is None else f"{f.baseline_value:.4g}",
                "" if f.ratio is None else f"{f.ratio:.3g}x",
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
