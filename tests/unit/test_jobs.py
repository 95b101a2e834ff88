"""The entry points, run as users run them (subprocesses from the repository root)."""

import json
import os
import subprocess
import sys

import pytest

from foveation.checkpoint import load_checkpoint

TINY = """
name = "tiny"
[patches]
fovs = [64, 128, 256]
patch_size = 64
xr_scale = 16
[model]
backbone = "hrnet_w18_small"
[data]
root = "{root}"
[data.toy]
n_train = 4
n_val = 1
n_test = 2
size = 128
region_size = 48
[training]
epochs = 2
batch_size = 2
locations_per_image = 4
lr_encoder = 1e-3
lr_decoder = 1e-3
lr_fovnet = 1e-2
"""


def run(root, *args, cwd=None):
    path = [str(root / "platform"), str(root), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_train_job_end_to_end(root, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(root=tmp_path / "data"))
    out = tmp_path / "out"
    r = run(root, "jobs.train", "--config", str(cfg), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| run | IoU benign" in r.stdout and "report and figures" in r.stdout
    report = (out / "report.md").read_text()
    assert "apsm_test.png" in report and (out / "apsm_test.png").stat().st_size > 1000
    _model, loaded_cfg, meta = load_checkpoint(str(out / "checkpoint"))
    assert loaded_cfg.name == "tiny" and meta["step"] == 4 and "miou" in meta["metrics"]


def test_train_job_bad_config_is_a_clear_error(root, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[patches]\nfovs = [256, 128]\n")
    r = run(root, "jobs.train", "--config", str(cfg))
    assert r.returncode == 2
    assert "patches.fovs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_benchmark_harness_writes_the_pinned_json(root, tmp_path):
    out = tmp_path / "bench.json"
    r = run(
        root,
        "jobs.benchmark",
        "patches",
        "--quick",
        "--config",
        str(root / "jobs/configs/debug.toml"),
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(out.read_text())
    names = {f["name"] for f in figures}
    assert {
        "extract_area_locations_per_s",
        "inference_forward_px_per_output_px_tiled",
        "inference_miou_tiled_minus_dense",
    } <= names
    for f in figures:
        assert {"name", "value", "unit", "direction", "target"} <= set(f)
        assert f["direction"] in ("higher", "lower")
        if "baseline_value" in f:
            assert "ratio" in f and f["ratio"] > 0
    ext = next(f for f in figures if f["name"] == "extract_area_locations_per_s")
    assert ext["ratio"] > 1  # vectorised beats the per-location loop even at smoke size
    assert "figure" in r.stdout and "ratio" in r.stdout
