"""SlideReader: pyramid-aware region reads from a slide on local disk or in S3.

- Pyramidal TIFF, plain TIFF, JPEG and PNG open through pyvips; on ``s3://`` through a pyvips
  custom source over ``rangeio.BlockCachedFile`` (ranged GETs through an LRU block cache: the
  slide is never downloaded whole). Vendor formats (SVS, NDPI, MRXS, ...: the backend of each
  suffix is ``io.formats.FORMATS``, the table ingest and prediction read too) open through
  OpenSlide (``openslide-python`` + ``openslide-bin``), from local disk; in S3 they are first
  copied to a local cache directory, since OpenSlide reads only files.
- ``read_region(centre, fov, out_size)`` reads from the level whose downsample is the largest
  not above ``fov / out_size`` and finishes with an area resize, so the decoded pixels stay
  close to the output pixels (docs/method.md#geometry: reading the 4400 px patch at full resolution
  decodes 16x what the model sees). Area beyond the slide is filled with ``pad_value``.
- Reads are thread-safe (a lock per level: a pyvips source has one read position) and
  ``open_slide`` caches readers per process.

Geometry follows ``patches.py``: ``centre`` is (row, col) in level-0 pixels, pixel ``k``
covering ``[k, k + 1)``, so the region is ``[c - fov/2, c + fov/2)`` per axis.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field

import numpy as np

from foveation.errors import InputError
from foveation.io import storage
from foveation.io.formats import OPENSLIDE, SLIDE_SUFFIXES, slide_format, suffix_of


class SlideError(InputError):
    """A slide that cannot be opened or read: names the slide (and region) and why."""


MPP_RANGE = (0.05, 50.0)
"""µm per pixel a slide can be scanned at; a value outside is no mpp (a 72-dpi PNG made into
a TIFF says 352.8, and a model at 0.5 µm/px would resample it 700x)."""

_OME_SIZE = re.compile(r'PhysicalSizeX="([^"]+)"')
_OME_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_IN_UM = {"µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def plausible_mpp(value) -> float | None:
    """``value`` as µm per pixel when it is a number in ``MPP_RANGE``, else None."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if MPP_RANGE[0] <= mpp <= MPP_RANGE[1] else None


def tiff_mpp(description: str | None, px_per_mm: float | None, unit: str | None) -> float | None:
    """The µm per pixel a TIFF's own metadata means, or None (unknown): OME's ``PhysicalSizeX``
    (in its unit, µm by default), Aperio's ``MPP``, else the resolution tag when its unit is
    the centimetre (libvips gives it in pixels per mm, 1.0 when absent). A resolution in inches
    is a display density (72 dpi), not a scan's; any value must fall in ``MPP_RANGE``."""
    text = description or ""
    ome = _OME_SIZE.search(text) if "<OME" in text else None
    if ome:
        unit_m = _OME_UNIT.search(text)
        factor = _IN_UM.get(unit_m.group(1) if unit_m else "µm")
        try:
            return plausible_mpp(float(ome.group(1)) * factor) if factor else None
        except ValueError:
            return None
    aperio = _APERIO_MPP.search(text) if text.startswith("Aperio") else None
    if aperio:
        return plausible_mpp(aperio.group(1))
    if unit != "cm" or not px_per_mm or abs(px_per_mm - 1.0) < 1e-6:
        return None
    return plausible_mpp(1000.0 / px_per_mm)


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float
    tile: tuple[int, int] | None  # (height, width) of the stored tiles, None when not tiled


@dataclass
class ReadCounters:
    regions: int = 0
    decoded_pixels: int = 0  # pixels of every stored tile (or strip) a read had to decode
    output_pixels: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, decoded: int, output: int) -> None:
        with self.lock:
            self.regions += 1
            self.decoded_pixels += decoded
            self.output_pixels += output


