"""The Gleason2019 layout (written by the generator, read by the one reader) and ingest into
local storage, in one process. (Ray tasks and S3: tests/integration/test_ingest.py.)"""

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from foveation.config import IngestConfig, PatchSetConfig, SyntheticConfig
from foveation.data.gleason import assign_splits, central_crop, map_labels, scan
from foveation.data.ingest import IngestError, ingest, ingest_slide
from foveation.data.manifest import MANIFEST_SCHEMA, read_manifest
from foveation.data.synthetic import write_synthetic_set
from foveation.errors import DataError
from foveation.io.images import decode_label, encode_png
from foveation.io.slides import SlideReader

PC = PatchSetConfig()
SYN = SyntheticConfig(n_slides=5, size=256, seed=3)
ING = IngestConfig(
    crop_size=192, tile_size=128, compression="deflate", val_fraction=0.2, test_fraction=0.2
)


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_set(str(root), SYN, PC, log=lambda s: None)
    return root


def copy_set(raw_set, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(raw_set, dst)
    return dst


def test_the_synthetic_set_reads_back_through_the_gleason_reader(raw_set):
    slides = scan(str(raw_set))
    assert [s.slide_id for s in slides] == [
        "slide001_core001",
        "slide001_core002",
        "slide001_core003",
        "slide001_core004",
        "slide002_core001",
    ]
    for s in slides:
        assert s.image_uri.endswith(f"Train Imgs/{s.slide_id}.png")
        assert 3 <= len(s.annotator_uris) <= 6 and len(s.annotators) == len(s.annotator_uris)
        assert all(f"Maps{k}_T/" in u for k, u in zip(s.annotators, s.annotator_uris, strict=True))
        assert s.truth_uri and s.cue_uri
        raw = decode_label(Path(s.annotator_uris[0]).read_bytes())
        assert set(np.unique(raw)) <= {1, 3, 4, 5}  # the challenge's raw values


def test_label_mapping_crop_and_splits():
    raw = np.array([[0, 1, 2, 6], [3, 4, 5, 1]], np.uint8)
    assert map_labels(raw, "m.png").tolist() == [[0, 0, 0, 0], [1, 2, 3, 0]]
    with pytest.raises(DataError, match=r"m\.png: unknown label values \[7, 9\]"):
        map_labels(np.array([[7, 9]], np.uint8), "m.png")
    a = np.arange(100).reshape(10, 10)
    assert central_crop(a, 4).tolist() == a[3:7, 3:7].tolist() and central_crop(a, 40).shape == (
        10,
        10,
    )
    ids = [f"s{i:03d}" for i in range(298)]
    split = assign_splits(ids, 0.0, 0.1, 30, seed=0)
    assert (
        sum(v == "test" for v in split.values()) == 30
        and sum(v == "train" for v in split.values()) == 268
    )
    assert split == assign_splits(list(reversed(ids)), 0.0, 0.1, 30, seed=0)  # order-independent
    assert split != assign_splits(ids, 0.0, 0.1, 30, seed=1)


def test_scan_errors_name_the_place(tmp_path, raw_set):
    with pytest.raises(DataError, match="no slides found"):
        scan(str(tmp_path))
    root = copy_set(raw_set, tmp_path)
    (root / "Maps6_T").mkdir(exist_ok=True)
    for f in (root / "Maps6_T").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="Maps6_T"):
        scan(str(root))


def test_ingest_writes_pyramids_and_the_manifest_and_is_idempotent(raw_set, tmp_path):
    import pyvips

    dest = str(tmp_path / "out")
    summary = ingest(str(raw_set), dest, ING, log=lambda s: None)
    assert len(summary.ingested) == 5 and not summary.failed
    # the average expert: every annotator scored against the STAPLE map, IoU averaged
    ae = summary.average_expert
    assert ae is not None and len(ae["annotators"]) >= 3
    assert 0.5 < ae["miou"] < 1.0 and "average expert vs STAPLE" in summary.text()
    table = read_manifest(dest)
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:
        assert (r["width"], r["height"]) == (192, 192) and r["schema_version"] == 1
        downs = r["level_downsamples"]
        assert downs[0] == 1.0 and downs == sorted(downs)
        # every power of 2 in the slide's TIFF, the levels in between in its sqrt(2) companion
        main = [d for d in downs if abs(math.log2(d) - round(math.log2(d))) < 1e-3]
        between = [d for d in downs if d not in main]
        assert len(main) >= 2 and len(between) >= 1
        for uri, levels in (
            (r["image_uri"], main),
            (r["image_uri"].replace(".tif", ".s2.tif"), between),
        ):
            for page, down in enumerate(levels):
                im = pyvips.Image.new_from_file(uri, page=page)
                assert abs(im.width - 192 / down) < 1 and im.bands == 3
        assert [lv.downsample for lv in SlideReader(r["image_uri"]).levels] == pytest.approx(downs)
        lab = pyvips.Image.new_from_file(r["label_uri"], page=1).numpy()
        assert set(np.unique(lab)) <= {0, 1, 2, 3}  # shrunk by mode: no averaged class ids
        assert abs(sum(r["class_fractions"]) - 1) < 1e-6 and r["truth_uri"] and r["cue_uri"]
    before = (tmp_path / "out" / "manifest.parquet").read_bytes()
    again = ingest(str(raw_set), dest, ING, log=lambda s: None)
    assert again.ingested == [] and len(again.unchanged) == 5
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").equals(
        pq.read_table(__import__("io").BytesIO(before))
    )


