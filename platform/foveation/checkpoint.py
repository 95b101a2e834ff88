"""Checkpoints in the directory format of docs/contracts.md#checkpoint:

    <dir>/model.safetensors   fp32 weights of the whole foveated segmenter
    <dir>/config.toml         the full config that built it
    <dir>/meta.json           step, epoch, metrics, versions
    <dir>/deepspeed/          optimiser state (written by distributed training only)

Evaluation and serving load only the safetensors file and the config: no file is unpickled.
A checkpoint appears whole or not at all (``storage.local_staging_dir``).
"""

from __future__ import annotations

import json
import os
import platform as _stdlib_platform
import tempfile

import torch
from safetensors.torch import load_file, save_file

from foveation import __version__
from foveation.config import Config, ConfigError, config_from_dict
from foveation.errors import InputError
from foveation.io import storage
from foveation.models.foveated import FoveatedSegmenter

WEIGHTS, CONFIG, META = "model.safetensors", "config.toml", "meta.json"


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or does not fit: names it and what was expected."""


def save_checkpoint(
    uri: str, model: FoveatedSegmenter, cfg: Config, meta: dict | None = None
) -> str:
    """Write the checkpoint at ``uri`` whole or not at all."""
    with storage.local_staging_dir(uri) as tmp:
        write_files(tmp, model, cfg, meta)
    return uri


def write_files(
    directory: str, model: FoveatedSegmenter, cfg: Config, meta: dict | None = None
) -> None:
    """The weights, config and metadata into an existing local directory (which may hold other
    files, e.g. a Ray Train checkpoint's ``deepspeed/``)."""
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }
    state |= {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not v.is_floating_point()
    }
    meta = dict(meta or {})
    meta.setdefault(
        "versions",
        {
            "foveation": __version__,
            "torch": torch.__version__,
            "python": _stdlib_platform.python_version(),
        },
    )
    save_file(state, os.path.join(directory, WEIGHTS))
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(cfg.to_toml())
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1)


def read_config(uri: str) -> Config:
    """The config a checkpoint directory was built from, without loading its weights."""
    return _config_at(storage.committed(uri), uri)


def _config_at(base: str, uri: str) -> Config:
    """The config in the checkpoint files at ``base`` (``uri`` resolved), named by ``uri``."""
    import tomllib

    try:
        text = storage.read_bytes(storage.join(base, CONFIG)).decode()
    except storage.StorageError as exc:
        raise CheckpointError(
            f"checkpoint {uri!r}: incomplete or missing ({exc}); expected {CONFIG}"
        ) from None
    try:
        return config_from_dict(tomllib.loads(text))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"checkpoint {uri!r}: bad {CONFIG}: {exc}") from None


def load_checkpoint(
    uri: str, device: str | torch.device = "cpu"
) -> tuple[FoveatedSegmenter, Config, dict]:
    """(model in eval mode, its config, its metadata) from a checkpoint directory (local or S3)."""
    base = storage.committed(uri)  # the whole checkpoint last written there (S3: versioned)
    try:
        weights = storage.read_bytes(storage.join(base, WEIGHTS))
    except storage.StorageError as exc:
        raise CheckpointError(
            f"checkpoint {uri!r}: incomplete or missing ({exc}); expected {WEIGHTS} and {CONFIG}"
        ) from None
    # The same version as the weights: resolving the pointer again could see a newer commit.
    cfg = _config_at(base, uri)
    # Pretrained weights are already inside the checkpoint; never require the file again.
    cfg = _without_pretrained(cfg)
    meta_uri = storage.join(base, META)
    meta = json.loads(storage.read_bytes(meta_uri)) if storage.exists(meta_uri) else {}
    model = FoveatedSegmenter(cfg)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(weights)
        f.flush()
        try:
            state = load_file(f.name)
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {uri!r}: {WEIGHTS} is not a readable safetensors file ({exc})"
            ) from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {uri!r}: weights do not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, meta


def _without_pretrained(cfg: Config) -> Config:
    import dataclasses

    if cfg.model.pretrained is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
