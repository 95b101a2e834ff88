"""The mixer registry: every caller reads a mode's properties from it, never a list of names."""

from __future__ import annotations

import pytest
import torch

from foveation.config import Config, ConfigError, MixConfig, replace
from foveation.experiments.reproduce import modes
from foveation.models.mixing import (
    MIXERS,
    MixContext,
    MixerSpec,
    fixed_mixes,
    is_learned,
    learned_mixes,
    mixer,
    split_label,
)
from foveation.tuning import space


def test_every_mode_is_either_learned_or_fixed():
    assert learned_mixes() == ("soft", "hard", "gumbel")
    assert fixed_mixes() == ("onehot", "random", "average")
    assert set(learned_mixes()) | set(fixed_mixes()) == set(MIXERS)
    assert all(isinstance(s, MixerSpec) for s in MIXERS.values())
    assert [m for m, s in MIXERS.items() if s.indexed] == ["onehot"]


def test_a_spec_is_called_like_its_function():
    w = torch.softmax(torch.randn(5, 3), dim=1)
    ctx = MixContext(MixConfig("onehot", index=1))
    assert torch.equal(MIXERS["onehot"](w, ctx), MIXERS["onehot"].fn(w, ctx))


def test_labels_split_into_mode_and_index():
    assert split_label("onehot-2") == ("onehot", 2)
    assert split_label("soft") == ("soft", None)
    assert split_label("soft-2") == ("soft-2", None)  # soft takes no index
    assert is_learned("gumbel") and is_learned("hard")
    assert not is_learned("onehot-0") and not is_learned("average")
    assert not is_learned("telepathy") and not is_learned(None)
    with pytest.raises(ConfigError, match=r"model\.mix\.mode: unknown mix mode 'telepathy'"):
        mixer("telepathy")


@pytest.mark.parametrize("mode", ["soft", "hard", "gumbel"])
def test_reproduction_trains_the_fixed_baselines_then_a_learned_mix(mode):
    cfg = replace(Config(), model=replace(Config().model, mix=MixConfig(mode)))
    labels = [m.label for m in modes(cfg)]
    assert labels == ["onehot-0", "onehot-1", "onehot-2", "random", "average", mode]


def test_reproduction_of_a_fixed_mix_adds_nothing():
    cfg = replace(Config(), model=replace(Config().model, mix=MixConfig("average")))
    assert [m.label for m in modes(cfg)][-1] == "average" and len(modes(cfg)) == 5


def test_tune_mixes_follow_the_registry():
    assert space.parse_mix("onehot-2") == MixConfig("onehot", index=2)
    for mode in learned_mixes():
        assert space.parse_mix(mode) == MixConfig(mode)
    with pytest.raises(space.SpaceError, match="is not onehot-N"):
        space.parse_mix("onehot-x")
    with pytest.raises(space.SpaceError, match=r"unknown mix mode 'best'.*'onehot-N'"):
        space.parse_mix("best")
