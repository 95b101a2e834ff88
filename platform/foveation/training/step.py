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
from foveation.errors import FoveationError
from foveation.geometry import IGNORE_INDEX
from foveation.models.foveated import log_mixture
from foveation.models.mixing import MixContext, is_learned


class TrainingDiverged(FoveationError, RuntimeError):
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
    per_fov = [
        model(bank, w, None, MixConfig("onehot", index=d))[0].float() for d in range(w.shape[1])
    ]
    return per_location_losses(torch.stack(per_fov, 1), label)


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
    """Cross entropy on the smallest patch's area (``IGNORE_INDEX`` pixels skipped: the one
    constant, which ``evaluation.ignore_index`` must equal), minus the optional entropy
    bonus on F's weights; raises ``TrainingDiverged`` naming the step and slides on NaN/inf."""
    tc = cfg.training
    class_w = torch.tensor(tc.class_weights, device=logits.device) if tc.class_weights else None
    loss = F.cross_entropy(logits.float(), label, weight=class_w, ignore_index=IGNORE_INDEX)
    ew = entropy_weight(cfg, step, total_steps) if is_learned(cfg.model.mix.mode) else 0.0
    if ew:
        loss = loss - ew * weight_entropy(w).mean()
    return check_finite(loss, step, slide_ids)


def check_finite(loss: Tensor, step: int, slide_ids, what: str = "loss") -> Tensor:
    """``loss``, or ``TrainingDiverged`` naming the step and slides if it is NaN or infinite."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged at step {step}: {what} is {loss.item()} "
            f"(slides {sorted(set(slide_ids))}); lower the learning rates or check the inputs"
        )
    return loss


def per_location_losses(logits: Tensor, label: Tensor) -> Tensor:
    """[N, D]: each location's mean cross entropy under each of D per-FoV logits
    [N, D, K, h, w] (``IGNORE_INDEX`` pixels skipped)."""
    valid = (label != IGNORE_INDEX).float()
    count = valid.sum((1, 2)).clamp_min(1.0)
    ce = torch.stack(
        [
            F.cross_entropy(logits[:, d], label, ignore_index=IGNORE_INDEX, reduction="none")
            for d in range(logits.shape[1])
        ],
        1,
    )
    return (ce * valid[:, None]).sum((2, 3)) / count[:, None]


def own_fov_forward(model, bank, label, w, cfg, step, total_steps, warm, slide_ids):
    """(loss, logits, h) of ``training.per_fov_loss = "own"``: each FoV's segmenter learns from
    its own patch alone (the sum over FoVs of their mean cross entropies: each gets the gradient
    its one-hot baseline would), and F learns from the mixture log sum_d h_d p_d with the
    segmenters' probabilities p_d held fixed, which pulls w towards each location's posterior
    h_d p_d(y) / sum_e h_e p_e(y) over FoVs (docs/method.md#per-fov-segmenters)."""
    per_fov, h = model(bank, w, mix_context(cfg, step, total_steps), warm, per_fov=True)
    own = per_location_losses(per_fov, label)
    logits = log_mixture(h, torch.softmax(per_fov.detach(), 2))
    loss = segmentation_loss(logits, label, w, cfg, step, slide_ids, total_steps)
    own_loss = check_finite(own.mean(0).sum(), step, slide_ids, "the per-FoV segmenters' loss")
    return loss + own_loss, logits, h, own


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
    tc = cfg.training
    learned = is_learned(cfg.model.mix.mode)  # the recipe's levers never touch a baseline
    slide_ids = batch.get("slide_id", [])
    fov_losses = None
    if learned and tc.per_fov_loss == "own" and module.layout.own_loss:
        loss, logits, h, fov_losses = own_fov_forward(
            model, bank, label, w, cfg, step, total_steps, warm, slide_ids
        )
    else:
        logits, h = model(bank, w, mix_context(cfg, step, total_steps), warm)
        loss = segmentation_loss(logits, label, w, cfg, step, slide_ids, total_steps)
    # The warm-up trains on its mix alone; "own" already gave each FoV its loss.
    if tc.every_fov_weight and learned and warm is None and fov_losses is None:
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
