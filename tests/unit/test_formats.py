"""The one table of slide formats (``foveation.io.formats``) is what the reader, ingest and
prediction read: every suffix in it is opened by its backend, routed by ingest as its
``whole_slide`` says and listed by prediction; a suffix outside it is refused by each."""

import pytest

from foveation.config import IngestConfig
from foveation.data.gleason import RawSlide
from foveation.data.ingest import ingest_slide
from foveation.errors import DataError, InputError
from foveation.io import formats
from foveation.io.formats import FORMATS, OPENSLIDE, PYVIPS, SlideFormat, slide_format, suffix_of
from foveation.io.slides import SlideError, SlideReader
from foveation.prediction import list_slides

SUFFIXES = sorted(FORMATS)


def test_the_table_is_consistent():
    for suffix, fmt in FORMATS.items():
        assert isinstance(fmt, SlideFormat) and fmt.suffix == suffix == suffix.lower()
        assert fmt.backend in (OPENSLIDE, PYVIPS) and fmt.what
    assert suffix_of("s3://b/Slide.SVS?versionId=1") == ".svs" and suffix_of("s3://b/x") == ""
    assert slide_format("a/b.NDPI") is FORMATS[".ndpi"] and slide_format("a.xyz") is None


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_reader_opens_each_format_with_its_backend(tmp_path, suffix):
    # Garbage under the name: the backend the table names is the one that refuses it.
    path = tmp_path / f"s{suffix}"
    path.write_bytes(b"not a slide at all" * 64)
    with pytest.raises(SlideError) as err:
        SlideReader(str(path))
    openslide = "OpenSlide cannot open it" in str(err.value)
    assert openslide == (FORMATS[suffix].backend == OPENSLIDE), str(err.value)
    assert str(path) in str(err.value)


def test_the_reader_refuses_a_suffix_outside_the_table(tmp_path):
    (tmp_path / "s.xyz").write_bytes(b"x")
    with pytest.raises(SlideError, match=r"s\.xyz: unsupported slide format '\.xyz'; expected"):
        SlideReader(str(tmp_path / "s.xyz"))
    assert issubclass(SlideError, InputError)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_ingest_routes_each_format_as_the_table_says(tmp_path, suffix, monkeypatch):
    import foveation.data.wsi

    def streamed(*args, **kwargs):
        raise DataError("streamed tile by tile")

    monkeypatch.setattr(foveation.data.wsi, "ingest_wsi", streamed)
    ann = (str(tmp_path / "s.geojson"),)
    raw = RawSlide("s", str(tmp_path / f"s{suffix}"), ann, (1,), label_kind="qupath")
    out = ingest_slide(raw, str(tmp_path / "store"), IngestConfig())
    assert out.status == "failed"
    assert ("streamed tile by tile" in out.error) == FORMATS[suffix].whole_slide, out.error


def test_prediction_lists_every_format_of_the_table_and_nothing_else(tmp_path):
    for suffix in SUFFIXES:
        (tmp_path / f"s{suffix.lstrip('.')}{suffix.upper()}").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    (tmp_path / "a.s2.tif").write_bytes(b"")  # the ingest's 1/sqrt(2) companion: not a slide
    items = list_slides(str(tmp_path))
    assert sorted(formats.suffix_of(item.uri) for item in items) == SUFFIXES


def test_a_real_vendor_slide_and_a_tiff_open_with_their_backends(tmp_path):
    import numpy as np

    from tests.vendor_slides import write_svs

    img = np.random.default_rng(0).integers(0, 255, (300, 260, 3), np.uint8)
    write_svs(str(tmp_path / "a.svs"), img)
    assert SlideReader(str(tmp_path / "a.svs")).backend == OPENSLIDE
    (tmp_path / "a.svs").rename(tmp_path / "a.tif")  # the same bytes as a TIFF: pyvips
    assert SlideReader(str(tmp_path / "a.tif")).backend == PYVIPS
