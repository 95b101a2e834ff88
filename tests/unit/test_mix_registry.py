"""The mixer registry and the segmenter-layout registry: every caller reads a mode's or a
layout's properties from them, never a list of names. The tests run over every entry and
check properties, not the lists themselves, so adding a mode or a layout is covered as is."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from foveation.config import (
    MIX_MODES,
    SEGMENTER_LAYOUTS,
    Config,
    ConfigError,
    MixConfig,
    config_from_dict,
    replace,
)
from foveation.experiments.reproduce import modes
from foveation.models import build_model
from foveation.models.mixing import (
    MIXERS,
    MixContext,
    MixerSpec,
    fixed_mixes,
    is_learned,
    mixer,
    split_label,
)
from foveation.training.step import batch_forward
from foveation.tuning import space

MODES = list(MIXERS)
LAYOUTS = list(SEGMENTER_LAYOUTS)
D = 3


def mix_cfg(mode: str, index: int = 1) -> MixConfig:
    return MixConfig(mode, index=index if MIX_MODES[mode].indexed else None)


def weights(seed: int, n: int = 64) -> torch.Tensor:
    return torch.softmax(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), 1)


def h_of(mode: str, w: torch.Tensor, training: bool, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return MIXERS[mode](w, MixContext(mix_cfg(mode), step=3, total_steps=10, training=training))


def test_the_registry_is_the_configs_table_of_modes():
    assert list(MIXERS) == list(MIX_MODES)  # one list: the config's, in its order
    for name, spec in MIXERS.items():
        assert isinstance(spec, MixerSpec) and spec.mode is MIX_MODES[name]
    assert set(fixed_mixes()) == {m for m, s in MIXERS.items() if not s.learned}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_every_mixer_gives_one_weight_per_patch_summing_to_one(mode, training):
    w = weights(0)
    h = h_of(mode, w, training)
    assert h.shape == w.shape and h.dtype == w.dtype
    assert (h >= -1e-6).all()
    torch.testing.assert_close(h.sum(1), torch.ones(len(w)))


@pytest.mark.parametrize("mode", MODES)
def test_every_mixer_is_deterministic_at_eval(mode):
    w = weights(0)
    torch.testing.assert_close(h_of(mode, w, False), h_of(mode, w, False), rtol=0, atol=0)
    if MIXERS[mode].learned:  # F decides: no draw at all at evaluation
        torch.testing.assert_close(h_of(mode, w, False, 1), h_of(mode, w, False, 2), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_fixed_mix_ignores_f_and_an_indexed_one_takes_its_patch(mode):
    spec, w1, w2 = MIXERS[mode], weights(1), weights(2)
    same = torch.equal(h_of(mode, w1, True), h_of(mode, w2, True))
    assert same == (not spec.learned)
    if spec.indexed:
        assert (h_of(mode, w1, False)[:, 1] == 1).all()


@pytest.mark.parametrize("mode", MODES)
def test_labels_name_the_index_of_an_indexed_mode_and_split_back(mode):
    cfg = mix_cfg(mode, index=2)
    assert cfg.label == (f"{mode}-2" if MIX_MODES[mode].indexed else mode)
    assert split_label(cfg.label) == (mode, cfg.index)
    assert is_learned(cfg.label) == MIXERS[mode].learned
    assert space.parse_mix(cfg.label) == cfg  # a sweep names modes as runs are labelled
    if MIX_MODES[mode].indexed:
        with pytest.raises(ConfigError, match=r"model\.mix\.index"):
            MixConfig(mode)
        with pytest.raises(space.SpaceError, match=f"is not {mode}-N"):
            space.parse_mix(f"{mode}-x")
    else:
        assert split_label(f"{mode}-2") == (f"{mode}-2", None)  # takes no index


def test_an_unknown_mode_is_refused_where_the_config_loads():
    with pytest.raises(ConfigError, match=r"model\.mix\.mode: unknown mix mode 'telepathy'"):
        config_from_dict({"model": {"mix": {"mode": "telepathy"}}})
    with pytest.raises(ConfigError, match=r"model\.mix\.mode: unknown mix mode 'telepathy'"):
        mixer("telepathy")
    assert not is_learned("telepathy") and not is_learned(None)
    with pytest.raises(space.SpaceError, match=r"unknown mix mode 'best'"):
        space.parse_mix("best")


@pytest.mark.parametrize("mode", MODES)
def test_reproduction_trains_every_fixed_baseline_then_a_learned_mix(mode):
    cfg = replace(Config(), model=replace(Config().model, mix=mix_cfg(mode)))
    labels = [m.label for m in modes(cfg)]
    fixed = [
        f"{m}-{i}" if MIX_MODES[m].indexed else m
        for m in fixed_mixes()
        for i in range(cfg.patches.depth if MIX_MODES[m].indexed else 1)
    ]
    assert labels == fixed + ([mode] if MIXERS[mode].learned else [])


# ------------------------------------------------------------------------- segmenter layouts


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_model(request, debug_cfg):
    m = dataclasses.replace(debug_cfg.model, segmenters=request.param, mix=MixConfig("soft"))
    cfg = dataclasses.replace(debug_cfg, model=m)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def batch(cfg: Config, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    p, k = cfg.patches.patch_size, cfg.model.num_classes
    return {
        "bank": torch.randint(
            0, 256, (n, cfg.patches.depth, 3, p, p), dtype=torch.uint8, generator=g
        ),
        "xr": torch.randn(n, 3, 7, 7, generator=g),
        "label": torch.randint(0, k, (n, p // 4, p // 4), generator=g),
    }


def test_every_layout_builds_its_count_of_segmenters(layout_model):
    cfg, model = layout_model
    layout, depth = cfg.model.layout, cfg.patches.depth
    assert model.layout is layout and len(model.segmenters()) == layout.count(depth)
    one = sum(p.numel() for p in model.segmenters()[0].parameters())
    everything = sum(p.numel() for s in model.segmenters() for p in s.parameters())
    assert everything == layout.count(depth) * one  # the parameters it multiplies


def test_every_layout_gives_class_logits_and_mixing_weights_summing_to_one(layout_model):
    cfg, model = layout_model
    b, p = batch(cfg), cfg.patches.patch_size
    model.eval()
    with torch.no_grad():
        w = model.location_weights(b["xr"])
        logits, h = model(b["bank"], w)
        again, _ = model(b["bank"], w)
    assert logits.shape == (4, cfg.model.num_classes, p // 4, p // 4) and h.shape == w.shape
    torch.testing.assert_close(h.sum(1), torch.ones(4))
    torch.testing.assert_close(torch.softmax(logits, 1).sum(1), torch.ones(4, p // 4, p // 4))
    torch.testing.assert_close(logits, again, rtol=0, atol=0)  # deterministic at eval


def test_the_own_loss_applies_only_where_the_layout_allows_it(layout_model):
    cfg, model = layout_model
    model.train()
    losses = {}
    for name in ("mixture", "own"):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, per_fov_loss=name))
        with torch.no_grad():
            losses[name] = batch_forward(model, batch(c), c, 5, 10, "cpu")[0].item()
    assert (losses["own"] != losses["mixture"]) == cfg.model.layout.own_loss, losses


def test_an_unknown_layout_is_refused_where_the_config_loads():
    with pytest.raises(ConfigError, match=r"model\.segmenters: must be one of"):
        config_from_dict({"model": {"segmenters": "many"}})
