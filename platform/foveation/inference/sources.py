"""Region sources: anything with ``height``, ``width`` and ``read_region``
(docs/contracts.md#inference-source-and-sink). ``ArraySource`` serves an in-memory image;
``slides.SlideReader.as_source`` serves one pyramid level of a slide on disk or in S3."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from foveation.io.images import as_rgb_uint8, to_chw_tensor
from foveation.patches import pad_image


@runtime_checkable
class RegionSource(Protocol):
    height: int
    width: int

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """uint8 [height, width, 3] of the image; the region lies inside the image."""
        ...


class ArraySource:
    """An in-memory image as a region source (grayscale / RGBA converted on the way in)."""

    def __init__(self, image, name: str = "image") -> None:
        self.image = as_rgb_uint8(image, name)
        self.height, self.width = self.image.shape[:2]

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.image[top : top + height, left : left + width]


def read_window(
    source: RegionSource, top: int, left: int, height: int, width: int, mode: str, pad_value
) -> torch.Tensor:
    """uint8 [3, height, width] of any window, inside or beyond the image: the part inside is
    read from the source, the rest padded as ``patches.pad_image`` pads a whole image.

    Reflection needs the image content next to the border; windows are always larger than the
    reflected margin they need, so it is inside what was read."""
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + height, source.height), min(left + width, source.width)
    if t1 <= t0 or l1 <= l0:
        out = torch.empty((3, height, width), dtype=torch.uint8)
        out[:] = torch.as_tensor(pad_value, dtype=torch.uint8).reshape(3, 1, 1)
        return out
    inner = to_chw_tensor(source.read_region(t0, l0, t1 - t0, l1 - l0))
    pads = (t0 - top, top + height - t1, l0 - left, left + width - l1)
    if mode == "reflect":
        # Reflect about the *image* border only: a window edge inside the image is not a border.
        inner_pads = (
            pads[0] if top < 0 else 0,
            pads[1] if top + height > source.height else 0,
            pads[2] if left < 0 else 0,
            pads[3] if left + width > source.width else 0,
        )
        return pad_image(inner, inner_pads, "reflect", pad_value)
    return pad_image(inner, pads, "constant", pad_value)
