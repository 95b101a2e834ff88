"""A pyramidal tiled TIFF written one tile at a time, in memory of a few tiles whatever the
slide's size.

libvips' pyramid writer (``tiffsave(pyramid=True)``) keeps strips one tile high and as wide as
the slide for every level, several of them: about 6 KB per column of an RGB slide, 100 MB for a
16,384 px wide one, growing with the slide (the ``wsi`` benchmark). Here each level is written
by tifffile from a generator of tiles in row-major order, and each tile is also appended,
uncompressed, to a tile-major scratch file; level k's tile (r, c) is then reduced from the four
tiles (2r..2r+1, 2c..2c+1) of level k-1 read back from that file by offset. So the peak holds a
2 x 2 block of tiles, never a row of them.

The file has the layout ``tiffsave(pyramid=True)`` gives and ``io.slides.SlideReader`` reads:
one page per level, each half the previous (rounded up) until the level fits in one tile,
reduced levels marked as such, the resolution in pixels per centimetre when ``mpp`` is known.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def reduce_mean(block: np.ndarray) -> np.ndarray:
    """2 x 2 box mean (rounded) of an even-sided [2h, 2w(, bands)] uint8 block: area-correct,
    as libvips' shrink."""
    b = block.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def reduce_mode(block: np.ndarray) -> np.ndarray:
    """2 x 2 mode of a [2h, 2w] map of class ids: a value two of the four share (the first
    such in reading order), else the top-left one. Never a blend of two ids."""
    a, b, c, d = block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]
    out = np.where(c == d, c, a)
    out = np.where((b == c) | (b == d), b, out)
    return np.where((a == b) | (a == c) | (a == d), a, out)


REDUCERS = {"mean": reduce_mean, "mode": reduce_mode}


