"""The sweep driver and its trials: a Ray Tune ``Tuner`` whose trials each run ``jobs.train``'s
training (``training.trainer.fit``, a Ray Train ``TorchTrainer`` with DeepSpeed) on a short
budget, reporting every epoch's validation scores to Tune through Ray Train's
``TuneReportCallback``, so ASHA can stop trials that trail.

    <out>/sweep/            Ray Tune's experiment (what ``--resume`` restores)
    <out>/trials/<id>/      each trial's training run: train/, model/, history/
    <out>/results.parquet   one row per trial (also results.csv): its point and its scores
    <out>/best.toml         the best trial's config with the full epoch budget, for jobs.train
    <out>/tradeoff.png/.csv the per-class IoU of the single-patch trials across FoV/resolution

Every check that can fail (the space, the storage, the manifest, the resources for the asked
concurrency, an existing sweep) runs before any trial starts.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from foveation.config import Config, config_from_dict
from foveation.errors import FoveationError
from foveation.io import storage
from foveation.tuning import results, space
from foveation.tuning.results import SweepResult

SWEEP_NAME = "sweep"
TRIALS = "trials"
METRIC = "val_miou"


class SweepError(FoveationError, RuntimeError):
    """A sweep that cannot start or did not finish; the message says why and what to do."""


def trial_resources(cfg: Config) -> dict[str, float]:
    """Logical resources one trial holds while it runs: its driver plus its training run."""
    from foveation.training.trainer import run_resources

    need = run_resources(cfg)
    return need | {"CPU": cfg.tune.trial_cpus + need["CPU"]}


def check_concurrency(cfg: Config, have: dict[str, float]) -> None:
    """``max_concurrent_trials`` trials must fit in the cluster at once, or they wait on each
    other's resources forever."""
    need = trial_resources(cfg)
    n = cfg.tune.max_concurrent_trials
    for res, amount in need.items():
        if n * amount > have.get(res, 0) + 1e-9:
            raise SweepError(
                f"tune.max_concurrent_trials: {n} trials x {amount:g} {res} each (a trial driver "
                f"{cfg.tune.trial_cpus:g} CPU, {cfg.distributed.num_workers} workers, "
                f"{cfg.data.pipeline.reader_actors} reader actors) need {n * amount:g} {res}; the "
                f"Ray cluster has {have.get(res, 0):g}. Lower tune.max_concurrent_trials to "
                f"{max(1, math.floor(have.get(res, 0) / amount))} or the per-trial resources"
            )


def check_writable(out: str) -> None:
    probe = storage.join(out, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe, missing_ok=True)
    except (storage.StorageError, OSError) as exc:
        raise SweepError(f"sweep output {out!r} is not writable: {exc}") from None


def _trial(config: dict, base: dict, out: str, manifest: str) -> None:
    """One trial: the training of ``jobs.train`` at this point of the space. A restored sweep
    starts unfinished trials again; ``resume=True`` lets Ray Train continue their run from its
    last checkpoint instead of from scratch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from foveation.training.trainer import fit

    # Tune runs a trial in its own directory; a local manifest's relative paths are relative
    # to the job's directory, which Tune keeps in TUNE_ORIG_WORKING_DIR. On a cluster the
    # manifest is in S3 and the trial may run on a machine without that directory.
    if not storage.is_remote(manifest):
        os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    import ray.data

    # Several trials' progress bars in one terminal are noise; Tune's table says the progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = space.trial_config(config_from_dict(base), config["point"])
    trial_out = storage.join(out, TRIALS, ray.tune.get_context().get_trial_id())
    fit(cfg, trial_out, manifest, resume=True, callbacks=[TuneReportCallback()])


def run_sweep(
    cfg: Config,
    out: str,
    manifest: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or with ``resume``, continue) the sweep of ``cfg.tune`` into ``out``."""
    manifest, out = storage.absolute(manifest or cfg.data.ingest.dest), storage.absolute(out)
    points = _checked_points(cfg, out, manifest)
    exp = _experiment(cfg, out, resume, overwrite)
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), out=out, manifest=manifest),
        {"CPU": cfg.tune.trial_cpus},
    )
    t = cfg.tune
    epochs = t.epochs or cfg.training.epochs
    n_trials = len(points) if t.search == "grid" else t.num_samples
    if exp.exists:
        log(f"resuming the sweep in {storage.join(out, SWEEP_NAME)} (finished trials are kept)")
        tuner = tune.Tuner.restore(
            exp.path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=exp.fs,
        )
    else:
        tuner = _new_tuner(cfg, trainable, points, epochs, out, exp)
        log(
            f"sweep {cfg.name!r} ({t.preset}): {n_trials} trials, {t.max_concurrent_trials} at a time, "
            f"{epochs} epochs each, scheduler {t.scheduler}, into {out}"
        )
    return _collect(cfg, out, tuner.fit(), epochs, n_trials, log)


