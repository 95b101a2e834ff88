"""The training step's speed levers (training/speed.py) change how the step runs, not what it
computes: channels-last memory, a compiled segmenter (``aot_eager``, the graph capture that
inductor compiles on a GPU) and the fused Adam give the eager model's outputs and update within
float tolerance, on CPU, with the checkpoint's weight names unchanged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from benchmarks.threads import synthetic_batch
from foveation.config import ConfigError, config_from_dict
from foveation.models.foveated import build_model
from foveation.models.mixing import MixContext
from foveation.training.distributed import LocalEngine
from foveation.training.step import batch_forward, train_step


@pytest.fixture(scope="module")
def cfg(debug_cfg):
    # One shared segmenter: the levers apply per segmenter, one is enough and compiles once.
    return dataclasses.replace(
        debug_cfg, model=dataclasses.replace(debug_cfg.model, segmenters="shared")
    )


def _with(cfg, **levers):
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **levers))


def _engine(cfg, model):
    return LocalEngine(copy.deepcopy(model), cfg, 10, "cpu")


def test_levers_give_the_eager_models_outputs_and_gradients(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(cfg, 16)
    eager = _engine(cfg, model)
    fast_cfg = _with(cfg, channels_last=True, compile="aot_eager", adam="fused")
    fast = _engine(fast_cfg, model)
    seg = fast.module.segmenter
    assert seg.channels_last and next(seg.encoder.parameters()).is_contiguous(
        memory_format=torch.channels_last
    ) is (next(seg.encoder.parameters()).dim() == 4)
    assert fast.module.state_dict().keys() == eager.module.state_dict().keys()

    # The forward in evaluation mode: the same logits.
    ctx = MixContext(cfg.model.mix, training=False)
    with torch.no_grad():
        for e in (eager, fast):
            e.eval()
        w = eager.module.location_weights(batch["xr"])
        a, _ = eager.module(batch["bank"], w, ctx)
        b, _ = fast.module(batch["bank"], w, ctx)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    # One forward and backward: the same loss in training mode, and the same gradients with
    # BatchNorm on its running statistics. (With batch statistics, BN's backward subtracts the
    # batch means of near-equal terms, which turns fp32 rounding into gradient differences of a
    # few percent on some random-init tensors; Adam's g / sqrt(v) then turns a rounding
    # difference in a near-zero gradient into a whole step, so the optimiser is checked alone,
    # below.)
    for train in (True, False):
        grads = []
        for e, c in ((eager, cfg), (fast, fast_cfg)):
            e.train(train)
            e.optimizer.zero_grad()
            loss, *_ = batch_forward(e, batch, c, 0, 10, "cpu")
            e.backward(loss)
            grads.append((loss.detach(), [p.grad.clone() for p in e.module.parameters()]))
        (la, ga), (lb, gb) = grads
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        if not train:
            names = [n for n, _ in eager.module.named_parameters()]
            for name, a, b in zip(names, ga, gb, strict=True):
                # within 1e-4 of the tensor's largest gradient
                torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * float(a.abs().max()), msg=name)


def test_the_fused_adam_takes_the_default_adams_steps(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(cfg, 16)
    plain, fused = _engine(cfg, model), _engine(_with(cfg, adam="fused"), model)
    assert fused.optimizer.defaults["fused"] is True
    # One step: the same gradients, so only the optimiser's arithmetic differs. (A second step
    # starts from weights a rounding apart, which BatchNorm's batch statistics and Adam's
    # g / sqrt(v) amplify, as above.)
    for e in (plain, fused):
        train_step(e, batch, cfg, 0, 10, "cpu")
    for (name, pa), pb in zip(
        plain.module.named_parameters(), fused.module.parameters(), strict=True
    ):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unknown_lever_value_fails_at_load_naming_the_field(cfg):
    for field, value in (("compile", "tensorrt-please"), ("adam", "fast")):
        d = cfg.to_dict()
        d["training"][field] = value
        with pytest.raises(ConfigError, match=rf"training\.{field}"):
            config_from_dict(d)
