"""One training step over one training batch (docs/contracts.md#training-batch), the same for
the single-device trainer and every Ray Train worker.

F runs on each location's 7x7 x_r neighbourhood (its centre is the location's weights), the
mixer turns the weights into coefficients, the segmenter segments the mixed bank, and all the
batch's locations go through one forward and one backward (the authors' accumulation across
location mini-batches double-counted the last one and mixed images: docs/method.md#training).
``engine`` is what ``training.distributed`` builds: a DeepSpeed engine or the single-device
``LocalEngine``; both apply the configured autocast in their forward and own the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import Config, MixConfig
from foveation.geometry import IGNORE_INDEX
from foveation.models.mixing import MixContext, is_learned


class TrainingDiverged(RuntimeError):
    """The loss (or an input) became NaN or infinite; names the step."""


def mix_context(cfg: Config, step: int, total_steps: int) -> MixContext:
    return MixContext(cfg.model.mix, step, total_steps, training=True)


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return int(cfg.training.uniform_warmup_fraction * total_steps)


def warmup_mode(cfg: Config, step: int, total_steps: int) -> MixConfig | None:
    """``training.warmup_mix`` during the warm-up (docs/method.md#collapse), else None. Only a
    learned mix has a warm-up: the recipe's levers never touch a fixed baseline."""
    if not is_learned(cfg.model.mix.mode) or step >= warmup_steps(cfg, total_steps):
        return None
    if cfg.training.warmup_mix == "smallest":
        return MixConfig("onehot", index=0)
    return MixConfig(cfg.training.warmup_mix)


def entropy_weight(cfg: Config, step: int, total_steps: int) -> float:
    """The entropy weight at ``step``: constant, or moving linearly to ``entropy_weight_end``
    between the end of the warm-up and the last step."""
    tc = cfg.training
    if tc.entropy_weight_end is None:
        return tc.entropy_weight
    start = warmup_steps(cfg, total_steps)
    frac = min(1.0, max(0.0, (step - start) / max(1, total_steps - 1 - start)))
    return tc.entropy_weight + frac * (tc.entropy_weight_end - tc.entropy_weight)


def weight_entropy(w: Tensor) -> Tensor:
    """Per-location entropy of F's weights [N] (nats; log D is uniform, 0 a one-hot)."""
    return -(w * w.clamp_min(1e-12).log()).sum(1)


def per_fov_losses(model, bank: Tensor, label: Tensor, w: Tensor) -> Tensor:
    """[N, D]: each location's mean cross entropy when the segmenter sees patch d alone (with
    gradient when called with it enabled: the every-FoV loss)."""
    valid = (label != IGNORE_INDEX).float()
    count = valid.sum((1, 2)).clamp_min(1.0)
    losses = []
    for d in range(w.shape[1]):
        logits, _ = model(bank, w, None, MixConfig("onehot", index=d))
        ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")
        losses.append((ce * valid).sum((1, 2)) / count)
    return torch.stack(losses, 1)


def scale_target(losses: Tensor, cfg: Config) -> Tensor:
    """The hindsight scale target q [N, D] = softmax(-loss_d / T) of per-FoV losses
    (docs/method.md#scale-target)."""
    return torch.softmax(-losses.detach() / cfg.training.scale_target_temperature, 1)


def segmentation_loss(
    logits: Tensor,
    label: Tensor,
    w: Tensor,
    cfg: Config,
    step: int,
    slide_ids,
    total_steps: int = 1,
) -> Tensor:
    """Cross entropy on the smallest patch's area (ignore index 255), minus the optional entropy
    bonus on F's weights; raises ``TrainingDiverged`` naming the step and slides on NaN/inf."""
    tc = cfg.training
    class_w = torch.tensor(tc.class_weights, device=logits.device) if tc.class_weights else None
    loss = F.cross_entropy(logits.float(), label, weight=class_w, ignore_index=IGNORE_INDEX)
    ew = entropy_weight(cfg, step, total_steps) if is_learned(cfg.model.mix.mode) else 0.0
    if ew:
        loss = loss - ew * weight_entropy(w).mean()
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged at step {step}: loss is {loss.item()} "
            f"(slides {sorted(set(slide_ids))}); lower the learning rates or check the inputs"
        )
    return loss


def batch_forward(
    model, batch: dict, cfg: Config, step: int, total_steps: int, device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, logits, w, h) of one training batch. ``model`` is an engine (whose forward applies
    the autocast) or the plain module."""
    module = getattr(model, "module", model)
    bank = batch["bank"].to(device, non_blocking=True)
    xr = batch["xr"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True).long()
    w = module.location_weights(xr)
    warm = warmup_mode(cfg, step, total_steps)
    logits, h = model(bank, w, mix_context(cfg, step, total_steps), warm)
    loss = segmentation_loss(logits, label, w, cfg, step, batch.get("slide_id", []), total_steps)
    tc = cfg.training
    fov_losses = None
    learned = is_learned(cfg.model.mix.mode)  # the recipe's levers never touch a baseline
    if tc.every_fov_weight and learned and warm is None:  # the warm-up trains on its mix alone
        fov_losses = per_fov_losses(model, bank, label, w.detach())
        loss = loss + tc.every_fov_weight * fov_losses.mean()
    # The target applies during the warm-up too: the segmenter then sees every FoV alike, so it
    # is not yet biased towards F's own choices (docs/method.md#scale-target).
    if tc.scale_target_weight and learned:
        if fov_losses is None:
            with torch.no_grad():
                fov_losses = per_fov_losses(model, bank, label, w.detach())
        q = scale_target(fov_losses, cfg)
        loss = loss - tc.scale_target_weight * (q * w.clamp_min(1e-12).log()).sum(1).mean()
    return loss, logits, w, h


@dataclass
class StepResult:
    loss: Tensor  # detached, still on the device (reading it syncs)
    w: Tensor  # F's weights [N, D] at the step's locations, detached
    h: Tensor  # the mixing coefficients used [N, D], detached


def train_step(engine, batch: dict, cfg: Config, step: int, total_steps: int, device) -> StepResult:
    """Forward, backward, clipping, optimiser and scheduler step: one optimizer step."""
    engine.train()
    loss, _, w, h = batch_forward(engine, batch, cfg, step, total_steps, device)
    engine.backward(loss)
    engine.step()
    return StepResult(loss.detach(), w.detach(), h.detach())