def level_sizes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every level: halved (rounded up) until the level fits in a tile."""
    sizes = [(height, width)]
    while max(sizes[-1]) > tile:
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class _Scratch:
    """A level's tiles, padded to ``tile`` px by repeating their last row and column (so a
    reduction at an odd edge averages real pixels, never padding), stored tile-major."""

    def __init__(self, path: str, rows: int, cols: int, tile: int, bands: int) -> None:
        self.rows, self.cols, self.tile, self.bands = rows, cols, tile, bands
        self.nbytes = tile * tile * bands
        self.f = open(path, "w+b")  # noqa: SIM115 (closed by close())

    def append(self, t: np.ndarray) -> np.ndarray:
        full = _padded(t, self.tile)
        self.f.write(full.tobytes())
        return full

    def read(self, r: int, c: int) -> np.ndarray:
        r, c = min(r, self.rows - 1), min(c, self.cols - 1)
        self.f.seek((r * self.cols + c) * self.nbytes)
        buf = self.f.read(self.nbytes)
        shape = (self.tile, self.tile, self.bands) if self.bands > 1 else (self.tile, self.tile)
        return np.frombuffer(buf, np.uint8).reshape(shape)

    def close(self) -> None:
        self.f.close()


def _padded(t: np.ndarray, tile: int) -> np.ndarray:
    h, w = t.shape[:2]
    if h == tile and w == tile:
        return np.ascontiguousarray(t)
    pad = [(0, tile - h), (0, tile - w)] + [(0, 0)] * (t.ndim - 2)
    return np.pad(t, pad, mode="edge")


def write_tile_pyramid(
    path: str,
    height: int,
    width: int,
    bands: int,
    tiles: Iterable[np.ndarray],
    *,
    tile: int = 256,
    compression: str = "deflate",
    quality: int = 90,
    mpp: float | None = None,
    reduce: str = "mean",
    on_tile: Callable[[np.ndarray], None] | None = None,
) -> None:
    """Write the pyramid of the ``height`` x ``width`` image whose level-0 tiles ``tiles``
    yields (row-major, [h, w(, bands)] uint8, ``tile`` px a side, less on the last row and
    column) to ``path``. ``compression``: "jpeg" (RGB only; ``quality``), "deflate" or "none".
    ``reduce``: "mean" for images, "mode" for label maps. ``on_tile`` sees each level-0 tile
    (unpadded) once, e.g. to count classes."""
    import tifffile

    if reduce not in REDUCERS:
        raise ValueError(f"reduce {reduce!r}: expected one of {sorted(REDUCERS)}")
    if compression == "jpeg" and bands != 3:
        raise ValueError(f"jpeg compression needs 3 bands, not {bands}")
    codec = {"jpeg": "jpeg", "deflate": "zlib", "none": None}.get(compression, compression)
    opts = _page_options(bands, tile, codec, mpp)
    sizes = level_sizes(height, width, tile)
    source = iter(tiles)
    tmpdir = tempfile.mkdtemp(prefix=".pyramid-", dir=os.path.dirname(os.path.abspath(path)))
    prev: _Scratch | None = None
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for k, (h, w) in enumerate(sizes):
                rows, cols = -(-h // tile), -(-w // tile)
                last = k == len(sizes) - 1
                cur = None if last else _Scratch(f"{tmpdir}/{k}.raw", rows, cols, tile, bands)
                if k == 0:
                    level = _level0_tiles(source, h, w, tile, bands, on_tile)
                else:
                    level = _reduced_tiles(prev, rows, cols, REDUCERS[reduce])
                shape = (h, w, bands) if bands > 1 else (h, w)
                # tifffile adds its own entries to compressionargs: a fresh dict per level.
                args = {"level": int(quality) if codec == "jpeg" else 6} if codec else {}
                tw.write(
                    _stored(level, cur, tile),
                    shape=shape,
                    subfiletype=1 if k else 0,
                    compressionargs=args,
                    **opts,
                )
                if prev is not None:
                    prev.close()
                prev = cur
    finally:
        if prev is not None:
            prev.close()
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)


def _page_options(bands: int, tile: int, codec: str | None, mpp: float | None) -> dict:
    """tifffile's options shared by every level's page."""
    opts = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "photometric": "rgb" if bands == 3 else "minisblack",
        "compression": codec,
        "metadata": None,
    }
    if mpp:
        opts |= {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    return opts


def _level0_tiles(
    source: Iterator[np.ndarray],
    height: int,
    width: int,
    tile: int,
    bands: int,
    on_tile: Callable[[np.ndarray], None] | None,
) -> Iterator[np.ndarray]:
    """Level 0's tiles from ``source``, checked (a tile of the wrong size, or too few, is an
    error naming it), one band taken from a single-band image's 3-d tiles."""
    for r in range(-(-height // tile)):
        for c in range(-(-width // tile)):
            t = next(source, None)
            if t is None:
                raise ValueError(f"the tiles ended before tile ({r}, {c})")
            if bands == 1 and t.ndim == 3:
                t = t[..., 0]
            want = (min(tile, height - r * tile), min(tile, width - c * tile))
            if t.shape[:2] != want:
                raise ValueError(f"tile ({r}, {c}) is {t.shape[:2]}, expected {want}")
            if on_tile is not None:
                on_tile(t)
            yield t


def _reduced_tiles(
    prev: _Scratch, rows: int, cols: int, shrink: Callable[[np.ndarray], np.ndarray]
) -> Iterator[np.ndarray]:
    """A coarser level's tiles, each reduced from the 2 x 2 finer tiles under it."""
    for r in range(rows):
        for c in range(cols):
            yield shrink(_block(prev, r, c))


def _stored(level: Iterator[np.ndarray], cur: _Scratch | None, tile: int) -> Iterator[np.ndarray]:
    """A level's tiles padded to full tiles, each also kept in ``cur`` (the next level's
    source; None for the last level)."""
    for t in level:
        yield cur.append(t) if cur is not None else _padded(t, tile)


def _block(prev: _Scratch, r: int, c: int) -> np.ndarray:
    """The 2 x 2 tiles of the finer level under tile (r, c) of the coarser one, as one block
    (a missing last row or column repeats its neighbour, as the padding does)."""
    top = np.concatenate([prev.read(2 * r, 2 * c), prev.read(2 * r, 2 * c + 1)], axis=1)
    bottom = np.concatenate([prev.read(2 * r + 1, 2 * c), prev.read(2 * r + 1, 2 * c + 1)], axis=1)
    return np.concatenate([top, bottom], axis=0)
