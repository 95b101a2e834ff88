"""QuPath GeoJSON annotations and slide lists: parsed, rasterised by tiles, ingested."""

import json
from dataclasses import replace

import numpy as np
import pytest
import pyvips

from foveation.config import IngestConfig
from foveation.data.annotations import parse_qupath, rasterize, unannotated_value
from foveation.data.ingest import ingest
from foveation.data.manifest import read_manifest
from foveation.data.slidelist import scan_list
from foveation.errors import DataError
from foveation.inference import geojson
from foveation.io.images import decode_label, encode_png

NAMES = ("benign", "grade3", "grade4", "grade5")


def blobs(h, w, seed):
    """A label map of blobs with holes and diagonal touches (and unlabelled 255 background)."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), 255, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 30)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 4)
    lab[rng.random((h, w)) < 0.01] = 255  # pinholes
    return lab


def export(lab, names=NAMES) -> bytes:
    return geojson.dumps(geojson.feature_collection(geojson.features(lab, names)))


@pytest.mark.parametrize("tile", [2048, 37])
def test_a_map_exported_as_qupath_geojson_rasterises_back_exactly(tile):
    lab = blobs(150, 170, 0)
    anns = parse_qupath(export(lab), "a.geojson", NAMES)
    assert {a.class_id for a in anns} == set(np.unique(lab).tolist()) - {255}
    back = rasterize(anns, 150, 170, tile=tile)
    assert np.array_equal(back, lab)
    # At a coarser label resolution: each pixel takes the class under its centre.
    half = rasterize(anns, 150, 170, downsample=2.0, tile=tile)
    assert half.shape == (75, 85) and (half == lab[::2, ::2]).mean() > 0.9


def test_holes_are_kept_and_later_features_win_where_polygons_overlap():
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]],
                        [[5, 5], [15, 5], [15, 15], [5, 15], [5, 5]],
                    ],
                },
                "properties": {"classification": {"name": "grade3"}},
            },
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4]]]},
                "properties": {"classification": {"name": "grade5"}},
            },
        ],
    }
    lab = rasterize(parse_qupath(json.dumps(doc).encode(), "x", NAMES), 24, 24, fill=0)
    assert (lab[6:14, 6:14] == 0).all()  # the hole
    assert (lab[:4, :4] == 3).all() and lab[10, 2] == 1 and lab[22, 22] == 0


def test_bad_annotations_are_errors_that_name_the_file_and_the_feature():
    good = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]}
    cases = [
        (b"{not json", r"a\.geojson: not JSON"),
        (json.dumps({"features": [{"geometry": good, "properties": {}}]}), r"feature 0: no prop"),
        (
            json.dumps([{"geometry": good, "properties": {"classification": {"name": "Tumor"}}}]),
            r"a\.geojson: classes \['Tumor'\] are not in the class table .* the file names "
            r"\['Tumor'\]\. Map them with data\.ingest\.class_map",
        ),
        (
            json.dumps([{"geometry": {"type": "Point", "coordinates": [1, 2]}}]),
            r"feature 0: geometry 'Point'; expected Polygon or MultiPolygon",
        ),
    ]
    for data, match in cases:
        with pytest.raises(DataError, match=match):
            parse_qupath(data if isinstance(data, bytes) else data.encode(), "a.geojson", NAMES)
    assert unannotated_value("ignore", NAMES) == 255 and unannotated_value("benign", NAMES) == 0
    with pytest.raises(DataError, match=r"data\.ingest\.unannotated: 'stroma'"):
        unannotated_value("stroma", NAMES)


def test_a_class_map_sends_a_projects_names_to_the_platforms_or_to_ignore(tmp_path):
    """A QuPath project says Tumor, Stroma, Other: several names to one class, one to
    "ignore" (255), the training class names untouched; through the config and through a
    slide list's class_map column, which wins over it."""
    lab = blobs(120, 140, 3)
    project = {"benign": "Stroma", "grade3": "Tumor", "grade4": "Tumor", "grade5": "Other"}
    data = export(lab, names=[project[n] for n in NAMES])
    cmap = {"Tumor": "grade3", "Stroma": "benign", "Other": "ignore"}
    got = rasterize(parse_qupath(data, "p.geojson", NAMES, cmap), 120, 140, fill=255)
    want = np.select([lab == 0, (lab == 1) | (lab == 2)], [0, 1], 255).astype(np.uint8)
    assert np.array_equal(got, want)
    with pytest.raises(DataError, match=r"p\.geojson: class_map maps 'Tumor' to 'cancer'"):
        parse_qupath(data, "p.geojson", NAMES, {"Tumor": "cancer"})
    with pytest.raises(DataError, match=r"classes \['Other', 'Stroma'\] .* names \['Other', "):
        parse_qupath(data, "p.geojson", NAMES, {"Tumor": "grade3"})
    (tmp_path / "s.png").write_bytes(encode_png(np.full((120, 140, 3), 120, np.uint8)))
    (tmp_path / "s.geojson").write_bytes(data)
    row = 's.png,s.geojson,"{""Other"": ""grade5""}"'
    (tmp_path / "l.csv").write_text(f"image_uri,annotation_uri,class_map\n{row}\n")
    (slide,) = scan_list(str(tmp_path / "l.csv"))
    assert dict(slide.class_map) == {"Other": "grade5"}
    cfg = IngestConfig(crop_size=None, tile_size=128, compression="deflate", class_map=cmap)
    cfg = replace(cfg, val_fraction=0.0, test_fraction=0.0)
    summary = ingest(str(tmp_path / "l.csv"), str(tmp_path / "store"), cfg, log=lambda s: None)
    (r,) = read_manifest(summary.manifest_uri).to_pylist()
    stored = pyvips.Image.new_from_file(r["label_uri"], page=0).numpy().reshape(120, 140)
    assert np.array_equal(stored, np.where(lab == 3, 3, want))  # the list's Other -> grade5
    (tmp_path / "bad.csv").write_text('image_uri,class_map\ns.png,"[1, 2]"\n')
    with pytest.raises(DataError, match=r"bad\.csv, line 2: class_map .*expected a JSON object"):
        scan_list(str(tmp_path / "bad.csv"))


