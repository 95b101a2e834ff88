"""The single-device training loop over an in-memory image set (the embedded default before
the Ray pipeline takes over): epochs of shuffled image batches, one ``train_step`` each, a
validation pass per epoch, the mean foveation weight per scale logged (collapse watch)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from foveation.config import Config
from foveation.data.toy import Sample
from foveation.evaluation import evaluate
from foveation.models.foveated import FoveatedSegmenter, build_model
from foveation.training.optim import build_optimizer
from foveation.training.step import prepare_image, train_step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"training.device is {name!r} but no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)


@dataclass
class EpochLog:
    epoch: int
    step: int
    loss: float
    weight_mean: list[float]
    val: dict | None
    seconds: float


@dataclass
class TrainResult:
    model: FoveatedSegmenter
    epochs: list[EpochLog] = field(default_factory=list)
    apsm_history: list = field(
        default_factory=list
    )  # APSM of the first val image per epoch (Fig. 4)


def train(
    cfg: Config,
    train_samples: list[Sample],
    val_samples: list[Sample] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    tc = cfg.training
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    prepared = [prepare_image(s.slide_id, s.image, s.label, cfg) for s in train_samples]
    steps_per_epoch = math.ceil(len(prepared) / tc.batch_size)
    total = tc.epochs * steps_per_epoch
    model = build_model(cfg).to(device)
    opt, sched = build_optimizer(model, tc, total)
    result = TrainResult(model)
    step = 0
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(prepared), generator=gen).tolist()
        losses, wmeans = [], []
        for b in range(steps_per_epoch):
            batch = [prepared[i] for i in order[b * tc.batch_size : (b + 1) * tc.batch_size]]
            res = train_step(model, opt, sched, batch, cfg, step, total, gen, device)
            losses.append(res.loss)
            wmeans.append(res.weight_mean)
            step += 1
        val = None
        if val_samples:
            val = evaluate(model, val_samples, cfg, device=device, keep_outputs=1)
            result.apsm_history.append(val["outputs"][0]["apsm"])
            val = {k: v for k, v in val.items() if k != "outputs"}
        wm = torch.tensor(wmeans).mean(0).tolist()
        entry = EpochLog(epoch, step, sum(losses) / len(losses), wm, val, time.perf_counter() - t0)
        result.epochs.append(entry)
        vtxt = f" val mIoU {val['miou']:.3f}" if val else ""
        log(
            f"epoch {epoch + 1}/{tc.epochs} step {step} loss {entry.loss:.4f}{vtxt} "
            f"mean weight per FoV {[round(x, 3) for x in wm]} ({entry.seconds:.1f}s)"
        )
    return result
