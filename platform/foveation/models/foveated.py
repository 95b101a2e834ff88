"""The foveated segmenter: F weighs the D patches of each location, a mixer turns the weights
into mixing coefficients, the segmenter segments the mix (eq. 1). Single device.

With ``model.segmenters = "per_fov"`` the coefficients mix outputs instead of inputs: D
segmenters each read one patch, and the model's output is the log of sum_d h_d softmax(s_d(x_d))
(docs/method.md#per-fov-segmenters). Callers see the same contract either way: "logits" whose
softmax is the class probability, so losses, argmax and tile blending need no branch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from foveation.config import Config, ConfigError, MixConfig, in_file
from foveation.geometry import IGNORE_INDEX, OUTPUT_STRIDE
from foveation.models.fovnet import FoveationNet
from foveation.models.mixing import MIXERS, MixContext, mix
from foveation.models.pretrained import load_pretrained
from foveation.models.segmenter import BACKBONES, Segmenter, known_backbone
from foveation.patches import normalise


def _log(prob: Tensor) -> Tensor:
    """log of class probabilities, floored so that a zero (a class no segmenter gives) stays
    finite in the loss."""
    return prob.clamp_min(1e-12).log()


def log_mixture(h: Tensor, probs: Tensor) -> Tensor:
    """log sum_d h_d probs_d [N, K, ...] from coefficients h [N, D] and per-FoV class
    probabilities probs [N, D, K, ...]: the per-FoV segmenters' output, from outputs already
    computed (the training step's own loss)."""
    return _log(torch.einsum("nd,ndk...->nk...", h.float(), probs))


class FoveatedSegmenter(nn.Module):
    output_stride = OUTPUT_STRIDE

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.mean, self.std = m.mean, m.std
        self.mix_cfg = m.mix
        self.register_buffer(
            "fovs", torch.tensor(cfg.patches.fovs, dtype=torch.float32), persistent=False
        )
        self.fovnet = FoveationNet(cfg.patches.depth, m.fovnet_width)
        self.layout = m.layout
        built = [
            Segmenter(m.backbone, m.num_classes, m.head_channels)
            for _ in range(self.layout.count(cfg.patches.depth))
        ]
        # The weights' names stay those of checkpoints: "segmenter.*", or "experts.<d>.*".
        self.segmenter: Segmenter | None = None if self.layout.per_fov else built[0]
        self.experts: nn.ModuleList | None = nn.ModuleList(built) if self.layout.per_fov else None

    def segmenters(self) -> list[Segmenter]:
        """The segmenter, or the D per-FoV ones (for optimiser groups and weight loading)."""
        return list(self.experts) if self.layout.per_fov else [self.segmenter]

    def weights(self, xr: Tensor) -> Tensor:
        """F's softmax weights [B, D, h, w] from x_r zero-padded by 3 [B, 3, h + 6, w + 6]."""
        return self.fovnet(xr)

    def location_weights(self, xr_neighbourhoods: Tensor) -> Tensor:
        """F's weights [N, D] at the centres of the training batch's 7x7 x_r neighbourhoods."""
        return self.fovnet(xr_neighbourhoods)[:, :, 0, 0]

    def mixing(
        self, w: Tensor, ctx: MixContext | None = None, mode: MixConfig | None = None
    ) -> Tensor:
        """Mixing coefficients h [N, D] from F's weights w [N, D] under the configured mix mode
        (or ``mode``, e.g. the Average mix during a uniform warm-up)."""
        mcfg = mode or self.mix_cfg
        ctx = ctx or MixContext(mcfg, training=self.training)
        if ctx.cfg is not mcfg:
            ctx = MixContext(mcfg, ctx.step, ctx.total_steps, ctx.training)
        return MIXERS[mcfg.mode](w, ctx)

    def forward(
        self,
        bank: Tensor,
        w: Tensor,
        ctx: MixContext | None = None,
        mode: MixConfig | None = None,
        per_fov: bool = False,
    ):
        """Logits [N, K, P/4, P/4] for banks [N, D, 3, P, P] (uint8 or float in 0..255) and F's
        weights w [N, D]; also returns the mixing coefficients h [N, D] used. ``per_fov`` (per-FoV
        segmenters only): each segmenter's own logits [N, D, K, P/4, P/4] instead, unmixed, so
        a training step can give each its own loss; a keyword rather than a method so it goes
        through the engine's forward (and its autocast)."""
        h = self.mixing(w, ctx, mode)
        if per_fov:
            if not self.layout.per_fov:
                raise ValueError("per_fov=True needs model.segmenters = 'per_fov'")
            return torch.stack(
                [self._expert(d, bank[:, d]) for d in range(len(self.experts))], 1
            ), h
        if self.layout.per_fov:
            return self._mix_outputs(bank, h), h
        x = normalise(mix(bank.to(torch.float32), h), self.mean, self.std)
        return self.segmenter(x), h

    def _mix_outputs(self, bank: Tensor, h: Tensor) -> Tensor:
        """log sum_d h_d softmax(s_d(x_d)) [N, K, P/4, P/4]. Where h carries no gradient
        (evaluation, one-hot and Random mixes, the every-FoV loss), segmenter d runs only on the
        locations with h_d != 0, so a hard choice costs one segmenter per location, not D."""
        grad = torch.is_grad_enabled() and h.requires_grad
        prob = None
        for d in range(len(self.experts)):
            hd = h[:, d].float()
            rows = None
            if not grad:
                active = hd != 0
                if not bool(active.any()):
                    continue
                if not bool(active.all()):
                    rows = active.nonzero().squeeze(1)
            p = torch.softmax(self._expert(d, bank[:, d] if rows is None else bank[rows, d]), 1)
            weight = (hd if rows is None else hd[rows])[:, None, None, None]
            if prob is None:
                prob = torch.zeros((bank.shape[0], *p.shape[1:]), device=p.device)
            prob = prob + weight * p if rows is None else prob.index_add(0, rows, weight * p)
        return _log(prob)

    def _expert(self, d: int, x: Tensor) -> Tensor:
        """Segmenter d's logits (float32) for patches x [N, 3, P, P] in 0..255."""
        return self.experts[d](normalise(x.to(torch.float32), self.mean, self.std)).float()

    def apsm(self, w: Tensor) -> Tensor:
        """Average Patch Size Map: the expected FoV (px) per location, sum_d w_d F_d; w [B, D, h, w]."""
        return torch.einsum("bdhw,d->bhw", w, self.fovs.to(w.dtype))


def check_config(cfg: Config, source: str | Path | None = None) -> None:
    """The checks of a config that need the models: its backbone is known (timm's registry),
    ``patches.patch_size`` is a multiple of the segmenter's output stride, and
    ``evaluation.ignore_index`` is the label value the data and the loss skip
    (``geometry.IGNORE_INDEX``). ``foveation.config`` validates everything else when it loads (its mix mode among them:
    ``config.MIX_MODES``), without importing the models (docs/contracts.md); this runs when a
    model is built. Raises ConfigError naming the field, and the file when ``source`` is
    given."""
    try:
        if not known_backbone(cfg.model.backbone):
            raise ConfigError(
                f"model.backbone: unknown backbone {cfg.model.backbone!r}; known: "
                f"{sorted(BACKBONES)} or 'timm:<name>'"
            )
        if cfg.patches.patch_size % OUTPUT_STRIDE:
            raise ConfigError(
                f"patches.patch_size: must be a multiple of the segmenter's output stride "
                f"{OUTPUT_STRIDE}, got {cfg.patches.patch_size}"
            )
        if cfg.evaluation.ignore_index != IGNORE_INDEX:
            raise ConfigError(
                f"evaluation.ignore_index: must be {IGNORE_INDEX}, the label of unlabelled pixels "
                f"that ingest writes and the loss skips, got {cfg.evaluation.ignore_index} (leave "
                "it out: it is no longer a setting)"
            )
    except ConfigError as exc:
        if source is None:
            raise
        raise in_file(exc, source) from None


def build_model(cfg: Config) -> FoveatedSegmenter:
    """A randomly initialised model, with ImageNet backbone weights when the config names a
    file; the config is checked against the models first (:func:`check_config`)."""
    check_config(cfg)
    model = FoveatedSegmenter(cfg)
    if cfg.model.pretrained:
        for segmenter in model.segmenters():
            load_pretrained(segmenter.encoder, cfg.model.pretrained)
    return model
