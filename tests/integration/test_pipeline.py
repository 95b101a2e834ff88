"""Slides read from local disk and S3, and the Ray Data pipeline, for real: a synthetic set is
generated and ingested once per module (into a local folder and into the local S3 endpoint)."""

import dataclasses

import numpy as np
import pytest
import torch

from foveation.config import Config, IngestConfig, PipelineConfig, SyntheticConfig, TrainingConfig
from foveation.data.ingest import ingest
from foveation.data.manifest import read_manifest, write_manifest
from foveation.data.pipeline import Pipeline, PipelineError, torch_batches
from foveation.data.synthetic import write_synthetic_set
from foveation.io import storage
from foveation.io.images import decode_label
from foveation.io.slides import SlideError, SlideReader
from foveation.patches import mode_pool
from foveation.raycluster import init_ray

CFG = dataclasses.replace(
    Config(),
    training=TrainingConfig(locations_per_image=6),
    data=dataclasses.replace(Config().data, pipeline=PipelineConfig(reader_actors=2)),
)
ING = IngestConfig(
    crop_size=None,
    tile_size=128,
    compression="jpeg",
    quality=95,
    val_fraction=0.0,
    test_fraction=0.0,
)


@pytest.fixture(scope="module")
def sets(ray_cluster, s3_endpoint, tmp_path_factory):
    init_ray(address=ray_cluster)
    import boto3

    bucket = "pipeline-slides"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    raw = str(tmp_path_factory.mktemp("raw"))
    write_synthetic_set(
        raw, SyntheticConfig(n_slides=16, size=384, seed=9), CFG.patches, log=lambda s: None
    )
    local = str(tmp_path_factory.mktemp("ingested"))
    ingest(raw, local, ING, log=lambda s: None)
    remote = f"s3://{bucket}/ingested"
    ingest(raw, remote, ING, log=lambda s: None)
    return {"local": local, "s3": remote, "tmp": tmp_path_factory.mktemp("manifests")}


def test_same_region_from_disk_and_s3_and_from_any_level(sets):
    row_l = read_manifest(sets["local"]).to_pylist()[0]
    row_s = read_manifest(sets["s3"]).to_pylist()[0]
    a, b = SlideReader(row_l["image_uri"]), SlideReader(row_s["image_uri"])
    downs = [lv.downsample for lv in a.levels]
    assert downs == [lv.downsample for lv in b.levels]
    assert [d for d in downs if d in (1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0] and len(
        downs
    ) > 3  # + sqrt(2) levels
    for centre, fov, out in (((100, 120), 64, 64), ((200, 200), 256, 64), ((0, 380), 128, 32)):
        ra, rb = a.read_region(centre, fov, out), b.read_region(centre, fov, out)
        assert np.array_equal(ra, rb)  # the same bytes, read through ranged GETs
    # a level-1 read, area-resized, matches level 0 area-resized, within JPEG tolerance
    lv0 = a.read_level(0, 64, 64, 256, 256).astype(np.float32)
    lv1 = a.read_level(downs.index(2.0), 32, 32, 128, 128).astype(np.float32)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(lv0).permute(2, 0, 1)[None], 4)[
        0
    ].permute(1, 2, 0)
    pooled1 = torch.nn.functional.avg_pool2d(torch.from_numpy(lv1).permute(2, 0, 1)[None], 2)[
        0
    ].permute(1, 2, 0)
    assert (pooled - pooled1).abs().mean() < 2.0
    # with blocks smaller than the slide, one region never fetches the whole object
    c = SlideReader(row_s["image_uri"], block_size=16384)
    c.read_region((50, 50), 64, 64)
    assert c.range_file is not None and c.range_file.stats.bytes_fetched < c.range_file.size / 2


