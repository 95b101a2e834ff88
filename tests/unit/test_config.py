import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from foveation.config import (
    Config,
    ConfigError,
    MixConfig,
    PatchSetConfig,
    config_from_dict,
    load_config,
)
from foveation.models.foveated import build_model, check_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.toml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"debug.toml", "paper.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    check_config(cfg, path)  # and passes the models' checks
    # and survives a round trip through TOML (checkpoints store it that way)
    import tomllib

    assert config_from_dict(tomllib.loads(cfg.to_toml())) == cfg


def test_paper_config_is_the_papers():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("paper.toml")])
    assert cfg.patches.fovs == (1100, 2000, 2900, 3800, 4400)
    assert cfg.patches.patch_size == 1100
    assert cfg.model.backbone == "hrnet_w48"
    assert cfg.training.lr_encoder == cfg.training.lr_decoder == cfg.training.lr_fovnet == 2e-5
    assert cfg.training.beta1 == 0.9 and cfg.training.batch_size == 2 and cfg.training.epochs == 50
    assert cfg.model.num_classes == 4 and cfg.evaluation.kept_classes == (0, 1, 2)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"patches": {"fovs": [128, 64, 256]}}, "patches.fovs"),
        ({"patches": {"fovs": [32, 128, 256], "patch_size": 64}}, "patches.fovs"),
        ({"patches": {"xr_scale": 15}}, "patches.xr_scale"),
        ({"patches": {"padding": "wrap"}}, "patches.padding"),
        ({"model": {"mix": {"mode": "onehot", "index": 3}}}, "model.mix.index"),  # D = 3
        ({"model": {"mix": {"mode": "onehot"}}}, "model.mix.index"),  # an indexed mode
        ({"model": {"mix": {"mode": "telepathy"}}}, "model.mix.mode"),  # config.MIX_MODES
        ({"model": {"segmenters": "many"}}, "model.segmenters"),  # config.SEGMENTER_LAYOUTS
        ({"model": {"pretrained": "/nonexistent/hrnet.pth"}}, "model.pretrained"),
        ({"training": {"class_weights": [1.0, 2.0]}}, "training.class_weights"),
        ({"training": {"epochs": "ten"}}, "training.epochs"),
        ({"training": {"learning_rate": 1}}, "unknown key"),
        ({"evaluation": {"class_names": ["a", "b"]}}, "evaluation.class_names"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_field(data, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"backbone": "resnet9000"}}, "model.backbone"),
        ({"model": {"backbone": "timm:not_a_model_at_all"}}, "model.backbone"),
        ({"patches": {"fovs": [66, 132, 264], "patch_size": 66}}, "patches.patch_size"),
        # One ignore label (geometry.IGNORE_INDEX): the field only stays for old configs.
        ({"evaluation": {"ignore_index": 0}}, "evaluation.ignore_index"),
    ],
)
def test_configs_the_models_cannot_build_fail_at_build_naming_the_field(data, field):
    cfg = config_from_dict(data)  # nothing config itself can see is wrong
    with pytest.raises(ConfigError, match=re.escape(field)):
        check_config(cfg)
    with pytest.raises(ConfigError, match=re.escape(field)):
        build_model(cfg)  # fails before any weights are made


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[patches]\nfovs = [64, 64]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*patches\.fovs"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    p.write_text("[patches\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    p.write_text('[model.mix]\nmode = "telepathy"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml.*model\.mix\.mode.*telepathy"):
        check_config(load_config(p), p)


def test_config_imports_no_other_foveation_module():
    # config is the ground floor: every part imports it, it imports none of them (no cycles)
    # but the error base beneath it (foveation.errors, which imports nothing).
    code = (
        "import sys, foveation.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'foveation'))"
    )
    import foveation

    platform = str(Path(foveation.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([platform, os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "['foveation', 'foveation.config', 'foveation.errors']"


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.patches.fovs = (1, 2)  # type: ignore[misc]
    assert PatchSetConfig().depth == 3
    assert MixConfig("onehot", index=1).label == "onehot-1"