def test_a_slide_list_with_qupath_and_mask_annotations_ingests(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["slide_id,image_uri,annotation_uri,patient"]
    truth = {}
    for i in range(6):
        img = rng.integers(0, 255, (200, 220, 3), np.uint8)
        lab = blobs(200, 220, 10 + i)
        (tmp_path / f"img{i}.png").write_bytes(encode_png(img))
        if i % 2:
            (tmp_path / f"img{i}.geojson").write_bytes(export(lab))
            ann = f"img{i}.geojson"
        else:
            (tmp_path / f"img{i}_mask.png").write_bytes(encode_png(lab))
            ann = f"img{i}_mask.png"
        rows.append(f"core{i},img{i}.png,{ann},P{i // 2}")
        truth[f"core{i}"] = lab
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    slides = scan_list(str(tmp_path / "slides.csv"))
    assert [s.label_kind for s in slides] == ["mask", "qupath"] * 3
    cfg = IngestConfig(
        crop_size=None, tile_size=128, compression="deflate", val_fraction=0.2, test_fraction=0.2
    )
    summary = ingest(str(tmp_path / "slides.csv"), str(tmp_path / "store"), cfg, log=print)
    assert not summary.failed, summary.failed
    rows_out = read_manifest(summary.manifest_uri).to_pylist()
    assert len(rows_out) == 6
    by_patient: dict[str, set] = {}
    for r in rows_out:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
        label = pyvips.Image.new_from_file(r["label_uri"], page=0).numpy()
        assert np.array_equal(label.reshape(200, 220), truth[r["slide_id"]])
    assert all(len(v) == 1 for v in by_patient.values())


def test_bad_slide_lists_name_the_list_and_the_line(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("image,who\na.png,x\n")
    with pytest.raises(DataError, match=r"l\.csv: the slide list has no 'image_uri' column"):
        scan_list(str(p))
    p.write_text("image_uri,slide_id\na.png,x\nb.png,x\n")
    with pytest.raises(DataError, match=r"l\.csv, line 3: slide id 'x' is listed twice"):
        scan_list(str(p))
    # A mask whose values are not class ids fails that slide, named.
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((64, 64, 3), np.uint8)))
    (tmp_path / "m.png").write_bytes(encode_png(np.full((64, 64), 7, np.uint8)))
    p.write_text("image_uri,annotation_uri\na.png,m.png\n")
    cfg = IngestConfig(
        crop_size=None, tile_size=128, compression="deflate", test_fraction=0.0, val_fraction=0.0
    )
    with pytest.raises(Exception, match=r"m\.png: label values \[7\] are not class ids"):
        ingest(str(p), str(tmp_path / "s"), cfg, log=lambda s: None)
    assert decode_label(encode_png(np.zeros((2, 2), np.uint8)), "z").shape == (2, 2)


