"""Ingest for real: Ray tasks on the session's local Ray cluster, into a local folder and into the
local S3 endpoint, from a synthetic set in the Gleason2019 layout."""

import dataclasses
import math

import pytest

from foveation.config import IngestConfig, PatchSetConfig, SyntheticConfig
from foveation.data.gleason import scan
from foveation.data.ingest import ingest
from foveation.data.ingest import ray_tasks as ingest_ray_tasks
from foveation.data.manifest import read_manifest
from foveation.data.synthetic import write_synthetic_set
from foveation.io import storage
from foveation.raycluster import init_ray

SYN = SyntheticConfig(n_slides=4, size=256, seed=5)
ING = IngestConfig(
    crop_size=None, tile_size=128, compression="deflate", val_fraction=0.25, test_fraction=0.25
)


ray_tasks = ingest_ray_tasks(ING)


@pytest.fixture(scope="module")
def ray_ready(ray_cluster, s3_endpoint):
    # join after the S3 endpoint exists, so its settings reach the tasks (raycluster.FORWARDED_ENV)
    init_ray(address=ray_cluster)
    return ray_cluster


def comparable(table):
    """Manifest rows without the parts that name where they live."""
    rows = table.to_pylist()
    for r in rows:
        for k in ("image_uri", "label_uri", "truth_uri", "cue_uri"):
            r[k] = r[k].rsplit("/", 2)[-2:]
        r["annotator_uris"] = [u.rsplit("/", 1)[-1] for u in r["annotator_uris"]]
    return rows


def test_ingest_with_ray_to_disk_and_to_s3_gives_the_same_manifest(ray_ready, s3_bucket, tmp_path):
    src = f"{s3_bucket}/raw"
    write_synthetic_set(src, SYN, PatchSetConfig(), log=lambda s: None)
    assert len(scan(src)) == 4  # the reader reads the layout from S3 too

    local = ingest(src, str(tmp_path / "out"), ING, map_fn=ray_tasks, log=lambda s: None)
    remote = ingest(src, f"{s3_bucket}/out", ING, map_fn=ray_tasks, log=lambda s: None)
    assert len(local.ingested) == len(remote.ingested) == 4
    assert comparable(read_manifest(str(tmp_path / "out"))) == comparable(
        read_manifest(f"{s3_bucket}/out")
    )
    # a second run changes nothing
    before = read_manifest(f"{s3_bucket}/out")
    slide_before = storage.read_bytes(before.column("image_uri")[0].as_py())
    again = ingest(src, f"{s3_bucket}/out", ING, map_fn=ray_tasks, log=lambda s: None)
    assert again.ingested == [] and len(again.unchanged) == 4
    assert read_manifest(f"{s3_bucket}/out").equals(before)
    assert storage.read_bytes(before.column("image_uri")[0].as_py()) == slide_before


def test_a_corrupt_slide_among_good_ones_is_reported_and_the_rest_land(ray_ready, s3_bucket):
    src = f"{s3_bucket}/raw"
    write_synthetic_set(src, SYN, PatchSetConfig(), log=lambda s: None)
    storage.write_bytes(f"{src}/Train Imgs/slide001_core002.png", b"not an image at all")
    summary = ingest(
        src,
        f"{s3_bucket}/out",
        dataclasses.replace(ING, max_error_fraction=0.5),
        map_fn=ray_tasks,
        log=lambda s: None,
    )
    assert sorted(summary.ingested) == ["slide001_core001", "slide001_core003", "slide001_core004"]
    assert "slide001_core002.png" in summary.failed["slide001_core002"]
    assert len(read_manifest(f"{s3_bucket}/out")) == 3


def test_the_written_tiff_opens_from_s3_at_every_level(ray_ready, s3_bucket, tmp_path):
    import pyvips

    src = f"{s3_bucket}/raw"
    write_synthetic_set(
        src, dataclasses.replace(SYN, n_slides=1, size=600), PatchSetConfig(), log=lambda s: None
    )
    ingest(src, f"{s3_bucket}/out", ING, map_fn=ray_tasks, log=lambda s: None)
    row = read_manifest(f"{s3_bucket}/out").to_pylist()[0]
    local = tmp_path / "s.tif"
    storage.download_file(row["image_uri"], str(local))
    assert [d for d in row["level_downsamples"] if d in (1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0]
    powers = [d for d in row["level_downsamples"] if abs(math.log2(d) - round(math.log2(d))) < 1e-3]
    for page, down in enumerate(powers):  # the main TIFF; the sqrt(2) levels live in <id>.s2.tif
        im = pyvips.Image.new_from_file(str(local), page=page)
        assert abs(im.width - 600 / down) < 1
        assert im.crop(0, 0, min(64, im.width), min(64, im.height)).numpy().shape[-1] == 3


def test_ingest_job_end_to_end_on_the_cluster(ray_cluster, root, tmp_path):
    """`python -m jobs.ingest --generate` as a user runs it, joining the running cluster."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"""
[data.synthetic]
n_slides = 3
size = 256
[data.ingest]
source = "{tmp_path / "raw"}"
dest = "{tmp_path / "out"}"
crop_size = 200
tile_size = 128
compression = "jpeg"
quality = 90
"""
    )
    path = [str(root / "platform"), str(root), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ, RAY_ADDRESS=ray_cluster, PYTHONPATH=os.pathsep.join(p for p in path if p)
    )
    r = subprocess.run(
        [sys.executable, "-m", "jobs.ingest", "--config", str(cfg), "--generate"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 ingested, 0 unchanged, 0 failed" in r.stdout
    rows = read_manifest(str(tmp_path / "out")).to_pylist()
    assert [(x["width"], x["height"]) for x in rows] == [(200, 200)] * 3
    # bad input: a source with no slides, or none at all, is a clear error, not a traceback
    (tmp_path / "empty").mkdir()
    for source, message in (("empty", "no slides found"), ("missing", "does not exist")):
        args = ["-m", "jobs.ingest", "--config", str(cfg), "--source", str(tmp_path / source)]
        r = subprocess.run(
            [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_unreachable_s3_endpoint_is_a_clear_error(s3_endpoint):
    import socket
    import time

    from foveation.errors import DataError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    previous = storage.configure(endpoint_url=closed)
    try:
        t = time.perf_counter()
        with pytest.raises(DataError, match=r"s3://slides/raw.*cannot list the source"):
            scan("s3://slides/raw")
        assert time.perf_counter() - t < 15
    finally:
        storage.configure(previous)
