"""Ray Tune sweeps for real at tiny size on the session's head node: trials are Ray Train +
DeepSpeed runs, ASHA stops the weak, the best config is a valid config file, and a sweep
interrupted with Ctrl-C continues with --resume without rerunning finished trials."""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import tomli_w

from foveation.config import DistributedConfig, PipelineConfig, TuneConfig, load_config
from foveation.data.ingest import ingest
from foveation.data.synthetic import write_synthetic_set
from foveation.raycluster import init_ray
from foveation.tuning.sweep import run_sweep

pytestmark = pytest.mark.slow


def tiny(root, tune: dict, **training):
    """tiny.toml made to fit two trials at once in the head node's 4 logical CPUs."""
    cfg = load_config(root / "jobs/configs/tiny.toml")
    return dataclasses.replace(
        cfg,
        training=dataclasses.replace(cfg.training, **training),
        distributed=DistributedConfig(num_workers=1, cpus_per_worker=0.5, keep_checkpoints=1),
        data=dataclasses.replace(cfg.data, pipeline=PipelineConfig(reader_actors=1)),
        tune=TuneConfig(**tune),
    )


@pytest.fixture(scope="module")
def store(ray_cluster, root, tmp_path_factory):
    init_ray(address=ray_cluster)
    cfg = load_config(root / "jobs/configs/tiny.toml")
    raw = str(tmp_path_factory.mktemp("tune-raw"))
    write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
    local = str(tmp_path_factory.mktemp("tune-store"))
    ingest(raw, local, cfg.data.ingest, log=lambda s: None)
    return local


def test_a_sweep_stops_the_weak_early_and_writes_its_best_config(store, root, tmp_path):
    # Two patch sets that learn (lr 1e-3) and the same two that cannot (lr 0), in this order:
    # the learning pair sets ASHA's first rung, where the frozen pair trails. Two epochs are
    # the fewest with a rung (epoch 1) below the full budget, so "stopped early" means
    # something; a third only made the survivors train longer.
    cfg = tiny(
        root,
        {
            "fov_sets": [[1, 2, 4], [1, 4]],
            "mixes": ["soft"],
            "lrs": [1e-3, 0.0],
            "epochs": 2,
            "grace_period": 1,
            "reduction_factor": 4,
            "max_concurrent_trials": 2,
        },
        epochs=1,
        locations_per_image=32,
    )
    out = tmp_path / "sweep"
    res = run_sweep(cfg, str(out), store, log=lambda s: None)

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 4 and (out / "results.csv").exists()
    assert {r["status"] for r in table} <= {"finished", "stopped_early"}, table
    stopped = [r for r in table if r["status"] == "stopped_early"]
    assert stopped and all(r["epochs"] < 2 for r in stopped), table
    assert all(r["peak_memory_mb"] > 0 and "val_iou_benign" in r for r in table)
    assert all(r["epochs"] == 2 for r in table if r["status"] == "finished")
    # every trial is a real training run of its own
    assert len(glob.glob(str(out / "trials" / "*" / "train"))) == 4

    best = load_config(res.best_config_uri)
    assert best.name == "tiny-best" and best.training.epochs == 1  # the base's full budget
    assert list(best.patches.fovs) == [int(f) for f in res.best["fovs"].split(",")]
    # It passes the checks jobs.train makes before any worker starts. (Training it would be one
    # more tiny.toml-sized run through jobs.train, as test_train_on_ray's `ray job submit` is:
    # about 20 s of CI, as a tiny fit measures, for no new code path.)
    from foveation.models.foveated import check_config

    check_config(best)


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster, store, root, tmp_path
):
    # One epoch per trial: the first trial finishes, the second is cut short by the Ctrl-C
    # and runs again on --resume; more epochs only make both longer.
    cfg = tiny(
        root,
        {"fov_sets": [[1, 2, 4], [1, 4]], "epochs": 1, "scheduler": "fifo"}
        | {"max_concurrent_trials": 1},
    )
    config = tmp_path / "sweep.toml"
    config.write_text(tomli_w.dumps(cfg.to_dict()))
    out = tmp_path / "sweep"
    path = [str(root / "platform"), str(root), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=os.pathsep.join(p for p in path if p)
    )
    args = [sys.executable, "-m", "jobs.tune", "--config", str(config), "--out", str(out),
            "--manifest", store]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Ctrl-C once the first trial has exported its model and the second has started: with
    # one trial at a time, Tune starts the second only after it recorded the first as
    # finished, so the interruption cannot land between the export and that record.
    finished, trials = [], []
    deadline = time.monotonic() + 600
    while (not finished or len(trials) < 2) and proc.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(1)
        finished = glob.glob(str(out / "trials" / "*" / "model" / "meta.json"))
        trials = glob.glob(str(out / "trials" / "*"))
    assert finished, "no trial finished before the sweep ended or timed out"
    proc.send_signal(signal.SIGINT)  # the user's Ctrl-C
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "--resume" in stdout, stdout[-3000:]

    done_id = finished[0].split(os.sep)[-3]
    stamp = os.stat(finished[0]).st_mtime_ns
    (result_json,) = glob.glob(str(out / "sweep" / f"*{done_id}*" / "result.json"))
    reports = _lines(result_json)

    from jobs.tune import main as tune_main

    refused = tune_main(["--config", str(config), "--out", str(out), "--manifest", store])
    assert refused == 1  # an existing sweep is not overwritten by accident
    assert tune_main(["--config", str(config), "--out", str(out), "--manifest", store,
                      "--resume"]) == 0  # fmt: skip
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["finished", "finished"], table
    # the finished trial was not trained again: its model and its Tune results are untouched
    assert os.stat(finished[0]).st_mtime_ns == stamp
    assert _lines(result_json) == reports
    assert (out / "best.toml").exists()


def test_a_trial_resumed_with_no_epoch_left_reports_its_last_checkpoint_again(
    store, root, tmp_path
):
    """A sweep interrupted after a trial's last report but before Tune recorded it restarts the
    trial on --resume; its run resumes with no epoch left. It must report its last checkpoint's
    metrics again, with that checkpoint: a trial that reports nothing fails Tune's check for
    the metric the sweep ranks by. Here the run is finished first, then resumed in a trial."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from foveation.training.trainer import fit

    cfg = tiny(root, {}, epochs=1)
    out = str(tmp_path / "trial")
    first = fit(cfg, out, store, log=lambda s: None)
    # The checkpoint as it was: with keep_checkpoints = 1, Ray Train drops it for the new one.
    kept = {n: _read(first.best_checkpoint_uri, n) for n in ("meta.json", "model.safetensors")}

    def trial(config: dict) -> None:
        fit(cfg, out, store, resume=True, log=lambda s: None, callbacks=[TuneReportCallback()])

    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": cfg.tune.trial_cpus}),
        tune_config=tune.TuneConfig(metric="val_miou", mode="max", num_samples=1),
        run_config=tune.RunConfig(name="again", storage_path=str(tmp_path / "tune")),
    )
    (result,) = tuner.fit()
    assert result.error is None, result.error
    assert result.metrics["val_miou"] == first.metrics["val_miou"]
    # With that checkpoint (Tune is told its path): the finished run's weights and metadata.
    again = result.metrics["checkpoint_path"]
    assert again != first.best_checkpoint_uri and result.metrics["epoch"] == 1
    assert (tmp_path / "trial" / "train").samefile(os.path.dirname(again))
    assert {n: _read(again, n) for n in kept} == kept


def _read(directory: str, name: str) -> bytes:
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def _lines(path: str) -> int:
    with open(path) as f:
        return f.read().count("\n")