def test_pipeline_batches_have_the_right_shapes_and_labels_line_up_with_the_truth(sets):
    pipe = Pipeline(sets["s3"], "train", CFG)
    rows = {r["slide_id"]: r for r in read_manifest(sets["s3"]).to_pylist()}
    seen, agree, shifted = 0, [], []
    truths = {}
    for b in torch_batches(pipe.epoch(0), batch_size=16):
        n = len(b["bank"])
        assert b["bank"].shape == (n, 3, 3, 64, 64) and b["bank"].dtype == torch.uint8
        assert b["xr"].shape == (n, 3, 7, 7) and b["xr"].dtype == torch.float32
        assert (
            b["label"].shape == (n, 16, 16) and b["loc"].shape == (n, 2) and len(b["slide_id"]) == n
        )
        for sid, (i, j), lab in zip(b["slide_id"], b["loc"].tolist(), b["label"], strict=True):
            if sid not in truths:
                truths[sid] = torch.from_numpy(
                    decode_label(storage.read_bytes(rows[sid]["truth_uri"]))
                )
            t = truths[sid]
            pad = torch.nn.functional.pad(t, (64, 64, 64, 64), value=255)
            cy, cx = (i + 0.5) * 16 + 64, (j + 0.5) * 16 + 64
            crop = pad[int(cy) - 32 : int(cy) + 32, int(cx) - 32 : int(cx) + 32]
            true = mode_pool(crop, 4, 4)
            off = mode_pool(
                pad[int(cy) - 32 + 16 : int(cy) + 48, int(cx) - 32 + 16 : int(cx) + 48], 4, 4
            )
            keep = (true != 255) & (lab != 255)
            agree.append((true[keep] == lab[keep]).float().mean().item())
            shifted.append((off[keep] == lab[keep]).float().mean().item())
        seen += n
    assert seen == 16 * 6  # every slide of the split, locations_per_image each
    assert np.mean(agree) > 0.9  # fused annotators vs the truth, at the sampled places
    assert np.mean(agree) > np.mean(shifted)  # and it is the place: a shifted crop agrees less
    assert pipe.check() == {}


def _big_slides(root, n, size=2048):
    """n slides of size^2 (12 MB decoded each) with a label map. One slide and three label maps
    are encoded (libvips); the other slides are byte copies of them in files of their own, so
    each is still a separate slide to the readers, at a fraction of the encoding time."""
    import shutil

    import pyvips

    from foveation.io.slides import write_pyramid

    noise = pyvips.Image.gaussnoise(size, size, sigma=30, mean=150)
    write_pyramid(
        noise.bandjoin([noise, noise]).cast("uchar"), f"{root}/s0.tif", 256, "jpeg", 85, sqrt2=False
    )
    for k in range(min(n, 3)):
        lab = (pyvips.Image.black(size, size) + k).cast("uchar")
        lab.tiffsave(
            f"{root}/l{k}.tif", tile=True, pyramid=True, compression="deflate", region_shrink="mode"
        )
    rows = []
    for i in range(n):
        if i:
            shutil.copyfile(f"{root}/s0.tif", f"{root}/s{i}.tif")
        if i >= 3:
            shutil.copyfile(f"{root}/l{i % 3}.tif", f"{root}/l{i}.tif")
        rows.append(
            {
                "schema_version": 1,
                "slide_id": f"s{i:02d}",
                "image_uri": f"{root}/s{i}.tif",
                "width": size,
                "height": size,
                "mpp": None,
                "level_downsamples": [1.0],
                "label_uri": f"{root}/l{i}.tif",
                "annotator_uris": [],
                "truth_uri": None,
                "cue_uri": None,
                "split": "train",
                "class_fractions": [1.0, 0, 0, 0],
                "checksum": "",
            }
        )
    return rows


