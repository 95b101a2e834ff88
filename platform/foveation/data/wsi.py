"""Whole-slide images into the store, out of core (what ``data.ingest`` runs for a slide list's
SVS, NDPI, MRXS, pyramidal TIFF and OME-TIFF rows).

A Gleason2019 core is decoded whole; a whole-slide image (50,000-150,000 px a side, tens of GB
as RGB) never is:

- the source is copied to local disk when it lives in object storage (OpenSlide reads only
  files) and its checksum is computed in 8 MB chunks;
- the store's pyramids are written a tile at a time (``io.tilepyramid``), from tiles read a
  tile at a time: OpenSlide's level 0 directly, a TIFF through a libvips crop (random
  access); when the slide is resampled to the store's mpp, libvips does it (a vendor slide's
  level 0 first copied into an uncompressed tiled TIFF it can read);
- the label map is rasterised from the QuPath polygons band by band (``annotations.rasterize``
  with a window), or cut from a mask, and written as a pyramid shrunk by mode; class
  fractions are counted per tile;
- several annotators (``annotation_uri`` "a.geojson;b.geojson") are fused by STAPLE at the
  label resolution, block by block (``TILE`` rows x ``STAPLE_COLS`` columns), so the
  annotators' sensitivities are estimated per block rather than over the whole slide: a whole
  slide's maps do not fit in memory, and a coarser level would blur the boundaries STAPLE is
  asked to settle;
- the slide's mpp (OpenSlide's ``openslide.mpp-x``, a TIFF's resolution) goes into the
  manifest; with ``data.ingest.mpp`` set (by default ``patches.mpp``), a slide of another mpp
  is resampled to it as it streams (image by area, labels by nearest) and the store's mpp is
  recorded; a slide that declares none is taken to be at it; slides are not cropped (``data.ingest.crop_size`` is for the Gleason cores);
- a slide without tissue on its coarsest level is an error naming it.

Resident memory is a few tiles plus one label band of ``cfg.tile_size`` rows, whatever the
slide's size (no memory map: its pages would count as resident as they are written); the
local disk holds the source copy, the pyramids' scratch levels and the outputs until they are
uploaded.
There is no 1/sqrt(2) companion pyramid for a whole slide.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from foveation.config import IngestConfig, PipelineConfig
from foveation.data.gleason import RawSlide, map_labels
from foveation.data.manifest import is_current, manifest_columns, manifest_row, source_key
from foveation.errors import DataError
from foveation.io import storage
from foveation.io.images import decode_label

TILE = 256  # rows of a band, and the side of the temporary TIFFs' tiles
STAPLE_COLS = 4096  # columns of a block that STAPLE fuses at once (1 MP: tens of MB in ITK)
# Which slides come here (``data.ingest``): the formats' table says (io.formats.is_whole_slide).


def file_checksum(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _local(uri: str, tmp: str) -> str:
    if not storage.is_remote(uri):
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            raise DataError(f"{uri}: slide does not exist")
        return path
    path = os.path.join(tmp, "source" + os.path.splitext(uri)[1])
    storage.download_file(uri, path)
    return path


def write_tiled(path: str, height: int, width: int, tiles, channels: int) -> None:
    """An uncompressed tiled TIFF [height, width(, channels)] from ``tiles``: arrays of at most
    ``TILE`` x ``TILE`` px in row-major tile order, written one at a time (tifffile), so only a
    tile is ever in memory, whatever the slide's width."""
    import tifffile

    shape = (height, width, channels) if channels > 1 else (height, width)

    def padded():
        for part in tiles:
            t = np.zeros((TILE, TILE, *shape[2:]), np.uint8)
            t[: part.shape[0], : part.shape[1]] = part
            yield t

    photometric = "rgb" if channels == 3 else "minisblack"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(padded(), shape=shape, dtype=np.uint8, tile=(TILE, TILE), photometric=photometric)


def tiles_of(bands, width: int, side: int = TILE):
    """The ``side``-wide tiles of bands of ``side`` rows, in row-major order."""
    for band in bands:
        for c in range(0, width, side):
            yield band[:, c : c + side]


def slide_tiles(reader, height: int, width: int, side: int = TILE):
    """Level 0 of an OpenSlide slide as RGB tiles of ``side`` px in row-major order, read a
    tile at a time (a band across a 100,000 px slide would be 100 MB of RGBA, several times
    over in OpenSlide's and PIL's buffers)."""
    for top in range(0, height, side):
        for c in range(0, width, side):
            tile = reader.read_level(0, top, c, min(side, height - top), min(side, width - c))
            yield tile[..., :3]