def test_training_samples_locations_only_where_a_partly_annotated_slide_has_labels():
    from foveation.config import Config, TrainingConfig, replace
    from foveation.data.batches import BatchExtractor, sample_locations

    cfg = replace(Config(), training=TrainingConfig(locations_per_image=64))
    s = cfg.patches.xr_scale
    image = np.full((512, 512, 3), 120, np.uint8)  # tissue everywhere
    label = np.full((512, 512), 255, np.uint8)
    label[:, :200] = 1  # annotated on the left only
    ex = BatchExtractor.from_arrays(cfg, image, label)
    locs = sample_locations(ex.image, cfg, 0, 0, "a", ex.label)
    assert len(locs) == 64 and (locs[:, 1] * s < 200).all()
    everywhere = sample_locations(ex.image, cfg, 0, 0, "a")
    assert (everywhere[:, 1] * s >= 200).any()
    # Fully labelled: the same draw as without the label.
    full = BatchExtractor.from_arrays(cfg, image, np.ones((512, 512), np.uint8))
    assert np.array_equal(sample_locations(full.image, cfg, 0, 0, "a", full.label), everywhere)
    unlabelled = BatchExtractor.from_arrays(cfg, image, np.full((512, 512), 255, np.uint8))
    assert len(sample_locations(unlabelled.image, cfg, 0, 0, "a", unlabelled.label)) == 0


def test_whole_slide_images_ingest_out_of_core_with_their_mpp_and_polygons(tmp_path):
    """An Aperio SVS (OpenSlide), a pyramidal TIFF and an OME-TIFF with SubIFD levels
    (libvips), each with QuPath polygons, go the whole-slide path: level 0 and the labels come
    back exactly, the mpp is kept; a blank slide is reported as having no tissue and a
    truncated one as truncated."""
    from tests.vendor_slides import write_ome_tiff, write_svs

    rng = np.random.default_rng(4)
    tissue = rng.integers(60, 200, (900, 700, 3), np.uint8)
    lab = blobs(900, 700, 21)
    write_svs(str(tmp_path / "a.svs"), tissue, mpp=0.25)
    pyvips.Image.new_from_array(tissue[:600, :500]).tiffsave(
        str(tmp_path / "b.tif"),
        tile=True,
        pyramid=True,
        compression="deflate",
        xres=2000.0,  # px per mm: 0.5 µm/px, in centimetres (a resolution in inches is no mpp)
        yres=2000.0,
        resunit="cm",
    )
    write_ome_tiff(str(tmp_path / "c.ome.tif"), tissue[:520, :640], mpp=0.3)
    write_svs(str(tmp_path / "blank.svs"), np.full((300, 300, 3), 250, np.uint8))
    whole = (tmp_path / "a.svs").read_bytes()  # a copy cut short: its last levels are missing
    (tmp_path / "cut.svs").write_bytes(whole[: int(len(whole) * 0.8)])
    (tmp_path / "a.geojson").write_bytes(export(lab))
    (tmp_path / "b.geojson").write_bytes(export(lab[:600, :500]))
    (tmp_path / "c.geojson").write_bytes(export(lab[:520, :640]))
    (tmp_path / "blank.geojson").write_bytes(export(lab[:300, :300]))
    (tmp_path / "wsi.csv").write_text(
        "image_uri,annotation_uri\na.svs,a.geojson\nb.tif,b.geojson\nc.ome.tif,c.geojson\n"
        "blank.svs,blank.geojson\ncut.svs,a.geojson\n"
    )
    cfg = IngestConfig(
        crop_size=4400, tile_size=128, compression="deflate", val_fraction=0.0, test_fraction=0.0
    )
    summary = ingest(str(tmp_path / "wsi.csv"), str(tmp_path / "store"), cfg, log=lambda s: None)
    assert sorted(summary.failed) == ["blank", "cut"] and "no tissue" in summary.failed["blank"]
    assert "cut.svs: truncated TIFF" in summary.failed["cut"]
    rows = {r["slide_id"]: r for r in read_manifest(summary.manifest_uri).to_pylist()}
    assert rows["a"]["mpp"] == pytest.approx(0.25) and rows["b"]["mpp"] == pytest.approx(0.5)
    assert rows["c"]["mpp"] == pytest.approx(0.3)
    from foveation.io.slides import SlideReader

    assert SlideReader(rows["a"]["image_uri"]).mpp == pytest.approx(0.25)  # kept in the store
    assert (rows["a"]["height"], rows["a"]["width"]) == (900, 700)  # not cropped
    for sid, (h, w) in {"a": (900, 700), "b": (600, 500), "c": (520, 640)}.items():
        img = pyvips.Image.new_from_file(rows[sid]["image_uri"], page=0).numpy()
        assert np.array_equal(img, tissue[:h, :w])
        got = pyvips.Image.new_from_file(rows[sid]["label_uri"], page=0).numpy()
        assert np.array_equal(got.reshape(h, w), lab[:h, :w])
        assert rows[sid]["level_downsamples"][0] == 1.0 and len(rows[sid]["level_downsamples"]) > 1
    again = ingest(str(tmp_path / "wsi.csv"), str(tmp_path / "store"), cfg, log=lambda s: None)
    assert sorted(again.unchanged) == ["a", "b", "c"]


