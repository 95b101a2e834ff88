"""Training and evaluation on Ray, for real at tiny size: Ray Train + DeepSpeed workers on the
session's local head node, slides and checkpoints in the local S3 endpoint, an injected worker
crash, ``ray job submit``, and the demo end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from foveation.checkpoint import load_checkpoint
from foveation.config import DistributedConfig, load_config, read_toml
from foveation.data.ingest import ingest
from foveation.data.manifest import read_manifest
from foveation.data.synthetic import write_synthetic_set
from foveation.io import storage
from foveation.raycluster import init_ray
from foveation.training.plan import FAULT_ENV
from foveation.training.trainer import TrainingError, fit

pytestmark = pytest.mark.slow


def tiny(root, **training):
    cfg = load_config(root / "jobs/configs/tiny.toml")
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **training))


@pytest.fixture(scope="module")
def store(ray_cluster, s3_endpoint, root, tmp_path_factory):
    """The tiny synthetic set ingested once, on disk and in the local S3 endpoint."""
    import boto3

    init_ray(address=ray_cluster)
    cfg = tiny(root)
    raw = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_set(raw, cfg.data.synthetic, cfg.patches, log=lambda s: None)
    local = str(tmp_path_factory.mktemp("store"))
    ingest(raw, local, cfg.data.ingest, log=lambda s: None)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket="training"
    )
    remote = "s3://training/store"
    ingest(raw, remote, cfg.data.ingest, log=lambda s: None)
    return {"local": local, "s3": remote, "raw": raw}


def _replay(config: dict) -> None:
    """A Ray Train worker that runs the one loop over given batches (pickled by value)."""
    import ray.train
    import ray.train.torch

    from foveation.config import config_from_dict
    from foveation.data.batches import to_torch
    from foveation.models import build_model
    from foveation.training import distributed
    from foveation.training.loop import run_epoch

    cfg = config_from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.training.seed)
    engine = distributed.init_engine(build_model(cfg), cfg, len(config["batches"]), device)
    batches = (to_torch(b) for b in config["batches"])
    stats = run_epoch(engine, batches, cfg, 0, len(config["batches"]), device)
    # Ray Train 2.60 keeps reported metrics with checkpoints only: the losses travel in one.
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "losses.json"), "w") as f:
            json.dump(stats.losses, f)
        ray.train.report({"steps": stats.steps}, checkpoint=ray.train.Checkpoint.from_directory(d))


def test_one_loop_gives_the_same_losses_on_one_device_and_in_a_ray_train_worker(
    ray_cluster, root, tmp_path
):
    """The single-device trainer (LocalEngine) and a 1-worker Ray Train run (DeepSpeed engine)
    fed the same 12 batches from the same seed train the same model (fp32, 1e-4 relative)."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from foveation.data.batches import BatchExtractor, concat, sample_locations, to_torch
    from foveation.data.synthetic import TissueScales, generate_slide
    from foveation.models import build_model
    from foveation.training.distributed import LocalEngine
    from foveation.training.loop import run_epoch

    init_ray(address=ray_cluster)
    cfg = tiny(root, locations_per_image=4, precision="fp32")
    scales = TissueScales.from_patches(cfg.patches)
    extractors = []
    for seed in range(2):
        s = generate_slide(256, 256, scales, seed=seed)
        extractors.append(BatchExtractor.from_arrays(cfg, s.image, s.truth, f"s{seed}"))
    batches = [
        concat([ex.batch(sample_locations(ex.image, cfg, 0, e, "s"), "s") for ex in extractors])
        for e in range(12)
    ]
    # One thread on both sides: a convolution split over other thread counts sums in another
    # order, and 1e-7 differences grow past 1e-4 within a few steps of training.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.training.seed)
        engine = LocalEngine(build_model(cfg), cfg, len(batches), "cpu")
        before = [p.detach().clone() for p in engine.module.parameters()]
        single = run_epoch(engine, (to_torch(b) for b in batches), cfg, 0, len(batches), "cpu")
        moved = max(
            float((p.detach() - b).abs().max())
            for p, b in zip(engine.module.parameters(), before, strict=True)
        )
    finally:
        torch.set_num_threads(threads)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _replay,
        train_loop_config={"cfg": cfg.to_dict(), "batches": batches},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="replay", storage_path=str(tmp_path)),
    )
    with trainer.fit().checkpoint.as_directory() as d, open(os.path.join(d, "losses.json")) as f:
        on_ray = json.load(f)
    assert len(single.losses) == len(on_ray) == 12
    np.testing.assert_allclose(on_ray, single.losses, rtol=1e-4)
    # And it trained: the weights moved. (Not "the last loss is below the first": 12 steps of 4
    # locations are noise, and on another CPU's float order the last came out higher.)
    assert moved > 1e-4


