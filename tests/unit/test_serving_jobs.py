"""Whole-slide jobs without Ray: the job store, GeoJSON polygons, the job sink's outputs and
the job runner (submit, progress, cancel, resume after a crash), on a tiny random model."""

import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import shapely

from foveation.inference import geojson
from foveation.serving.errors import RequestError
from foveation.serving.jobstore import RUNNING, JobStore
from foveation.serving.settings import serve_config_from_dict


@pytest.fixture(scope="module")
def tiny_model(root):
    import torch

    from foveation.config import load_config
    from foveation.models.foveated import build_model

    cfg = load_config(root / "jobs/configs/tiny.toml")
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def smooth_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3))
    img = np.kron(low, np.ones((32, 32, 1)))[:h, :w]
    return (img * 0.8 + rng.uniform(0, 40, (h, w, 3))).astype(np.uint8)


# ----------------------------------------------------------------------------- the job store


def test_job_store_round_trip_and_listing(tmp_path):
    store = JobStore(str(tmp_path / "jobs"))
    a = store.create("runs/data/a.tif", {"width": 3})
    b = store.create("runs/data/b.tif")
    assert store.get(a.id) == a
    a2 = store.update(a, state=RUNNING, progress=0.5)
    assert store.get(a.id).progress == 0.5 and store.get(a.id).updated >= a.updated
    assert [r.id for r in store.list()] == [a.id, b.id]
    assert a2.state == RUNNING and not a2.final
    # no temporary files are left beside the state
    assert sorted(p.name for p in (tmp_path / "jobs" / a.id).iterdir()) == ["state.json"]
    with pytest.raises(RequestError) as info:
        store.get("f" * 32)
    assert info.value.status == 404
    with pytest.raises(RequestError):
        store.uri("../../etc")


def test_an_empty_or_missing_store_lists_nothing(tmp_path):
    assert JobStore(str(tmp_path / "none")).list() == []


# ------------------------------------------------------------------------------- polygons


def _class_areas(collection: dict) -> dict[str, float]:
    """Area per class name, by shapely (an independent reading of the GeoJSON)."""
    from shapely.geometry import shape

    out: dict[str, float] = {}
    for f in collection["features"]:
        name = f["properties"]["classification"]["name"]
        out[name] = out.get(name, 0.0) + shape(f["geometry"]).area
    return out


def test_polygon_areas_equal_pixel_counts_on_random_maps():
    rng = np.random.default_rng(1)
    for _ in range(100):
        lab = rng.integers(0, 3, (rng.integers(1, 15), rng.integers(1, 15))).astype(np.uint8)
        coll = geojson.feature_collection(geojson.features(lab, ["a", "b", "c"]))
        areas = _class_areas(coll)
        for k, name in enumerate("abc"):
            assert areas.get(name, 0) == (lab == k).sum()


def test_holes_belong_to_their_ring_and_diagonal_pixels_are_separate():
    lab = np.zeros((6, 6), np.uint8)
    lab[1:5, 1:5] = 1
    lab[2:4, 2:4] = 0  # a hole
    polys = geojson.polygons(lab, 1)
    assert len(polys) == 1 and len(polys[0]) == 2  # one outer ring, one hole
    outer, hole = polys[0]
    assert geojson.ring_area(outer) == 16 and geojson.ring_area(hole) == -4
    diag = np.array([[1, 0], [0, 1]], np.uint8)
    assert len(geojson.polygons(diag, 1)) == 2


def _shapes(coll):  # class name -> shapely geometry
    from shapely.geometry import shape

    return {
        f["properties"]["classification"]["name"]: shape(f["geometry"]) for f in coll["features"]
    }


