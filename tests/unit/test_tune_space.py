"""The sweep's search space, presets, checks and outputs, without Ray."""

from __future__ import annotations

import math
import tomllib

import pytest

from foveation.config import ConfigError, TuneConfig, config_from_dict, load_config, replace
from foveation.tuning import results, space
from foveation.tuning.sweep import SweepError, check_concurrency, trial_resources

BASE = load_config("jobs/configs/tiny.toml")


def _with(**tune) -> object:
    return replace(BASE, tune=TuneConfig(**tune))


def test_custom_space_is_the_product_and_trials_keep_the_output_size():
    cfg = _with(fov_sets=[[1, 2, 4], [1, 4]], mixes=["soft", "onehot-1"], lrs=[1e-3, 3e-4])
    pts = space.points(cfg)
    assert len(pts) == 8
    trial = space.trial_config(cfg, pts[0])
    assert trial.patches.fovs == (64, 128, 256) and trial.patches.patch_size == 64
    assert trial.training.lr_encoder == 1e-3
    # F's learning rate keeps the base ratio lr_fovnet / lr_encoder (10 in tiny.toml).
    assert math.isclose(trial.training.lr_fovnet, 1e-2)
    assert {space.label(p) for p in pts} == {space.trial_config(cfg, p).name[5:] for p in pts}


def test_presets_are_the_papers_three_analyses():
    fov = space.points(_with(preset="fov", fov_ratios=[1, 2, 4]))
    assert [(p["fovs"], p["patch_size"]) for p in fov] == [([64], 64), ([128], 128), ([256], 256)]
    res = space.points(_with(preset="resolution", downsamples=[2, 4, 8]))
    assert [(p["fovs"], p["patch_size"]) for p in res] == [([512], 256), ([512], 128), ([512], 64)]
    trade = space.points(_with(preset="tradeoff", fov_ratios=[1, 2, 4, 8]))
    assert {p["patch_size"] for p in trade} == {64}  # the fixed pixel budget
    assert [p["fovs"][0] for p in trade] == [64, 128, 256, 512]
    assert [space.single_patch(p) for p in trade] == [(64, 1), (128, 2), (256, 4), (512, 8)]
    assert len({space.pixels_per_location(p) for p in trade}) == 1
    assert len({space.pixels_per_location(p) for p in fov}) == 3


@pytest.mark.parametrize(
    ("tune", "expected"),
    [
        ({"base_fovs": [32]}, "every FoV must be >= patch_size"),
        ({"mixes": ["onehot-5"]}, "model.mix.index"),
        ({"mixes": ["onehot"]}, "needs a patch index"),
        ({"mixes": ["best"]}, "unknown mix mode"),
        ({"preset": "resolution", "downsamples": [3]}, "does not divide"),
        ({"lrs": [1e-3, 1e-3]}, "same point twice"),
    ],
)
def test_contradictory_spaces_fail_before_any_trial(tune, expected):
    with pytest.raises(space.SpaceError, match=expected):
        space.points(_with(**tune))


@pytest.mark.parametrize(
    ("tune", "field"),
    [
        ({"fov_sets": []}, "tune.fov_sets"),
        ({"fov_sets": [[2, 4]]}, "tune.fov_sets"),
        ({"mixes": []}, "tune.mixes"),
        ({"max_concurrent_trials": 0}, "tune.max_concurrent_trials"),
        ({"preset": "everything"}, "tune.preset"),
    ],
)
def test_bad_tune_sections_name_the_field(tune, field):
    with pytest.raises(ConfigError, match=field):
        TuneConfig(**tune)


def test_more_concurrent_trials_than_resources_is_refused():
    cfg = _with(max_concurrent_trials=4, trial_cpus=0.5)
    need = trial_resources(cfg)["CPU"]  # driver + 1 worker + 2 readers x 0.5
    assert need == 0.5 + 1.0 + 1.0
    with pytest.raises(SweepError, match=r"tune\.max_concurrent_trials: 4 trials"):
        check_concurrency(cfg, {"CPU": 8.0})
    check_concurrency(cfg, {"CPU": 10.0})


def _reports(mious, iou=0.5):
    return [
        {"epoch": e + 1, "val_miou": m, "val_iou_benign": iou, "peak_memory_mb": 100 + e}
        for e, m in enumerate(mious)
    ]


