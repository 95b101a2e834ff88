"""Request checks of the Serve app without Ray or HTTP: upload decoding under limits, the
slide URI allow-list, job ids."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from foveation.serving.errors import RequestError
from foveation.serving.jobstore import check_job_id
from foveation.serving.uploads import check_content_type, decode_upload
from foveation.serving.uris import check_slide_uri


def encoded(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def rgb(h=20, w=30):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_supported_formats_decode_to_rgb(fmt):
    img = rgb()
    out = decode_upload(encoded(img, fmt), max_pixels=10_000)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if fmt != "JPEG":
        assert (out == img).all()


def test_grey_and_16_bit_images_become_rgb():
    g = np.arange(600, dtype=np.uint8).reshape(20, 30)
    assert (decode_upload(encoded(g, "PNG"), 10_000)[..., 1] == g).all()
    g16 = (np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)
    assert decode_upload(encoded(g16, "TIFF"), 10_000).shape == (20, 30, 3)


def _png_zero():
    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _tiff_declaring(w, h):
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8)]
    entries += [(277, 3, 1), (278, 4, h), (279, 4, 4_000_000_000)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, v in entries:
        ifd += struct.pack("<HHI", tag, typ, 1)
        ifd += struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty_body"),
        (b"GIF89a not supported, nor text", 400, "not_an_image"),
        (encoded(rgb(), "PNG")[:200], 400, "corrupt_image"),
        (_png_zero(), 400, None),
        (_tiff_declaring(100_000, 100_000), 413, "too_many_pixels"),
        (_tiff_declaring(2_000, 1_000), 413, "too_many_pixels"),  # over our limit, under PIL's
        (encoded(rgb(), "GIF"), 400, "not_an_image"),
        (encoded(rgb(), "BMP"), 400, "not_an_image"),
    ],
)
def test_bad_uploads_are_request_errors(data, status, code):
    with pytest.raises(RequestError) as info:
        decode_upload(data, max_pixels=1_000_000)
    assert info.value.status == status, info.value.message
    if code:
        assert info.value.code == code
    assert "object at 0x" not in info.value.message
    d = info.value.to_dict()["error"]
    assert d["status"] == status and d["message"]


def test_the_pixel_limit_is_checked_before_decoding(monkeypatch):
    from PIL import ImageFile

    def never(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(RequestError) as info:
        decode_upload(encoded(rgb(100, 100), "PNG"), max_pixels=9_999)
    assert info.value.status == 413 and "10000" in info.value.message


@pytest.mark.parametrize("ctype", ["image/png", "image/jpeg", "IMAGE/TIFF; charset=x"])
def test_image_content_types_pass(ctype):
    check_content_type(ctype)


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/json", "image/gif"])
def test_other_content_types_are_415(ctype):
    with pytest.raises(RequestError) as info:
        check_content_type(ctype)
    assert info.value.status == 415


def test_slide_uris_under_allowed_prefixes(tmp_path):
    allowed = (str(tmp_path / "slides"), "s3://bucket/slides/")
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.tif").write_bytes(b"x")
    real = os.path.realpath(tmp_path / "slides" / "a.tif")
    assert check_slide_uri(str(tmp_path / "slides" / "a.tif"), allowed) == real
    assert check_slide_uri(f"file://{tmp_path}/slides/a.tif", allowed) == real
    assert check_slide_uri("s3://bucket/slides/x/a.tif", allowed) == "s3://bucket/slides/x/a.tif"


@pytest.mark.parametrize(
    ("uri", "status"),
    [
        ("file:///etc/passwd", 403),
        ("/etc/passwd", 403),
        ("{tmp}/slides/../secret.tif", 403),
        ("{tmp}/slides-evil/a.tif", 403),  # a prefix match must end at a '/'
        ("{tmp}/link/a.tif", 403),  # a symlink out of the allowed folder
        ("s3://bucket/slidesX/a.tif", 403),
        ("s3://other/slides/a.tif", 403),
        ("s3://bucket/slides/../x.tif", 422),
        ("s3://bucket/slides//x.tif", 422),
        ("s3://bucket", 422),
        ("http://example.com/a.tif", 422),
        ("", 422),
        (None, 422),
        (42, 422),
        ("{tmp}/slides/a\x00.tif", 422),
    ],
)
def test_disallowed_or_malformed_slide_uris(tmp_path, uri, status):
    (tmp_path / "slides").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "slides" / "link").symlink_to(tmp_path / "outside")
    os.symlink(tmp_path / "outside", tmp_path / "link")
    if isinstance(uri, str):
        uri = uri.replace("{tmp}/link", f"{tmp_path}/slides/link").format(tmp=tmp_path)
    with pytest.raises(RequestError) as info:
        check_slide_uri(uri, (str(tmp_path / "slides"), "s3://bucket/slides"))
    assert info.value.status == status, info.value.message


@pytest.mark.parametrize("job_id", ["", "x", "../../etc/passwd", "A" * 32, "0" * 31, "0" * 33])
def test_job_ids_are_32_hex_digits_or_404(job_id):
    with pytest.raises(RequestError) as info:
        check_job_id(job_id)
    assert info.value.status == 404
    assert check_job_id("0123456789abcdef" * 2)


def test_exif_orientation_is_applied():
    """A photo stored sideways with orientation 6 (display = stored turned 90 degrees
    clockwise) is segmented as displayed."""
    img = rgb(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", exif=exif)
    out = decode_upload(buf.getvalue(), 10_000)
    assert out.shape == (30, 20, 3)
    assert np.array_equal(out, np.rot90(img, k=-1))


def test_a_pyramidal_tiff_is_read_at_level_0_and_several_full_images_are_refused(tmp_path):
    import tifffile

    img = rgb(48, 64)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img[::2, ::2].copy(), photometric="rgb")  # a reduced page first
        tw.write(img, photometric="rgb")
        tw.write(img[::4, ::4].copy(), photometric="rgb")
    assert np.array_equal(decode_upload(path.read_bytes(), 10_000), img)
    with tifffile.TiffWriter(tmp_path / "two.tif") as tw:
        tw.write(img, photometric="rgb")
        tw.write(img[::-1].copy(), photometric="rgb")
    with pytest.raises(RequestError) as err:
        decode_upload((tmp_path / "two.tif").read_bytes(), 10_000)
    assert err.value.status == 400 and err.value.code == "multi_image_tiff"
    assert "2 full-size images" in err.value.message


def test_a_corrupt_tile_of_a_slide_says_so(tmp_path):
    """libvips reports a tile it cannot decode as 'unable to write to memory'; the slide
    reader names the slide, the region and the decoder's reason."""
    import tifffile

    from foveation.io.slides import SlideError, SlideReader

    img = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    page = tifffile.TiffFile(path).pages[0]
    off, n = page.dataoffsets[1], page.databytecounts[1]
    with open(path, "r+b") as f:  # tile 1: its JPEG stream replaced by garbage
        f.seek(off)
        f.write(os.urandom(n))
    reader = SlideReader(str(path))
    assert reader.read_level(0, 0, 0, 256, 256).shape == (256, 256, 3)  # tile 0 is fine
    with pytest.raises(SlideError) as err:
        reader.read_level(0, 0, 256, 256, 256)
    msg = str(err.value)
    assert str(path) in msg and "cols 256..512" in msg
    assert "corrupt or unreadable image data" in msg and "unable to write" not in msg
