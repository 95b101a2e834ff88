"""The segmenter: an HRNetV2 head on a timm features backbone, chosen by name from a registry.

HRNetV2 (docs/method.md#segmenter): every branch output upsampled bilinearly to the
stride-4 branch, concatenated (720 channels for W48, the paper's fc_dim), conv3x3 -> BN -> ReLU,
conv1x1 -> K classes. Output stride 4. Any timm model that has ``features_only`` and a
stride-4 feature works the same way (``"timm:<name>"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foveation.config import ConfigError
from foveation.geometry import OUTPUT_STRIDE


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    kwargs: dict = field(default_factory=dict)
    note: str = ""


_HRNET = {"feature_location": ""}  # HRNetV2's own branch outputs, not the classification head's
BACKBONES: dict[str, BackboneSpec] = {
    "hrnet_w48": BackboneSpec("hrnet_w48", _HRNET, "HRNetV2-W48, the paper's (66M with the head)"),
    "hrnet_w32": BackboneSpec("hrnet_w32", _HRNET),
    "hrnet_w18": BackboneSpec("hrnet_w18", _HRNET),
    "hrnet_w18_small_v2": BackboneSpec("hrnet_w18_small_v2", _HRNET),
    "hrnet_w18_small": BackboneSpec("hrnet_w18_small", _HRNET, "1.5M parameters, for CPU"),
}


def known_backbone(name: str) -> bool:
    if name in BACKBONES:
        return True
    if name.startswith("timm:"):
        import timm

        return timm.is_model(name.removeprefix("timm:"))
    return False


def create_backbone(name: str) -> nn.Module:
    import timm

    if name in BACKBONES:
        spec = BACKBONES[name]
        return timm.create_model(
            spec.timm_name, features_only=True, pretrained=False, **spec.kwargs
        )
    if name.startswith("timm:"):
        return timm.create_model(name.removeprefix("timm:"), features_only=True, pretrained=False)
    raise ConfigError(
        f"model.backbone: unknown backbone {name!r}; known: {sorted(BACKBONES)} or 'timm:<name>'"
    )


class Segmenter(nn.Module):
    """Backbone features at strides >= 4 -> HRNetV2 head -> logits at stride 4."""

    def __init__(self, backbone: str, num_classes: int, head_channels: int | None = None) -> None:
        super().__init__()
        self.encoder = create_backbone(backbone)
        info = self.encoder.feature_info
        reductions = info.reduction()
        self.use = [i for i, r in enumerate(reductions) if r >= OUTPUT_STRIDE]
        if not self.use or reductions[self.use[0]] != OUTPUT_STRIDE:
            raise ConfigError(
                f"model.backbone: {backbone!r} has no stride-{OUTPUT_STRIDE} feature (reductions {reductions})"
            )
        # HRNet's fuse layers upsample by exact factors of 2, so the input side must be a multiple
        # of the coarsest reduction (32); the paper's 1100 px patches are not. forward() pads.
        self.input_multiple = max(reductions)
        self.channels_last = False  # set with the weights' layout (training/speed.py)
        width = sum(info.channels()[i] for i in self.use)
        mid = head_channels or max(width // 4, num_classes)
        self.decoder = nn.Sequential(
            nn.Conv2d(width, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, K, H/4, W/4] for x [N, 3, H, W] (H, W multiples of 4). Inputs of other
        sizes are zero-padded (the mean colour after normalisation) on the bottom and right
        only, so output pixel (a, b) still sits over input pixels (4a, 4b), and cropped back."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        H, W = x.shape[-2:]
        m = self.input_multiple
        ph, pw = -H % m, -W % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        out = self._logits(x)
        return out[..., : H // OUTPUT_STRIDE, : W // OUTPUT_STRIDE] if ph or pw else out

    def _logits(self, x: Tensor) -> Tensor:
        feats = self.encoder(x)
        feats = [feats[i] for i in self.use]
        size = feats[0].shape[-2:]
        up = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
        ]
        return self.decoder(torch.cat(up, dim=1))
