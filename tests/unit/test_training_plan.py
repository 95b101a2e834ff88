"""What the driver hands the Ray Train workers (``training.plan``), the one validation both
trainers run, and a resumed run with no epoch left (no Ray: the worker's parts, called
directly)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from foveation.config import ToyConfig
from foveation.data.toy import generate_set, load_split
from foveation.io import storage
from foveation.training import worker
from foveation.training.loop import train, validate
from foveation.training.plan import (
    FAULT_ENV,
    PLAN_KEY,
    HistoryTarget,
    WorkerPlan,
    fault_steps,
    from_loop_config,
)


def _plan(cfg, **changes) -> WorkerPlan:
    fields = dict(
        cfg=cfg,
        steps_per_epoch=3,
        clock=None,
        run="r",
        progress="/tmp/p",
        history=HistoryTarget("/tmp/h", "/tmp/a.png", None),
        has_val=True,
        train_rows=({"slide_id": "a", "image_uri": "/tmp/a.png"},),
        fail_at_steps=(3, 5),
        faults="/tmp/faults",
    )
    return WorkerPlan(**(fields | changes))


def test_the_plan_travels_pickled_as_ray_train_passes_it_and_is_read_back(debug_cfg):
    plan = _plan(debug_cfg)
    config = pickle.loads(pickle.dumps(plan.loop_config()))
    assert list(config) == [PLAN_KEY]
    back = from_loop_config(config)
    assert back == plan and back.cfg == debug_cfg
    assert back.total_steps == debug_cfg.training.epochs * 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.steps_per_epoch = 4  # type: ignore[misc]


def test_a_bad_plan_fails_where_it_is_made_naming_the_field(debug_cfg):
    with pytest.raises(ValueError, match="steps_per_epoch"):
        _plan(debug_cfg, steps_per_epoch=0)
    with pytest.raises(ValueError, match="faults"):
        _plan(debug_cfg, faults=None)
    with pytest.raises(TypeError, match="Config"):
        _plan(debug_cfg.to_dict())
    with pytest.raises(TypeError, match="WorkerPlan"):
        from_loop_config({"cfg": debug_cfg.to_dict(), "steps_per_epoch": 3})  # the old form


def test_fault_steps_are_read_from_the_environment_value():
    assert fault_steps(None) == fault_steps("") == ()
    assert fault_steps("3,7,11") == (3, 7, 11)
    with pytest.raises(ValueError, match=FAULT_ENV):
        fault_steps("3;7")


def _toy_rows(root: str, split: str) -> list[dict]:
    """The manifest rows the memory loader reads, for a toy set's split."""
    import json

    index = json.loads(storage.read_bytes(storage.join(root, "index.json")))
    return [
        {
            "slide_id": e["slide_id"],
            "image_uri": storage.join(root, e["image"]),
            "label_uri": storage.join(root, e["label"]),
        }
        for e in index["samples"]
        if e["split"] == split
    ]


def test_both_trainers_validate_the_same_slides_to_the_same_scores(debug_cfg, tmp_path):
    """The single-device trainer's per-epoch validation of its val images, and the Ray
    worker's of the same slides read from their manifest rows (the memory loader), score the
    same model the same: one function, the same validation locations."""
    root = str(tmp_path / "toy")
    generate_set(root, ToyConfig(n_train=2, n_val=2, n_test=1, size=128, region_size=48))
    cfg = dataclasses.replace(
        debug_cfg,
        training=dataclasses.replace(
            debug_cfg.training, epochs=1, batch_size=2, locations_per_image=4
        ),
    )
    lines: list[str] = []
    res = train(cfg, load_split(root, "train"), load_split(root, "val"), log=lines.append)
    single = res.epochs[-1].val
    assert single is not None and 0.0 <= single["miou"] <= 1.0
    assert len(res.apsm_history) == 1 and res.apsm_history[0].ndim == 2

    batches = worker.memory_val_batches(cfg, _toy_rows(root, "val"), rank=0)
    on_ray = validate(res.model, batches, cfg, torch.device("cpu"))
    assert on_ray == single
    assert lines[-1].startswith("epoch 1/1 step 1 loss ") and "val mIoU" in lines[-1]


def test_a_resumed_run_with_no_epoch_left_reports_its_checkpoint_again(debug_cfg, monkeypatch):
    """Tune restarts a trial whose last report it did not record: the run resumes with no
    epoch left, and must report again (Tune's metric check fails a trial that reported
    nothing), the checkpoint's own metrics with its metadata."""
    reported = []
    monkeypatch.setattr(worker, "report", lambda *args: reported.append(args))
    cfg = dataclasses.replace(debug_cfg, training=dataclasses.replace(debug_cfg.training, epochs=2))
    last = {"epoch": 2, "step": 8, "val_miou": 0.42}
    meta = {"epoch": 2, "step": 8, "metrics": last, "history": [last]}
    w = worker.Worker(_plan(cfg), 0, torch.device("cpu"), "engine", recorder=None)
    w.pos = worker.Position(epoch=2, step=8, history=[last], resumed_from=8, meta=meta)
    assert not w.epochs_left
    worker.report_again(w)
    ((engine, sent_cfg, metrics, sent_meta, rank),) = reported
    assert engine == "engine" and sent_cfg is cfg and rank == 0
    assert metrics == last and sent_meta == meta  # the checkpoint's, unchanged