def _reader_actor_rss() -> dict[int, int]:
    """Resident memory of each of the pipeline's reader actors (Ray titles them after
    BankReader), by process id."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        if "BankReader" in " ".join(p.info["cmdline"] or []):
            out[p.info["pid"]] = p.info["memory_info"].rss
    return out


def test_memory_does_not_grow_with_the_number_of_slides(sets):
    """Over 16 slides of 3072 px (28 MB decoded each), each reader actor's memory once half the
    slides are read (imports and caches warm) is what it is after all 16: it does not grow."""
    root = sets["tmp"] / "big"
    root.mkdir()
    rows = _big_slides(root, 16, size=3072)
    uri = str(sets["tmp"] / "m16")
    write_manifest(uri, rows)
    pipe = Pipeline(uri, "train", CFG)
    samples = [
        _reader_actor_rss()
        for _ in torch_batches(pipe.epoch(0), batch_size=CFG.training.locations_per_image)
    ]
    assert len(samples) >= 16
    early = {}
    half = len(samples) // 2
    for s in samples[:half]:
        for pid, rss in s.items():
            early[pid] = max(early.get(pid, 0), rss)
    growth = []
    for pid, rss in early.items():  # the same processes, later (a leftover or new one is ignored)
        later = [s[pid] for s in samples[half:] if pid in s]
        if later:
            growth.append(max(later) - rss)
    assert growth, "no reader actor was seen both early and late"
    # Holding the 8 further slides whole would add about 110 MB to each of the two actors; the
    # allocator's arenas alone have been seen to add up to about 58 MB on a loaded 2-core
    # machine, so the bound sits between the two.
    assert max(growth) < 80 * 2**20, [g / 2**20 for g in growth]


def test_unreadable_slides_are_skipped_counted_and_fail_the_epoch_past_the_limit(sets):
    rows = read_manifest(sets["s3"]).to_pylist()[:5]
    for r in rows:
        r["split"] = "train"
    data = storage.read_bytes(rows[0]["image_uri"])
    storage.write_bytes(rows[0]["image_uri"].replace(".tif", "-trunc.tif"), data[: len(data) // 3])
    rows[0]["image_uri"] = rows[0]["image_uri"].replace(
        ".tif", "-trunc.tif"
    )  # truncated TIFF in S3
    rows[1]["image_uri"] = rows[1]["image_uri"].replace(".tif", "-gone.tif")  # a key that vanished
    uri = str(sets["tmp"] / "bad")
    write_manifest(uri, rows)
    lenient = dataclasses.replace(
        CFG, data=dataclasses.replace(CFG.data, pipeline=PipelineConfig(max_error_fraction=0.5))
    )
    pipe = Pipeline(uri, "train", lenient)
    ids = {sid for b in torch_batches(pipe.epoch(0), 16) for sid in b["slide_id"]}
    assert ids == {r["slide_id"] for r in rows[2:]}
    skipped = pipe.check()
    assert set(skipped) == {rows[0]["slide_id"], rows[1]["slide_id"]}
    assert any("-gone.tif" in e for e in skipped[rows[1]["slide_id"]])
    strict = Pipeline(uri, "train", CFG)  # max_error_fraction 0.1
    for _ in torch_batches(strict.epoch(0), 16):
        pass
    with pytest.raises(PipelineError, match="2 of 5 slides could not be read"):
        strict.check()


def test_reader_errors_name_slide_and_region(sets, tmp_path):
    row = read_manifest(sets["local"]).to_pylist()[0]
    r = SlideReader(row["image_uri"])
    out = r.read_region((-1000, -1000), 64, 64, pad_value=(1, 2, 3))  # wholly outside: padding
    assert (out == np.array([1, 2, 3], np.uint8)).all()
    with pytest.raises(SlideError, match="does not exist"):
        SlideReader(str(tmp_path / "missing.tif"))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(SlideError, match=r"bad\.tif: not a readable slide"):
        SlideReader(str(bad))
    # a plain, level-less JPEG is a one-level slide
    from foveation.io.images import encode_jpeg

    jpg = tmp_path / "plain.jpg"
    jpg.write_bytes(encode_jpeg(np.full((300, 200, 3), 128, np.uint8)))
    plain = SlideReader(str(jpg))
    assert len(plain.levels) == 1 and plain.read_region((150, 100), 128, 32).shape == (32, 32, 3)
