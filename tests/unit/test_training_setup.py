"""What distributed training decides before any worker starts (no Ray here): DeepSpeed's
config from ours, the preflight checks, the reproduction's modes and its tables."""

from __future__ import annotations

import dataclasses
import json

import pytest

from foveation.checkpoint import CheckpointError
from foveation.config import ConfigError, DistributedConfig, config_from_dict
from foveation.data.manifest import write_manifest
from foveation.experiments.reproduce import modes, seed_table
from foveation.io import storage
from foveation.training.distributed import cpu_threads, deepspeed_config
from foveation.training.trainer import SNAPSHOT, TrainingError, preflight


def test_deepspeed_config_comes_from_ours(debug_cfg):
    cfg = dataclasses.replace(
        debug_cfg,
        training=dataclasses.replace(debug_cfg.training, precision="bf16", grad_clip=1.0),
        distributed=DistributedConfig(zero_stage=2),
    )
    ds = deepspeed_config(cfg)
    tc = cfg.training
    assert ds["train_micro_batch_size_per_gpu"] == tc.batch_size * tc.locations_per_image
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds  # DeepSpeed's bf16 section casts weights: BatchNorm fails on CPU
    assert "torch_autocast" not in deepspeed_config(debug_cfg)  # fp32


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"training": {"precision": "fp16"}}, "training.precision"),  # no GPU asked for
        (
            {"training": {"precision": "fp16"}, "distributed": {"use_gpu": True}},
            "training.precision",  # ZeRO 1 with fp16: no loss scaler
        ),
        ({"distributed": {"zero_stage": 3}}, "distributed.zero_stage"),
        ({"distributed": {"num_workers": 0}}, "distributed.num_workers"),
        ({"distributed": {"keep_checkpoints": 0}}, "distributed.keep_checkpoints"),
        ({"distributed": {"threads_per_worker": -1}}, "distributed.threads_per_worker"),
    ],
)
def test_bad_distributed_settings_fail_at_load_naming_the_field(debug_cfg, changes, field):
    d = debug_cfg.to_dict()
    for section, values in changes.items():
        d.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict(d)


def test_worker_threads_follow_the_setting():
    import os

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(None, 1) is None  # Ray's rule (OMP_NUM_THREADS from the worker's CPUs)
    assert cpu_threads(3, 1) == 3
    assert cpu_threads(0, 1) == cores  # the machine to itself
    assert cpu_threads(0, 2) == max(1, cores // 2)  # shared among the node's workers
    assert cpu_threads(0, 4 * cores) == 1


def _manifest(tmp_path, splits):
    rows = [
        {
            "schema_version": 1,
            "slide_id": f"s{i}",
            "image_uri": f"/nowhere/s{i}.tif",
            "width": 64,
            "height": 64,
            "level_downsamples": [1.0],
            "label_uri": f"/nowhere/s{i}_label.tif",
            "annotator_uris": [],
            "split": split,
            "class_fractions": [1.0, 0, 0, 0],
            "checksum": "x",
        }
        for i, split in enumerate(splits)
    ]
    return write_manifest(str(tmp_path / "store"), rows)


def test_preflight_names_a_missing_manifest(debug_cfg, tmp_path):
    with pytest.raises(TrainingError, match="nope"):
        preflight(debug_cfg, str(tmp_path / "nope"), str(tmp_path / "run"), False, False)


def test_preflight_refuses_an_empty_train_split(debug_cfg, tmp_path):
    m = _manifest(tmp_path, ["val", "test"])
    with pytest.raises(TrainingError, match="no slides in the train split"):
        preflight(debug_cfg, m, str(tmp_path / "run"), False, False)


def _fake_checkpoint(run, cfg, step=4):
    """A checkpoint Ray Train registered in the run directory ``run`` (``<out>/train``)."""
    ck = storage.join(run, "checkpoint_x")
    storage.write_bytes(storage.join(ck, "config.toml"), cfg.to_toml().encode())
    storage.write_bytes(storage.join(ck, "meta.json"), json.dumps({"step": step}).encode())
    result = {"checkpoint_dir_name": "checkpoint_x", "metrics": {}}
    snapshot = {"checkpoint_results": [result], "latest_checkpoint_result": result}
    storage.write_bytes(storage.join(run, SNAPSHOT), json.dumps(snapshot).encode())


def test_preflight_refuses_to_start_over_a_run_and_resume_of_another_architecture(
    debug_cfg, tmp_path
):
    m = _manifest(tmp_path, ["train", "val", "test"])
    run = str(tmp_path / "run")
    other = dataclasses.replace(
        debug_cfg, model=dataclasses.replace(debug_cfg.model, backbone="hrnet_w18")
    )
    _fake_checkpoint(run, other)
    with pytest.raises(TrainingError, match="--resume"):
        preflight(debug_cfg, m, run, False, False)
    with pytest.raises(CheckpointError, match="another architecture"):
        preflight(debug_cfg, m, run, True, False)
    splits = preflight(other, m, run, True, False)  # the same architecture resumes
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_reproduction_runs_every_baseline_then_foveation(debug_cfg):
    labels = [m.label for m in modes(debug_cfg)]
    assert labels == ["onehot-0", "onehot-1", "onehot-2", "random", "average", "soft"]


def test_seed_table_gives_mean_and_spread_per_mode():
    m = {
        "soft-seed0": {"miou": 0.5, "miou_kept": 0.6},
        "soft-seed1": {"miou": 0.7, "miou_kept": 0.8},
        "onehot-0-seed0": {"miou": 0.4, "miou_kept": 0.4},
        "average expert": {"miou": 0.9, "miou_kept": 0.9},
    }
    t = seed_table(m, (0, 1))
    assert "| soft | 2 | 0.600 ± 0.100 | 0.700 ± 0.100 |" in t
    assert "| onehot-0 | 1 |" in t and "expert" not in t


def test_reproduce_reuses_a_run_whose_config_differs_only_by_a_new_default(tmp_path, debug_cfg):
    """A run saved before a config field existed (its TOML lacks the field, at its default)
    is reused; any real difference trains again."""
    import dataclasses

    from foveation.checkpoint import CONFIG
    from foveation.experiments.reproduce import _done

    model = tmp_path / "model"
    model.mkdir()
    text = debug_cfg.to_toml()
    assert "argmax_at_eval = false" in text
    (model / CONFIG).write_text(text.replace("argmax_at_eval = false\n", ""))
    assert _done(str(model), debug_cfg)
    other = dataclasses.replace(
        debug_cfg,
        training=dataclasses.replace(debug_cfg.training, seed=debug_cfg.training.seed + 1),
    )
    assert not _done(str(model), other)
    # How it runs is not what it trains: threads and speed levers do not make it stale.
    faster = dataclasses.replace(
        debug_cfg,
        training=dataclasses.replace(debug_cfg.training, compile="inductor", adam="fused"),
        distributed=dataclasses.replace(debug_cfg.distributed, threads_per_worker=7),
    )
    assert _done(str(model), faster)
    (model / CONFIG).write_text("not toml [")
    assert not _done(str(model), debug_cfg)
