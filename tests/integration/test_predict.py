"""jobs.predict for real: a pool of Ray Data actors on the session's local Ray cluster predicts
a bucket of slides in the local S3 endpoint (and on disk), writes every output per slide,
reports a bad slide by name and skips finished slides when run again."""

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import shape

from foveation.io import storage
from foveation.io.images import encode_png
from foveation.prediction import DONE_FILE, SUMMARY_FILE, list_slides, predict
from foveation.raycluster import init_ray

CHECKPOINT = str(Path(__file__).parent.parent / "fixtures" / "checkpoint-48f8459")


@pytest.fixture(scope="module")
def ray_ready(ray_cluster, s3_endpoint):
    init_ray(address=ray_cluster)
    return ray_cluster


def write_bucket(prefix: str, tmp_path) -> None:
    from tests.vendor_slides import write_svs

    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 255, (300 + 40 * i, 260, 3), np.uint8)
        storage.write_bytes(storage.join(prefix, f"core{i}.png"), encode_png(img))
    # A vendor slide: OpenSlide reads it from a local copy of the object.
    write_svs(str(tmp_path / "wsi.svs"), rng.integers(0, 255, (600, 520, 3), np.uint8))
    storage.upload_file(str(tmp_path / "wsi.svs"), storage.join(prefix, "wsi.svs"))
    storage.write_bytes(storage.join(prefix, "broken.tif"), b"II*\x00 not a tiff at all")
    storage.write_bytes(storage.join(prefix, "notes.txt"), b"not a slide")


def test_a_bucket_is_predicted_a_bad_slide_named_and_a_rerun_skips_finished(
    ray_ready, s3_bucket, tmp_path
):
    base = s3_bucket  # the harder place: listing, range reads and writes all through S3
    write_bucket(f"{base}/in", tmp_path)
    out = f"{base}/out"
    assert [s.slide_id for s in list_slides(f"{base}/in")] == ["broken", "core0", "core1", "wsi"]
    lines = []
    res = predict(CHECKPOINT, f"{base}/in", out, workers=2, device="cpu", log=lines.append)
    assert sorted(res.predicted) == ["core0", "core1", "wsi"] and list(res.failed) == ["broken"]
    assert "broken.tif" in res.failed["broken"]
    assert any("[4/4]" in line for line in lines)
    for sid, (h, w) in {"core0": (300, 260), "core1": (340, 260), "wsi": (600, 520)}.items():
        done = json.loads(storage.read_bytes(storage.join(out, sid, DONE_FILE)))
        assert done["summary"]["height"] == h and done["summary"]["width"] == w
        assert set(done["results"]) >= {"labels", "probabilities", "apsm", "geojson"}
        coll = json.loads(storage.read_bytes(done["results"]["geojson"]))
        assert all(shape(f["geometry"]).is_valid for f in coll["features"])
        area = sum(shape(f["geometry"]).area for f in coll["features"])
        assert area == h * w  # every pixel has exactly one class
    assert not storage.exists(storage.join(out, "broken", DONE_FILE))
    summary = json.loads(storage.read_bytes(storage.join(out, SUMMARY_FILE)))
    assert summary["failed"] == res.failed

    again = predict(CHECKPOINT, f"{base}/in", out, workers=1, device="cpu", log=lambda s: None)
    assert sorted(again.already_done) == ["core0", "core1", "wsi"] and again.predicted == []
    assert list(again.failed) == ["broken"]