def _checked_points(cfg: Config, out: str, manifest: str) -> list:
    """The space's points, once the space, the manifest and its splits (once for the sweep:
    every trial reads the same) and the output's storage are known good."""
    from foveation.training.trainer import TrainingError, preflight

    try:
        points = space.points(cfg)
    except space.SpaceError as exc:
        raise SweepError(str(exc)) from None
    try:
        probe = storage.join(out, TRIALS, ".preflight")  # no run there: only data checks
        preflight(space.trial_config(cfg, points[0]), manifest, probe, False, False)
    except TrainingError as exc:
        raise SweepError(str(exc)) from None
    check_writable(out)
    return points


@dataclass(frozen=True)
class _Experiment:
    """Where Ray Tune keeps the sweep's experiment, and whether one is there to restore."""

    fs: object  # pyarrow filesystem (storage.resolve)
    path: str
    exists: bool


def _experiment(cfg: Config, out: str, resume: bool, overwrite: bool) -> _Experiment:
    """The Tune experiment, on a started Ray whose resources fit the asked concurrency; with
    ``overwrite``, a previous sweep's experiment and trials are gone."""
    from foveation.raycluster import init_ray

    init_ray(cfg.distributed.logical_cpus, dashboard=True)
    import ray
    from ray import tune

    check_concurrency(cfg, ray.cluster_resources())
    fs, exp_path = storage.resolve(storage.join(out, SWEEP_NAME))  # as Tune's storage wants
    exists = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if exists and not (resume or overwrite):
        raise SweepError(
            f"{storage.join(out, SWEEP_NAME)} already holds a sweep; pass --resume to continue "
            "it (finished trials are kept) or --overwrite to start afresh"
        )
    if overwrite:
        for stale in (SWEEP_NAME, TRIALS):
            storage.delete(storage.join(out, stale), missing_ok=True)
        exists = False
    return _Experiment(fs, exp_path, exists)


def _new_tuner(cfg: Config, trainable, points: list, epochs: int, out: str, exp: _Experiment):
    """A fresh ``Tuner`` over ``points``: grid or random search, ASHA or FIFO."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",  # ours, not Tune's iteration count: it survives a resume
            max_t=epochs,
            grace_period=min(t.grace_period, epochs),
            reduction_factor=t.reduction_factor,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    grid = t.search == "grid"
    return tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(points) if grid else tune.choice(points)},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=1 if grid else t.num_samples,
            # Tune ignores max_concurrent_trials beside a BasicVariantGenerator of ours.
            search_alg=BasicVariantGenerator(
                random_state=t.seed, max_concurrent=t.max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(
            name=SWEEP_NAME,
            storage_path=exp.path.rsplit("/", 1)[0],
            storage_filesystem=exp.fs if storage.is_remote(out) else None,
            # A trial whose driver is lost (its node gone) starts again and resumes its run.
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=1,
        ),
    )


def _collect(
    cfg: Config, out: str, grid_result, epochs: int, n_trials: int, log: Callable[[str], None]
) -> SweepResult:
    """The sweep's outputs from Tune's results; an error when every trial failed."""
    rows = results.rows_of(grid_result, epochs)
    # Interrupted (Ctrl-C): trials that did not finish, or that the search never started.
    interrupted = len(rows) < n_trials or any(r["status"] == results.UNFINISHED for r in rows)
    res = results.write_outputs(cfg, out, rows, interrupted, log)
    failed = [r for r in rows if r["status"] == results.ERROR]
    if failed and len(failed) == len(rows):
        raise SweepError(
            f"every trial failed; the first ({failed[0]['label']}): {failed[0]['error']}"
        )
    if failed:
        log(f"warning: {len(failed)} of {len(rows)} trials failed (see the table's error column)")
    return res
