"""The foveated segmenter: F weighs the D patches of each location, a mixer turns the weights
into mixing coefficients, the segmenter segments the mix (eq. 1). Single device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from foveation.config import Config, ConfigError, MixConfig, in_file
from foveation.models.fovnet import FoveationNet
from foveation.models.mixing import MIXERS, MixContext, mix, mixer
from foveation.models.pretrained import load_pretrained
from foveation.models.segmenter import BACKBONES, OUTPUT_STRIDE, Segmenter, known_backbone
from foveation.patches import normalise


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
        self.segmenter = Segmenter(m.backbone, m.num_classes, m.head_channels)

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
        self, bank: Tensor, w: Tensor, ctx: MixContext | None = None, mode: MixConfig | None = None
    ):
        """Logits [N, K, P/4, P/4] for banks [N, D, 3, P, P] (uint8 or float in 0..255) and F's
        weights w [N, D]; also returns the mixing coefficients h [N, D] used."""
        h = self.mixing(w, ctx, mode)
        x = normalise(mix(bank.to(torch.float32), h), self.mean, self.std)
        return self.segmenter(x), h

    def apsm(self, w: Tensor) -> Tensor:
        """Average Patch Size Map: the expected FoV (px) per location, sum_d w_d F_d; w [B, D, h, w]."""
        return torch.einsum("bdhw,d->bhw", w, self.fovs.to(w.dtype))


def check_config(cfg: Config, source: str | Path | None = None) -> None:
    """The checks of a config that need the models: its mix mode is registered
    (``models.mixing.MIXERS``), its backbone is known, and ``patches.patch_size`` is a multiple
    of the segmenter's output stride. ``foveation.config`` validates everything else when it
    loads, without importing the models (docs/contracts.md); this runs when a model is built.
    Raises ConfigError naming the field, and the file when ``source`` is given."""
    try:
        mixer(cfg.model.mix.mode)
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
        load_pretrained(model.segmenter.encoder, cfg.model.pretrained)
    return model
