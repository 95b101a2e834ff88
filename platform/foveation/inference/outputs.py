"""What a whole-slide job writes, out of core: a sink (``inference.sinks.Sink``) that spills
the label map and a 1/s class-probability map to memory-mapped files on local disk as rows
arrive, then the results: a pyramidal OME-TIFF label map (levels shrunk by mode, in SubIFDs),
the probability heatmap (one OME channel per class), the APSM, and GeoJSON polygons.

Memory stays bounded by a few rows of the slide: the label map lives in a file, the pyramid
is built by libvips streaming from that file, and polygons are traced tile by tile on the
label map shrunk by mode to at most ``geojson_max_side`` px a side, then merged per class.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from xml.sax.saxutils import escape

import numpy as np
import torch

from foveation.inference import geojson
from foveation.io import storage

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised from inside the inference loop when the job was cancelled."""


def ome_xml(
    width: int,
    height: int,
    channels: Sequence[str],
    pixel_type: str,
    name: str,
    mpp: float | None = None,
) -> str:
    """A minimal OME-XML header for a single image (XYCZT, one TIFF page per channel), with
    its physical pixel size (``mpp``, µm: OME's default unit) where it is known: what
    Bio-Formats (QuPath) lines a layer up with its slide by."""
    chans = "".join(
        f'<Channel ID="Channel:0:{i}" Name="{escape(c)}" SamplesPerPixel="1"/>'
        for i, c in enumerate(channels)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd">'
        f'<Image ID="Image:0" Name="{escape(name)}">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="{pixel_type}" '
        f'SizeX="{width}" SizeY="{height}" SizeC="{len(channels)}" SizeZ="1" SizeT="1"'
        + (f' PhysicalSizeX="{mpp:.6g}" PhysicalSizeY="{mpp:.6g}"' if mpp else "")
        + ">"
        f"{chans}<TiffData/></Pixels></Image></OME>"
    )


def write_ome_tiff(
    image,
    path: str,
    channels: Sequence[str],
    name: str,
    shrink: str,
    tile: int = 256,
    mpp: float | None = None,
) -> None:
    """A pyvips image (bands = channels) -> a pyramidal OME-TIFF at the local ``path``: each
    channel a page, each page's lower levels in SubIFDs, shrunk by ``shrink`` ("mode" for
    labels, "mean" for maps). ``mpp`` (µm per pixel of this image, where known) goes into the
    OME header and the TIFF resolution tags in centimetres, each level's its own
    (``scale_level_resolutions``), which OpenSlide, pyvips and tifffile read back; unknown,
    both stay out."""
    import pyvips

    w, h = image.width, image.height
    pixel_type = {"uchar": "uint8", "ushort": "uint16", "float": "float"}[image.format]
    if image.bands > 1:
        image = pyvips.Image.arrayjoin(image.bandsplit(), across=1)
    image = image.copy(xres=1000 / mpp, yres=1000 / mpp) if mpp else image.copy()
    image.set_type(pyvips.GValue.gint_type, "page-height", h)
    image.set_type(
        pyvips.GValue.gstr_type,
        "image-description",
        ome_xml(w, h, channels, pixel_type, name, mpp),
    )
    image.tiffsave(
        path,
        resunit="cm",
        tile=True,
        tile_width=tile,
        tile_height=tile,
        pyramid=True,
        subifd=True,
        region_shrink=shrink,
        compression="deflate",
        bigtiff=True,
    )
    if mpp:
        scale_level_resolutions(path)


