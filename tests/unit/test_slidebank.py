"""Batches cut from slide files equal those cut from the same image in memory: one extractor
(``data.batches.BatchExtractor``) over two region sources."""

import numpy as np
import pytest
import torch

from foveation.config import Config
from foveation.data.batches import BatchExtractor
from foveation.data.synthetic import TissueScales, generate_slide
from foveation.io.slides import SlideReader, write_pyramid
from foveation.patches import make_xr, xr_neighbourhoods


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    import pyvips

    cfg = Config()
    s = generate_slide(512, 448, TissueScales.from_patches(cfg.patches), seed=2)
    d = tmp_path_factory.mktemp("slide")
    img = pyvips.Image.new_from_memory(np.ascontiguousarray(s.image).data, 448, 512, 3, "uchar")
    write_pyramid(img, str(d / "s.tif"), 128, "deflate", sqrt2=True)  # lossless: exact comparison
    lab = pyvips.Image.new_from_memory(np.ascontiguousarray(s.truth).data, 448, 512, 1, "uchar")
    lab.tiffsave(
        str(d / "l.tif"),
        tile=True,
        pyramid=True,
        tile_width=128,
        tile_height=128,
        compression="deflate",
        region_shrink="mode",
    )
    return s, str(d / "s.tif"), str(d / "l.tif")


def test_slide_batches_equal_the_in_memory_extractor(slide_files):
    cfg = Config()
    s, image_uri, label_uri = slide_files
    reader = BatchExtractor(cfg, SlideReader(image_uri), SlideReader(label_uri, rgb=False))
    assert len(reader.image.levels) > 3  # the sqrt(2) companion levels are there
    locs = np.array([[0, 0], [0, 27], [31, 0], [31, 27], [15, 13], [7, 20]])
    b = reader.batch(locs, "s")
    img = torch.from_numpy(s.image).permute(2, 0, 1)
    mem = BatchExtractor.from_arrays(cfg, s.image, s.truth).batch(locs, "s")
    # pyramid levels are rounded to uint8 once per level: at most 1 grey level apart
    assert np.abs(b["bank"].astype(int) - mem["bank"].astype(int)).max() <= 1
    assert np.array_equal(b["label"], mem["label"])
    t = torch.from_numpy(locs)
    xr = xr_neighbourhoods(
        make_xr(img, cfg.patches.xr_scale, cfg.model.mean, cfg.model.std), t
    ).numpy()
    np.testing.assert_allclose(mem["xr"], xr, atol=1e-5)  # in memory: the whole image's x_r
    # a pyramid level is a rounded area mean: within a grey level or two (0.5 / 255 / std ~ 0.009)
    np.testing.assert_allclose(b["xr"], xr, atol=0.02)
    assert np.abs(b["xr"] - xr).mean() < 0.005
    assert b["loc"].dtype == np.int32 and list(b["slide_id"]) == ["s"] * 6


def test_no_locations_give_an_empty_batch(slide_files):
    cfg = Config()
    _, image_uri, label_uri = slide_files
    b = BatchExtractor(cfg, SlideReader(image_uri), SlideReader(label_uri, rgb=False)).batch(
        np.zeros((0, 2))
    )
    assert b["bank"].shape == (0, 3, 3, 64, 64) and b["label"].shape == (0, 16, 16)


def test_rgba_and_grey_slides_read_as_rgb(tmp_path):
    from PIL import Image

    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    Image.fromarray(rgba).save(tmp_path / "a.png")
    r = SlideReader(str(tmp_path / "a.png"))
    out = r.read_level(0, 0, 0, 40, 50)
    assert (
        r.bands == 3
        and out[0, 0].tolist() == [200, 0, 0]
        and out[39, 0].tolist() == [255, 255, 255]
    )
    Image.fromarray(np.full((30, 30), 77, np.uint8)).save(tmp_path / "g.png")
    assert SlideReader(str(tmp_path / "g.png")).read_region((15, 15), 16, 8).tolist()[0][0] == [
        77,
        77,
        77,
    ]


def test_openslide_backend_reads_what_pyvips_reads(slide_files, tmp_path):
    import shutil

    _, image_uri, _ = slide_files
    vendor = tmp_path / "s.svs"  # OpenSlide reads a tiled TIFF as "generic-tiff" whatever its name
    shutil.copy(image_uri, vendor)
    a, b = SlideReader(image_uri), SlideReader(str(vendor))
    assert b.backend == "openslide" and a.backend == "pyvips"
    assert (b.width, b.height) == (a.width, a.height)
    for centre, fov, out in (((100, 100), 64, 64), ((250, 200), 256, 64)):
        diff = np.abs(
            a.read_region(centre, fov, out).astype(int)
            - b.read_region(centre, fov, out).astype(int)
        )
        assert diff.max() <= 1


