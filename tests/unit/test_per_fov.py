"""``model.segmenters = "per_fov"``: D segmenters, one per FoV, whose class probabilities the
mix weighs (docs/method.md#per-fov-segmenters)."""

import dataclasses

import pytest
import torch

from foveation.config import ConfigError, MixConfig, config_from_dict
from foveation.models import build_model
from foveation.models.mixing import MixContext
from foveation.patches import normalise
from foveation.training.optim import param_groups


@pytest.fixture(scope="module")
def per_fov(debug_cfg):
    cfg = dataclasses.replace(
        debug_cfg, model=dataclasses.replace(debug_cfg.model, segmenters="per_fov")
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def _bank(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 3, 32, 32), dtype=torch.uint8, generator=g)


def _expert_log_probs(model, bank, d):
    x = normalise(bank[:, d].float(), model.mean, model.std)
    return torch.log_softmax(model.experts[d](x), 1)


def test_one_segmenter_per_fov_each_with_its_own_weights(per_fov):
    cfg, model = per_fov
    assert model.segmenter is None and len(model.experts) == cfg.patches.depth
    a, b = (model.experts[i].decoder[-1].weight for i in (0, 1))
    assert not torch.equal(a, b)
    groups = {g["name"]: g["params"] for g in param_groups(model, cfg.training)}
    owned = {id(p) for ps in groups.values() for p in ps}
    assert all(id(p) in owned for p in model.parameters())


def test_output_is_the_log_of_the_weighted_mixture_of_class_probabilities(per_fov):
    _, model = per_fov
    bank = _bank()
    w = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), 1)
    with torch.no_grad():
        logits, h = model(bank, w)
        want = sum(
            h[:, d, None, None, None] * _expert_log_probs(model, bank, d).exp() for d in range(3)
        )
    torch.testing.assert_close(logits.exp(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(6, 8, 8))


@pytest.mark.parametrize("k", [0, 2])
def test_a_onehot_mix_is_exactly_that_fovs_segmenter(per_fov, k):
    _, model = per_fov
    bank, w = _bank(), torch.full((6, 3), 1 / 3)
    with torch.no_grad():
        logits, _ = model(bank, w, mode=MixConfig("onehot", index=k))
    torch.testing.assert_close(logits, _expert_log_probs(model, bank, k), rtol=1e-5, atol=1e-5)


def test_a_hard_choice_runs_each_segmenter_on_its_own_locations_only(per_fov):
    """Evaluation of a hard mix: location n is read by segmenter argmax w_n alone, and the
    others never see it (counted by hooks)."""
    _, model = per_fov
    bank = _bank(n=5)
    choice = torch.tensor([0, 2, 2, 1, 0])
    w = torch.nn.functional.one_hot(choice, 3).float() * 0.8 + 0.2 / 3
    seen = {}
    hooks = [
        e.register_forward_hook(lambda m, i, o, d=d: seen.__setitem__(d, i[0].shape[0]))
        for d, e in enumerate(model.experts)
    ]
    try:
        with torch.no_grad():
            logits, _ = model(
                bank, w, MixContext(MixConfig("hard"), training=False), MixConfig("hard")
            )
    finally:
        for hk in hooks:
            hk.remove()
    assert seen == {0: 2, 1: 1, 2: 2}
    for n, d in enumerate(choice.tolist()):
        torch.testing.assert_close(
            logits[n], _expert_log_probs(model, bank[n : n + 1], d)[0], rtol=1e-4, atol=1e-5
        )


def test_gradients_reach_f_and_every_segmenter_under_a_soft_mix(per_fov):
    _, model = per_fov
    model.train()
    try:
        xr = torch.randn(4, 3, 7, 7)
        w = model.location_weights(xr)
        logits, _ = model(_bank(n=4), w, MixContext(MixConfig("soft"), training=True))
        label = torch.randint(0, 4, (4, 8, 8))
        torch.nn.functional.cross_entropy(logits, label).backward()
        for part in [model.fovnet, *model.experts]:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    finally:
        model.zero_grad()
        model.eval()


def test_an_unknown_segmenters_value_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.segmenters"):
        config_from_dict({"model": {"segmenters": "many"}})


def test_own_loss_trains_each_segmenter_on_its_patch_and_f_on_the_fixed_mixture(per_fov):
    """``training.per_fov_loss = "own"``: segmenter d's gradient is its one-hot loss's alone
    (the mixture term does not reach it), and F's is the mixture's alone."""
    from foveation.training.step import own_fov_forward, per_location_losses

    cfg, model = per_fov
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, per_fov_loss="own"))
    model.train()
    try:
        torch.manual_seed(3)
        bank, xr = _bank(n=4), torch.randn(4, 3, 7, 7)
        label = torch.randint(0, 4, (4, 8, 8))
        w = model.location_weights(xr)
        loss, logits, _, own = own_fov_forward(model, bank, label, w, cfg, 0, 10, None, [])
        assert own.shape == (4, 3) and logits.shape == (4, 4, 8, 8)
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        # The segmenters alone, each on its patch: the same gradients.
        per_fov_logits, _ = model(bank, w.detach(), per_fov=True)
        per_location_losses(per_fov_logits, label).mean(0).sum().backward()
        for n, p in model.experts.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[f"experts.{n}"], p.grad, rtol=1e-4, atol=1e-6)
        assert any(n.startswith("fovnet.") for n in got)
        model.zero_grad()
        # F alone, on the mixture with the probabilities held fixed.
        w = model.location_weights(xr)
        prob = torch.einsum("nd,ndkij->nkij", w, torch.softmax(per_fov_logits.detach(), 2))
        torch.nn.functional.cross_entropy(prob.log(), label).backward()
        for n, p in model.fovnet.named_parameters():
            torch.testing.assert_close(got[f"fovnet.{n}"], p.grad, rtol=1e-4, atol=1e-6)
    finally:
        model.zero_grad()
        model.eval()


def test_argmax_at_eval_chooses_one_fov_per_location_outside_training_only():
    w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    mix = MixConfig("soft", argmax_at_eval=True)
    from foveation.models.mixing import MIXERS

    evaluated = MIXERS["soft"](w, MixContext(mix, training=False))
    assert evaluated.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert torch.equal(MIXERS["soft"](w, MixContext(mix, training=True)), w)
    assert torch.equal(MIXERS["soft"](w, MixContext(MixConfig("soft"), training=False)), w)
