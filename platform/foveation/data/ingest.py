"""Ingest: raw slides in the Gleason2019 layout (a folder or an s3:// prefix), or a slide list
(CSV or Parquet: ``data.slidelist``, with QuPath GeoJSON or label masks) -> object storage:

    <dest>/slides/<id>.tif            pyramidal tiled TIFF (a level at every power of 2)
    <dest>/labels/<id>.tif            the STAPLE-fused label map, a pyramid shrunk by mode
    <dest>/annotators/<id>_mapK.png   each annotator's map (class ids), cropped like the slide
    <dest>/truth/<id>.png, cues/<id>.png   synthetic sets only
    <dest>/rows/<id>.json             one manifest row per finished slide (resume / skip)
    <dest>/manifest.parquet           written last, atomically: the only entry point for readers
    <dest>/ingest-summary.json        what landed, what was skipped and why

Slides run in parallel as Ray tasks (``ingest`` takes any ``map_fn``; the job passes Ray's);
one bad slide is reported and skipped; a slide already ingested from a source with the same
checksum is skipped. The manifest and the row files are ``data.manifest``'s (the schema:
docs/contracts.md#manifest); whole-slide images are streamed by ``data.wsi``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from foveation.config import IngestConfig
from foveation.data import wsi
from foveation.data.gleason import RawSlide, assign_splits, central_crop, scan
from foveation.data.manifest import (
    is_current,
    manifest_columns,
    manifest_row,
    previous_row,
    source_key,
    write_manifest,
    write_row,
)
from foveation.data.staple import annotator_confusions, average_expert, staple
from foveation.errors import DataError, FoveationError, failure_lines
from foveation.io import storage
from foveation.io.formats import is_whole_slide
from foveation.io.images import ImageError, decode_image, decode_label, encode_png
from foveation.io.slides import companion_uri
from foveation.metrics import ConfusionMatrix

SUMMARY_FILE = "ingest-summary.json"
"""What landed, what was skipped and why, beside the manifest."""


class IngestError(FoveationError, RuntimeError):
    """An ingest that failed as a whole (too many slides could not be ingested): names them."""


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # "ingested", "unchanged" or "failed"
    row: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    megapixels: float = 0.0
    annotator_confusion: dict[int, list] = field(
        default_factory=dict
    )  # annotator -> matrix vs fused


@dataclass
class IngestSummary:
    dest: str
    manifest_uri: str | None
    ingested: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    megapixels: float = 0.0
    average_expert: dict | None = None  # the paper's last Table-1 row, over every slide that landed

    def text(self, reasons: bool = True) -> str:
        """The summary; ``reasons=False`` (the job, whose log printed each failure as it
        came) names the failed slides without repeating why."""
        lines = [
            f"ingest into {self.dest}: {len(self.ingested)} ingested, {len(self.unchanged)} unchanged, "
            f"{len(self.failed)} failed ({self.megapixels:.1f} MP in {self.seconds:.1f}s)"
        ]
        lines += failure_lines(self.failed, "skipped", reasons, SUMMARY_FILE)
        if self.average_expert:
            ious = ", ".join(f"{k} {v:.3f}" for k, v in self.average_expert["iou"].items())
            lines.append(
                f"average expert vs STAPLE: IoU {ious}; mIoU {self.average_expert['miou']:.3f}"
            )
        if self.manifest_uri:
            lines.append(f"manifest: {self.manifest_uri}")
        return "\n".join(lines)


# -- one slide ------------------------------------------------------------------------------


def _tiff_bytes(
    image: np.ndarray, cfg: IngestConfig, label: bool
) -> tuple[bytes, bytes | None, list[float]]:
    """Encode a pyramidal tiled TIFF (labels: lossless, pyramid shrunk by mode, never averaged)
    and, for images with ``sqrt2_levels``, its 1/sqrt(2) companion pyramid; returns both and
    the downsample of every level of the two, merged."""
    import pyvips

    from foveation.io.slides import COMPANION_SUFFIX, write_pyramid

    bands = 1 if image.ndim == 2 else image.shape[2]
    im = pyvips.Image.new_from_memory(
        np.ascontiguousarray(image).data, image.shape[1], image.shape[0], bands, "uchar"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.tif")
        if label:
            opts = {
                "tile": True,
                "pyramid": True,
                "tile_width": cfg.tile_size,
                "tile_height": cfg.tile_size,
            }
            im.tiffsave(path, bigtiff=True, compression="deflate", region_shrink="mode", **opts)
        else:
            write_pyramid(
                im, path, cfg.tile_size, cfg.compression, cfg.quality, sqrt2=cfg.sqrt2_levels
            )
        w0 = image.shape[1]
        companion = path[: -len(".tif")] + COMPANION_SUFFIX
        paths = [path] + ([companion] if os.path.exists(companion) else [])
        downs = sorted(
            w0 / pyvips.Image.new_from_file(q, page=p).width
            for q in paths
            for p in range(_n_pages(q))
        )
        with open(path, "rb") as f:
            main = f.read()
        extra = None
        if len(paths) > 1:
            with open(companion, "rb") as f:
                extra = f.read()
        return main, extra, downs


def _n_pages(path: str) -> int:
    import pyvips

    im = pyvips.Image.new_from_file(path)
    return im.get("n-pages") if im.get_typeof("n-pages") else 1


def ingest_slide(
    raw: RawSlide,
    dest: str,
    cfg: IngestConfig,
    num_classes: int = 4,
    class_names: tuple[str, ...] = ("benign", "grade3", "grade4", "grade5"),
) -> SlideOutcome:
    """Ingest one slide; never raises for bad input: a failed outcome names the file and why."""
    t0 = time.perf_counter()
    sid = raw.slide_id
    try:
        if raw.label_kind != "gleason" and is_whole_slide(raw.image_uri):  # out of core
            return _ingest_whole_slide(raw, dest, cfg, class_names, t0)
        return _ingest_image(raw, dest, cfg, num_classes, class_names, t0)
    except (DataError, ImageError, storage.StorageError) as exc:  # messages already name the file
        return SlideOutcome(sid, "failed", error=str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # anything else still fails only this slide, named
        err = f"{raw.image_uri}: {type(exc).__name__}: {exc}"
        return SlideOutcome(sid, "failed", error=err, seconds=time.perf_counter() - t0)


def _ingest_whole_slide(
    raw: RawSlide, dest: str, cfg: IngestConfig, class_names: tuple[str, ...], t0: float
) -> SlideOutcome:
    """A whole-slide image, streamed out of core (``data.wsi``), and its row file."""
    got = wsi.ingest_wsi(raw, dest, cfg, class_names, previous_row(dest, raw.slide_id))
    if got.source_key is not None:
        write_row(dest, got.row, got.source_key, got.annotator_confusion)
    state = "ingested" if got.source_key is not None else "unchanged"
    conf = {int(k): v for k, v in got.annotator_confusion.items()}
    seconds = time.perf_counter() - t0
    return SlideOutcome(raw.slide_id, state, got.row, None, seconds, got.megapixels, conf)


def _ingest_image(
    raw: RawSlide,
    dest: str,
    cfg: IngestConfig,
    num_classes: int,
    class_names: tuple[str, ...],
    t0: float,
) -> SlideOutcome:
    """An image decoded whole (a Gleason2019 core, a slide list's PNG or JPEG): cropped, its
    annotators fused by STAPLE, written as pyramids; skipped when its source is unchanged."""
    sid = raw.slide_id
    data = storage.read_bytes(raw.image_uri)
    checksum = hashlib.sha256(data).hexdigest()
    map_bytes = [storage.read_bytes(uri) for uri in raw.annotator_uris]
    # QuPath polygons read through the class table and the unannotated label.
    extra = (cfg.unannotated, tuple(class_names)) if raw.label_kind == "qupath" else ()
    key = source_key(checksum, map_bytes, cfg, extra)
    prev = previous_row(dest, sid)
    if is_current(prev, key):
        conf = {int(k): v for k, v in prev.get("annotator_confusion", {}).items()}
        row, seconds = manifest_columns(prev), time.perf_counter() - t0
        return SlideOutcome(sid, "unchanged", row, None, seconds, 0.0, conf)
    if not raw.annotator_uris:
        where = "in any MapsK_T folder" if raw.label_kind == "gleason" else "(annotation_uri)"
        raise DataError(f"{raw.image_uri}: no annotator map for {sid} {where}")
    image, maps = _decoded(raw, data, map_bytes, cfg, class_names)
    fused = staple(maps, num_classes)
    confusion = {
        k: cm.matrix.tolist()
        for k, cm in zip(
            raw.annotators, annotator_confusions(maps, fused, num_classes), strict=True
        )
    }
    row = _write_image(raw, dest, cfg, image, fused, maps, checksum, num_classes)
    # The row file also keeps what a resumed run needs: the key and the annotator scores.
    write_row(dest, row, key, confusion)
    mp = image.shape[0] * image.shape[1] / 1e6
    return SlideOutcome(sid, "ingested", row, None, time.perf_counter() - t0, mp, confusion)


def _decoded(
    raw: RawSlide, data: bytes, map_bytes: list[bytes], cfg: IngestConfig, class_names
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image and each annotator's map (class ids), read at the image's size, then
    centrally cropped to ``cfg.crop_size``."""
    image = decode_image(data, raw.image_uri)
    H, W = image.shape[:2]
    maps = []
    for uri, raw_map in zip(raw.annotator_uris, map_bytes, strict=True):
        m = wsi.read_annotator_map(raw, uri, raw_map, (H, W), cfg, class_names)
        maps.append(central_crop(m, cfg.crop_size))
    return central_crop(image, cfg.crop_size), maps


def _write_image(
    raw: RawSlide,
    dest: str,
    cfg: IngestConfig,
    image: np.ndarray,
    fused: np.ndarray,
    maps: list[np.ndarray],
    checksum: str,
    num_classes: int,
) -> dict:
    """The slide's files in the store (pyramids, annotators' maps, a synthetic set's truth and
    cue maps); returns its manifest row."""
    sid = raw.slide_id
    image_uri, label_uri, downs = _write_pyramids(dest, sid, image, fused, cfg)
    ann_uris = []
    for k, m in zip(raw.annotators, maps, strict=True):
        u = storage.join(dest, "annotators", f"{sid}_map{k}.png")
        storage.write_bytes(u, encode_png(m))
        ann_uris.append(u)
    truth_uri = _write_cropped_map(raw.truth_uri, dest, "truth", sid, cfg)
    cue_uri = _write_cropped_map(raw.cue_uri, dest, "cues", sid, cfg)
    fractions = np.bincount(fused.reshape(-1), minlength=num_classes)[:num_classes] / fused.size
    return manifest_row(
        slide_id=sid,
        image_uri=image_uri,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        mpp=None,
        level_downsamples=downs,
        label_uri=label_uri,
        annotator_uris=ann_uris,
        truth_uri=truth_uri,
        cue_uri=cue_uri,
        class_fractions=[float(f) for f in fractions],
        checksum=checksum,
    )


def _write_pyramids(
    dest: str, sid: str, image: np.ndarray, fused: np.ndarray, cfg: IngestConfig
) -> tuple[str, str, list[float]]:
    """The image's pyramid (and its 1/sqrt(2) companion) and the label's; (image URI, label
    URI, the image's level downsamples)."""
    slide_bytes, companion_bytes, downs = _tiff_bytes(image, cfg, label=False)
    label_bytes, _, _ = _tiff_bytes(fused, cfg, label=True)
    image_uri = storage.join(dest, "slides", f"{sid}.tif")
    label_uri = storage.join(dest, "labels", f"{sid}.tif")
    if companion_bytes is not None:  # first, so a reader never sees the slide without it
        storage.write_bytes(companion_uri(image_uri), companion_bytes)
    storage.write_bytes(image_uri, slide_bytes)
    storage.write_bytes(label_uri, label_bytes)
    return image_uri, label_uri, downs


def _write_cropped_map(
    src: str | None, dest: str, folder: str, sid: str, cfg: IngestConfig
) -> str | None:
    """A synthetic set's truth or cue map, cropped like the slide, into ``folder``; its URI
    (None where the source has none)."""
    if src is None:
        return None
    a = central_crop(decode_label(storage.read_bytes(src), src), cfg.crop_size)
    u = storage.join(dest, folder, f"{sid}.png")
    storage.write_bytes(u, encode_png(a))
    return u


# -- the whole set --------------------------------------------------------------------------


def ray_tasks(cfg: IngestConfig) -> Callable[[Callable, list], Iterable[SlideOutcome]]:
    """``ingest``'s ``map_fn`` over Ray tasks: a task whose worker dies after its retries fails
    only its slide."""

    def crashed(raw: RawSlide, exc: Exception) -> SlideOutcome:
        return SlideOutcome(
            raw.slide_id,
            "failed",
            error=f"{raw.image_uri}: worker failed: {type(exc).__name__}: {exc}",
        )

    def map_fn(fn: Callable, items: list) -> Iterable[SlideOutcome]:
        from foveation.raycluster import ray_map

        return ray_map(fn, items, num_cpus=cfg.task_cpus, desc="ingest", on_error=crashed)

    return map_fn


def serial_map(fn: Callable, items: Iterable) -> Iterable:
    """The one-process baseline of ``ingest``'s ``map_fn``."""
    for it in items:
        yield fn(it)


def ingest(
    source: str,
    dest: str,
    cfg: IngestConfig,
    num_classes: int = 4,
    map_fn: Callable[[Callable, list], Iterable[SlideOutcome]] = serial_map,
    log: Callable[[str], None] = print,
    kept_classes: tuple[int, ...] = (0, 1, 2),
    class_names: tuple[str, ...] = ("benign", "grade3", "grade4", "grade5"),
) -> IngestSummary:
    """Ingest every slide under ``source`` into ``dest`` and write the manifest last."""
    from foveation.data.slidelist import is_slide_list, scan_list

    t0 = time.perf_counter()
    slides = scan_list(source) if is_slide_list(source) else scan(source)
    log(f"ingest: {len(slides)} slides from {source}")
    summary = IngestSummary(dest, None)
    rows = []
    per_annotator: dict[int, ConfusionMatrix] = {}

    def one(raw: RawSlide) -> SlideOutcome:
        return ingest_slide(raw, dest, cfg, num_classes, tuple(class_names))

    for out in map_fn(one, slides):
        if out.status == "failed":
            summary.failed[out.slide_id] = out.error or "unknown error"
            log(f"  FAILED {out.slide_id}: {out.error}")
            continue
        (summary.ingested if out.status == "ingested" else summary.unchanged).append(out.slide_id)
        summary.megapixels += out.megapixels
        rows.append(out.row)
        for k, m in out.annotator_confusion.items():
            cm = per_annotator.setdefault(int(k), ConfusionMatrix(num_classes))
            cm.matrix += np.asarray(m, dtype=np.int64)
    summary.seconds = time.perf_counter() - t0
    if len(summary.failed) > cfg.max_error_fraction * len(slides) or not rows:
        raise IngestError(
            f"{len(summary.failed)} of {len(slides)} slides failed (more than data.ingest.max_error_fraction = "
            f"{cfg.max_error_fraction}); no manifest written.\n{summary.text()}"
        )
    patients = {s.slide_id: s.patient for s in slides}
    splits = assign_splits(
        [s.slide_id for s in slides],  # all of the source: a failure now reshuffles nothing
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.test_count,
        cfg.split_seed,
        groups=patients,  # one patient's cores never span two splits
    )
    for r in rows:
        r["split"] = splits[r["slide_id"]]
        r["patient"] = patients.get(r["slide_id"])
    rows.sort(key=lambda r: r["slide_id"])
    if per_annotator:
        summary.average_expert = average_expert(per_annotator, kept_classes, class_names)
    summary.manifest_uri = write_manifest(dest, rows)
    storage.write_bytes(
        storage.join(dest, SUMMARY_FILE), json.dumps(asdict(summary), indent=1).encode()
    )
    return summary
