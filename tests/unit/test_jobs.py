"""The entry points, run as users run them (subprocesses from the repository root)."""

import json
import os
import subprocess
import sys

import pytest


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


def test_train_job_names_a_missing_manifest_before_starting_anything(root, tmp_path):
    r = run(
        root, "jobs.train", "--manifest", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")
    )
    assert r.returncode == 1, r.stderr
    assert "nowhere" in r.stderr and "manifest" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_job_names_a_missing_checkpoint(root, tmp_path):
    r = run(root, "jobs.evaluate", "--run", f"soft={tmp_path / 'nothing'}")
    assert r.returncode == 1
    assert "nothing" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_job_refuses_a_malformed_run_argument(root):
    r = run(root, "jobs.evaluate", "--run", "no-equals-sign")
    assert r.returncode == 1 and "NAME=CHECKPOINT_URI" in r.stderr


@pytest.mark.parametrize(
    "job, args, names",
    [
        ("jobs.evaluate", ["--run", "no-equals-sign"], "--run 'no-equals-sign'"),
        ("jobs.ingest", ["--serial", "--source", "{tmp}/nowhere", "--dest", "{tmp}/d"], "nowhere"),
    ],
)
def test_bad_input_to_any_job_is_one_line_naming_it(root, tmp_path, job, args, names):
    # Every job has the one handler (jobs._cli.job): "error: <input>: <what was expected>".
    r = run(root, job, *(a.format(tmp=tmp_path) for a in args))
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and names in line and "expected" in line, line
    assert not (tmp_path / "d").exists()


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
        str(root / "jobs/configs/bench.toml"),
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
