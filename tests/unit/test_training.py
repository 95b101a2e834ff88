import math

import numpy as np
import pytest
import torch

from foveation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from foveation.config import Config, TrainingConfig, replace
from foveation.data.batches import (
    BatchExtractor,
    concat,
    sample_locations,
    tissue_locations,
    to_torch,
)
from foveation.data.toy import generate_image
from foveation.models import build_model
from foveation.training.distributed import LocalEngine
from foveation.training.optim import param_groups, poly_decay
from foveation.training.step import TrainingDiverged, train_step

CPU = torch.device("cpu")


def batch(cfg, n=2, size=128, epoch=0):
    """One training batch of ``n`` toy images, as the single-device trainer cuts it."""
    parts = []
    for i in range(n):
        im, lab = generate_image(size, 48, seed=i)
        ex = BatchExtractor.from_arrays(cfg, im, lab, f"s{i}")
        parts.append(ex.batch(sample_locations(ex.image, cfg, 0, epoch, f"s{i}"), f"s{i}"))
    return to_torch(concat(parts))


def test_poly_decay_and_param_groups():
    f = poly_decay(100, 0.9)
    assert f(0) == 1.0 and f(100) == 0.0 and f(50) == pytest.approx(0.5**0.9)
    model = build_model(Config())
    groups = {
        g["name"]: g for g in param_groups(model, TrainingConfig(lr_fovnet=0.5, weight_decay=0.1))
    }
    assert groups["fovnet"]["lr"] == 0.5 and groups["fovnet.no_decay"]["weight_decay"] == 0.0
    decayed = {id(p) for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # BN never decays
            assert id(m.weight) not in decayed and id(m.bias) not in decayed
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_all


def test_one_step_trains_all_locations_in_one_batch():
    cfg = replace(Config(), training=TrainingConfig(locations_per_image=5))
    torch.manual_seed(0)
    engine = LocalEngine(build_model(cfg), cfg, 10, CPU)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    res = train_step(engine, batch(cfg), cfg, 0, 10, CPU)
    assert len(res.w) == 10 and math.isfinite(float(res.loss))
    assert float(res.w.mean(0).sum()) == pytest.approx(1.0)
    changed = [
        k
        for k, v in engine.module.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert any(k.startswith("fovnet") for k in changed) and any(
        k.startswith("segmenter.encoder") for k in changed
    )


def test_uniform_warmup_uses_the_average_mix():
    cfg = replace(
        Config(), training=TrainingConfig(uniform_warmup_fraction=0.5, locations_per_image=3)
    )
    engine = LocalEngine(build_model(cfg), cfg, 10, CPU)
    b = batch(cfg, 1)
    r0 = train_step(engine, b, cfg, 0, 10, CPU)
    assert r0.h.mean(0).tolist() == pytest.approx([1 / 3] * 3)
    r9 = train_step(engine, b, cfg, 9, 10, CPU)
    assert r9.h.mean(0).tolist() != pytest.approx([1 / 3] * 3)


def test_nan_loss_stops_training_naming_the_step():
    cfg = Config()
    model = build_model(cfg)
    with torch.no_grad():
        model.segmenter.decoder[-1].bias.fill_(float("nan"))
    engine = LocalEngine(model, cfg, 10, CPU)
    with pytest.raises(TrainingDiverged, match="at step 7"):
        train_step(engine, batch(cfg, 1), cfg, 7, 10, CPU)


def test_sampling_is_seeded_without_replacement_on_tissue_and_small_images_pad():
    cfg = replace(Config(), training=TrainingConfig(locations_per_image=100))
    im, lab = generate_image(40, 16, seed=0)  # smaller than the largest FoV (256): padded
    ex = BatchExtractor.from_arrays(cfg, im, lab, "tiny")
    loc = sample_locations(ex.image, cfg, 0, 0, "tiny")
    on_tissue = {tuple(x) for x in tissue_locations(ex.image, cfg).tolist()}
    assert 0 < len(on_tissue) <= 9  # 3 x 3 x_r pixels, the pale ones background
    assert len(loc) == len(on_tissue) and {tuple(x) for x in loc.tolist()} == on_tissue
    again = sample_locations(ex.image, cfg, 0, 0, "tiny")
    assert np.array_equal(loc, again)  # the same seed, epoch and slide: the same draw
    white = BatchExtractor.from_arrays(cfg, np.full((40, 40, 3), 255, np.uint8), lab, "w")
    assert len(sample_locations(white.image, cfg, 0, 0, "w")) == 0  # background: no locations
    b = ex.batch(loc[:1], "tiny")
    assert b["bank"].shape == (1, 3, 3, 64, 64) and b["label"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="label of 'bad'"):
        BatchExtractor.from_arrays(cfg, im, lab[:10], "bad")


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = Config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    uri = save_checkpoint(str(tmp_path / "ckpt"), model, cfg, {"step": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.toml",
        "meta.json",
        "model.safetensors",
    ]
    loaded, cfg2, meta = load_checkpoint(uri)
    assert cfg2 == cfg and meta["step"] == 3 and "torch" in meta["versions"]
    bank = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)
    w = torch.full((2, 3), 1 / 3)
    torch.testing.assert_close(loaded(bank, w)[0], model(bank, w)[0])
    # overwriting is atomic: the directory is replaced whole
    save_checkpoint(uri, model, cfg, {"step": 4})
    assert load_checkpoint(uri)[2]["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(CheckpointError, match="incomplete or missing"):
        load_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(uri)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    cfg = Config()
    save_checkpoint(str(tmp_path / "a"), build_model(cfg), cfg)
    other = replace(
        cfg,
        model=replace(cfg.model, num_classes=3),
        evaluation=replace(cfg.evaluation, class_names=("a", "b", "c"), kept_classes=(0, 1)),
    )
    (tmp_path / "a" / "config.toml").write_text(other.to_toml())
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(str(tmp_path / "a"))


def test_in_memory_images_with_nan_are_refused_by_name():
    im = np.full((64, 64, 3), np.nan, np.float32)
    with pytest.raises(ValueError, match="image 'x': contains NaN"):
        BatchExtractor.from_arrays(Config(), im, np.zeros((64, 64), np.uint8), "x")


def test_bf16_autocast_step_on_cpu():
    cfg = replace(Config(), training=TrainingConfig(locations_per_image=3, precision="bf16"))
    engine = LocalEngine(build_model(cfg), cfg, 10, CPU)
    res = train_step(engine, batch(cfg, 1), cfg, 0, 10, CPU)
    assert math.isfinite(float(res.loss))
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # weights stay fp32
    fp16 = replace(
        cfg,
        training=replace(cfg.training, precision="fp16"),
        distributed=replace(cfg.distributed, use_gpu=True, zero_stage=0),
    )
    with pytest.raises(ValueError, match="fp16"):
        LocalEngine(build_model(fp16), fp16, 10, CPU)


def test_validation_keeps_the_run_alive(monkeypatch):
    """A validation pass calls back after every batch, and the worker turns those calls into
    the run's heartbeat (at most every 2 s, rank 0 only), so a long pass is not a stall."""
    from foveation.config import load_config
    from foveation.geometry import OUTPUT_STRIDE, XR_CONTEXT
    from foveation.training.loop import validate

    cfg = load_config("jobs/configs/tiny.toml")
    pc, k, n = cfg.patches, 2 * XR_CONTEXT + 1, 2
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "bank": torch.randint(
                0,
                255,
                (n, pc.depth, 3, pc.patch_size, pc.patch_size),
                generator=g,
                dtype=torch.uint8,
            ),
            "xr": torch.randn(n, 3, k, k, generator=g),
            "label": torch.randint(
                0,
                cfg.model.num_classes,
                (n, pc.patch_size // OUTPUT_STRIDE, pc.patch_size // OUTPUT_STRIDE),
                generator=g,
                dtype=torch.uint8,
            ),
        }
        for _ in range(3)
    ]
    calls = []
    summary = validate(
        build_model(cfg), batches, cfg, torch.device("cpu"), on_batch=lambda: calls.append(1)
    )
    assert len(calls) == 3 and 0.0 <= summary["miou"] <= 1.0
    assert sum(summary["weight_mean"]) == pytest.approx(1.0)

    from foveation.training.recorder import Recorder

    beats = []
    monkeypatch.setattr(
        Recorder,
        "heartbeat",
        lambda self, now=None: beats.append(self.rank) or setattr(self, "_last_beat", now),
    )
    Recorder("r", 1).keep_alive()  # not rank 0: never
    r0 = Recorder("r", 0)
    r0.keep_alive()
    r0.keep_alive()  # within 2 s of the last: skipped
    assert beats == [0]