class SlideReader:
    def __init__(
        self,
        uri: str,
        *,
        block_size: int = 1 << 20,
        max_blocks: int = 64,
        cache_dir: str | None = None,
        rgb: bool = True,
        mpp: float | None = None,
    ):
        """``rgb``: present every slide as 3-band RGB (grey expanded, alpha flattened onto
        white); label maps pass False to keep their single band of class ids. ``mpp``: the
        slide's µm per pixel as its slide list gives it, over what its metadata says."""
        self.uri = uri
        self.rgb = rgb
        self.counters = ReadCounters()
        self.range_file = None
        fmt, suffix = slide_format(uri), suffix_of(uri)
        if fmt is None and suffix:
            raise SlideError(
                f"{uri}: unsupported slide format {suffix!r}; expected one of {SLIDE_SUFFIXES}"
            )
        if fmt is not None and fmt.tiff and not storage.is_remote(uri):
            check_tiff_complete(uri.removeprefix("file://"), uri)
        if fmt is not None and fmt.backend == OPENSLIDE:
            self._open_openslide(
                self._local_copy(uri, cache_dir) if storage.is_remote(uri) else uri
            )
        else:  # pyvips: TIFF, JPEG, PNG, and a file without a suffix (libvips sniffs it)
            self._open_pyvips(uri, block_size, max_blocks)
        self.width, self.height = self.levels[0].width, self.levels[0].height
        self._locks = [threading.Lock() for _ in self.levels]
        if mpp is not None:
            self.mpp = mpp

    # -- opening ------------------------------------------------------------------------------
    def _open_pyvips(self, uri: str, block_size: int, max_blocks: int) -> None:
        self.backend = "pyvips"
        pyramid, self.range_file = self._pyvips_pyramid(uri, block_size, max_blocks)
        w0 = pyramid[0][0].width
        # A companion pyramid at 1/sqrt(2) (written by ingest) adds the levels in between, so
        # a FoV is read from a level at most sqrt(2) finer than it needs (benchmark `io`).
        companion = companion_uri(uri)
        if companion and storage.exists(companion):
            extra, self._companion_file = self._pyvips_pyramid(companion, block_size, max_blocks)
            pyramid = sorted(
                pyramid + [p for p in extra if p[0].width < w0], key=lambda p: -p[0].width
            )
        self._sources = [src for _, src in pyramid]
        self._pages = [_as_rgb(im) if self.rgb else im for im, _ in pyramid]
        self.levels = [Level(im.width, im.height, w0 / im.width, _tile_of(im)) for im, _ in pyramid]
        first = pyramid[0][0]

        def meta(name: str):
            return first.get(name) if first.get_typeof(name) else None

        self.mpp = tiff_mpp(meta("image-description"), meta("xres"), meta("resolution-unit"))
        self.bands = self._pages[0].bands

    @staticmethod
    def _pyvips_pyramid(uri: str, block_size: int, max_blocks: int):
        """The pages of one file that form a pyramid, and its range file (S3) or None."""
        import pyvips

        range_file = None
        sources: dict[int, object] = {}
        try:
            if storage.is_remote(uri):
                from foveation.io.rangeio import BlockCachedFile, vips_source

                range_file = BlockCachedFile(uri, block_size=block_size, max_blocks=max_blocks)

                def page(k: int, subifd: int | None = None):
                    src = vips_source(range_file)  # one per page: a source has one position
                    opts = {"page": k} if k else {}  # JPEG / PNG loaders take no page argument
                    if subifd is not None:
                        opts["subifd"] = subifd
                    with src.errors("open"):
                        im = pyvips.Image.new_from_source(src, "", access="random", **opts)
                    sources[id(im)] = src
                    return im
            else:
                path = uri.removeprefix("file://")
                if not os.path.isfile(path):
                    raise SlideError(f"{uri}: slide does not exist")

                def page(k: int, subifd: int | None = None):
                    opts = {"page": k} if k else {}
                    if subifd is not None:
                        opts["subifd"] = subifd
                    return pyvips.Image.new_from_file(path, access="random", **opts)

            first = page(0)
            n = first.get("n-pages") if first.get_typeof("n-pages") else 1
            # OME-TIFF (and other newer writers) keep the reduced levels as SubIFDs of the
            # full-resolution page rather than as pages of their own.
            m = first.get("n-subifds") if first.get_typeof("n-subifds") else 0
            images = [first] + [page(0, j) for j in range(m)] + [page(k) for k in range(1, n)]
        except (pyvips.Error, ValueError) as exc:  # rangeio turns unreadable bytes into ValueError
            if isinstance(exc, SlideError):
                raise
            raise SlideError(f"{uri}: not a readable slide ({_first_line(exc)})") from None
        # Keep only the pages that form a pyramid (each smaller than the one before, same bands).
        pyramid = [images[0]]
        for im in images[1:]:
            if im.width < pyramid[-1].width and im.bands == pyramid[0].bands:
                pyramid.append(im)
        return [(im, sources.get(id(im))) for im in pyramid], range_file

    def _open_openslide(self, path: str) -> None:
        try:
            import openslide
        except ImportError:
            raise SlideError(
                f"{self.uri}: vendor formats need openslide-python and openslide-bin"
            ) from None
        self.backend = "openslide"
        try:
            self._osr = openslide.OpenSlide(path)
        except Exception as exc:
            raise SlideError(f"{self.uri}: OpenSlide cannot open it ({exc})") from None
        dims, downs = self._osr.level_dimensions, self._osr.level_downsamples
        tw = self._osr.properties.get("openslide.level[0].tile-width")
        th = self._osr.properties.get("openslide.level[0].tile-height")
        tile = (int(th), int(tw)) if tw and th else None
        self.levels = [Level(w, h, float(d), tile) for (w, h), d in zip(dims, downs, strict=True)]
        self.mpp = plausible_mpp(self._osr.properties.get("openslide.mpp-x"))
        self.bands = 3

    @staticmethod
    def _local_copy(uri: str, cache_dir: str | None) -> str:
        import hashlib

        d = cache_dir or os.path.join(tempfile.gettempdir(), "foveation-slide-cache")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(
            d, hashlib.sha256(uri.encode()).hexdigest()[:24] + os.path.splitext(uri)[1]
        )
        if not os.path.exists(path):
            storage.download_file(uri, path)
        return path

    # -- reading ------------------------------------------------------------------------------
    def level_for(self, fov: float, out_size: int) -> int:
        """The level whose downsample is the largest not above fov / out_size."""
        want = fov / out_size * (1 + 1e-9)
        best = 0
        for k, lv in enumerate(self.levels):
            if lv.downsample <= want:
                best = k if lv.downsample >= self.levels[best].downsample else best
        return best

    def read_level(
        self, level: int, top: int, left: int, height: int, width: int, pad_value=(255, 255, 255)
    ) -> np.ndarray:
        """uint8 [height, width, C] of a level; area beyond the level is ``pad_value``."""
        lv = self.levels[level]
        out = np.empty((height, width, self.bands), np.uint8)
        out[:] = np.asarray(pad_value, np.uint8)[: self.bands]
        t0, l0 = max(top, 0), max(left, 0)
        t1, l1 = min(top + height, lv.height), min(left + width, lv.width)
        if t1 <= t0 or l1 <= l0:
            self.counters.add(0, height * width)
            return out
        try:
            with self._locks[level]:
                inner = self._read_inside(level, t0, l0, t1 - t0, l1 - l0)
        except (storage.StorageError, SlideError) as exc:
            raise SlideError(
                f"{self.uri}: reading level {level} rows {t0}..{t1} cols {l0}..{l1} failed: {exc}"
            ) from None
        except Exception as exc:  # pyvips.Error and OpenSlide errors: name slide and region
            raise SlideError(
                f"{self.uri}: reading level {level} rows {t0}..{t1} cols {l0}..{l1} failed: {_first_line(exc)}"
            ) from None
        out[t0 - top : t1 - top, l0 - left : l1 - left] = inner
        self.counters.add(_decoded(lv, t0, l0, t1, l1), height * width)
        return out

    def _read_inside(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        if self.backend == "openslide":
            ds = self.levels[level].downsample
            im = self._osr.read_region((round(left * ds), round(top * ds)), level, (width, height))
            a = np.asarray(im)
            rgb = a[..., :3].astype(np.float32)
            alpha = a[..., 3:4].astype(np.float32) / 255
            return np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
        src = self._sources[level]
        if src is None:
            a = self._pages[level].crop(left, top, width, height).numpy()
        else:
            with src.errors():  # a storage failure surfaces as itself (endpoint, byte range)
                a = self._pages[level].crop(left, top, width, height).numpy()
        return a[..., None] if a.ndim == 2 else a

    def read_region(
        self, centre: tuple[float, float], fov: float, out_size: int, pad_value=(255, 255, 255)
    ) -> np.ndarray:
        """uint8 [out_size, out_size, C]: the square of side ``fov`` (level-0 px) centred on
        ``centre``, area-resized to ``out_size``."""
        if fov <= 0 or out_size <= 0:
            raise SlideError(f"{self.uri}: region fov {fov} / out_size {out_size} must be positive")
        k = self.level_for(fov, out_size)
        ds = self.levels[k].downsample
        top = (centre[0] - fov / 2) / ds
        left = (centre[1] - fov / 2) / ds
        size = fov / ds
        ratio = size / out_size  # level pixels per output pixel, >= 1 up to rounding
        if (
            abs(top - round(top)) < 1e-6
            and abs(left - round(left)) < 1e-6
            and abs(ratio - round(ratio)) < 1e-6
        ):
            r = round(ratio)
            win = self.read_level(k, round(top), round(left), r * out_size, r * out_size, pad_value)
            if r == 1:
                return win
            # Exact area average over r x r blocks, rounded like the in-memory pyramid.
            w = win.reshape(out_size, r, out_size, r, -1).astype(np.float32).mean((1, 3))
            return np.clip(np.rint(w), 0, 255).astype(np.uint8)
        # Non-integer geometry: read the covering window, then an antialiased resize of exactly
        # the requested square (roi_align averages ceil(ratio)^2 samples per output pixel).
        t0, l0 = math.floor(top) - 1, math.floor(left) - 1
        t1, l1 = math.ceil(top + size) + 1, math.ceil(left + size) + 1
        win = self.read_level(k, t0, l0, t1 - t0, l1 - l0, pad_value)
        return _roi_resize(win, top - t0, left - l0, size, out_size)

    def as_source(self, level: int = 0, pad_value=(255, 255, 255)) -> LevelSource:
        """A region source (``inference.sources.RegionSource``) over one level."""
        return LevelSource(self, level, pad_value)

    @property
    def range_files(self) -> list:
        """The block-cached files this reader fetches through (object storage only; empty for
        local files): their ``stats`` count GETs, bytes and cache hits (monitoring)."""
        return [f for f in (self.range_file, getattr(self, "_companion_file", None)) if f]

    def close(self) -> None:
        for f in self.range_files:
            f.close()
        if getattr(self, "_osr", None) is not None:
            self._osr.close()


class LevelSource:
    """One level of a slide as a region source for whole-slide inference (out of core)."""

    def __init__(self, reader: SlideReader, level: int, pad_value) -> None:
        self.reader, self.level, self.pad_value = reader, level, pad_value
        lv = reader.levels[level]
        self.height, self.width = lv.height, lv.width

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        a = self.reader.read_level(self.level, top, left, height, width, self.pad_value)
        return a if a.shape[-1] == 3 else np.repeat(a[..., :1], 3, -1)


class ScaledSource:
    """A slide as a region source at another resolution: ``scale`` output px per level-0 px
    (the slide's mpp over the model's: 0.5 reads a 40x scan as 20x). Each region is read from
    the coarsest level still at least as fine as the output (so the residual resampling
    shrinks by less than 2x, or enlarges when the slide is coarser than the model) and
    resampled bilinearly with exact sub-pixel alignment (pixel centres map to pixel centres),
    so a 20x and a 40x scan of the same tissue give the same regions within resampling error.
    Memory is the region's, as for ``LevelSource``."""

    def __init__(self, reader: SlideReader, scale: float, pad_value=(255, 255, 255)) -> None:
        if scale <= 0:
            raise SlideError(f"{reader.uri}: scale {scale} must be positive")
        self.reader, self.scale, self.pad_value = reader, float(scale), pad_value
        self.height = max(1, round(reader.height * scale))
        self.width = max(1, round(reader.width * scale))
        self.level = reader.level_for(1.0 / scale, 1)

    def read_region(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        lv = self.reader.levels[self.level]
        k = 1.0 / (self.scale * lv.downsample)  # level px per output px
        # Output pixel centre (top + i + 0.5) sits at level coordinate (top + i + 0.5) * k.
        y = (torch.arange(height, dtype=torch.float64) + top + 0.5) * k - 0.5
        x = (torch.arange(width, dtype=torch.float64) + left + 0.5) * k - 0.5
        y0, x0 = math.floor(float(y[0])) - 1, math.floor(float(x[0])) - 1
        h = math.floor(float(y[-1])) + 3 - y0
        w = math.floor(float(x[-1])) + 3 - x0
        a = self.reader.read_level(self.level, y0, x0, h, w, self.pad_value)
        if a.shape[-1] != 3:
            a = np.repeat(a[..., :1], 3, -1)
        img = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()
        gy = (y - y0 + 0.5) / h * 2 - 1  # grid_sample's normalised coordinates, align_corners=False
        gx = (x - x0 + 0.5) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].float()
        out = F.grid_sample(img, grid, mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


COMPANION_SUFFIX = ".s2.tif"


def check_tiff_complete(path: str, uri: str | None = None) -> None:
    """Raise ``SlideError`` naming ``uri`` when the TIFF at ``path`` is cut short: an IFD the
    header chain points to lies past the file's end (libvips would open it as a slide with
    fewer levels, OpenSlide says only "unsupported"), or a page's tiles or strips run past
    it. Reads the IFDs only (tifffile), never the pixels. A file that is not a TIFF at all is
    left to the reader, which names it."""
    import logging

    import tifffile

    uri = uri or path
    if not os.path.isfile(path):
        return
    size = os.path.getsize(path)
    problems: list[str] = []
    pages: list = []

    class Catch(logging.Handler):  # tifffile logs a broken IFD chain and stops there
        def emit(self, record: logging.LogRecord) -> None:
            problems.append(record.getMessage())

    log = logging.getLogger("tifffile")
    handler = Catch(logging.WARNING)
    log.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            for k, page in enumerate(pages):
                for off in page.subifds or ():
                    if off >= size:
                        problems.append(f"page {k}'s reduced level at byte {off}")
                offs, counts = page.dataoffsets, page.databytecounts
                end = max((o + c for o, c in zip(offs, counts, strict=False)), default=0)
                if end > size:
                    problems.append(f"page {k}'s pixel data runs to byte {end}")
    except Exception:  # not a TIFF, or a header too broken to parse: the reader reports it
        return
    finally:
        log.removeHandler(handler)
    # Only what says the file ends too early: tifffile warns about other oddities of valid
    # vendor files (unknown tags, odd values) that are not truncation.
    bad = [p for p in problems if "invalid page offset" in p or "offset to first page" in p]
    bad += [p for p in problems if p.startswith("page ")]
    if bad:
        what = (
            f"truncated TIFF: {bad[0].split('> ')[-1]}, past the end of its {size} bytes; "
            "expected a complete file (was a copy or an upload cut short?)"
        )
        if not pages:  # not one page to show for it: as likely garbage as a cut-short file
            raise SlideError(f"{uri}: not a readable slide ({what})")
        raise SlideError(f"{uri}: {what}")


def companion_uri(uri: str) -> str | None:
    """``x.tif`` -> ``x.s2.tif``, the 1/sqrt(2) pyramid ingest writes beside a slide."""
    if uri.endswith(COMPANION_SUFFIX) or not uri.lower().endswith(".tif"):
        return None
    return uri[: -len(".tif")] + COMPANION_SUFFIX


def write_pyramid(
    image, path: str, tile: int, compression: str = "jpeg", quality: int = 90, sqrt2: bool = True
) -> None:
    """A pyramidal tiled TIFF of a pyvips image at ``path`` and, with ``sqrt2``, its companion
    pyramid at 1/sqrt(2) (area-correct: libvips' linear reduce averages its footprint)."""
    opts = {"tile": True, "pyramid": True, "tile_width": tile, "tile_height": tile, "bigtiff": True}
    opts |= (
        {"compression": "jpeg", "Q": quality}
        if compression == "jpeg"
        else {"compression": compression}
    )
    image.tiffsave(path, **opts)
    if sqrt2:
        image.resize(1 / math.sqrt(2), kernel="linear").tiffsave(
            path[: -len(".tif")] + COMPANION_SUFFIX, **opts
        )


def _roi_resize(win: np.ndarray, top: float, left: float, size: float, out: int) -> np.ndarray:
    import torch
    from torchvision.ops import roi_align

    x = torch.from_numpy(np.ascontiguousarray(win)).permute(2, 0, 1)[None].float()
    box = torch.tensor([[0, left, top, left + size, top + size]], dtype=torch.float32)
    y = roi_align(
        x,
        box,
        (out, out),
        spatial_scale=1.0,
        sampling_ratio=max(1, math.ceil(size / out)),
        aligned=True,
    )
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _as_rgb(im):
    """3-band sRGB uint8: alpha flattened onto white (slide background), grey expanded."""
    if im.hasalpha():
        im = im.flatten(background=[255] * (im.bands - 1))
    if im.bands == 1:
        im = im.bandjoin([im, im])
    return im.cast("uchar") if im.format != "uchar" else im


def _tile_of(im) -> tuple[int, int] | None:
    for h, w in (("tile-height", "tile-width"),):
        if im.get_typeof(h) and im.get_typeof(w):
            return int(im.get(h)), int(im.get(w))
    return None


def _decoded(lv: Level, t0: int, l0: int, t1: int, l1: int) -> int:
    """Pixels of the stored tiles a read of rows t0..t1, cols l0..l1 decodes (tile overhead)."""
    if lv.tile is None:
        return (t1 - t0) * (l1 - l0)
    th, tw = lv.tile
    rows = (t1 - 1) // th - t0 // th + 1
    cols = (l1 - 1) // tw - l0 // tw + 1
    return rows * th * cols * tw


def _first_line(exc: BaseException) -> str:
    """The cause in one line. libvips' own first line is what failed at the end of the
    pipeline ("unable to write to memory"); the decoder's reason is in its ``detail``, so a
    corrupt tile reads as one ("corrupt image data: tiff2vips: decompress error tile ...")."""
    detail = getattr(exc, "detail", None)
    if detail:
        lines = [ln.strip() for ln in str(detail).splitlines() if ln.strip()]
        if lines:
            return "corrupt or unreadable image data: " + "; ".join(lines[-2:])[:300]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@functools.lru_cache(maxsize=8)
def open_slide(uri: str, block_size: int = 1 << 20, max_blocks: int = 64) -> SlideReader:
    """A per-process cached reader (Ray Data actors and Serve replicas reuse theirs)."""
    return SlideReader(uri, block_size=block_size, max_blocks=max_blocks)