def _checkpointed(root):
    """tiny.toml for 2 epochs of 4 steps with a checkpoint every 2 steps."""
    cfg = tiny(root, epochs=2)
    return dataclasses.replace(
        cfg,
        distributed=dataclasses.replace(cfg.distributed, checkpoint_every_steps=2, max_failures=3),
    )


def _last_meta(out: str) -> dict:
    """The meta.json of a run's latest checkpoint (the most steps)."""
    return max(
        (
            json.loads(storage.read_bytes(f))
            for f in storage.list_files(os.path.join(out, "train"))
            if f.endswith("/meta.json")
        ),
        key=lambda m: m["step"],
    )


@pytest.fixture(scope="module")
def clean_run(ray_dashboard, store, root, tmp_path_factory):
    """One unkilled run of ``_checkpointed``, submitted with ``ray job submit`` as a user
    would: the job-submit test's subject, the crash test's reference, then the run the resume
    test continues (one run shared: each costs about 25 s of CI)."""
    tmp = tmp_path_factory.mktemp("clean")
    config = tmp / "checkpointed.toml"
    config.write_text(tomli_w.dumps(_checkpointed(root).to_dict()))
    out = tmp / "run"
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    args = [ray_bin, "job", "submit", "--address", ray_dashboard, "--working-dir", str(root),
            "--", sys.executable,  # the project's interpreter, whatever PATH the job inherits
            "-m", "jobs.train", "--config", str(config), "--manifest", store["local"],
            "--out", str(out)]  # fmt: skip
    env = dict(os.environ, RAY_AUTH_MODE="token")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"out": str(out), "stdout": r.stdout}


def test_a_worker_killed_three_times_finishes_from_checkpoints_like_an_unkilled_run(
    store, root, tmp_path, monkeypatch, clean_run
):
    # 4 steps per epoch and a checkpoint every 2 steps; rank 0 is SIGKILLed at steps 3, 5 and
    # 7, each after a checkpoint (2, 4, 6; 2 and 6 mid-epoch), so each resumed attempt must
    # skip the batches that checkpoint already trained.
    cfg = _checkpointed(root)
    monkeypatch.setenv(FAULT_ENV, "3,5,7")
    out = str(tmp_path / "fault")
    res = fit(cfg, out, store["local"], log=lambda s: None)
    assert len(storage.list_files(os.path.join(out, "faults"))) == 3  # killed three times
    load_checkpoint(os.path.join(out, "model"))  # the exported best loads
    last = _last_meta(out)
    # Batches trained before a checkpoint are not trained again: 2 epochs are 8 steps.
    assert last["epoch"] == 2 and last["step"] == 8, last["step"]
    assert last["resumed_from_step"] == 6
    assert [h["step"] for h in last["history"]] == [4, 8]
    unkilled = _last_meta(clean_run["out"])["history"][-1]["val_miou"]
    killed = res.history[-1]["val_miou"]
    assert abs(killed - unkilled) <= 0.02, (killed, unkilled)
    print(f"val mIoU after 3 SIGKILLs {killed:.4f}, unkilled {unkilled:.4f}")