def vips_tiles(im, side: int):
    """A pyvips image as tiles of ``side`` px in row-major order, each computed on its own
    (random access: libvips reads only the source tiles under it)."""
    for top in range(0, im.height, side):
        for c in range(0, im.width, side):
            yield im.crop(c, top, min(side, im.width - c), min(side, im.height - top)).numpy()


def area_resize(im, scale: float):
    """``im`` resized by ``scale``, area-correct when shrinking: a box mean over the integer
    part of 1/scale (libvips shrink), then a linear kernel for the rest. libvips' ``resize``
    alone leaves most of a 2x reduction to lanczos3, which rings on fine texture (up to 19
    grey levels on noise: the model would see sharper tissue than it trained on)."""
    if scale >= 1.0:
        return im.resize(scale, kernel="linear")
    k = int(1.0 / scale + 1e-6)
    if k > 1:
        im = im.shrink(k, k)
    rest = scale * k
    return im if abs(rest - 1.0) < 1e-6 else im.resize(rest, kernel="linear")


def check_tissue(reader, uri: str) -> None:
    """A slide whose coarsest level has no pixel darker than the tissue threshold is an error.
    The level is read by bands of ``TILE`` rows (a slide with few levels has a large coarsest
    one), stopping at the first tissue."""
    k = len(reader.levels) - 1
    lv = reader.levels[k]
    threshold = PipelineConfig().tissue_threshold
    for top in range(0, lv.height, TILE):
        band = reader.read_level(k, top, 0, min(TILE, lv.height - top), lv.width)[..., :3]
        if (band.mean(-1, dtype=np.float32) < threshold).any():
            return
    raise DataError(f"{uri}: no tissue (every pixel of level {k} is background)")


def class_map_of(raw: RawSlide, cfg: IngestConfig) -> dict[str, str]:
    """The slide's class map: the config's, with the slide list's entries over it."""
    return {**cfg.class_map, **dict(raw.class_map)}


def read_annotator_map(
    raw: RawSlide, uri: str, data: bytes, shape: tuple[int, int], cfg: IngestConfig, class_names
) -> np.ndarray:
    """One annotator's label map (class ids, 255 unlabelled) of ``raw``'s image of ``shape``, by
    the source's kind, whole (an image decoded whole, or a whole slide's mask); errors name
    ``uri`` and what was expected."""
    H, W = shape
    if raw.label_kind == "qupath":
        from foveation.data.annotations import parse_qupath, rasterize, unannotated_value

        fill = unannotated_value(cfg.unannotated, class_names)
        anns = parse_qupath(data, uri, class_names, class_map_of(raw, cfg))
        return rasterize(anns, H, W, fill=fill)
    m = decode_label(data, uri)
    if raw.label_kind == "gleason":
        m = map_labels(m, uri)
    else:
        bad = sorted(set(np.unique(m).tolist()) - {*range(len(class_names)), 255})
        if bad:
            raise DataError(
                f"{uri}: label values {bad[:10]} are not class ids 0..{len(class_names) - 1} "
                "(or 255 for unlabelled)"
            )
    if m.shape != (H, W):
        raise DataError(
            f"{uri}: label map is {m.shape[1]} x {m.shape[0]}, expected the slide's {W} x {H}"
        )
    return m


def annotator_bands(
    raw: RawSlide, uri: str, data: bytes, shape, cfg: IngestConfig, class_names, rows: int = TILE
):
    """One annotator's label map [H, W] as bands of ``rows`` rows: rasterised from the QuPath
    polygons band by band, or cut from a mask of class ids."""
    from foveation.data.annotations import parse_qupath, rasterize, unannotated_value

    H, W = shape
    if raw.label_kind == "qupath":
        fill = unannotated_value(cfg.unannotated, class_names)
        anns = parse_qupath(data, uri, class_names, class_map_of(raw, cfg))
        for top in range(0, H, rows):
            yield rasterize(anns, min(rows, H - top), W, fill=fill, origin=(top, 0))
        return
    m = read_annotator_map(raw, uri, data, shape, cfg, class_names)
    for top in range(0, H, rows):
        yield m[top : top + rows]


