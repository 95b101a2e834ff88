"""Decoding an uploaded image under limits: the format and the pixel count are read from the
header (PIL opens lazily) and checked before a single pixel is decoded. PIL's own
decompression-bomb guard is a second line: the ingress replica sets ``Image.MAX_IMAGE_PIXELS``
to the same limit (a process-wide setting, so never changed here), and its warning is an
error here."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np

from foveation.io.images import ImageError, as_rgb_uint8
from foveation.serving.errors import RequestError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff"}
CONTENT_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/tiff", "image/tif"}


def check_content_type(content_type: str | None) -> None:
    """An image upload's declared type: image/png, image/jpeg or image/tiff."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"content type {content_type or '(none)'!r}: expected image/png, image/jpeg or "
            "image/tiff (a raw body), or multipart/form-data with a file field 'image'",
        )


def decode_upload(data: bytes, max_pixels: int, name: str = "image") -> np.ndarray:
    """PNG / JPEG / TIFF bytes -> uint8 RGB [H, W, 3], or a :class:`RequestError`: 400 for
    bytes that are not a supported image, truncated, corrupt or empty; 413 for more pixels
    than ``max_pixels`` (read from the header, before decoding)."""
    from PIL import Image

    if not data:
        raise RequestError(400, "empty_body", f"{name}: no bytes; expected a PNG, JPEG or TIFF")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(FORMATS))
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(
            413, "too_many_pixels", f"{name}: {_first_line(exc)}; limit {max_pixels} pixels"
        ) from None
    except Exception as exc:  # UnidentifiedImageError, SyntaxError, OSError on bad headers
        raise RequestError(
            400,
            "not_an_image",
            f"{name}: not a readable image ({_first_line(exc)}); expected PNG, JPEG or TIFF",
        ) from None
    if w < 1 or h < 1:
        raise RequestError(400, "empty_image", f"{name}: image is {w} x {h} pixels; expected >= 1")
    if im.format == "TIFF":
        im, w, h = _tiff_level0(im, name)
    if w * h > max_pixels:
        raise RequestError(
            413,
            "too_many_pixels",
            f"{name}: {w} x {h} = {w * h} pixels exceeds the limit of {max_pixels}",
        )
    try:
        im.load()
        im = _oriented(im)
        if im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return as_rgb_uint8(np.asarray(im), name)
    except ImageError as exc:
        raise RequestError(400, "bad_image", str(exc)) from None
    except Exception as exc:
        raise RequestError(
            400, "corrupt_image", f"{name}: truncated or corrupt image ({_first_line(exc)})"
        ) from None


MAX_TIFF_PAGES = 64


def _tiff_level0(im, name: str):
    """A multi-page TIFF upload: a pyramid (each further page smaller, as pyramidal TIFF and
    OME-TIFF writers leave them) is read at its largest page, level 0; several full-size
    images are refused rather than segmenting the first without a word."""
    n = getattr(im, "n_frames", 1)
    if n <= 1:
        return im, im.size[0], im.size[1]
    if n > MAX_TIFF_PAGES:
        raise RequestError(
            400, "multi_image_tiff", f"{name}: a TIFF of {n} pages; expected one image or a pyramid"
        )
    sizes = []
    for k in range(n):
        im.seek(k)  # reads the page's header only
        sizes.append(im.size)
    largest = max(sizes, key=lambda s: s[0] * s[1])
    full = [k for k, s in enumerate(sizes) if s == largest]
    if len(full) > 1:
        raise RequestError(
            400,
            "multi_image_tiff",
            f"{name}: a TIFF with {len(full)} full-size images ({largest[0]} x {largest[1]}, "
            f"pages {full[:8]}); send one image per request",
        )
    im.seek(full[0])
    return im, largest[0], largest[1]


def _oriented(im):
    """The image as it is meant to be seen: the EXIF orientation (a phone or camera photo of a
    slide) applied, so the mask lines up with what the client displays."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # an unreadable EXIF block: the pixels as stored
        return im


def _first_line(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\s*<[^>]*object at 0x[0-9a-f]+>", "", line)  # no reprs of our buffers
