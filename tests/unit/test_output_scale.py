"""Every raster output of a slide carries its physical scale, so QuPath (Bio-Formats), OpenSlide
and TIAToolbox lay it over the slide: the OME header's PhysicalSizeX/Y in µm and the TIFF
resolution in centimetres, at every level, equal to the slide's mpp times the layer's
downsampling. Read back with tifffile, pyvips and OpenSlide."""

import re
from pathlib import Path

import numpy as np
import pytest

from foveation.checkpoint import load_checkpoint
from foveation.inference.outputs import predict_slide
from tests.vendor_slides import write_svs

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint-48f8459"
MPP = 0.499


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    model, cfg, _ = load_checkpoint(str(CHECKPOINT))
    rng = np.random.default_rng(0)
    write_svs(str(tmp / "s.svs"), rng.integers(60, 200, (700, 600, 3), np.uint8), mpp=MPP)
    res, summary = predict_slide(model, cfg, str(tmp / "s.svs"), str(tmp / "out"))
    paths = {k: v.removeprefix("file://") for k, v in res.items() if k != "geojson"}
    return paths, cfg.patches.xr_scale, summary


def _expected(name: str, s: int) -> float:
    return MPP if name == "labels" else MPP * s


def test_the_ome_header_and_every_levels_resolution_say_the_physical_size(outputs):
    import tifffile

    paths, s, summary = outputs
    assert summary["slide_mpp"] == pytest.approx(MPP)
    for name, path in paths.items():
        want = _expected(name, s)
        with tifffile.TiffFile(path) as tif:
            ome = tif.ome_metadata
            got = float(re.search(r'PhysicalSizeX="([^"]+)"', ome).group(1))
            assert got == pytest.approx(want, rel=1e-4), (name, ome[:400])
            page = tif.pages[0]
            levels = [page, *(page.pages or [])]  # the SubIFDs: lower levels
            assert len(levels) >= 2 or page.imagewidth <= 256, name
            for level in levels:
                x = level.tags["XResolution"].value
                assert level.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
                per_cm = x[0] / x[1]
                down = page.imagewidth / level.imagewidth
                assert 1e4 / per_cm == pytest.approx(want * down, rel=0.02), (name, down)


def test_pyvips_and_openslide_read_the_mpp_back(outputs):
    import openslide
    import pyvips

    paths, s, _ = outputs
    for name, path in paths.items():
        want = _expected(name, s)
        im = pyvips.Image.new_from_file(path, page=0)
        assert im.get("resolution-unit") == "cm" and 1000 / im.get("xres") == pytest.approx(
            want, rel=1e-4
        ), name
        with openslide.OpenSlide(path) as osr:
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(want, rel=1e-4)