def label_bands(
    raw: RawSlide, maps: list[bytes], shape, cfg, class_names, confusion, rows: int = TILE
):
    """The slide's label map [H, W] as bands of ``rows`` rows. With several annotators, STAPLE
    fuses them by blocks of ``rows`` x ``STAPLE_COLS`` px (each block's own estimate of the
    annotators' performance; blocks where they agree are taken as they are), and each
    annotator's confusion against the fused map is added to ``confusion`` (annotator ->
    ``ConfusionMatrix``)."""
    from foveation.data.staple import annotator_confusions, staple

    per = [
        annotator_bands(raw, u, d, shape, cfg, class_names, rows)
        for u, d in zip(raw.annotator_uris, maps, strict=True)
    ]
    if len(per) == 1:
        yield from per[0]
        return
    k = len(class_names)
    for bands in zip(*per, strict=True):
        fused = np.empty_like(bands[0])
        for c in range(0, fused.shape[1], STAPLE_COLS):
            block = [b[:, c : c + STAPLE_COLS] for b in bands]
            fused[:, c : c + STAPLE_COLS] = staple(block, k)
        for a, cm in zip(raw.annotators, annotator_confusions(list(bands), fused, k), strict=True):
            confusion[a] = confusion[a].merge(cm) if a in confusion else cm
        yield fused


@dataclass(frozen=True)
class WholeSlide:
    """What ``ingest_wsi`` hands back for one slide."""

    row: dict  # its manifest columns
    annotator_confusion: dict  # annotator -> [K, K] matrix (lists) against the fused map
    megapixels: float  # written (0 when unchanged)
    source_key: str | None  # what its row file records; None: unchanged, the previous row


@dataclass(frozen=True)
class _Scale:
    """How a slide goes into the store: its level 0's size and whether it is resampled to the
    store's mpp (``scale``: store pixels per source pixel)."""

    height: int
    width: int
    scale: float
    resample: bool
    mpp: float | None  # the store's: the asked one when resampling or none is declared


def ingest_wsi(
    raw: RawSlide, dest: str, cfg: IngestConfig, class_names, prev: dict | None
) -> WholeSlide:
    """One whole-slide image written to ``dest``, or the previous row (``prev``) when its
    source is unchanged. Raises ``DataError`` and friends naming the slide; the caller turns
    them into a failed outcome and writes the row file."""
    import pyvips

    # libvips' operation cache keeps finished images and their buffers (100 MB by default):
    # nothing here is read twice, so it would only grow the peak with the slide.
    pyvips.cache_set_max(0)
    sid = raw.slide_id
    if not raw.annotator_uris:
        raise DataError(f"{raw.image_uri}: no annotation for {sid} (annotation_uri)")
    with tempfile.TemporaryDirectory(prefix="foveation-wsi-") as tmp:
        local = _local(raw.image_uri, tmp)
        checksum = file_checksum(local)
        maps = [storage.read_bytes(u) for u in raw.annotator_uris]
        key = source_key(checksum, maps, cfg, ("wsi", cfg.unannotated, tuple(class_names)))
        if is_current(prev, key):
            return WholeSlide(
                manifest_columns(prev), prev.get("annotator_confusion", {}), 0.0, None
            )
        geo, slide_path, (H, W) = _write_slide(raw, local, tmp, cfg)
        label_path, counts, confusion = _write_labels(raw, maps, geo, tmp, cfg, class_names)
        n_pages = pyvips.Image.new_from_file(slide_path).get("n-pages")
        downs = [W / pyvips.Image.new_from_file(slide_path, page=p).width for p in range(n_pages)]
        image_uri = storage.join(dest, "slides", f"{sid}.tif")
        label_uri = storage.join(dest, "labels", f"{sid}.tif")
        storage.upload_file(slide_path, image_uri)
        storage.upload_file(label_path, label_uri)
    k = len(class_names)
    fractions = counts[:k] / max(1, int(counts[:k].sum()))
    row = manifest_row(
        slide_id=sid,
        image_uri=image_uri,
        width=int(W),
        height=int(H),
        mpp=geo.mpp,
        level_downsamples=sorted(downs),
        label_uri=label_uri,
        annotator_uris=[],
        truth_uri=None,
        cue_uri=None,
        class_fractions=[float(f) for f in fractions],
        checksum=checksum,
    )
    conf = {a: cm.matrix.tolist() for a, cm in confusion.items()}
    return WholeSlide(row, conf, H * W / 1e6, key)


def _open_slide(local: str, uri: str, mpp: float | None = None):
    from foveation.io.slides import SlideError, SlideReader

    try:
        return SlideReader(local, mpp=mpp)
    except SlideError as exc:
        raise DataError(str(exc).replace(local, uri)) from None


