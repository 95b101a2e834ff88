"""Connecting to Ray and fanning work out as tasks: the one place jobs start Ray from.

On a laptop (the embedded default) a local Ray starts in-process with more logical CPUs than
cores (DESIGN.md, "Ray on 2 cores": tasks take fractional CPUs so they never wait on each
other forever); with ``RAY_ADDRESS`` set (``ray job submit`` sets it) the job joins that
cluster instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

DEFAULT_LOGICAL_CPUS = 4


def init_ray(logical_cpus: int = DEFAULT_LOGICAL_CPUS, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=logical_cpus, include_dashboard=False, log_to_driver=True)


def ray_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    num_cpus: float = 0.5,
    desc: str = "tasks",
    max_retries: int = 2,
) -> Iterator[Any]:
    """Run ``fn`` on every item as a Ray task; yield results as they finish, with a progress bar.

    ``max_retries`` covers crashed workers (system failures); ``fn`` itself should turn bad
    input into a result rather than raise."""
    import ray
    from tqdm import tqdm

    init_ray()
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    pending = [task.remote(it) for it in items]
    with tqdm(total=len(pending), desc=desc, file=sys.stderr, disable=None) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                bar.update(1)
                yield ray.get(ref)