def test_bad_slides_are_reported_and_skipped_and_the_rest_land(raw_set, tmp_path):
    root = copy_set(raw_set, tmp_path)
    slides = {s.slide_id: s for s in scan(str(root))}
    (root / "Train Imgs" / "slide001_core001.png").write_bytes(
        b"\x89PNG\r\n\x1a\n garbage"
    )  # corrupt
    png = (root / "Train Imgs" / "slide001_core002.png").read_bytes()
    (root / "Train Imgs" / "slide001_core002.png").write_bytes(png[: len(png) // 3])  # truncated
    bad_map = slides["slide001_core003"].annotator_uris[0]
    Path(bad_map).write_bytes(encode_png(np.full((100, 100), 1, np.uint8)))  # wrong size
    bad_vals = slides["slide001_core004"].annotator_uris[0]
    Path(bad_vals).write_bytes(encode_png(np.full((256, 256), 9, np.uint8)))  # unknown value
    cfg = dataclasses.replace(ING, max_error_fraction=0.9)
    summary = ingest(str(root), str(tmp_path / "out"), cfg, log=lambda s: None)
    assert summary.ingested == ["slide002_core001"]
    f = summary.failed
    assert (
        "slide001_core001.png" in f["slide001_core001"]
        and "not a readable image" in f["slide001_core001"]
    )
    assert "truncated or corrupt" in f["slide001_core002"]
    assert (
        bad_map in f["slide001_core003"]
        and "expected the slide's 256 x 256" in f["slide001_core003"]
    )
    assert bad_vals in f["slide001_core004"] and "unknown label values [9]" in f["slide001_core004"]
    assert [r["slide_id"] for r in read_manifest(str(tmp_path / "out")).to_pylist()] == [
        "slide002_core001"
    ]
    assert "4 failed" in summary.text()
    # too many failures: no manifest at all, and a summary in the error
    with pytest.raises(IngestError, match="4 of 5 slides failed"):
        ingest(str(root), str(tmp_path / "out2"), ING, log=lambda s: None)
    assert not (tmp_path / "out2" / "manifest.parquet").exists()


def test_a_slide_without_annotator_maps_fails_by_name(raw_set, tmp_path):
    root = copy_set(raw_set, tmp_path)
    s = scan(str(root))[0]
    for u in s.annotator_uris:
        __import__("os").unlink(u)
    out = ingest_slide(scan(str(root))[0], str(tmp_path / "o"), ING)
    assert out.status == "failed" and "no annotator map for slide001_core001" in out.error


def test_changed_annotations_reingest_one_slide_and_splits_stay(raw_set, tmp_path):
    root = copy_set(raw_set, tmp_path)
    dest = str(tmp_path / "out")
    first = ingest(str(root), dest, ING, log=lambda s: None)
    splits = {r["slide_id"]: r["split"] for r in read_manifest(dest).to_pylist()}
    s = scan(str(root))[2]
    raw = decode_label(Path(s.annotator_uris[0]).read_bytes())
    raw[:40, :40] = 5  # an annotator corrects a corner to grade 5
    Path(s.annotator_uris[0]).write_bytes(encode_png(raw))
    again = ingest(str(root), dest, ING, log=lambda s: None)
    assert again.ingested == [s.slide_id] and len(again.unchanged) == 4
    assert {r["slide_id"]: r["split"] for r in read_manifest(dest).to_pylist()} == splits
    # the average expert still covers every slide, not only the re-ingested one
    assert again.average_expert["annotators"] == first.average_expert["annotators"]
    # a setting that shapes the files re-ingests everything
    third = ingest(str(root), dest, dataclasses.replace(ING, tile_size=256), log=lambda s: None)
    assert len(third.ingested) == 5


def test_a_generated_set_made_with_other_settings_is_regenerated_and_real_data_never(
    raw_set, tmp_path
):
    from foveation.config import Config, DataConfig
    from foveation.data.prepare import ForeignSetError, generation_needed
    from foveation.data.synthetic import SETTINGS_FILE

    cfg = Config(patches=PC, data=DataConfig(synthetic=SYN))
    assert generation_needed(cfg, str(tmp_path / "empty")) == "the source is empty"
    src = copy_set(raw_set, tmp_path)
    assert generation_needed(cfg, str(src)) is None  # the same settings: reused
    other = dataclasses.replace(
        cfg, data=DataConfig(synthetic=dataclasses.replace(SYN, texture_contrast=2.0))
    )
    assert "texture_contrast" in generation_needed(other, str(src))
    fewer = dataclasses.replace(
        cfg, data=DataConfig(synthetic=dataclasses.replace(SYN, n_slides=3, seed=4))
    )
    with pytest.raises(ValueError, match=r"holds a synthetic set of 5 slides.*remove"):
        generation_needed(fewer, str(src))
    (src / SETTINGS_FILE).unlink()  # no record: not known to be ours, so never overwritten
    with pytest.raises(ForeignSetError, match=rf"{src}.*no synthetic\.json"):
        generation_needed(other, str(src), str(tmp_path / "no-store"))
    real = tmp_path / "real"
    shutil.copytree(src / "Train Imgs", real / "Train Imgs")  # no truth maps: not generated
    assert generation_needed(other, str(real)) is None


def test_splits_keep_each_patients_cores_together_and_stay_as_they_were_without_patients():
    ids = [f"slide{i // 4 + 1:03d}_core{i % 4 + 1:03d}" for i in range(64)]
    # Without groups: each slide its own group, the split drawn before groups existed.
    rng = np.random.default_rng(0)
    order = [sorted(ids)[i] for i in rng.permutation(len(ids))]
    before = {sid: "test" if i < 8 else "val" if i < 12 else "train" for i, sid in enumerate(order)}
    assert assign_splits(ids, 0.0625, 0.125, None, seed=0) == before
    for seed in range(20):
        patient = {sid: sid.split("_")[0] if seed % 2 else f"p{hash(sid) % 7}" for sid in ids}
        split = assign_splits(ids, 0.0625, 0.125, None, seed=seed, groups=patient)
        by_patient: dict[str, set] = {}
        for sid, name in split.items():
            by_patient.setdefault(patient[sid], set()).add(name)
        assert all(len(v) == 1 for v in by_patient.values()), by_patient  # no patient spans two
        n_test = sum(v == "test" for v in split.values())
        assert 8 <= n_test < 8 + max(list(patient.values()).count(p) for p in set(patient.values()))


def test_patients_csv_groups_the_cores_through_ingest(raw_set, tmp_path):
    src = copy_set(raw_set, tmp_path)
    ids = [s.slide_id for s in scan(str(src))]
    (src / "patients.csv").write_text(
        "slide_id,patient\n" + "".join(f"{sid},P{i // 2}\n" for i, sid in enumerate(ids))
    )
    slides = scan(str(src))
    assert [s.patient for s in slides] == [f"P{i // 2}" for i in range(len(ids))]
    summary = ingest(str(src), str(tmp_path / "store"), ING, 4, log=lambda s: None)
    rows = read_manifest(summary.manifest_uri).to_pylist()
    splits: dict[str, set] = {}
    for r in rows:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(v) == 1 for v in splits.values())
    (src / "patients.csv").write_text(f"slide_id,patient\n{ids[0]},A\nslide999_core001,B\n")
    with pytest.raises(DataError, match=r"patients\.csv, line 3: slide 'slide999_core001'"):
        scan(str(src))
    (src / "patients.csv").write_text("id;who\n")
    with pytest.raises(DataError, match=r"patients\.csv: expected a CSV with a header"):
        scan(str(src))


def test_a_manifest_from_before_the_patient_column_reads_with_it_null(raw_set, tmp_path):
    summary = ingest(str(raw_set), str(tmp_path / "store"), ING, 4, log=lambda s: None)
    table = pq.read_table(summary.manifest_uri).drop_columns(["patient"])
    old = tmp_path / "old.parquet"
    pq.write_table(table, old)
    assert read_manifest(str(old)).column("patient").null_count == table.num_rows


def test_a_set_regenerated_over_an_older_one_keeps_none_of_its_files(tmp_path):
    from foveation.data.prepare import remove_generated

    src = tmp_path / "raw"
    write_synthetic_set(str(src), SYN, PC, log=lambda s: None)
    (src / "notes.txt").write_text("the user's own file")
    other = dataclasses.replace(SYN, seed=4)
    remove_generated(str(src))
    write_synthetic_set(str(src), other, PC, log=lambda s: None)
    fresh = tmp_path / "fresh"
    write_synthetic_set(str(fresh), other, PC, log=lambda s: None)
    listing = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    want = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert listing == sorted([*want, "notes.txt"])  # no stale annotator map; the user's file kept