def test_an_s3_outage_of_20_s_mid_epoch_fails_clearly_and_resume_finishes(store, root, s3_outage):
    """Training from and to the local S3: once the first checkpoint is there (mid-epoch 1),
    the endpoint goes away for 20 s. The run either rides it out or ends with an error that
    names the storage; then `--resume` finishes from the last checkpoint and the model loads."""
    import threading

    cfg = tiny(root, epochs=1)
    cfg = dataclasses.replace(
        cfg, distributed=dataclasses.replace(cfg.distributed, checkpoint_every_steps=2)
    )
    out = "s3://training/runs/outage"
    state: dict = {}

    def cut_when_a_checkpoint_lands():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "back" not in state:
            try:
                files = storage.list_files(storage.join(out, "train"))
            except storage.StorageError:
                files = []
            if any(f.endswith("/meta.json") for f in files):
                state["back"] = s3_outage(20.0)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=cut_when_a_checkpoint_lands)
    watcher.start()
    try:
        res = fit(cfg, out, store["s3"], log=lambda s: None)
        state["outcome"] = "rode it out"
    except Exception as exc:  # a clear error: it says storage failed, where
        state["outcome"] = f"{type(exc).__name__}: {exc}"
        msg = str(exc).lower()
        assert any(w in msg for w in ("s3", "storage", "127.0.0.1", "connect")), str(exc)[:2000]
        watcher.join()
        assert state["back"].wait(60)
        res = fit(cfg, out, store["s3"], resume=True, log=lambda s: None)
    watcher.join()
    assert "back" in state, "the outage never started: the run ended before a checkpoint"
    assert state["back"].wait(60)
    load_checkpoint(res.model_uri)
    assert [h["step"] for h in res.history] == [4], res.history
    print(f"S3 outage of 20 s mid-epoch: {state['outcome'][:300]}")


def test_resume_continues_and_a_fresh_run_over_an_old_one_is_refused(store, root, clean_run):
    # The crash test's finished reference run (2 epochs), continued in place to a third.
    cfg = _checkpointed(root)
    out = clean_run["out"]
    with pytest.raises(TrainingError, match="--resume"):
        fit(cfg, out, store["local"], log=lambda s: None)
    longer = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=3))
    res = fit(longer, out, store["local"], resume=True, log=lambda s: None)
    assert [h["step"] for h in res.history] == [4, 8, 12]  # epoch 3 resumed at step 8
    _, _, meta = load_checkpoint(res.best_checkpoint_uri)
    assert meta["epoch"] in (1, 2, 3)


def test_gpus_asked_for_where_there_are_none_fail_before_any_worker(store, root, tmp_path):
    cfg = tiny(root)
    cfg = dataclasses.replace(cfg, distributed=DistributedConfig(use_gpu=True))
    with pytest.raises(TrainingError, match="GPU"):
        fit(cfg, str(tmp_path / "gpu"), store["local"], log=lambda s: None)
    assert not os.path.exists(tmp_path / "gpu" / "train")


def test_ray_job_submit_runs_the_training_to_completion(clean_run):
    # The submitted job is clean_run's (the crash and resume tests use its output too).
    assert "succeeded" in clean_run["stdout"] and "best val mIoU" in clean_run["stdout"]
    assert os.path.exists(os.path.join(clean_run["out"], "model", "model.safetensors"))


def test_the_demo_runs_end_to_end_in_tiny_mode_and_reuses_its_work(ray_cluster, root, tmp_path):
    path = [str(root / "platform"), str(root), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=os.pathsep.join(p for p in path if p)
    )
    # tiny.toml with the demo's recipe (per-FoV segmenters, own loss) and its worker on every
    # core: it goes through Ray Train and DeepSpeed's engine here, as `make demo` runs it.
    data = read_toml(root / "jobs/configs/tiny.toml")
    data["model"] |= {"segmenters": "per_fov"}
    data["training"] |= {"per_fov_loss": "own"}
    data["distributed"] |= {"threads_per_worker": 0}
    config = tmp_path / "tiny-demo.toml"
    config.write_bytes(tomli_w.dumps(data).encode())
    args = [
        sys.executable,
        "-m",
        "jobs.demo",
        "--config",
        str(config),
        "--raw",
        str(tmp_path / "raw"),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| soft |" in r.stdout and "| average expert |" in r.stdout
    assert (tmp_path / "out" / "report" / "report.md").exists()
    # A readable console: each epoch's line once (the driver prints it), none of Ray's worker
    # output, and a serve command whose checkpoint exists.
    console = r.stdout + r.stderr
    assert [console.count(f"epoch {e}/2 step") for e in (1, 2)] == [1, 1], console[-3000:]
    assert "PlacementGroupCleaner" not in console and "RayTrainWorker" not in console
    serve = next(line for line in r.stdout.splitlines() if line.startswith("serve:"))
    ckpt = serve.split("checkpoint=")[1].split()[0]
    assert (root / ckpt / "model.safetensors").exists() or (
        Path(ckpt) / "model.safetensors"
    ).exists(), serve
    assert serve.endswith("config=serve/serve.toml"), serve  # laptop resources: it starts
    assert read_manifest(str(tmp_path / "store")).num_rows == 6
    again = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout and "6 unchanged" in again.stdout
