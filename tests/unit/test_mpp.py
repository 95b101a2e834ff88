"""A slide's mpp comes only from metadata that means it (docs/data.md#mpp): OME's physical
size, Aperio's MPP, a resolution tag in centimetres; a resolution in inches (a screen
image's 72 dpi) or a value outside 0.05-50 µm/px is unknown."""

import numpy as np
import pytest

from foveation.io.slides import SlideReader, plausible_mpp, tiff_mpp


def test_ome_physical_size_is_read_in_its_unit():
    ome = '<OME xmlns="x"><Image><Pixels PhysicalSizeX="0.2527" SizeX="9">'
    assert tiff_mpp(ome, None, None) == pytest.approx(0.2527)
    nm = '<OME><Pixels PhysicalSizeX="252.7" PhysicalSizeXUnit="nm">'
    assert tiff_mpp(nm, 2.8, "in") == pytest.approx(0.2527)
    assert tiff_mpp('<OME><Pixels PhysicalSizeX="1" PhysicalSizeXUnit="pc">', 2000, "cm") is None


def test_aperio_mpp_and_a_resolution_in_centimetres_are_mpps():
    aperio = "Aperio Image Library v12.0.0 \r\n6144x6144 (256x256) -|AppMag = 20|MPP = 0.4990"
    assert tiff_mpp(aperio, None, None) == pytest.approx(0.499)
    assert tiff_mpp(None, 2000.0, "cm") == pytest.approx(0.5)


def test_inches_defaults_and_implausible_values_are_unknown():
    assert tiff_mpp(None, 2.834, "in") is None  # 72 dpi: 352.8 µm/px
    assert tiff_mpp(None, 2000.0, "in") is None  # inches, whatever the value
    assert tiff_mpp(None, 1.0, "cm") is None  # libvips' default: no resolution tag
    assert tiff_mpp(None, 10.0, "cm") is None  # 100 µm/px: no scanner
    assert (
        plausible_mpp("0.25") == 0.25 and plausible_mpp(60) is None and plausible_mpp("x") is None
    )


def test_a_tiff_made_from_a_png_has_no_mpp(tmp_path):
    import pyvips

    path = str(tmp_path / "png.tif")
    img = np.full((64, 64, 3), 200, np.uint8)
    pyvips.Image.new_from_array(img).tiffsave(path, xres=72 / 25.4, yres=72 / 25.4)  # 72 dpi
    assert SlideReader(path).mpp is None


def test_a_slide_lists_mpp_column_is_read_and_checked(tmp_path):
    from foveation.data.slidelist import scan_list
    from foveation.errors import DataError
    from foveation.prediction import list_slides

    good = tmp_path / "good.csv"
    good.write_text("image_uri,mpp\na.tif,0.25\nb.tif,\n")
    a, b = scan_list(str(good))
    assert (a.slide_id, a.mpp, b.mpp) == ("a", 0.25, None)
    assert [s.mpp for s in list_slides(str(good))] == [0.25, None]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_uri,mpp\na.tif,352.8\n")
    with pytest.raises(DataError, match=r"bad.csv, line 2: mpp .*352.8.*0.05 to 50"):
        scan_list(str(bad))