def _scale(reader, cfg: IngestConfig) -> _Scale:
    """The slide's scale against the store's mpp, decided once: resampled when the two differ
    by more than 0.5%; a slide that declares none is taken to be at the store's."""
    H, W, mpp = reader.height, reader.width, reader.mpp
    scale = mpp / cfg.mpp if mpp and cfg.mpp else 1.0
    resample = abs(scale - 1.0) > 0.005  # to the store's mpp
    out_mpp = cfg.mpp if resample or not mpp else mpp  # none declared: taken as at it
    return _Scale(H, W, scale, resample, out_mpp)


def _write_slide(
    raw: RawSlide, local: str, tmp: str, cfg: IngestConfig
) -> tuple[_Scale, str, tuple[int, int]]:
    """The store's image pyramid of the slide at ``local``, in ``tmp``: straight from
    OpenSlide a tile at a time, or through libvips when it reads the file or resamples it;
    (the slide's scale, the pyramid's path, its (height, width))."""
    import pyvips

    from foveation.io.tilepyramid import write_tile_pyramid

    reader = _open_slide(local, raw.image_uri, raw.mpp)
    side = cfg.tile_size
    slide_path = os.path.join(tmp, "slide.tif")
    level0 = os.path.join(tmp, "level0.tif")
    try:
        check_tissue(reader, raw.image_uri)
        geo, backend = _scale(reader, cfg), reader.backend
        H, W = geo.height, geo.width
        if backend == "openslide" and not geo.resample:
            # Straight from OpenSlide into the store, a tile at a time.
            tiles = slide_tiles(reader, H, W, side)
            write_tile_pyramid(slide_path, H, W, 3, tiles, **_store(cfg, geo.mpp))
        elif backend == "openslide":  # libvips resamples: level 0 as a TIFF it can read
            write_tiled(level0, H, W, slide_tiles(reader, H, W), 3)
    finally:
        reader.close()
    if backend != "pyvips" and not geo.resample:
        return geo, slide_path, (H, W)
    if backend == "pyvips":
        im = pyvips.Image.new_from_file(local, access="random")
        im = im.flatten(background=255) if im.hasalpha() else im
        im = im.colourspace("srgb") if im.bands < 3 else im
    else:
        im = pyvips.Image.new_from_file(level0, access="random")
    if geo.resample:
        im = area_resize(im, geo.scale)
    write_tile_pyramid(
        slide_path, im.height, im.width, 3, vips_tiles(im, side), **_store(cfg, geo.mpp)
    )
    return geo, slide_path, ((im.height, im.width) if geo.resample else (H, W))


def _write_labels(
    raw: RawSlide, maps: list[bytes], geo: _Scale, tmp: str, cfg: IngestConfig, class_names
) -> tuple[str, np.ndarray, dict]:
    """The store's label pyramid, in ``tmp``: rasterised band by band, counted and written tile
    by tile; when the slide is resampled, class ids resampled by nearest (never a blend of two
    ids) through libvips. (its path, pixel counts per value [256], annotator -> confusion
    against the fused map)."""
    import pyvips

    from foveation.io.tilepyramid import write_tile_pyramid

    counts = np.zeros(256, np.int64)

    def count(t: np.ndarray) -> None:
        counts[:] += np.bincount(t.reshape(-1), minlength=256)

    H, W, side = geo.height, geo.width, cfg.tile_size
    confusion: dict = {}
    label_path = os.path.join(tmp, "labels.tif")
    labels = dict(tile=side, compression="deflate", mpp=geo.mpp, reduce="mode")
    if not geo.resample:
        bands = label_bands(raw, maps, (H, W), cfg, class_names, confusion, rows=side)
        tiles = tiles_of(bands, W, side)
        write_tile_pyramid(label_path, H, W, 1, tiles, on_tile=count, **labels)
        return label_path, counts, confusion
    raw_labels = os.path.join(tmp, "labels0.tif")
    bands = label_bands(raw, maps, (H, W), cfg, class_names, confusion)
    write_tiled(raw_labels, H, W, tiles_of(bands, W), 1)
    lab = pyvips.Image.new_from_file(raw_labels, access="random")
    lab = lab.resize(geo.scale, kernel="nearest")
    write_tile_pyramid(
        label_path, lab.height, lab.width, 1, vips_tiles(lab, side), on_tile=count, **labels
    )
    return label_path, counts, confusion


def _store(cfg: IngestConfig, mpp: float | None) -> dict:
    """The store's image pyramid options: its tile, compression and physical scale."""
    return {
        "tile": cfg.tile_size,
        "compression": cfg.compression,
        "quality": cfg.quality,
        "mpp": mpp,
    }