def scale_level_resolutions(path: str) -> None:
    """Rewrite, in place, each reduced level's resolution tags to its own pixel size: libvips
    copies level 0's to every SubIFD, so a reader taking a lower level's scale from its tags
    would place it at the wrong size. The tags keep their size (RATIONAL), so nothing moves."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            x, y = (page.tags.get(t) for t in ("XResolution", "YResolution"))
            if x is None or y is None:
                continue
            for level in page.pages or []:
                down = page.imagewidth / level.imagewidth
                for tag, full in (("XResolution", x), ("YResolution", y)):
                    per_cm = full.value[0] / full.value[1] / down
                    level.tags[tag].overwrite((max(1, round(per_cm * 1000)), 1000))


class JobSink:
    """A sink for one whole-slide job; files go to ``workdir`` (local, deleted by the caller).

    ``progress(rows_done, rows_total)`` is called after every block of rows; ``cancelled()``
    is polled there too, and a True ends the inference with :class:`JobCancelled`."""

    def __init__(
        self,
        workdir: str,
        heat_scale: int,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        checkpoint: str | None = None,
        checkpoint_interval_s: float = 30.0,
        resume_key: str = "",
    ) -> None:
        """``checkpoint``: a storage prefix where the rows written so far are saved, every
        ``checkpoint_interval_s`` (0: after every block of rows), as compressed chunks of
        labels and heat-map rows plus a ``state.json`` naming them; ``begin`` restores them
        when the saved state has the same ``resume_key`` and shape, and sets ``resume_row``
        (inference then continues from there). The partial state lives in the store, so a
        job killed with its replica resumes on any other."""
        self.workdir, self.s = workdir, heat_scale
        self.progress, self.cancelled = progress, cancelled
        self.checkpoint, self.interval = checkpoint, checkpoint_interval_s
        self.resume_key = resume_key
        self.rows_written = 0
        self.resume_row = 0
        self.apsm: np.ndarray | None = None
        self.counts: np.ndarray | None = None

    # -- the Sink protocol ----------------------------------------------------------------
    def begin(self, height: int, width: int, num_classes: int) -> None:
        self.height, self.width, self.k = height, width, num_classes
        self.labels = np.lib.format.open_memmap(
            os.path.join(self.workdir, "labels.npy"),
            mode="w+",
            dtype=np.uint8,
            shape=(height, width),
        )
        s = self.s
        self.hh, self.hw = math.ceil(height / s), math.ceil(width / s)
        self.heat = np.lib.format.open_memmap(
            os.path.join(self.workdir, "heat.npy"),
            mode="w+",
            dtype=np.uint8,
            shape=(self.hh, self.hw, num_classes),
        )
        self._acc = torch.zeros((num_classes, self.hw * s))
        self._acc_rows = 0
        self._heat_row = 0
        self.counts = np.zeros(num_classes, np.int64)
        self._chunks: list[dict] = []
        self._saved_rows = self._saved_heat = 0
        self._last_save = time.monotonic()
        if self.checkpoint:
            self._restore()

    # -- checkpoints of the rows written (resumable jobs) --------------------------------
    def _shape(self) -> list[int]:
        return [self.height, self.width, self.k, self.s]

    def _restore(self) -> None:
        state_uri = storage.join(self.checkpoint, "state.json")
        if not storage.exists(state_uri):
            return
        state = json.loads(storage.read_bytes(state_uri))
        if state.get("key") != self.resume_key or state.get("shape") != self._shape():
            log.info("%s: a checkpoint of another model or shape; starting over", state_uri)
            return
        for c in state["chunks"]:
            data = storage.read_bytes(storage.join(self.checkpoint, c["file"]))
            with np.load(io.BytesIO(data)) as z:
                self.labels[c["rows"][0] : c["rows"][1]] = z["labels"]
                self.heat[c["heat"][0] : c["heat"][1]] = z["heat"]
                acc = z["acc"]  # the heat block still accumulating (the last chunk's counts)
        self._acc = torch.from_numpy(acc.copy())
        self._acc_rows = int(state["acc_rows"])
        self._chunks = list(state["chunks"])
        self.rows_written = self.resume_row = self._saved_rows = int(state["rows"])
        self._heat_row = self._saved_heat = int(state["heat_rows"])
        self.counts[:] = state["counts"]
        log.info("%s: resuming at row %d of %d", self.checkpoint, self.rows_written, self.height)

    def _maybe_save(self) -> None:
        """Save the rows written since the last save when the interval has passed, with the
        heat map's half-accumulated block of ``s`` rows (its sums: K x width floats)."""
        if (
            not self.checkpoint
            or self.rows_written in (self._saved_rows, self.height)
            or time.monotonic() - self._last_save < self.interval
        ):
            return
        a, b, ha, hb = self._saved_rows, self.rows_written, self._saved_heat, self._heat_row
        buf = io.BytesIO()
        np.savez_compressed(
            buf, labels=self.labels[a:b], heat=self.heat[ha:hb], acc=self._acc.numpy()
        )
        name = f"rows-{a:09d}-{b:09d}.npz"
        storage.write_bytes(storage.join(self.checkpoint, name), buf.getvalue())
        self._chunks.append({"file": name, "rows": [a, b], "heat": [ha, hb]})
        state = {
            "key": self.resume_key,
            "shape": self._shape(),
            "rows": b,
            "heat_rows": hb,
            "acc_rows": self._acc_rows,
            "counts": self.counts.tolist(),
            "chunks": self._chunks,
        }
        # The chunk first, then the state naming it: a kill in between loses one chunk.
        storage.write_bytes(storage.join(self.checkpoint, "state.json"), json.dumps(state).encode())
        self._saved_rows, self._saved_heat, self._last_save = b, hb, time.monotonic()

    def write_weights(self, weights: torch.Tensor, apsm: torch.Tensor) -> None:
        self.apsm = apsm.float().cpu().numpy()

    def write_rows(self, top: int, probs: torch.Tensor) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JobCancelled()
        if top != self.rows_written:
            raise RuntimeError(f"rows out of order: got {top}, expected {self.rows_written}")
        probs = probs.float().cpu()
        n = probs.shape[1]
        mask = probs.argmax(0).to(torch.uint8).numpy()
        mask[(probs.sum(0) == 0).numpy()] = NO_TISSUE  # glass that inference skipped
        self.labels[top : top + n] = mask
        self.counts += np.bincount(mask.ravel(), minlength=self.k)[: self.k]
        start = 0
        while start < n:  # heat rows: means of s x s blocks
            take = min(n - start, self.s - self._acc_rows)
            self._acc[:, : self.width] += probs[:, start : start + take].sum(1)
            self._acc_rows += take
            start += take
            if self._acc_rows == self.s:
                self._emit_heat_row()
        self.rows_written += n
        self._maybe_save()
        if self.progress is not None:
            self.progress(self.rows_written, self.height)

    def _emit_heat_row(self) -> None:
        s, w = self.s, self.width
        sums = self._acc.reshape(self.k, self.hw, s).sum(-1)
        cols = torch.full((self.hw,), float(s))
        cols[-1] = w - (self.hw - 1) * s
        mean = sums / (cols * self._acc_rows)
        self.heat[self._heat_row] = (mean.T * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        self._heat_row += 1
        self._acc.zero_()
        self._acc_rows = 0

    def close(self) -> None:
        if self._acc_rows:
            self._emit_heat_row()
        if self.rows_written != self.height:
            raise RuntimeError(f"sink closed after {self.rows_written} of {self.height} rows")
        self.labels.flush()
        self.heat.flush()

    # -- results --------------------------------------------------------------------------
    def fractions(self) -> list[float]:
        """Each class's share of the segmented (tissue) pixels."""
        total = max(1, int(self.counts.sum()))
        return [float(c) / total for c in self.counts]

    def tissue_fraction(self) -> float:
        """The share of the slide's pixels that were segmented (the rest is skipped glass)."""
        return float(self.counts.sum()) / max(1, self.width * self.height)

    def write_results(
        self,
        prefix: str,
        class_names: Sequence[str],
        geojson_max_side: int = 4096,
        geojson_tile: int = 1024,
        geojson_simplify_px: float = 0.0,
        level0_per_px: float = 1.0,
        mpp: float | None = None,
    ) -> dict[str, str]:
        """Write every result under the storage ``prefix``; returns name -> URI. ``mpp``: µm
        per label pixel (None: unknown); the probability map and the APSM are at 1/s of it."""
        import pyvips

        out = {}
        local = os.path.join(self.workdir, "out.tif")

        def publish(name: str, filename: str) -> None:
            uri = storage.join(prefix, filename)
            storage.upload_file(local, uri)
            os.unlink(local)
            out[name] = uri

        labels = _vips_from_memmap(self.labels, self.width, self.height, 1)
        coarse = mpp * self.s if mpp else None
        write_ome_tiff(labels, local, ["labels"], "labels", "mode", mpp=mpp)
        publish("labels", "labels.ome.tif")

        heat = _vips_from_memmap(self.heat, self.hw, self.hh, self.k)
        write_ome_tiff(
            heat, local, list(class_names), "class probabilities x255", "mean", mpp=coarse
        )
        publish("probabilities", "probabilities.ome.tif")

        if self.apsm is not None:
            a = np.ascontiguousarray(self.apsm.astype(np.float32))
            im = pyvips.Image.new_from_memory(a.data, a.shape[1], a.shape[0], 1, "float")
            # On x_r's grid, as the heat map: a pixel per s output px (the last one partial).
            write_ome_tiff(
                im, local, ["apsm_px"], "average patch size map (px)", "mean", mpp=coarse
            )
            publish("apsm", "apsm.ome.tif")

        uri = storage.join(prefix, "annotations.geojson")
        coll = self.geojson(
            class_names, geojson_max_side, geojson_tile, geojson_simplify_px, level0_per_px
        )
        storage.write_bytes(uri, geojson.dumps(coll))
        out["geojson"] = uri
        return out

    def geojson(
        self,
        class_names: Sequence[str],
        max_side: int,
        tile: int,
        simplify_px: float = 0.0,
        level0_per_px: float = 1.0,
    ) -> dict:
        """Polygons of the label map shrunk by mode by ``g`` (the least power of 2 that brings
        the longer side to ``max_side`` or less), traced per tile and merged across tiles per
        class: one valid MultiPolygon per class, in level-0 pixels."""
        g = 1
        while max(self.height, self.width) / g > max_side:
            g *= 2
        small = mode_shrink(self.labels, g, self.k)
        return geojson.feature_collection(
            geojson.tiled_features(small, class_names, tile, g * level0_per_px, simplify_px)
        )


NO_TISSUE = 255  # the label of pixels that are not segmented (skipped glass), as "unlabelled"


def mode_shrink(labels: np.ndarray, g: int, k: int, band_blocks: int = 64) -> np.ndarray:
    """The majority class of every g x g block (edge blocks partial), read in row bands."""
    h, w = labels.shape
    if g == 1:
        return np.array(labels)
    hh, ww = math.ceil(h / g), math.ceil(w / g)
    out = np.empty((hh, ww), np.uint8)
    pad_w = ww * g - w
    for b0 in range(0, hh, band_blocks):
        rows = labels[b0 * g : min(h, (b0 + band_blocks) * g)]
        nb = math.ceil(rows.shape[0] / g)
        blk = np.full((nb * g, ww * g), 255, np.uint8)
        blk[: rows.shape[0], :w] = rows
        if pad_w:
            blk[:, w:] = 255
        blk = blk.reshape(nb, g, ww, g)
        counts = np.stack([(blk == c).sum((1, 3)) for c in range(k)])
        out[b0 : b0 + nb] = np.where(counts.sum(0) > 0, counts.argmax(0), NO_TISSUE)
    return out


def _vips_from_memmap(mm: np.memmap, width: int, height: int, bands: int):
    """A pyvips image streaming from the file behind a uint8 ``open_memmap`` (raw after the
    .npy header), so libvips builds the pyramid without the map in memory."""
    import pyvips

    return pyvips.Image.rawload(mm.filename, width, height, bands, offset=mm.offset)


def model_resolution_source(reader, model_mpp: float | None):
    """(region source, output px per level-0 px, the mpp the output is at) for predicting
    ``reader``'s slide with a model trained at ``model_mpp``: the slide resampled when both
    declare an mpp and they differ by more than 0.1%, else level 0 as it is."""
    if model_mpp is None:
        return reader.as_source(0), 1.0, reader.mpp
    if reader.mpp is None:
        from foveation.io.slides import MPP_RANGE, SlideError

        raise SlideError(
            f"{reader.uri}: the slide gives no mpp the model can trust (no OME PhysicalSizeX, "
            f"Aperio MPP, or resolution in centimetres from {MPP_RANGE[0]} to {MPP_RANGE[1]} "
            f"µm/px), and the model was trained at {model_mpp:g} µm/px; expected the slide's "
            "mpp: predict from a slide list (CSV image_uri,mpp) that gives it"
        )
    scale = reader.mpp / model_mpp
    if abs(scale - 1.0) <= 1e-3:
        return reader.as_source(0), 1.0, model_mpp
    from foveation.io.slides import ScaledSource

    return ScaledSource(reader, scale), scale, model_mpp


def predict_slide(
    model,
    cfg,
    slide_uri: str,
    prefix: str,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    geojson_max_side: int = 4096,
    geojson_tile: int = 1024,
    geojson_simplify_px: float = 0.0,
    skip_background: bool = True,
    checkpoint_interval_s: float | None = None,
    resume_key: str = "",
    slide_mpp: float | None = None,
) -> tuple[dict[str, str], dict]:
    """Segment one slide read out of core from ``slide_uri`` and write its results under the
    storage ``prefix`` (``JobSink.write_results``): (name -> URI, summary). What a Serve slide
    job and ``jobs.predict`` both run for each slide. ``skip_background``: glass (no pixel
    darker than ``data.pipeline.tissue_threshold`` near a location) is not segmented; its
    labels are ``NO_TISSUE`` (255), its probabilities 0, and no GeoJSON covers it.
    ``checkpoint_interval_s``: the rows done are saved under ``<prefix>/partial/`` this often
    and a rerun with the same ``resume_key`` (the model) continues from them (``JobSink``);
    the partial state is removed once the results are written. None: no checkpoints.
    ``slide_mpp``: the slide's µm per pixel as its slide list gives it, over its metadata."""
    import tempfile
    import time

    from foveation.inference import segment
    from foveation.io.slides import SlideReader

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="foveation-slide-") as tmp:
        reader = SlideReader(slide_uri, mpp=slide_mpp)
        try:
            source, scale, mpp = model_resolution_source(reader, cfg.patches.mpp)
            partial = storage.join(prefix, "partial") if checkpoint_interval_s is not None else None
            sink = JobSink(
                tmp,
                cfg.patches.xr_scale,
                progress,
                cancelled,
                checkpoint=partial,
                checkpoint_interval_s=checkpoint_interval_s or 0.0,
                resume_key=f"{resume_key}|{slide_uri}|{cfg.patches}",
            )
            background = cfg.data.pipeline.tissue_threshold if skip_background else None
            stats = segment(model, source, cfg, sink, device=device, background=background)
        finally:
            reader.close()
        names = cfg.evaluation.class_names
        results = sink.write_results(
            prefix, names, geojson_max_side, geojson_tile, geojson_simplify_px, 1.0 / scale, mpp
        )
        if partial is not None:
            storage.remove_tree(partial)
        summary = {
            "slide_mpp": reader.mpp,
            "model_mpp": mpp,
            "scale": scale,  # output px per slide level-0 px (GeoJSON is in level-0 px)
            "width": sink.width,
            "height": sink.height,
            "class_fractions": dict(zip(names, sink.fractions(), strict=True)),
            "locations": stats.locations,  # segmented in this attempt
            "resumed_from_row": int(sink.resume_row),
            "tissue_fraction": round(float(sink.tissue_fraction()), 4),
            "seconds": round(time.time() - t0, 3),
        }
    return results, summary