def test_several_annotators_of_a_whole_slide_are_fused_by_staple_block_by_block(
    tmp_path, monkeypatch
):
    """Three QuPath annotators of an SVS, the third off on one region: the fused labels are
    the two who agree (STAPLE per block of 256 rows x 128 columns here), and each annotator's
    confusion against them is recorded."""
    from foveation.data import wsi
    from tests.vendor_slides import write_svs

    monkeypatch.setattr(wsi, "STAPLE_COLS", 128)
    rng = np.random.default_rng(5)
    write_svs(str(tmp_path / "s.svs"), rng.integers(60, 200, (600, 500, 3), np.uint8), mpp=0.5)
    lab = np.zeros((600, 500), np.uint8)
    lab[50:300, 40:260] = 1
    lab[350:560, 300:480] = 2
    other = lab.copy()
    other[350:560, 300:480] = 3  # annotator 3 grades the second region higher
    for k, m in enumerate([lab, lab, other], start=1):
        (tmp_path / f"a{k}.geojson").write_bytes(export(m))
    (tmp_path / "l.csv").write_text(
        "image_uri,annotation_uri\ns.svs,a1.geojson;a2.geojson;a3.geojson\n"
    )
    (raw,) = scan_list(str(tmp_path / "l.csv"))
    assert raw.annotators == (1, 2, 3) and raw.label_kind == "qupath"
    cfg = IngestConfig(crop_size=None, tile_size=128, val_fraction=0.0, test_fraction=0.0)
    summary = ingest(str(tmp_path / "l.csv"), str(tmp_path / "store"), cfg, log=lambda s: None)
    assert summary.ingested == ["s"], summary.failed
    (row,) = read_manifest(summary.manifest_uri).to_pylist()
    got = pyvips.Image.new_from_file(row["label_uri"], page=0).numpy().reshape(600, 500)
    assert np.array_equal(got, lab)
    conf = json.loads((tmp_path / "store" / "rows" / "s.json").read_text())["annotator_confusion"]
    assert sorted(conf) == ["1", "2", "3"]
    third = np.array(conf["3"])  # rows: the fused class, columns: the annotator's
    assert third[2, 3] == 210 * 180 and np.trace(np.array(conf["1"])) == 600 * 500


def test_a_40x_and_a_20x_scan_ingest_to_the_same_store_at_the_configured_mpp(tmp_path):
    """data.ingest.mpp = 0.5: the 40x scan is resampled as it streams (image by area, labels
    by nearest) to the 20x scan's pixels within rounding; the 20x scan is kept as it is."""
    from tests.vendor_slides import write_svs

    rng = np.random.default_rng(6)
    half = rng.integers(40, 200, (300, 260, 3), np.uint8)
    lab = blobs(300, 260, 3)
    full = np.repeat(np.repeat(half, 2, 0), 2, 1)  # every 20x pixel as 2 x 2 at 40x
    write_svs(str(tmp_path / "x40.svs"), full, mpp=0.25)
    write_svs(str(tmp_path / "x20.svs"), half, mpp=0.5)
    (tmp_path / "x40.geojson").write_bytes(export(np.repeat(np.repeat(lab, 2, 0), 2, 1)))
    (tmp_path / "x20.geojson").write_bytes(export(lab))
    (tmp_path / "l.csv").write_text(
        "image_uri,annotation_uri\nx40.svs,x40.geojson\nx20.svs,x20.geojson\n"
    )
    cfg = IngestConfig(
        crop_size=None, tile_size=128, compression="deflate", val_fraction=0.0, test_fraction=0.0
    )
    cfg = replace(cfg, mpp=0.5)
    summary = ingest(str(tmp_path / "l.csv"), str(tmp_path / "store"), cfg, log=lambda s: None)
    assert sorted(summary.ingested) == ["x20", "x40"], summary.failed
    rows = {r["slide_id"]: r for r in read_manifest(summary.manifest_uri).to_pylist()}
    for r in rows.values():
        assert (r["height"], r["width"], r["mpp"]) == (300, 260, pytest.approx(0.5))
        img = pyvips.Image.new_from_file(r["image_uri"], page=0).numpy()
        assert np.abs(img.astype(int) - half).max() <= 1, r["slide_id"]
        got = pyvips.Image.new_from_file(r["label_uri"], page=0).numpy().reshape(300, 260)
        assert np.array_equal(got, lab)
