"""One single-device training step over a batch of images (REFERENCE.md, "Training").

F runs once per image on the whole x_r; every sampled location of every image in the batch is
extracted, mixed and segmented in one forward, with one backward (the authors' accumulation
across location mini-batches double-counted the last one and mixed images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import Config, MixConfig
from foveation.images import as_rgb_uint8, to_chw_tensor
from foveation.models.foveated import FoveatedSegmenter
from foveation.models.mixing import MixContext
from foveation.patches import IGNORE_INDEX, PatchExtractor, make_xr, pad_xr, xr_shape


class TrainingDiverged(RuntimeError):
    """The loss (or an input) became NaN or infinite; names the step."""


@dataclass
class PreparedImage:
    """Everything a step needs of one image, made once per image: the patch extractor (padded
    canvas, per-FoV levels, label level) and the padded x_r."""

    slide_id: str
    extractor: PatchExtractor
    xr: Tensor  # [3, h + 6, w + 6], normalised, zero-padded by F's context
    xr_size: tuple[int, int]


def prepare_image(slide_id: str, image, label, cfg: Config) -> PreparedImage:
    img = to_chw_tensor(as_rgb_uint8(image, f"image {slide_id!r}"))
    lab = torch.from_numpy(np.ascontiguousarray(label)).to(torch.uint8)
    if tuple(lab.shape) != tuple(img.shape[1:]):
        raise ValueError(
            f"label of {slide_id!r}: shape {tuple(lab.shape)} differs from the image's {tuple(img.shape[1:])}"
        )
    ex = PatchExtractor.from_image(
        img,
        cfg.patches,
        cfg.model.pad_value,
        lab,
        cfg.model.num_classes,
        FoveatedSegmenter.output_stride,
    )
    xr = pad_xr(make_xr(img, cfg.patches.xr_scale, cfg.model.mean, cfg.model.std))
    return PreparedImage(
        slide_id, ex, xr, xr_shape(img.shape[1], img.shape[2], cfg.patches.xr_scale)
    )


@dataclass
class StepResult:
    loss: float
    weight_mean: list[float]  # mean of F's weights per scale over the step's locations
    mix_mean: list[float]  # mean of the mixing coefficients actually used
    locations: int


def sample_locations(size: tuple[int, int], n: int, gen: torch.Generator) -> Tensor:
    """n distinct x_r locations [n, 2] (all of them when the image has fewer)."""
    h, w = size
    idx = torch.randperm(h * w, generator=gen)[: min(n, h * w)]
    return torch.stack([idx // w, idx % w], dim=1)


def mix_context(cfg: Config, step: int, total_steps: int) -> MixContext:
    return MixContext(cfg.model.mix, step, total_steps, training=True)


def warmup_mode(cfg: Config, step: int, total_steps: int) -> MixConfig | None:
    """The Average mix during the uniform warm-up (REFERENCE.md, collapse), else None."""
    warm = step < int(cfg.training.uniform_warmup_fraction * total_steps)
    return MixConfig("average") if warm else None


def segmentation_loss(
    logits: Tensor, label: Tensor, w: Tensor, cfg: Config, step: int, slide_ids
) -> Tensor:
    """Cross entropy on the smallest patch's area (ignore index 255), minus the optional entropy
    bonus on F's weights; raises ``TrainingDiverged`` naming the step and slides on NaN/inf."""
    tc = cfg.training
    class_w = torch.tensor(tc.class_weights, device=logits.device) if tc.class_weights else None
    loss = F.cross_entropy(logits.float(), label, weight=class_w, ignore_index=IGNORE_INDEX)
    if tc.entropy_weight:
        entropy = -(w * w.clamp_min(1e-12).log()).sum(1).mean()
        loss = loss - tc.entropy_weight * entropy
    if not torch.isfinite(loss):
        raise TrainingDiverged(
            f"training diverged at step {step}: loss is {loss.item()} "
            f"(slides {sorted(set(slide_ids))}); lower the learning rates or check the inputs"
        )
    return loss


def batch_forward(
    model: FoveatedSegmenter, batch: dict, cfg: Config, step: int, total_steps: int, device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, logits, w, h) of one DESIGN.md training batch (bank, xr, label) from the Ray Data
    pipeline: F on each location's 7x7 x_r neighbourhood, the mix, the segmenter. ``model`` is
    the plain module or a DeepSpeed engine (whose forward applies its own autocast)."""
    module = getattr(model, "module", model)
    bank = batch["bank"].to(device, non_blocking=True)
    xr = batch["xr"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True).long()
    w = module.location_weights(xr)
    logits, h = model(
        bank, w, mix_context(cfg, step, total_steps), warmup_mode(cfg, step, total_steps)
    )
    loss = segmentation_loss(logits, label, w, cfg, step, batch.get("slide_id", []))
    return loss, logits, w, h


def train_step(
    model: FoveatedSegmenter,
    optimizer: torch.optim.Optimizer,
    scheduler,
    images: list[PreparedImage],
    cfg: Config,
    step: int,
    total_steps: int,
    gen: torch.Generator,
    device: torch.device,
) -> StepResult:
    tc = cfg.training
    model.train()
    banks, labels, weights = [], [], []
    for im in images:
        locs = sample_locations(im.xr_size, tc.locations_per_image, gen)
        w_map = model.weights(im.xr[None].to(device))[0]  # F once per image: [D, h, w]
        weights.append(w_map[:, locs[:, 0].to(device), locs[:, 1].to(device)].T)
        with torch.no_grad():
            banks.append(im.extractor.bank(locs))
            labels.append(im.extractor.labels(locs))
    bank = torch.cat(banks).to(device, non_blocking=True)
    label = torch.cat(labels).to(device, non_blocking=True).long()
    w = torch.cat(weights)

    if tc.precision == "fp16":
        raise ValueError(
            "training.precision 'fp16' runs only through DeepSpeed on GPUs (jobs.train); "
            "the single-device loop takes 'fp32' or 'bf16'"
        )
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
        logits, h = model(
            bank, w, mix_context(cfg, step, total_steps), mode=warmup_mode(cfg, step, total_steps)
        )
    loss = segmentation_loss(logits, label, w, cfg, step, [im.slide_id for im in images])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    scheduler.step()
    return StepResult(
        float(loss.detach()),
        w.detach().mean(0).cpu().tolist(),
        h.detach().mean(0).cpu().tolist(),
        int(bank.shape[0]),
    )