def test_a_slide_list_in_s3_is_ingested_trained_on_and_predicted_back_to_its_annotation(
    ray_ready, s3_bucket, tmp_path
):
    """Bring your own slides, end to end through the local S3: an Aperio SVS with QuPath
    polygons listed in a CSV is ingested out of core into an S3 store, a model overfits it from
    the store's manifest (50 steps), and jobs.predict on the manifest gives back the annotation
    (IoU of the annotated class >= 0.9, 0.96 measured; its GeoJSON area within 10%)."""
    from dataclasses import replace

    from foveation.checkpoint import save_checkpoint
    from foveation.config import IngestConfig, load_config
    from foveation.data.ingest import ingest
    from foveation.data.manifest import read_manifest
    from foveation.data.samples import load_manifest_split
    from foveation.inference import geojson
    from foveation.training.loop import train
    from tests.vendor_slides import write_svs

    rng = np.random.default_rng(1)
    H, W = 384, 320
    tissue = rng.integers(40, 200, (H, W, 3), np.uint8)
    lab = np.zeros((H, W), np.uint8)
    lab[:, : W // 2] = 2  # grade 4 on the left: bluer and less red
    tissue[lab == 2, 2] = np.minimum(tissue[lab == 2, 2].astype(int) + 55, 255)
    tissue[lab == 2, 0] //= 2
    write_svs(str(tmp_path / "p1.svs"), tissue, mpp=0.5)
    storage.upload_file(str(tmp_path / "p1.svs"), f"{s3_bucket}/raw/p1.svs")
    names = ("benign", "grade3", "grade4", "grade5")
    coll = geojson.feature_collection(geojson.features(lab, names))
    storage.write_bytes(f"{s3_bucket}/raw/p1.geojson", geojson.dumps(coll))
    storage.write_bytes(
        f"{s3_bucket}/raw/slides.csv", b"image_uri,annotation_uri,patient\np1.svs,p1.geojson,A\n"
    )
    cfg = IngestConfig(crop_size=None, tile_size=128, val_fraction=0.0, test_fraction=0.0)
    summary = ingest(f"{s3_bucket}/raw/slides.csv", f"{s3_bucket}/store", cfg, log=lambda s: None)
    assert summary.ingested == ["p1"], summary.failed
    (row,) = read_manifest(f"{s3_bucket}/store").to_pylist()
    assert row["mpp"] == pytest.approx(0.5) and row["patient"] == "A"
    assert row["class_fractions"][2] == pytest.approx((lab == 2).mean())

    tiny = load_config("jobs/configs/tiny.toml")
    run = replace(
        tiny,
        patches=replace(tiny.patches, fovs=(32, 64), patch_size=32, xr_scale=8),
        training=replace(tiny.training, epochs=50, locations_per_image=24),
    )
    res = train(run, load_manifest_split(summary.manifest_uri, "train"), log=lambda s: None)
    model = f"{s3_bucket}/model"
    save_checkpoint(model, res.model.cpu(), run)
    res = predict(
        model, summary.manifest_uri, f"{s3_bucket}/pred", device="cpu", log=lambda s: None
    )
    assert res.predicted == ["p1"]
    done = json.loads(storage.read_bytes(f"{s3_bucket}/pred/p1/{DONE_FILE}"))
    assert (done["summary"]["height"], done["summary"]["width"]) == (H, W)
    assert done["summary"]["slide_mpp"] == pytest.approx(0.5)
    local = tmp_path / "labels.ome.tif"
    storage.download_file(done["results"]["labels"], str(local))
    import pyvips

    got = pyvips.Image.new_from_file(str(local), page=0).numpy().reshape(H, W)
    inter, union = ((got == 2) & (lab == 2)).sum(), ((got == 2) | (lab == 2)).sum()
    assert inter / union >= 0.9, f"IoU of grade 4 {inter / union:.3f}"
    feats = json.loads(storage.read_bytes(done["results"]["geojson"]))["features"]
    area = sum(
        shape(f["geometry"]).area
        for f in feats
        if f["properties"]["classification"]["name"] == "grade4"
    )
    assert area == pytest.approx((lab == 2).sum(), rel=0.1)


def test_the_predict_job_says_a_line_per_slide_and_answers_at_once_when_it_can(
    ray_ready, root, tmp_path
):
    """``python -m jobs.predict`` as a user runs it: a line per slide and a summary, Ray's own
    output in its log files; a rerun with nothing to do and a bad input answer without
    starting Ray (targets: under 10 s and 3 s)."""
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(2):
        img = rng.integers(0, 255, (200, 180, 3), np.uint8)
        (tmp_path / "in" / f"s{i}.png").write_bytes(encode_png(img))
    env = dict(__import__("os").environ, RAY_ADDRESS=ray_ready)
    env["PYTHONPATH"] = f"{root / 'platform'}:{root}"
    args = [sys.executable, "-m", "jobs.predict", "--checkpoint", CHECKPOINT,
            "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]  # fmt: skip

    def run(*extra: str) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        done = subprocess.run(
            [*args, *extra], env=env, cwd=root, capture_output=True, text=True, timeout=300
        )
        return done, time.monotonic() - t0

    first, _ = run()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    lines = first.stdout.splitlines()
    assert len(lines) == 5, lines  # the plan, where Ray logs, a line per slide, the summary
    assert "[1/2]" in lines[2] and "[2/2]" in lines[3] and "2 predicted" in lines[4], lines
    assert "core_worker" not in first.stderr and "Running Dataset" not in first.stderr
    assert len(first.stderr.splitlines()) <= 3, first.stderr[-3000:]
    again, again_s = run()
    assert again.returncode == 0 and "2 already done" in again.stdout, again.stdout
    assert again_s < 10 and "Ray's logs" not in again.stdout, (again_s, again.stdout)
    (tmp_path / "list.csv").write_text("image_uri,mpp\nin/s0.png,900\n")
    bad = subprocess.run(
        [*args[:6], str(tmp_path / "list.csv"), *args[7:]],
        env=env, cwd=root, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "list.csv, line 2: mpp" in bad.stderr + bad.stdout
    t0 = time.monotonic()
    missing = subprocess.run(
        [*args[:4], str(tmp_path / "nowhere"), *args[5:]],
        env=env, cwd=root, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode != 0 and "nowhere" in missing.stderr + missing.stdout
    # The target is 3 s; the bound is twice it, for a CI machine slower than this one.
    assert time.monotonic() - t0 < 6, time.monotonic() - t0
    print(f"a rerun with nothing to do: {again_s:.1f} s; a missing checkpoint: "
          f"{time.monotonic() - t0:.1f} s")  # fmt: skip