def test_whole_slide_inference_from_a_slide_file_equals_from_memory(slide_files):
    """``SlideReader.as_source`` is the out-of-core region source of whole-slide inference."""
    from foveation.inference import ArraySink, ArraySource, segment
    from foveation.models import FoveatedSegmenter

    s, image_uri, _ = slide_files
    torch.manual_seed(0)
    model = FoveatedSegmenter(Config()).eval()
    source = SlideReader(image_uri).as_source(level=0)
    assert (source.height, source.width) == s.image.shape[:2]
    a, b = ArraySink(keep_probs=True), ArraySink(keep_probs=True)
    segment(model, source, Config(), a)
    segment(model, ArraySource(s.image), Config(), b)
    assert np.array_equal(a.mask, b.mask)  # a lossless pyramid: the same pixels, the same answer


def test_an_aperio_svs_opens_through_openslide_with_its_mpp_and_levels(tmp_path):
    import openslide

    from tests.vendor_slides import write_svs

    img = np.random.default_rng(3).integers(0, 255, (700, 520, 3), np.uint8)
    path = str(tmp_path / "s.svs")
    write_svs(path, img, mpp=0.25)
    assert openslide.OpenSlide.detect_format(path) == "aperio"
    r = SlideReader(path)
    assert r.backend == "openslide" and r.mpp == pytest.approx(0.25)
    assert [lv.downsample for lv in r.levels] == pytest.approx([1, 2, 4], rel=0.01)
    assert np.array_equal(r.read_level(0, 100, 50, 64, 80), img[100:164, 50:130])
    half = img[:700, :520].reshape(350, 2, 260, 2, 3).astype(np.float32).mean((1, 3))
    assert np.array_equal(
        r.read_level(1, 10, 20, 30, 40), np.rint(half).astype(np.uint8)[10:40, 20:60]
    )


def test_an_ome_tiff_opens_with_its_subifd_levels_and_a_truncated_tiff_is_named(tmp_path):
    from foveation.io.slides import SlideError
    from tests.vendor_slides import write_ome_tiff, write_svs

    img = np.random.default_rng(4).integers(0, 255, (600, 520, 3), np.uint8)
    path = str(tmp_path / "s.ome.tif")
    write_ome_tiff(path, img, mpp=0.3)
    r = SlideReader(path)
    assert r.backend == "pyvips" and r.mpp == pytest.approx(0.3)
    assert [lv.downsample for lv in r.levels] == pytest.approx([1, 2, 4], rel=0.01)
    assert np.array_equal(r.read_level(0, 100, 50, 64, 80), img[100:164, 50:130])
    write_svs(str(tmp_path / "whole.svs"), img)
    whole = (tmp_path / "whole.svs").read_bytes()
    for name, frac in [("a.svs", 0.9), ("b.tif", 0.9), ("c.tif", 0.3), ("d.ome.tif", 0.5)]:
        src = whole if not name.endswith("ome.tif") else (tmp_path / "s.ome.tif").read_bytes()
        (tmp_path / name).write_bytes(src[: int(len(src) * frac)])
        with pytest.raises(SlideError, match=f"{name}: truncated TIFF.*past the end"):
            SlideReader(str(tmp_path / name))


def test_a_40x_and_a_20x_scan_of_the_same_tissue_read_alike_at_the_models_mpp(tmp_path):
    """ScaledSource: the 40x scan resampled to 20x matches the 20x scan within resampling error,
    and scale 1 is level 0 exactly."""
    import torch.nn.functional as F

    from foveation.io.slides import ScaledSource
    from tests.vendor_slides import write_svs

    cfg = Config()
    tissue = generate_slide(1024, 768, TissueScales.from_patches(cfg.patches), 5).image
    half = (
        F.avg_pool2d(torch.from_numpy(tissue).permute(2, 0, 1)[None].float(), 2)[0]
        .permute(1, 2, 0)
        .round()
        .to(torch.uint8)
        .numpy()
    )
    write_svs(str(tmp_path / "x40.svs"), tissue, mpp=0.25)
    write_svs(str(tmp_path / "x20.svs"), half, mpp=0.5)
    r40, r20 = SlideReader(str(tmp_path / "x40.svs")), SlideReader(str(tmp_path / "x20.svs"))
    same = ScaledSource(r20, r20.mpp / 0.5)
    assert np.array_equal(same.read_region(10, 20, 100, 90), half[10:110, 20:110])
    s40 = ScaledSource(r40, r40.mpp / 0.5)
    assert (s40.height, s40.width) == (512, 384)
    a = s40.read_region(37, 11, 200, 150).astype(np.int16)
    b = half[37:237, 11:161].astype(np.int16)
    assert np.abs(a - b).mean() < 1.0  # a 2x2 area mean either way: rounding only
    c = ScaledSource(r40, 0.3).read_region(0, 0, 64, 64)  # a non-integer scale reads too
    assert c.shape == (64, 64, 3)
