"""ImageNet initialisation of a backbone from a local file (no downloads on these machines).

Accepts timm's format (a state dict of the timm model, ``.safetensors`` or ``.pth``) and the
HRNet authors' ImageNet checkpoints (``hrnetv2_w48_imagenet_pretrained.pth``: the same module
names as timm's HRNet, possibly wrapped in ``state_dict``/``model`` and prefixed ``module.``).
Classification-head keys are dropped. ``.pth`` files load with ``weights_only=True``: nothing
in a user's file is ever unpickled beyond tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from foveation.errors import InputError

_WRAPPERS = ("state_dict", "model", "model_state", "net")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


class PretrainedMismatch(InputError):
    """``model.pretrained`` cannot be read, or does not fit the backbone: says which."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weight file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files...
            raise PretrainedMismatch(
                f"model.pretrained: cannot read {str(path)!r} as a tensor checkpoint: {exc}"
            ) from None
    for key in _WRAPPERS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise PretrainedMismatch(f"model.pretrained: {str(path)!r} does not hold a state dict")
    return sd


def map_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_pretrained(encoder: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into ``encoder``; every encoder tensor must be found, same shape."""
    sd = map_keys(read_state_dict(path))
    own = encoder.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or wrong:
        raise PretrainedMismatch(
            f"model.pretrained: {str(path)!r} does not match the backbone "
            f"({len(missing)} missing, {len(wrong)} of wrong shape; first: {(missing + wrong)[:3]})"
        )
    encoder.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
