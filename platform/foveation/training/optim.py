"""The paper's optimiser: Adam with per-module learning rates (encoder, decoder, foveation
net), weight decay on conv / linear weights only, and poly decay (1 - it / max) ** 0.9."""

from __future__ import annotations

import torch
from torch import nn

from foveation.config import TrainingConfig
from foveation.models.foveated import FoveatedSegmenter
from foveation.training.speed import adam_options


def param_groups(model: FoveatedSegmenter, cfg: TrainingConfig) -> list[dict]:
    segmenters = model.segmenters()
    modules = {
        "encoder": (nn.ModuleList([s.encoder for s in segmenters]), cfg.lr_encoder),
        "decoder": (nn.ModuleList([s.decoder for s in segmenters]), cfg.lr_decoder),
        "fovnet": (model.fovnet, cfg.lr_fovnet),
    }
    groups = []
    for name, (module, lr) in modules.items():
        decay, no_decay = [], []
        for sub in module.modules():
            for pname, p in sub.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_weight = pname == "weight" and isinstance(sub, nn.Conv2d | nn.Linear)
                (decay if is_weight else no_decay).append(p)
        groups.append(
            {"name": f"{name}", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay}
        )
        groups.append(
            {"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
        )
    return [g for g in groups if g["params"]]


def build_optimizer(model: FoveatedSegmenter, cfg: TrainingConfig, total_steps: int):
    opt = torch.optim.Adam(
        param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), **adam_options(cfg)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_decay(total_steps, cfg.poly_power))
    return opt, sched


def poly_decay(total_steps: int, power: float):
    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max(1, total_steps)) ** power

    return factor