def test_every_geometry_is_valid_and_exact_on_random_maps_traced_in_tiles():
    """Noisy maps are full of diagonal touches (the rings the tracer closes through a shared
    vertex): every class comes back as one valid MultiPolygon with its pixel count as area,
    whole or traced in tiles and merged."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        lab = rng.integers(0, 3, (rng.integers(2, 40), rng.integers(2, 40))).astype(np.uint8)
        for tile in (1024, 7):
            coll = geojson.feature_collection(geojson.tiled_features(lab, ["a", "b", "c"], tile))
            shapes = _shapes(coll)
            assert len(coll["features"]) == len(shapes)  # one feature per class
            for k, name in enumerate("abc"):
                if (lab == k).any():
                    assert shapes[name].is_valid, (tile, name, shapely_reason(shapes[name]))
                    assert shapes[name].area == (lab == k).sum()


def shapely_reason(geom) -> str:
    from shapely.validation import explain_validity

    return explain_validity(geom)


def test_a_ring_closing_through_a_diagonal_touch_is_split_into_valid_parts():
    # A C whose ends touch diagonally: its hole opens to the outside through the shared vertex
    # (2, 1), and the traced outer ring passes through it twice.
    lab = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], np.uint8)
    (raw,) = geojson.polygons(lab, 1)
    assert not shapely.Polygon(raw[0], raw[1:]).is_valid  # what make_valid repairs
    geom = _shapes(geojson.feature_collection(geojson.features(lab, ["o", "x"])))["x"]
    assert geom.is_valid and geom.area == 7


def test_a_region_across_four_tiles_comes_back_as_one_polygon_with_its_exact_area():
    lab = np.zeros((128, 128), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    lab[(yy - 64) ** 2 + (xx - 60) ** 2 < 40**2] = 2  # a disc over the four 64 px tiles
    lab[62:66, 58:63] = 0  # with a hole in the middle, on the tiles' corner
    coll = geojson.feature_collection(
        geojson.tiled_features(lab, ["benign", "grade3", "grade4"], tile=64, scale=4)
    )
    g = _shapes(coll)["grade4"]
    assert g.is_valid and g.geom_type == "MultiPolygon" and len(g.geoms) == 1
    assert len(g.geoms[0].interiors) == 1
    assert g.area == (lab == 2).sum() * 16  # level-0 px: 4 x 4 each
    # A simplification tolerance of 1 label px keeps this region's area within 1% (it moves
    # the boundary by at most 1 px: the area by at most the perimeter).
    simple = _shapes(
        geojson.feature_collection(
            geojson.tiled_features(lab, ["benign", "grade3", "grade4"], 64, 4, simplify_px=1.0)
        )
    )["grade4"]
    assert simple.is_valid
    assert abs(simple.area - g.area) <= 0.01 * g.area
    assert len(simple.geoms[0].exterior.coords) < len(g.geoms[0].exterior.coords)


def test_features_are_in_qupaths_form_with_offsets():
    lab = np.zeros((4, 4), np.uint8)
    lab[:2, :2] = 2
    feats = geojson.features(lab, ["benign", "grade3", "grade4", "grade5"], scale=8, offset=(10, 0))
    f = next(f for f in feats if f["properties"]["classification"]["name"] == "grade4")
    assert f["properties"]["objectType"] == "annotation"
    assert len(f["properties"]["classification"]["color"]) == 3
    ring = f["geometry"]["coordinates"][0][0]
    assert ring[0] == ring[-1]
    xs = [p[0] for p in ring]
    assert min(xs) == 80 and max(xs) == 96  # (col + offset) * scale
    json.dumps(feats)  # serialisable


# ----------------------------------------------------------------------- sink and runner


def test_job_sink_writes_pyramids_and_polygons_equal_to_inference(tiny_model, tmp_path):
    import pyvips

    from foveation.inference import ArraySink, ArraySource, segment
    from foveation.inference.outputs import JobSink

    model, cfg = tiny_model
    img = smooth_image(300, 420)
    ref = ArraySink()
    segment(model, ArraySource(img), cfg, ref)
    seen = []
    sink = JobSink(str(tmp_path), cfg.patches.xr_scale, lambda d, t: seen.append((d, t)))
    segment(model, ArraySource(img), cfg, sink)
    assert seen[-1] == (300, 300) and all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    res = sink.write_results(str(tmp_path / "out"), cfg.evaluation.class_names, 256, 64)
    labels = pyvips.Image.new_from_file(res["labels"])
    assert (labels.numpy() == ref.mask).all()
    assert labels.get("n-subifds") >= 1 and "<OME" in labels.get("image-description")
    level1 = pyvips.Image.new_from_file(res["labels"], subifd=0)
    assert (level1.width, level1.height) == (210, 150)
    heat = pyvips.Image.new_from_file(res["probabilities"], n=-1)
    hh = heat.get("page-height")
    assert hh == 300 // 16 + 1 and heat.height == 4 * hh
    areas = _class_areas(json.loads(Path(res["geojson"]).read_text()))
    for k, name in enumerate(cfg.evaluation.class_names):  # traced at 1/2: edge blocks differ
        assert abs(areas.get(name, 0) - (ref.mask == k).sum()) <= 0.02 * ref.mask.size
    assert abs(sum(sink.fractions()) - 1) < 1e-9


def test_mode_shrink_takes_the_majority_of_each_block():
    from foveation.inference.outputs import mode_shrink

    lab = np.zeros((5, 7), np.uint8)
    lab[:4, :4] = 1
    lab[0, 0] = 2
    small = mode_shrink(lab, 4, 3)
    assert small.shape == (2, 2) and small[0, 0] == 1 and small[0, 1] == 0


def _settings(tmp_path, **jobs):
    return serve_config_from_dict(
        {
            "jobs": {
                "store": str(tmp_path / "jobs"),
                "allowed_prefixes": [str(tmp_path / "slides")],
                "progress_interval_s": 0,
                **jobs,
            }
        }
    )


def _slide(tmp_path, name, h, w):
    import pyvips

    from foveation.io.slides import write_pyramid

    (tmp_path / "slides").mkdir(exist_ok=True)
    path = str(tmp_path / "slides" / name)
    img = smooth_image(h, w)
    write_pyramid(pyvips.Image.new_from_array(img), path, 128, "deflate", sqrt2=False)
    return path, img


def test_runner_segments_a_slide_and_refuses_bad_ones(tiny_model, tmp_path):
    from foveation.serving.runtime import JobRunner, segment_image

    model, cfg = tiny_model
    path, img = _slide(tmp_path, "s.tif", 256, 320)
    runner = JobRunner(model, cfg, _settings(tmp_path))
    try:
        rec = runner.submit(path)
        done = runner.wait(rec.id, 60)
        assert done.state == "succeeded", done
        assert done.progress == 1.0 and done.results["heatmap"] == done.results["probabilities"]
        import pyvips

        mask = pyvips.Image.new_from_file(done.results["labels"]).numpy()
        assert (mask == segment_image(model, cfg, img).mask).all()
        stored = JobStore(str(tmp_path / "jobs")).get(rec.id)
        assert stored.state == "succeeded" and stored.summary["width"] == 320
        for bad, status in ((str(tmp_path / "slides" / "none.tif"), 404), ("/etc/passwd", 403)):
            with pytest.raises(RequestError) as info:
                runner.submit(bad)
            assert info.value.status == status
        (tmp_path / "slides" / "junk.tif").write_bytes(b"junk")
        with pytest.raises(RequestError) as info:
            runner.submit(str(tmp_path / "slides" / "junk.tif"))
        assert info.value.status == 422
    finally:
        runner.shutdown()


def test_runner_slide_size_limit(tiny_model, tmp_path):
    from foveation.serving.runtime import JobRunner

    model, cfg = tiny_model
    path, _ = _slide(tmp_path, "s.tif", 64, 64)
    settings = _settings(tmp_path)
    import dataclasses

    settings = dataclasses.replace(
        settings, limits=dataclasses.replace(settings.limits, max_slide_pixels=4000)
    )
    with pytest.raises(RequestError) as info:
        JobRunner(model, cfg, settings).submit(path)
    assert info.value.status == 413


def test_cancel_and_resume_after_a_crash(tiny_model, tmp_path):
    from foveation.inference import outputs
    from foveation.serving.runtime import JobRunner

    model, cfg = tiny_model
    path, _ = _slide(tmp_path, "s.tif", 256, 256)
    settings = _settings(tmp_path)
    gate = threading.Event()
    started = threading.Event()
    real_write_rows = outputs.JobSink.write_rows

    def slow_rows(self, top, probs):
        started.set()
        gate.wait(30)
        return real_write_rows(self, top, probs)

    outputs.JobSink.write_rows = slow_rows
    try:
        runner = JobRunner(model, cfg, settings)
        running = runner.submit(path)
        queued = runner.submit(path)
        assert started.wait(30)
        assert runner.cancel(queued.id).state == "cancelled"
        assert runner.cancel(running.id).cancel_requested
        gate.set()
        assert runner.wait(running.id, 30).state == "cancelled"
        runner.shutdown()
    finally:
        outputs.JobSink.write_rows = real_write_rows

    # a runner that "crashed" mid-job: the store says running; a new runner resumes it
    store = JobStore(settings.jobs.store)
    crashed = store.update(store.create(path), state=RUNNING, attempts=1, progress=0.3)
    cancelled = store.update(store.create(path), state=RUNNING, cancel_requested=True)
    runner = JobRunner(model, cfg, settings)
    try:
        assert runner.resume() == [crashed.id]
        done = runner.wait(crashed.id, 60)
        assert done.state == "succeeded" and done.attempts == 2
        assert store.get(cancelled.id).state == "cancelled"
        with pytest.raises(RequestError, match="already ended"):  # final: 409, unchanged
            runner.cancel(crashed.id)
        assert store.get(crashed.id).state == "succeeded"
    finally:
        runner.shutdown()


def test_batched_forward_gives_the_same_mask(tiny_model):
    from foveation.serving.runtime import forward_tiles, segment_image

    model, cfg = tiny_model
    img = smooth_image(130, 190, seed=3)
    calls = []

    def forward(bank, w):
        calls.append(len(bank))
        return forward_tiles(model, bank, w)

    a = segment_image(model, cfg, img)
    b = segment_image(model, cfg, img, forward)
    assert calls and (a.mask == b.mask).all() and a.counts == b.counts
    assert a.apsm.shape == (9, 12)  # ceil(130 / 16), ceil(190 / 16)


def test_a_slide_interrupted_at_60_percent_resumes_from_its_checkpoint(tiny_model, tmp_path):
    """predict_slide saves its finished rows under <prefix>/partial/; killed at 60% and run
    again, it restores them, segments fewer than half of the locations, and writes exactly
    what an uninterrupted run writes. A checkpoint of another model is not reused."""
    import pyvips

    from foveation.inference.outputs import predict_slide

    model, cfg = tiny_model
    path, _ = _slide(tmp_path, "s.tif", 768, 320)
    whole, whole_summary = predict_slide(
        model, cfg, path, str(tmp_path / "whole"), skip_background=False
    )

    class Killed(Exception):
        pass

    def kill_at_60(done, total):
        if done >= 0.6 * total:
            raise Killed()

    prefix = str(tmp_path / "job")

    def run(model_key: str, progress=None):
        return predict_slide(
            model,
            cfg,
            path,
            prefix,
            progress=progress,
            checkpoint_interval_s=0,
            resume_key=model_key,
            skip_background=False,
        )

    with pytest.raises(Killed):
        run("m1", kill_at_60)
    assert (tmp_path / "job" / "partial" / "state.json").exists()
    results, summary = run("m1")
    assert summary["resumed_from_row"] >= 0.5 * 768, summary
    assert summary["locations"] < 0.5 * whole_summary["locations"], (summary, whole_summary)
    for name in ("labels", "probabilities"):
        a = pyvips.Image.new_from_file(whole[name]).numpy()
        b = pyvips.Image.new_from_file(results[name]).numpy()
        assert np.array_equal(a, b), name
    assert not (tmp_path / "job" / "partial").exists()  # removed once the results are written

    # a checkpoint left by another model is ignored: the run starts over
    with pytest.raises(Killed):
        run("m1", kill_at_60)
    _, other = run("m2")
    assert other["resumed_from_row"] == 0 and other["locations"] == whole_summary["locations"]