def test_rows_take_the_best_epoch_and_tell_stopped_from_finished():
    pt = space.points(_with())[0]
    done = results.trial_row("a", pt, _reports([0.2, 0.4, 0.3]), 3, True, None)
    assert done["status"] == "finished" and done["val_miou"] == 0.4 and done["best_epoch"] == 2
    assert done["val_miou_last"] == 0.3 and done["peak_memory_mb"] == 102
    stopped = results.trial_row("b", pt, _reports([0.1]), 3, True, None)
    assert stopped["status"] == "stopped_early" and stopped["epochs"] == 1
    assert results.trial_row("c", pt, _reports([0.1]), 3, False, None)["status"] == "unfinished"
    assert results.trial_row("d", pt, [], 3, True, "boom")["status"] == "error"
    # Mid-epoch checkpoints report val_miou -1: never a score.
    partial = results.trial_row("e", pt, [{"epoch": 0, "val_miou": -1.0}], 3, None, None)
    assert math.isnan(partial["val_miou"])
    assert results.best_row([done, stopped, partial])["trial_id"] == "a"


def test_best_config_is_a_training_config_with_the_full_budget(tmp_path):
    cfg = replace(
        _with(fov_sets=[[1, 4]], mixes=["hard"], lrs=[3e-4], epochs=2),
        training=replace(BASE.training, epochs=7),
    )
    (pt,) = space.points(cfg)
    row = results.trial_row("t1", pt, _reports([0.3, 0.5]), 2, True, None)
    assert results.point_of(row) == pt
    path = tmp_path / "best.toml"
    path.write_text(results.best_config_toml(cfg, row))
    best = load_config(path)  # what jobs.train does with it
    assert best.patches.fovs == (64, 256) and best.model.mix.mode == "hard"
    assert best.training.epochs == 7 and best.training.lr_encoder == 3e-4
    assert best.tune == TuneConfig() and "[tune]" not in path.read_text()


def test_tradeoff_marks_the_best_per_class_and_writes_a_figure():
    cfg = _with(preset="tradeoff", fov_ratios=[1, 2, 4])
    names = cfg.evaluation.class_names
    rows = []
    for i, pt in enumerate(space.points(cfg)):
        rep = {"epoch": 1, "val_miou": 0.3 + 0.1 * i, "peak_memory_mb": 1.0}
        rep |= {f"val_iou_{n}": (0.9 - 0.2 * i if n == "benign" else 0.1 * i) for n in names}
        rows.append(results.trial_row(f"t{i}", pt, [rep], 1, True, None))
    trade = results.tradeoff(rows, names)
    assert [t["fov"] for t in trade] == [64, 128, 256]
    text = results.tradeoff_text(trade, names)
    assert "best FoV per class: benign 64, grade3 256" in text
    png = results.tradeoff_figure(trade, names, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    _, csv = results.table_bytes(trade)
    assert csv.decode().splitlines()[0].startswith('"fov"')


def test_tiny_config_round_trips_with_a_tune_section():
    cfg = _with(preset="fov", fov_ratios=[1, 2])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_an_unwritable_output_is_refused_before_any_trial(tmp_path):
    from foveation.tuning.sweep import check_writable

    check_writable(str(tmp_path / "fresh" / "sweep"))  # made on the way
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SweepError, match="is not writable"):
        check_writable(str(blocker / "sweep"))


def test_points_pass_the_models_checks_before_any_trial():
    # fov preset: the patch is as big as its FoV, 1.5 x 64 = 96 is fine, 1.25 x 64 = 80 too,
    # but 1.1 x 64 = 70 is no multiple of the segmenter's output stride.
    space.points(_with(preset="fov", fov_ratios=[1, 1.5]))
    with pytest.raises(space.SpaceError, match=r"patches\.patch_size"):
        space.points(_with(preset="fov", fov_ratios=[1, 1.1]))


def test_sweep_result_lives_with_the_results():
    from foveation.tuning import sweep

    assert sweep.SweepResult is results.SweepResult


def test_any_dotted_config_field_can_be_searched_and_bad_ones_are_named():
    cfg = _with(
        fields={
            "training.scale_target_weight": [0.0, 1.0],
            "model.mix.mode": ["soft", "gumbel"],
        }
    )
    pts = space.points(cfg)
    assert len(pts) == 4
    trials = [space.trial_config(cfg, p) for p in pts]
    got = {(t.training.scale_target_weight, t.model.mix.mode) for t in trials}
    assert got == {(0.0, "soft"), (0.0, "gumbel"), (1.0, "soft"), (1.0, "gumbel")}
    assert len({space.label(p) for p in pts}) == 4  # every point has its own name
    best = space.best_config(cfg, pts[-1])
    assert best.training.scale_target_weight == trials[-1].training.scale_target_weight
    # a shipped config file with [tune.fields] round-trips through TOML
    assert config_from_dict(tomllib.loads(cfg.to_toml())) == cfg
    with pytest.raises(space.SpaceError, match=r"training\.warmup_mix"):
        space.points(_with(fields={"training.warmup_mix": ["nope"]}))
    with pytest.raises(space.SpaceError, match="no_such_field"):
        space.points(_with(fields={"training.no_such_field": [1]}))
    with pytest.raises(ConfigError, match=r"tune\.fields\.training\.lr_fovnet"):
        _with(fields={"training.lr_fovnet": []})
