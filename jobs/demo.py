"""The embedded default, end to end: generate a small synthetic slide set, ingest it into a
local store (Ray tasks), train foveation through Ray Train + DeepSpeed on CPU, evaluate on the
test slides (Ray tasks), print the table and the report's path. A second run reuses the data,
the store and a model trained from the same config.

    python -m jobs.demo [--config jobs/configs/debug.toml] [--out runs/demo]
        [--raw DIR_OR_S3] [--store DIR_OR_S3]     # default: data.ingest.source / dest
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs._cli import add_config_arg, job, load_job_config


@job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    add_config_arg(p)
    p.add_argument("--out", help="runs and report (default: runs/<config name>)")
    p.add_argument("--raw", help="where the synthetic raw slides go (default: data.ingest.source)")
    p.add_argument("--store", help="the ingested store (default: data.ingest.dest)")
    args = p.parse_args(argv)
    # A readable console: no Ray Data progress bars (they redraw hundreds of KB into a log), and
    # the output of Ray's workers stays in Ray's log files; the stages and epochs print here.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cfg = load_job_config(args.config)
    from foveation.data.prepare import ensure_store, generation_needed
    from foveation.raycluster import init_ray, ray_logs_dir

    raw = args.raw or cfg.data.ingest.source
    store = args.store or cfg.data.ingest.dest
    generation_needed(cfg, raw, store)  # a set this platform did not write fails before Ray
    init_ray(cfg.distributed.logical_cpus, quiet=True)
    from foveation.experiments.reproduce import reproduce

    t0 = time.perf_counter()
    out = args.out or f"runs/{cfg.name}"

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step("1/4 data and 2/4 ingest")
    ensure_store(cfg, raw, store, log=step)
    step(f"3/4 training {cfg.model.mix.label} through Ray Train + DeepSpeed, then 4/4 evaluating")
    res = reproduce(cfg, out, store, "ray", only=(cfg.model.mix.label,), log=step)
    model = f"{out}/runs/{cfg.model.mix.label}/model"
    print()
    print(res.table)
    print()
    step("done")
    print(f"model:  {model}")
    if ray_logs_dir():
        print(f"Ray's logs: {ray_logs_dir()}")
    print(f"report: {res.report_uri}")
    print(
        f"serve:  .venv/bin/serve run serve.app:build_app checkpoint={model} config=serve/serve.toml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
