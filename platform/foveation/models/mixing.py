"""Mix modes as data (docs/method.md, "Mix modes"): each maps F's weights w [N, D] to the
weights h [N, D] actually used to mix the bank, x = sum_d h_d x_d (eq. 1).

``MIXERS`` pairs each mode of the config's table (``foveation.config.MIX_MODES``: whether F's
weights decide the mix, ``learned``, or it is a fixed baseline; whether it takes a patch index,
``indexed``) with its function: callers read those properties instead of lists of names of
their own. The table lives with the config, which checks ``model.mix.mode`` when it loads and
imports no model code; adding a mode is one entry there and one function here (``_FUNCTIONS``),
and importing this module fails if the two disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from foveation.config import MIX_MODES, ConfigError, MixConfig, MixMode


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
    """Eq. 1: the softmax weights themselves; the gradient reaches F only through them. With
    ``argmax_at_eval``, the one-hot of argmax w outside training."""
    if ctx.cfg.argmax_at_eval and not ctx.training:
        return _onehot_argmax(w)
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


@dataclass(frozen=True)
class MixerSpec:
    """A registered mix mode: its function and the properties callers read (the config's)."""

    fn: Mixer
    """(w [N, D], context) -> h [N, D]."""
    mode: MixMode
    """The mode's entry of ``foveation.config.MIX_MODES``."""

    @property
    def learned(self) -> bool:
        """``MixMode.learned``: F's weights decide the mix."""
        return self.mode.learned

    @property
    def indexed(self) -> bool:
        """``MixMode.indexed``: takes ``model.mix.index``."""
        return self.mode.indexed

    def __call__(self, w: Tensor, ctx: MixContext) -> Tensor:
        return self.fn(w, ctx)


_FUNCTIONS: dict[str, Mixer] = {
    "soft": soft,
    "hard": hard,
    "gumbel": gumbel,
    "onehot": onehot,
    "random": random,
    "average": average,
}
if set(_FUNCTIONS) != set(MIX_MODES):  # a mode without a function, or a function without a mode
    raise ImportError(
        f"models.mixing: the mixers {sorted(_FUNCTIONS)} are not the config's mix modes "
        f"{sorted(MIX_MODES)} (foveation.config.MIX_MODES)"
    )

MIXERS: dict[str, MixerSpec] = {
    name: MixerSpec(_FUNCTIONS[name], m) for name, m in MIX_MODES.items()
}
"""Every mix mode with its function, in the order of ``MIX_MODES``."""


def fixed_mixes() -> tuple[str, ...]:
    """The baseline modes that ignore F ("onehot", "random", "average"), in registry order."""
    return tuple(name for name, spec in MIXERS.items() if not spec.learned)


def mixer(mode: str) -> MixerSpec:
    """The registered mixer of ``mode``; a ConfigError naming ``model.mix.mode`` if none."""
    try:
        return MIXERS[mode]
    except KeyError:
        raise ConfigError(
            f"model.mix.mode: unknown mix mode {mode!r}; known: {sorted(MIXERS)}"
        ) from None


def split_label(label: str) -> tuple[str, int | None]:
    """The mode and index of a run label (the inverse of ``MixConfig.label``): "onehot-2" ->
    ("onehot", 2), "soft" -> ("soft", None). A label that is no "<indexed mode>-<N>" comes back
    whole as the mode."""
    mode, sep, index = label.rpartition("-")
    if sep and index.isdigit() and mode in MIXERS and MIXERS[mode].indexed:
        return mode, int(index)
    return label, None


def is_learned(label: str | None) -> bool:
    """Whether a mode or run label ("soft", "onehot-2"...) names a learned mix; False for an
    unknown one or None."""
    if label is None:
        return False
    spec = MIXERS.get(split_label(label)[0])
    return spec is not None and spec.learned


def mix(bank: Tensor, h: Tensor) -> Tensor:
    """x [N, C, P, P] = sum_d h[n, d] bank[n, d] in one einsum (bank float)."""
    return torch.einsum("nd,ndchw->nchw", h.to(bank.dtype), bank)
