"""What a run on a cluster of several nodes may be handed, and which checkpoints of a run count:
a local path is refused where other nodes cannot see it; a checkpoint half-reported when its node
died (files written, never registered by Ray Train) is never resumed from."""

import dataclasses
import json
import os

import pytest

from foveation.config import Config, DistributedConfig
from foveation.training.trainer import (
    RUN_NAME,
    SNAPSHOT,
    _latest_checkpoint,
    path_problem,
    registered_checkpoints,
)

SPLITS = {
    "train": [{"slide_id": "a", "image_uri": "s3://b/store/a.tif"}],
    "val": [{"slide_id": "b", "image_uri": "s3://b/store/b.tif"}],
}


def _cfg(**distributed) -> Config:
    return dataclasses.replace(Config(), distributed=DistributedConfig(**distributed))


def test_one_node_without_an_autoscaler_takes_local_paths():
    assert path_problem(_cfg(), "runs/m", "runs/out", SPLITS, 1, False) is None


def test_several_nodes_refuse_a_local_output_and_say_what_is_expected():
    problem = path_problem(_cfg(), "s3://b/store", "runs/out", SPLITS, 3, False)
    assert problem.startswith("--out: 'runs/out' is a local path")
    assert "3 nodes" in problem and "s3://" in problem and "shared_filesystem" in problem


def test_a_local_slide_is_refused_on_a_cluster_an_autoscaler_can_grow():
    splits = {"train": [{"slide_id": "a", "image_uri": "/data/a.tif"}], "val": []}
    problem = path_problem(_cfg(), "s3://b/m", "s3://b/out", splits, 1, True)
    assert problem.startswith("slide a: '/data/a.tif'") and "autoscaler can add" in problem


def test_object_storage_or_a_shared_filesystem_pass():
    assert path_problem(_cfg(), "s3://b/m", "s3://b/out", SPLITS, 3, False) is None
    shared = _cfg(shared_filesystem=True)
    assert path_problem(shared, "runs/m", "runs/out", SPLITS, 3, False) is None


def test_placement_is_checked_against_its_registry():
    with pytest.raises(Exception, match=r"distributed\.placement"):
        DistributedConfig(placement="scatter")
    assert DistributedConfig(placement="strict_spread").placement == "strict_spread"


def _checkpoint(run: str, name: str, step: int) -> None:
    d = os.path.join(run, RUN_NAME, name)
    os.makedirs(d)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"step": step}, f)


def _snapshot(run: str, names: list[str]) -> None:
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    with open(os.path.join(run, RUN_NAME, SNAPSHOT), "w") as f:
        json.dump({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}, f)


def test_a_half_reported_checkpoint_is_ignored_for_the_last_registered_one(tmp_path):
    run = str(tmp_path / "run")
    _checkpoint(run, "checkpoint_1", 2)
    _checkpoint(run, "checkpoint_2", 4)
    _checkpoint(run, "checkpoint_3", 6)  # its node died before Ray Train registered it
    _snapshot(run, ["checkpoint_1", "checkpoint_2"])
    every, latest = registered_checkpoints(run)
    assert latest.endswith(f"{RUN_NAME}/checkpoint_2")
    assert [u.rsplit("/", 1)[-1] for u in every] == ["checkpoint_1", "checkpoint_2"]


def test_files_without_any_registration_are_no_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    _checkpoint(run, "checkpoint_1", 2)  # the first report never completed
    assert _latest_checkpoint(os.path.join(run, RUN_NAME)) is None
    assert registered_checkpoints(str(tmp_path / "nothing")) == ([], None)


def test_a_corrupt_snapshot_is_a_clear_error(tmp_path):
    run = str(tmp_path / "run")
    _checkpoint(run, "checkpoint_1", 2)
    with open(os.path.join(run, RUN_NAME, SNAPSHOT), "w") as f:
        f.write("{not json")
    with pytest.raises(Exception, match="not Ray Train's checkpoint snapshot"):
        registered_checkpoints(run)
