import io

import numpy as np
import pytest
from PIL import Image

from foveation.io.images import ImageError, as_rgb_uint8, decode_image, encode_png


def test_grayscale_and_rgba_are_converted():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = as_rgb_uint8(g)
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == g).all() and (rgb[..., 2] == g).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 100
    rgba[0, 0, 3] = 255  # opaque red-ish; the rest transparent -> white background
    out = as_rgb_uint8(rgba)
    assert out[0, 0].tolist() == [100, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    assert as_rgb_uint8(np.ones((4, 4, 3), np.float32)).max() == 255
    assert as_rgb_uint8(np.zeros((3, 5, 6), np.uint8)).shape == (5, 6, 3)  # CHW accepted


@pytest.mark.parametrize(
    ("arr", "msg"),
    [
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((6, 6, 5), np.uint8), "expected an RGB image"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), -3.0), "float values"),
        (np.full((2, 2, 3), 70000, np.int32), "uint8"),
    ],
)
def test_bad_arrays_are_refused_with_a_clear_message(arr, msg):
    with pytest.raises(ImageError, match=msg):
        as_rgb_uint8(arr, "upload")


def test_decode_png_and_bad_bytes():
    img = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    data = encode_png(img)
    assert (decode_image(data) == img).all()
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"hello world", "upload.png")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], "half.png")
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(data, max_pixels=100)


def test_decode_grayscale_tiff():
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(buf, format="TIFF")
    out = decode_image(buf.getvalue())
    assert out.shape == (5, 7, 3) and (out == 9).all()
