"""Image decoding and conversion to the platform's one pixel format: uint8 RGB [H, W, 3].

Every image entering the platform passes through :func:`as_rgb_uint8`, which converts what
can be converted (grayscale, RGBA over white, float in [0, 1], 16-bit) and refuses the rest
with a message naming the input and what was expected.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from foveation.errors import InputError

if TYPE_CHECKING:  # torch is imported where used: ingest workers never need it (1 s each)
    import torch


class ImageError(InputError):
    """An image that cannot be decoded or converted: names it and what was expected."""


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """Any 2-D or 3-D array-like -> contiguous uint8 [H, W, 3]."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(
            f"{name}: expected an RGB image [H, W, 3] (or grayscale / RGBA), got shape {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: image is empty ({a.shape[0]} x {a.shape[1]} pixels)")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                f"{name}: float values must lie in [0, 1] or [0, 255], got [{lo:.3g}, {hi:.3g}]"
            )
        a = a * 255.0 if hi <= 1.0 else a
        a = np.rint(a).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        else:
            raise ImageError(
                f"{name}: expected uint8 pixels, got {a.dtype} with values outside 0..255"
            )
    c = a.shape[-1]
    if c in (2, 4):  # gray+alpha / RGBA: composite over white, the background of a slide
        alpha = a[..., -1:].astype(np.float32) / 255.0
        rgb = a[..., :-1].astype(np.float32)
        a = np.rint(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
        c -= 1
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 tensor [3, H, W] (a view where possible)."""
    import torch

    a = np.ascontiguousarray(image)
    if not a.flags.writeable:  # torch warns on read-only buffers (decoded images are)
        a = a.copy()
    return torch.from_numpy(a).permute(2, 0, 1)


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """PNG / JPEG / TIFF bytes -> uint8 [H, W, 3]; the pixel count is checked from the header
    before decoding (decompression bombs)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a readable image (expected PNG, JPEG or TIFF bytes)"
        ) from None
    except Exception as exc:  # PIL raises OSError / SyntaxError on broken headers
        raise ImageError(
            f"{name}: not a readable image (expected PNG, JPEG or TIFF bytes; {exc})"
        ) from None
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: {w} x {h} pixels exceeds the limit of {max_pixels}")
    try:
        im.load()
    except Exception as exc:
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None
    if im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    return as_rgb_uint8(np.asarray(im), name)


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes; level 1 by default: most of the size win at a fraction of the time."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_label(data: bytes, name: str = "label") -> np.ndarray:
    """A single-channel PNG of class ids -> uint8 [H, W]."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, SyntaxError):
        raise ImageError(
            f"{name}: not a readable label image (expected a single-channel PNG)"
        ) from None
    except Exception as exc:  # truncated data raises OSError from open() or load()
        raise ImageError(f"{name}: truncated or corrupt label image ({exc})") from None
    a = np.asarray(im)
    if a.ndim != 2:
        raise ImageError(f"{name}: expected a single-channel label map, got shape {a.shape}")
    return a.astype(np.uint8)
