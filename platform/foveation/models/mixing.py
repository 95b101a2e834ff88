"""Mix modes as data (REFERENCE.md, "Mix modes"): each maps F's weights w [N, D] to the
weights h [N, D] actually used to mix the bank, x = sum_d h_d x_d (eq. 1). Adding a mode is
adding one function to ``MIXERS``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import MixConfig


@dataclass(frozen=True)
class MixContext:
    """What a mixer may depend on besides w: the config, the step, and train/eval."""

    cfg: MixConfig
    step: int = 0
    total_steps: int = 1
    training: bool = False


def _onehot_argmax(w: Tensor) -> Tensor:
    return F.one_hot(w.argmax(dim=1), w.shape[1]).to(w.dtype)


def soft(w: Tensor, ctx: MixContext) -> Tensor:
    """Eq. 1: the softmax weights themselves; the gradient reaches F only through them."""
    return w


def hard(w: Tensor, ctx: MixContext) -> Tensor:
    """One-hot of argmax in the forward pass, a straight-through gradient in the backward."""
    onehot = _onehot_argmax(w)
    if ctx.cfg.straight_through == "inverse":  # the authors' default 'st_inv': gradient / w
        logw = w.clamp_min(1e-12).log()
        return onehot + logw - logw.detach()
    return onehot + w - w.detach()


def gumbel(w: Tensor, ctx: MixContext) -> Tensor:
    """Gumbel-softmax on log w with tau = max(tau_min, exp(-step / total)); argmax at eval,
    so evaluation is deterministic (the authors sample at inference too)."""
    if not ctx.training:
        return _onehot_argmax(w) if ctx.cfg.gumbel_hard else w
    tau = max(ctx.cfg.tau_min, math.exp(-ctx.step / max(1, ctx.total_steps)))
    return F.gumbel_softmax(w.clamp_min(1e-12).log(), tau=tau, hard=ctx.cfg.gumbel_hard, dim=1)


def onehot(w: Tensor, ctx: MixContext) -> Tensor:
    """A fixed choice: patch ``index`` everywhere (the one-hot baselines)."""
    out = torch.zeros_like(w)
    out[:, ctx.cfg.index] = 1
    return out


def average(w: Tensor, ctx: MixContext) -> Tensor:
    """The Average baseline: 1/D each."""
    return torch.full_like(w, 1.0 / w.shape[1])


def random(w: Tensor, ctx: MixContext) -> Tensor:
    """The Random baseline: a fresh uniform one-hot per location and per call (the authors'
    froze it after the first forward)."""
    idx = torch.randint(0, w.shape[1], (w.shape[0],), device=w.device)
    return F.one_hot(idx, w.shape[1]).to(w.dtype)


Mixer = Callable[[Tensor, MixContext], Tensor]
MIXERS: dict[str, Mixer] = {
    "soft": soft,
    "hard": hard,
    "gumbel": gumbel,
    "onehot": onehot,
    "average": average,
    "random": random,
}


def mix(bank: Tensor, h: Tensor) -> Tensor:
    """x [N, C, P, P] = sum_d h[n, d] bank[n, d] in one einsum (bank float)."""
    return torch.einsum("nd,ndchw->nchw", h.to(bank.dtype), bank)
